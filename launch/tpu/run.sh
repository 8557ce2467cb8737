#!/usr/bin/env bash
# Plans the job for the slice (locally, before any VM exists), then creates a TPU VM
# (or pod slice), copies this repo, installs it, runs the main job on every worker,
# fetches the results and deletes the VM.
#
#   DRY_RUN=1 launch/tpu/run.sh --config=configs/default.py    # plan, print the commands
#   TPU_NAME=sj-v4 ZONE=us-central2-b ACCELERATOR=v4-32 BUCKET=gs://my-bucket \
#     launch/tpu/run.sh --config=configs/glue_rte.py --config.data.data_dir=gs://my-bucket/tfds
#
# The plan (`python -m simfluence_jax.plan`, needs libtpu locally: pip install -e
# ".[tpu]") compiles every stage for the slice's topology (TOPOLOGY, default: the
# ACCELERATOR type) and the script refuses to create a VM when a stage does not fit
# (or the plan cannot run); it prints the stage and a config change that fits.
# SKIP_PLAN=1 skips it. The plan creates nothing, so DRY_RUN runs it too.
#
# The workdir is on GCS (orbax writes multi-host checkpoints there); only process 0
# writes the report. Keep the VM with KEEP=1.
set -euo pipefail
TPU_NAME=${TPU_NAME:-simfluence-jax}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-8}
TOPOLOGY=${TOPOLOGY:-${ACCELERATOR}}
VERSION=${VERSION:-tpu-ubuntu2204-base}
BUCKET=${BUCKET:-gs://YOUR_BUCKET}
WORKDIR=${WORKDIR:-${BUCKET}/simfluence_jax/$(date +%Y%m%d-%H%M%S)}
PYTHON=${PYTHON:-python3}
repo=$(cd "$(dirname "$0")/../.." && pwd)

run() {
  echo "+ $*"
  if [[ -z "${DRY_RUN:-}" ]]; then "$@"; fi
}

if [[ -z "${SKIP_PLAN:-}" ]]; then
  echo "+ ${PYTHON} -m simfluence_jax.plan $* --topology=${TOPOLOGY}"
  status=0
  (cd "${repo}" && "${PYTHON}" -m simfluence_jax.plan "$@" --topology="${TOPOLOGY}") \
    || status=$?
  if [[ ${status} -ne 0 ]]; then
    case ${status} in
      3) echo "run.sh: a stage does not fit ${TOPOLOGY} (see the plan above);" \
              "not creating ${TPU_NAME}." >&2 ;;
      4) echo "run.sh: cannot plan without libtpu; install it or set SKIP_PLAN=1;" \
              "not creating ${TPU_NAME}." >&2 ;;
      *) echo "run.sh: the plan failed (exit ${status}); not creating ${TPU_NAME}." >&2 ;;
    esac
    exit "${status}"
  fi
fi

run gcloud compute tpus tpu-vm create "${TPU_NAME}" --zone="${ZONE}" \
  --accelerator-type="${ACCELERATOR}" --version="${VERSION}"
run gcloud compute tpus tpu-vm scp --recurse "${repo}" "${TPU_NAME}":~/simfluence_jax \
  --zone="${ZONE}" --worker=all
run gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" --worker=all --command \
  "cd ~/simfluence_jax && pip install -q -e '.[gcs,report]' 'jax[tpu]' && python3 -m simfluence_jax.main $* --config.distributed=True --workdir=${WORKDIR}"
run gsutil -m cp -r "${WORKDIR}/report.md" "${WORKDIR}/metrics.json" "${WORKDIR}/plots" .
if [[ -z "${KEEP:-}" ]]; then
  run gcloud compute tpus tpu-vm delete "${TPU_NAME}" --zone="${ZONE}" --quiet
fi
