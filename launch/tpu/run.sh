#!/usr/bin/env bash
# Creates a TPU VM (or pod slice), copies this repo, installs it, runs the main job on
# every worker, fetches the results and deletes the VM.
#
#   DRY_RUN=1 launch/tpu/run.sh --config=configs/default.py    # print the commands only
#   TPU_NAME=sj-v4 ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu/run.sh --config=configs/glue_rte.py --config.data.data_dir=gs://my-bucket/tfds
#
# The workdir is on GCS (orbax writes multi-host checkpoints there); only process 0
# writes the report. Keep the VM with KEEP=1.
set -euo pipefail
TPU_NAME=${TPU_NAME:-simfluence-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
VERSION=${VERSION:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:-gs://YOUR_BUCKET}
WORKDIR=${WORKDIR:-${BUCKET}/simfluence_jax/$(date +%Y%m%d-%H%M%S)}
repo=$(cd "$(dirname "$0")/../.." && pwd)

run() {
  echo "+ $*"
  if [[ -z "${DRY_RUN:-}" ]]; then "$@"; fi
}

run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR}" --version="${VERSION}"
run gcloud compute tpus tpu-vm scp --recurse "${repo}" "${TPU_NAME}":~/simfluence_jax \
  --zone="${ZONE}" --worker=all
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command \
  "cd ~/simfluence_jax && pip install -q -e . 'jax[tpu]' && python3 -m simfluence_jax.main $* --config.distributed=True --workdir=${WORKDIR}"
run gsutil -m cp -r "${WORKDIR}/report.md" "${WORKDIR}/metrics.json" "${WORKDIR}/plots" .
if [[ -z "${KEEP:-}" ]]; then
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
fi
