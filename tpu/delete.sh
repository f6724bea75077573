#!/usr/bin/env bash
# Delete a TPU VM (or, with --queued, its queued resource and the nodes in it).
#
#   tpu/delete.sh [--name NAME] [--zone ZONE] [--project P] [--queued] [--yes] [--dry-run]
#
# gcloud asks for confirmation unless --yes is given.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
QUIET=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1 ;;
    --yes) QUIET=(--quiet) ;;
    -h | --help) sed -n '2,6p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
location_flags
if [[ "$QUEUED" == 1 ]]; then
  run "$GCLOUD" compute tpus queued-resources delete "$TPU_NAME" "${LOCATION[@]}" --force "${QUIET[@]+"${QUIET[@]}"}"
else
  run "$GCLOUD" compute tpus tpu-vm delete "$TPU_NAME" "${LOCATION[@]}" "${QUIET[@]+"${QUIET[@]}"}"
fi
