#!/usr/bin/env bash
# Create a TPU VM: a single host (v5p-8, v6e-8) or a pod slice (v5p-64, v6e-64, ...).
#
#   tpu/create.sh --accelerator v5p-64 --zone us-east5-a [--name NAME] [--project P] [--spot | --reserved]
#   tpu/create.sh --queued --accelerator v6e-64 --zone us-east5-b [--spot] [--no-wait]
#   tpu/create.sh ... --dry-run          # print the gcloud commands instead of running them
#
# Without --queued this is `gcloud compute tpus tpu-vm create`. With --queued it asks for the slice through a
# queued resource (`gcloud compute tpus queued-resources create`, the way v5p and v6e capacity is usually
# granted) and then waits until the resource is ACTIVE (--no-wait returns at once). Common flags and their
# environment variables: tpu/common.sh.
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "$0")/common.sh"

QUEUED=0
WAIT=1
TIER=()
parse_common "$@"
set -- "${REST[@]+"${REST[@]}"}"
while (($#)); do
  case "$1" in
    --queued) QUEUED=1 ;;
    --no-wait) WAIT=0 ;;
    --spot) TIER+=(--spot) ;;
    --reserved) TIER+=(--reserved) ;;
    -h | --help) sed -n '2,12p' "$0"; exit 0 ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done

location_flags
if [[ "$QUEUED" == 1 ]]; then
  run "$GCLOUD" compute tpus queued-resources create "$TPU_NAME" "${LOCATION[@]}" --node-id="$TPU_NAME" \
    --accelerator-type="$TPU_ACCELERATOR" --runtime-version="$TPU_RUNTIME" "${TIER[@]+"${TIER[@]}"}"
  if [[ "$WAIT" == 1 ]]; then
    describe=("$GCLOUD" compute tpus queued-resources describe "$TPU_NAME" "${LOCATION[@]}" --format="value(state.state)")
    if [[ "$TPU_DRY_RUN" == 1 ]]; then
      run "${describe[@]}"
      echo "# (repeated every 30 s until it prints ACTIVE)"
    else
      while true; do
        state="$("${describe[@]}")"
        echo "queued resource $TPU_NAME: $state" >&2
        case "$state" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $TPU_NAME is $state" ;;
        esac
        sleep 30
      done
    fi
  fi
else
  run "$GCLOUD" compute tpus tpu-vm create "$TPU_NAME" "${LOCATION[@]}" --accelerator-type="$TPU_ACCELERATOR" \
    --version="$TPU_RUNTIME" "${TIER[@]+"${TIER[@]}"}"
fi
echo "# $TPU_NAME: $TPU_ACCELERATOR, $(worker_count "$TPU_ACCELERATOR") worker(s); next: tpu/install.sh --name $TPU_NAME --zone $TPU_ZONE" >&2
