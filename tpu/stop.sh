#!/usr/bin/env bash
# Stop a run started by tpu/launch.sh on every worker (kills the pid it recorded).
#
#   tpu/stop.sh [--run NAME|latest] [--dry-run]
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

RUN=latest
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --run) RUN="${2:?--run needs a name}"; shift ;;
    -h | --help) sed -n '2,4p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
pid_file="$(shell_quote "$TPU_LOG_DIR/$RUN/pid")"
tpu_ssh all "if [ -f $pid_file ]; then kill \$(cat $pid_file) 2>/dev/null && echo stopped || echo 'not running'; else echo 'no pid file'; fi"
