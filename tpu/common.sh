#!/usr/bin/env bash
# Shared settings and helpers for the tpu/*.sh scripts (sourced, not run).
#
# Settings come from environment variables, overridden by the common flags every script accepts:
#   --name NAME            TPU_NAME            TPU VM (and queued resource) name   [sftrl-jax]
#   --project PROJECT      TPU_PROJECT         GCP project            [gcloud's configured project]
#   --zone ZONE            TPU_ZONE            zone                                [us-east5-a]
#   --accelerator TYPE     TPU_ACCELERATOR     accelerator type, e.g. v5p-64       [v5p-8]
#   --runtime VERSION      TPU_RUNTIME         runtime version             [derived from the type]
#   --dry-run              TPU_DRY_RUN=1       print the commands instead of running them
# and, for what runs on the workers:
#   TPU_REMOTE_DIR   checkout on every worker, relative to the home directory     [sftrl_jax]
#   TPU_LOG_DIR      run logs, configs and pid files on every worker, likewise    [sftrl_logs]
#   TPU_PYTHON       Python on the workers                     [python3]
# and, on this machine:
#   PYTHON           Python with sftrl_jax importable (pip install -e .): launch.sh reads the
#                    config's kind and merges its base: files with it          [python3]

set -euo pipefail

TPU_NAME="${TPU_NAME:-sftrl-jax}"
TPU_PROJECT="${TPU_PROJECT:-}"
TPU_ZONE="${TPU_ZONE:-us-east5-a}"
TPU_ACCELERATOR="${TPU_ACCELERATOR:-v5p-8}"
TPU_RUNTIME="${TPU_RUNTIME:-}"
TPU_DRY_RUN="${TPU_DRY_RUN:-0}"
TPU_REMOTE_DIR="${TPU_REMOTE_DIR:-sftrl_jax}"
TPU_LOG_DIR="${TPU_LOG_DIR:-sftrl_logs}"
TPU_PYTHON="${TPU_PYTHON:-python3}"
PYTHON="${PYTHON:-python3}"
GCLOUD="${GCLOUD:-gcloud}"
# shellcheck disable=SC2034  # used by the scripts that source this file
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# Runtime version for an accelerator type (Cloud TPU's "TPU software versions" page: v6e -> v2-alpha-tpuv6e,
# v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite, v4 and older -> tpu-ubuntu2204-base).
default_runtime() {
  case "$1" in
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v5litepod-* | v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "no default runtime version for accelerator type '$1'; pass --runtime" ;;
  esac
}

# Hosts (workers) of a slice: v5p and v4 names count TensorCores (2 per chip, 4 chips per host), v6e and v5e
# names count chips (a single-host VM holds up to 8, multi-host slices 4 per host).
worker_count() {
  local type="$1" size="${1##*-}"
  case "$type" in
    v5p-* | v4-*) echo $(((size + 7) / 8)) ;;
    v6e-* | v5litepod-* | v5e-*) if ((size <= 8)); then echo 1; else echo $((size / 4)); fi ;;
    *) echo 1 ;;
  esac
}

# Parse the common flags out of "$@"; the rest is left in REST (an array).
REST=()
parse_common() {
  while (($#)); do
    case "$1" in
      --name) TPU_NAME="${2:?--name needs a value}"; shift 2 ;;
      --project) TPU_PROJECT="${2:?--project needs a value}"; shift 2 ;;
      --zone) TPU_ZONE="${2:?--zone needs a value}"; shift 2 ;;
      --accelerator) TPU_ACCELERATOR="${2:?--accelerator needs a value}"; shift 2 ;;
      --runtime) TPU_RUNTIME="${2:?--runtime needs a value}"; shift 2 ;;
      --dry-run) TPU_DRY_RUN=1; shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  if [[ -z "$TPU_RUNTIME" ]]; then
    TPU_RUNTIME="$(default_runtime "$TPU_ACCELERATOR")"
  fi
}

# Flags every gcloud tpu command takes: --zone and, when set, --project.
location_flags() {
  LOCATION=(--zone="$TPU_ZONE")
  if [[ -n "$TPU_PROJECT" ]]; then
    LOCATION+=(--project="$TPU_PROJECT")
  fi
}

# One word quoted for a POSIX shell: as it is when it is safe, else in single quotes.
quote_word() {
  local word="$1" q="'"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\$q$q}"
  fi
}

# Run a command, or with --dry-run print it (shell-quoted, one line, copy-pasteable) instead.
run() {
  if [[ "$TPU_DRY_RUN" == 1 ]]; then
    local word line=""
    for word in "$@"; do
      line+="$(quote_word "$word") "
    done
    echo "${line% }"
  else
    echo "+ $*" >&2
    "$@"
  fi
}

# Run a command string on TPU workers: tpu_ssh WORKERS COMMAND (WORKERS: all, 0, 1-3, ...).
tpu_ssh() {
  local workers="$1" command="$2"
  location_flags
  run "$GCLOUD" compute tpus tpu-vm ssh "$TPU_NAME" "${LOCATION[@]}" --worker="$workers" --command="$command"
}

# Write config SOURCE with its `base:` includes merged in (sftrl_jax.config.read_yaml, with $PYTHON) to
# TARGET, a file that stands alone on the workers; print its `kind:` (empty when it declares none).
resolve_config() {
  "$PYTHON" -c '
import sys
import yaml
from sftrl_jax.config import ConfigError, read_yaml
source, target = sys.argv[1:]
try:
    data = read_yaml(source)
except (OSError, ConfigError) as err:
    sys.exit(str(err))
with open(target, "w") as out:
    out.write(f"# {source} with its base: includes merged in (tpu/launch.sh)\n")
    out.write(yaml.safe_dump(data, sort_keys=False))
kind = data.get("kind")
print(kind if isinstance(kind, str) else "")
' "$1" "$2"
}

# Quote one word for a remote shell command line.
shell_quote() {
  quote_word "$1"
}
