#!/usr/bin/env bash
# Run a shell command on TPU workers (all of them unless --worker says otherwise).
#
#   tpu/ssh.sh [--worker all|0|1-3] [--dry-run] -- COMMAND [ARGS...]
#   tpu/ssh.sh -- 'sudo mkdir -p /models && sudo chown $USER /models && gsutil -m cp -r gs://BUCKET/Qwen3-0.6B /models/'
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

WORKER=all
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    --) shift; break ;;
    -h | --help) sed -n '2,5p' "$0"; exit 0 ;;
    *) break ;;
  esac
  shift
done
(($#)) || die "no command given (tpu/ssh.sh -- COMMAND)"
tpu_ssh "$WORKER" "$*"
