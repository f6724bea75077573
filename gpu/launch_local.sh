#!/usr/bin/env bash
# Run a config on the GPUs of this machine: one process drives all of them (one JAX mesh over every local GPU).
#
#   gpu/launch_local.sh --config FILE [--cmd sft|rl|pipeline|eval] [--gpus 0,1,2,3] [--log FILE] [--resume]
#                       [--dry-run] [key=value ...]
#
# --cmd defaults to the config's `kind:` (read with $PYTHON, through its `base:` files). --gpus limits
# the run to some GPUs (CUDA_VISIBLE_DEVICES); the config's mesh must then match that count. --log tees
# the output to FILE. SFTRL_JAX_NUM_PROCESSES=1 keeps the run single-process even inside a SLURM
# allocation; XLA_PYTHON_CLIENT_MEM_FRACTION (default here 0.90) is how much of each GPU JAX takes.
# Install first: pip install -e '.[cuda]' (CUDA 12 wheels, NVIDIA driver >= 525) or '.[cuda13]' (driver >= 580).
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

GPUS=""
LOG=""
parse_run_args "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --gpus) GPUS="${2:?--gpus needs a list like 0,1,2,3}"; shift ;;
    --log) LOG="${2:?--log needs a file}"; shift ;;
    -h | --help) sed -n '2,11p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (overrides are key=value)" ;;
  esac
  shift
done
[[ -z "$GPUS" || "$GPUS" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus: expected a list like 0,1,2,3"
[[ "$DRY_RUN" == 1 || -f "$CONFIG" ]] || die "config file not found: $CONFIG"
resolve_cmd

env_vars=(SFTRL_JAX_NUM_PROCESSES=1 XLA_PYTHON_CLIENT_MEM_FRACTION="$MEM_FRACTION")
if [[ -n "$GPUS" ]]; then
  env_vars+=(CUDA_VISIBLE_DEVICES="$GPUS")
fi
command=(env "${env_vars[@]}" "$PYTHON" -m sftrl_jax.cli "$CMD" --config "$CONFIG" "${RESUME[@]+"${RESUME[@]}"}"
  "${OVERRIDES[@]+"${OVERRIDES[@]}"}")
if [[ -n "$LOG" ]]; then
  if [[ "$DRY_RUN" == 1 ]]; then
    echo "$(quote_words "${command[@]}") 2>&1 | tee $(quote_word "$LOG")"
  else
    mkdir -p "$(dirname "$LOG")"
    run "${command[@]}" 2>&1 | tee "$LOG"
  fi
else
  run "${command[@]}"
fi
