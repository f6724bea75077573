#!/usr/bin/env bash
# Install this checkout on every worker of a TPU VM (--worker=all).
#
#   tpu/install.sh [--name NAME] [--zone ZONE] [--project P] [--extras tpu] [--clean] [--dry-run]
#
# Packs the working tree (tracked files and untracked files git does not ignore, so local edits travel
# too), copies the archive to every worker, unpacks it into $TPU_REMOTE_DIR (default ~/sftrl_jax) and runs
# `pip install -e '.[tpu]'` there. --clean empties that folder first. Model weights and data are not
# copied: put them on every worker (tpu/ssh.sh -- gsutil -m cp -r gs://BUCKET/models/X /models/) or on a
# shared mount.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

EXTRAS=tpu
CLEAN=0
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --extras) EXTRAS="${2:?--extras needs a value}"; shift ;;
    --clean) CLEAN=1 ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

ARCHIVE="${TMPDIR:-/tmp}/sftrl_jax-$TPU_NAME.tar.gz"
REMOTE_ARCHIVE="sftrl_jax-src.tar.gz"
LIST="${ARCHIVE%.tar.gz}.files"
if [[ "$TPU_DRY_RUN" == 1 ]]; then
  echo "# git -C $(shell_quote "$REPO_ROOT") ls-files -z --cached --others --exclude-standard > $(shell_quote "$LIST")"
  echo "# tar -C $(shell_quote "$REPO_ROOT") --null -T $(shell_quote "$LIST") --ignore-failed-read -czf $(shell_quote "$ARCHIVE")"
else
  git -C "$REPO_ROOT" ls-files -z --cached --others --exclude-standard >"$LIST"
  tar -C "$REPO_ROOT" --null -T "$LIST" --ignore-failed-read -czf "$ARCHIVE"
  echo "packed $(tr -cd '\0' <"$LIST" | wc -c) files into $ARCHIVE" >&2
fi

location_flags
run "$GCLOUD" compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$REMOTE_ARCHIVE" "${LOCATION[@]}" --worker=all
dir="$(shell_quote "$TPU_REMOTE_DIR")"
remote="set -e"
if [[ "$CLEAN" == 1 ]]; then
  remote+=" && rm -rf $dir"
fi
remote+=" && mkdir -p $dir && tar -xzf $REMOTE_ARCHIVE -C $dir && rm $REMOTE_ARCHIVE && cd $dir"
remote+=" && $TPU_PYTHON -m pip install --upgrade pip && $TPU_PYTHON -m pip install -e $(shell_quote ".[$EXTRAS]")"
remote+=" && $TPU_PYTHON -c 'import jax, sftrl_jax; print(\"jax\", jax.__version__)'"
tpu_ssh all "$remote"
