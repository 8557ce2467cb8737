#!/usr/bin/env bash
# Runs the main job as N processes on this machine (CPU, gloo collectives), the way a
# multi-host pod runs it: each process calls jax.distributed.initialize() against a
# coordinator on 127.0.0.1. For development and CI.
#
#   launch/local.sh 2 --config=configs/default.py:tiny --workdir=/tmp/sj_2proc
#
# Env: SJ_PORT (coordinator port, default 12355), SJ_LOCAL_DEVICES (forced host devices
# per process, default 2), SJ_LOG_DIR (if set, process i logs to $SJ_LOG_DIR/process_i.log
# instead of the terminal), SJ_PYTHON (interpreter, default python3), SJ_STOP_GRACE_S
# (seconds between SIGTERM and SIGKILL when stopping the processes, default 5). If one
# process fails the others are stopped (they would otherwise wait in a collective for
# the missing peer) and its exit status is returned.
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
  (
    if [[ -n "${SJ_LOG_DIR:-}" ]]; then
      mkdir -p "${SJ_LOG_DIR}"
      exec >>"${SJ_LOG_DIR}/process_${i}.log" 2>&1
    fi
    SJ_COORDINATOR="127.0.0.1:${port}" SJ_NUM_PROCESSES="${num_processes}" \
    SJ_PROCESS_ID="${i}" \
    XLA_FLAGS="--xla_force_host_platform_device_count=${devices} ${XLA_FLAGS:-}" \
      exec "${SJ_PYTHON:-python3}" -m simfluence_jax.main "$@" --config.distributed=True
  ) &
  pids+=($!)
done
stop_all() {
  # A process blocked in a collective may not react to SIGTERM: SIGKILL after a grace.
  for pid in "${pids[@]}"; do kill "${pid}" 2>/dev/null || true; done
  sleep "${SJ_STOP_GRACE_S:-5}"
  for pid in "${pids[@]}"; do kill -9 "${pid}" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM
status=0
running=("${pids[@]}")
while ((${#running[@]} > 0)); do
  code=0
  finished=""
  wait -n -p finished "${running[@]}" || code=$?
  rest=()
  for pid in "${running[@]}"; do [[ "${pid}" == "${finished}" ]] || rest+=("${pid}"); done
  running=("${rest[@]+"${rest[@]}"}")
  if [[ "${code}" -ne 0 && "${status}" -eq 0 ]]; then
    echo "launch/local.sh: a process exited with status ${code}; stopping the others" >&2
    status=${code}
    stop_all
    # Every process is stopped now, some perhaps reaped during stop_all's grace: a
    # further `wait -n` on them would find no such job (and leave `finished` unset).
    wait 2>/dev/null || true
    break
  fi
done
exit "${status}"
