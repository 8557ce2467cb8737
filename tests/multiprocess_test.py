"""The main job as 2 processes x 2 CPU devices (gloo) equals the single-process run.

Both use 4 devices in all, so each process-independent computation has the same
per-device shapes; what differs is exactly the multi-process machinery:
jax.distributed, gloo collectives, global arrays gathered to every host, orbax
writing checkpoints from two processes, process 0 writing the files.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process(tmp_path, tiny_job, tiny_reference):
  workdir = str(tmp_path / "two_processes")
  log = str(tmp_path / "launch.log")
  env = tiny_job.env(tiny_job.num_devices // 2, SJ_PORT=str(_free_port()),
                     SJ_LOCAL_DEVICES=str(tiny_job.num_devices // 2),
                     SJ_LOG_DIR=str(tmp_path), SJ_PYTHON=sys.executable)
  with open(log, "w") as f:
    proc = subprocess.run(
        ["bash", os.path.join(tiny_job.repo, "launch", "local.sh"), "2", *tiny_job.flags,
         f"--workdir={workdir}"], cwd=tiny_job.repo, env=env, stdout=f,
        stderr=subprocess.STDOUT, timeout=540)
  if proc.returncode != 0:
    logs = []
    for i in range(2):
      path = tmp_path / f"process_{i}.log"
      text = path.read_text() if path.exists() else "(no log)"
      logs.append(f"--- process {i} (last 3000 chars) ---\n{text[-3000:]}")
    raise AssertionError(f"launch/local.sh exited {proc.returncode}\n" + "\n".join(logs))

  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  tiny_job.assert_same_metrics(metrics, tiny_reference)
  # Both processes ran on all 4 devices and process 1 wrote nothing of its own.
  for i in range(2):
    text = (tmp_path / f"process_{i}.log").read_text()
    assert "devices: [CpuDevice(id=0), CpuDevice(id=1), CpuDevice(id=2048)" in text
    assert "stage train_runs done" in text
  assert "stage report done" in (tmp_path / "process_0.log").read_text()
  assert "stage report" not in (tmp_path / "process_1.log").read_text()
  # The trace written by process 0 holds all 12 runs, gathered from both processes.
  losses = np.load(os.path.join(workdir, "trace", "losses.npy"))
  assert losses.shape == (12, 9, 8) and np.isfinite(losses).all()
  assert sorted(os.listdir(os.path.join(workdir, "runs", "runs_ckpt"))) == ["4", "8"]
