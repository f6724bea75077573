#!/usr/bin/env bash
# Stream a run's log from TPU workers.
#
#   tpu/logs.sh [--run NAME|latest] [--worker 0|all|1-3] [--lines N] [--no-follow] [--dry-run]
#
# Worker 0 (JAX process 0) writes the metrics and the progress bar; --worker all interleaves every
# worker's log. --no-follow prints the last lines and returns.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

RUN=latest
WORKER=0
LINES=100
FOLLOW=1
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a name}"; shift ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    --lines) LINES="${2:?--lines needs a number}"; shift ;;
    --no-follow) FOLLOW=0 ;;
    -h | --help) sed -n '2,8p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
[[ "$LINES" =~ ^[0-9]+$ ]] || die "--lines needs a number"
follow=""
if [[ "$FOLLOW" == 1 ]]; then
  follow=" -F"
fi
tpu_ssh "$WORKER" "tail -n $LINES$follow $(shell_quote "$TPU_LOG_DIR/$RUN/worker.log")"
