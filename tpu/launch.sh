#!/usr/bin/env bash
# Launch a config on every worker of a TPU VM: the same command on all hosts, one process per host.
#
#   tpu/launch.sh --config FILE [--cmd sft|rl|pipeline|eval] [--run NAME] [--resume] [--env KEY=VALUE]...
#                 [--foreground] [--dry-run] [key=value ...]
#
# Copies FILE, with its `base:` includes merged in, to every worker ($TPU_LOG_DIR/RUN/config.yaml), then starts
#   python3 -m sftrl_jax.cli CMD --config $TPU_LOG_DIR/RUN/config.yaml key=value ...
# in the checkout that tpu/install.sh made, detached (nohup), with each worker's output in
# $TPU_LOG_DIR/RUN/worker.log and its pid in $TPU_LOG_DIR/RUN/pid; $TPU_LOG_DIR/latest points at RUN.
# Follow it with tpu/logs.sh, stop it with tpu/stop.sh. --foreground instead streams every worker's
# output here and returns when the run ends. The workers find each other without any setting on a TPU
# slice (JAX's TPU cluster detection); --env SFTRL_JAX_COORDINATOR_ADDRESS=... etc. override it.
# --cmd defaults to the config's `kind:`. Reading the config needs Python with sftrl_jax here ($PYTHON,
# default python3); the merged copy is written to $TMPDIR, also with --dry-run.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

CONFIG=""
CMD=""
RUN=""
RESUME=0
FOREGROUND=0
ENVS=()
OVERRIDES=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --config) CONFIG="${2:?--config needs a file}"; shift ;;
    --cmd) CMD="${2:?--cmd needs a value}"; shift ;;
    --run) RUN="${2:?--run needs a name}"; shift ;;
    --resume) RESUME=1 ;;
    --foreground) FOREGROUND=1 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE"; ENVS+=("$2"); shift ;;
    -h | --help) sed -n '2,15p' "$0"; exit 0 ;;
    *=*) OVERRIDES+=("$1") ;;
    *) die "unknown argument '$1' (overrides are key=value)" ;;
  esac
  shift
done
[[ -n "$CONFIG" ]] || die "--config FILE is required"
[[ -f "$CONFIG" ]] || die "config file not found: $CONFIG"
if [[ -z "$RUN" ]]; then
  RUN="$(basename "$CONFIG" .yaml)-$(date +%Y%m%d-%H%M%S)"
fi
[[ "$RUN" =~ ^[A-Za-z0-9._-]+$ ]] || die "--run: use letters, digits, '.', '_' and '-' only"
# the workers get one file: the config with its base: includes merged in
resolved="${TMPDIR:-/tmp}/sftrl_jax-$TPU_NAME-$RUN.yaml"
kind="$(resolve_config "$CONFIG" "$resolved")" || die "could not read $CONFIG with $PYTHON (needs sftrl_jax: pip install -e .)"
if [[ -z "$CMD" ]]; then
  CMD="$kind"
  [[ -n "$CMD" ]] || die "$CONFIG declares no 'kind:' (sft, rl, pipeline or eval): add one or pass --cmd"
elif [[ -n "$kind" && "$kind" != "$CMD" ]]; then
  die "$CONFIG is a '$kind' config, not '$CMD' (drop --cmd or pass --cmd $kind)"
fi
case "$CMD" in
  sft | rl | pipeline | eval) ;;
  *) die "the command must be sft, rl, pipeline or eval (got '$CMD')" ;;
esac
if [[ "$TPU_DRY_RUN" == 1 ]]; then
  echo "# wrote $(shell_quote "$resolved"): $(shell_quote "$CONFIG") with its base: includes merged in"
fi

log_dir="$(shell_quote "$TPU_LOG_DIR")"
run_dir="$log_dir/$RUN"
tpu_ssh all "mkdir -p $run_dir && ln -sfn $RUN $log_dir/latest"
location_flags
run "$GCLOUD" compute tpus tpu-vm scp "$resolved" "$TPU_NAME:$TPU_LOG_DIR/$RUN/config.yaml" "${LOCATION[@]}" --worker=all

command="$TPU_PYTHON -m sftrl_jax.cli $CMD --config \"\$HOME\"/$run_dir/config.yaml"
if [[ "$RESUME" == 1 ]]; then
  command+=" --resume"
fi
for override in "${OVERRIDES[@]+"${OVERRIDES[@]}"}"; do
  command+=" $(shell_quote "$override")"
done
exports=""
for env in "${ENVS[@]+"${ENVS[@]}"}"; do
  exports+="export $(shell_quote "${env%%=*}")=$(shell_quote "${env#*=}") && "
done
log="\"\$HOME\"/$run_dir/worker.log"
if [[ "$FOREGROUND" == 1 ]]; then
  tpu_ssh all "cd $(shell_quote "$TPU_REMOTE_DIR") && ${exports}$command 2>&1 | tee $log"
else
  tpu_ssh all "cd $(shell_quote "$TPU_REMOTE_DIR") && ${exports}nohup $command > $log 2>&1 < /dev/null & echo \$! > \"\$HOME\"/$run_dir/pid"
  echo "# started run $RUN on every worker of $TPU_NAME; follow it: tpu/logs.sh --name $TPU_NAME --zone $TPU_ZONE --run $RUN" >&2
fi
