#!/usr/bin/env bash
# Shared helpers for gpu/launch_local.sh and gpu/slurm_multinode.sbatch (sourced, not run).

set -euo pipefail

DRY_RUN="${DRY_RUN:-0}"
PYTHON="${PYTHON:-python}"
# JAX preallocates this share of each GPU's memory (its own default is 0.75; the configs in configs/gpu/
# are sized against the whole 80 GB, see docs/scaling.md)
# shellcheck disable=SC2034  # used by the scripts that source this file
MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"

die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# One word quoted for a POSIX shell: as it is when it is safe, else in single quotes.
quote_word() {
  local word="$1" q="'"
  if [[ -n "$word" && "$word" =~ ^[A-Za-z0-9_./=:,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//$q/$q\\\\$q$q}"
  fi
}

quote_words() {
  local word line=""
  for word in "$@"; do
    line+="$(quote_word "$word") "
  done
  printf '%s' "${line% }"
}

# Run a command, or with --dry-run print it (one line, copy-pasteable) instead.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_words "$@"
    echo
  else
    echo "+ $(quote_words "$@")" >&2
    "$@"
  fi
}

# Parse the run arguments shared by both launchers into CONFIG, CMD, RESUME, OVERRIDES; the rest into REST.
# shellcheck disable=SC2034  # RESUME and OVERRIDES are used by the scripts that source this file
CONFIG=""
CMD=""
RESUME=()
OVERRIDES=()
REST=()
# shellcheck disable=SC2034
parse_run_args() {
  while (($#)); do
    case "$1" in
      --config) CONFIG="${2:?--config needs a file}"; shift 2 ;;
      --cmd) CMD="${2:?--cmd needs a value}"; shift 2 ;;
      --resume) RESUME=(--resume); shift ;;
      --dry-run) DRY_RUN=1; shift ;;
      *=*) OVERRIDES+=("$1"); shift ;;
      *) REST+=("$1"); shift ;;
    esac
  done
  [[ -n "$CONFIG" ]] || die "--config FILE is required"
}

# The `kind:` a config file declares (sft, rl, pipeline or eval; through its `base:` includes), read by
# sftrl_jax.config with $PYTHON; empty when it declares none.
read_config_kind() {
  "$PYTHON" -c '
import sys
from sftrl_jax.config import ConfigError, config_kind
try:
    print(config_kind(sys.argv[1]) or "")
except (OSError, ConfigError) as err:
    sys.exit(str(err))
' "$1"
}

# CMD from the config's `kind:` unless --cmd gave it; then check it.
resolve_cmd() {
  if [[ -z "$CMD" ]]; then
    [[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
    CMD="$(read_config_kind "$CONFIG")" || die "could not read the kind of $CONFIG with $PYTHON (pass --cmd)"
    [[ -n "$CMD" ]] || die "$CONFIG declares no 'kind:' (sft, rl, pipeline or eval): add one or pass --cmd"
  fi
  case "$CMD" in
    sft | rl | pipeline | eval) ;;
    *) die "the command must be sft, rl, pipeline or eval (got '$CMD')" ;;
  esac
}
