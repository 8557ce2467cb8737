#!/usr/bin/env bash
# Runs the main job as N processes on this machine (CPU, gloo collectives), the way a
# multi-host pod runs it: each process calls jax.distributed.initialize() against a
# coordinator on 127.0.0.1. For development and CI.
#
#   launch/local.sh 2 --config=configs/default.py:tiny --workdir=/tmp/sj_2proc
#
# Env: SJ_PORT (coordinator port, default 12355), SJ_LOCAL_DEVICES (forced host devices
# per process, default 2).
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: launch/local.sh NUM_PROCESSES [simfluence_jax.main flags...]" >&2
  exit 2
fi
num_processes=$1; shift
port=${SJ_PORT:-12355}
devices=${SJ_LOCAL_DEVICES:-2}
pids=()
for ((i = 0; i < num_processes; i++)); do
  SJ_COORDINATOR="127.0.0.1:${port}" SJ_NUM_PROCESSES="${num_processes}" SJ_PROCESS_ID="${i}" \
  XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
    python3 -m simfluence_jax.main "$@" --config.distributed=True &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
exit "${status}"
