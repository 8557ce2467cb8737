"""The main job as 2 processes x 2 CPU devices (gloo) equals the single-process run.

Both use 4 devices in all, so each process-independent computation has the same
per-device shapes; what differs is exactly the multi-process machinery:
jax.distributed (coordinator on 127.0.0.1), gloo collectives, runs and train
examples split over the devices of both processes, global arrays gathered to every
host, orbax writing checkpoints from two processes, process 0 deciding and writing
the files.
"""

import json
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tiny_job, root, workdir, timeout=540):
  """Runs the 2-process job into `workdir`; (port, [log of process 0, of 1])."""
  port = _free_port()
  env = tiny_job.env(tiny_job.num_devices // 2, SJ_PORT=str(port),
                     SJ_LOCAL_DEVICES=str(tiny_job.num_devices // 2), SJ_LOG_DIR=str(root),
                     SJ_PYTHON=sys.executable)
  with open(root / "launch.log", "w") as f:
    # A session of its own: a hung job's processes are killed with the launcher.
    proc = subprocess.Popen(
        ["bash", os.path.join(tiny_job.repo, "launch", "local.sh"), "2", *tiny_job.flags,
         f"--workdir={workdir}"], cwd=tiny_job.repo, env=env, stdout=f,
        stderr=subprocess.STDOUT, start_new_session=True)
    try:
      proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      raise AssertionError(f"the 2-process job hung ({timeout} s)") from None
  logs = []
  for i in range(2):
    path = root / f"process_{i}.log"
    logs.append(path.read_text() if path.exists() else "(no log)")
  if proc.returncode != 0:
    raise AssertionError(f"launch/local.sh exited {proc.returncode}\n" + "\n".join(
        f"--- process {i} (last 3000 chars) ---\n{text[-3000:]}"
        for i, text in enumerate(logs)))
  return port, logs


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, tiny_job, tiny_reference):
  """(workdir, port, [log of process 0, log of process 1]) of the 2-process job."""
  del tiny_reference  # set up first: this job then reuses its compiled programs
  root = tmp_path_factory.mktemp("two_processes")
  workdir = str(root / "job")
  port, logs = _launch(tiny_job, root, workdir)
  return workdir, port, logs


def test_a_rerun_reuses_every_stage_on_every_process(two_processes, tiny_job,
                                                     tmp_path):
  """Review h24: a stage reused on a process other than 0 read its record as None
  (`read_record`) and raised AttributeError, and the job hung in the next
  collective: no multi-process rerun or resume could finish."""
  workdir = two_processes[0]
  with open(os.path.join(workdir, "metrics.json")) as f:
    first = json.load(f)
  _, logs = _launch(tiny_job, tmp_path, workdir, timeout=240)
  for text in logs:
    assert "stage record_runs: reusing its outputs" in text
    assert "=== stage record_runs ===" not in text
  with open(os.path.join(workdir, "metrics.json")) as f:
    tiny_job.assert_same_metrics(json.load(f), first)


def test_metrics_equal_one_process(two_processes, tiny_job, tiny_reference):
  with open(os.path.join(two_processes[0], "metrics.json")) as f:
    tiny_job.assert_same_metrics(json.load(f), tiny_reference[1])


@pytest.mark.parametrize("path", [
    "trace/losses.npy",  # all 12 runs, gathered from both processes
    "grad_trace/train_grads.npy", "grad_trace/test_grads.npy",
    "arrays/tracin_cp_scores.npy", "arrays/ekfac_scores.npy",
])
def test_arrays_equal_one_process(two_processes, tiny_reference, path):
  got = np.load(os.path.join(two_processes[0], path))
  want = np.load(os.path.join(tiny_reference[0], path))
  assert got.shape == want.shape
  assert np.isfinite(got).all()
  # Sums over devices may be reduced in another order by gloo: float32 round-off.
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())


def test_both_processes_ran_every_stage_and_process_0_wrote(two_processes):
  workdir, port, logs = two_processes
  with open(os.path.join(workdir, "metrics.json")) as f:
    summary = json.load(f)["summary"]
  # Process 0 saw the devices of both processes (process 1's CPU ids start at 2048).
  assert summary["devices"] == ("[CpuDevice(id=0), CpuDevice(id=1), "
                                "CpuDevice(id=2048), CpuDevice(id=2049)]")
  for text in logs:
    assert f"Connecting to JAX distributed service on 127.0.0.1:{port}" in text
    for stage in ("base_model", "record_runs", "tracin_cp_scores", "ekfac_scores",
                  "fit_simfluence_linear", "evaluate"):
      assert f"=== stage {stage} done" in text, stage
  # TensorBoard event files come from process 0 only.
  assert "tensorboard: 117 training scalars of 12 runs" in logs[0]
  assert "tensorboard: 0 training scalars of 12 runs" in logs[1]
  # Both processes wrote their shards of each group's checkpoints.
  for group in ("grads", "plain"):
    runs_ckpt = os.path.join(workdir, "runs", group, "runs_ckpt")
    assert sorted(os.listdir(runs_ckpt)) == ["4", "8"]
    for i in range(2):
      assert os.path.isdir(os.path.join(runs_ckpt, "8", "state", f"ocdbt.process_{i}"))
  assert sorted(os.listdir(os.path.join(workdir, "runs", "grads", "tracin_ckpt"))) == [
      "0", "4", "8"]


def test_the_launcher_returns_the_status_of_the_process_that_failed(tmp_path):
  """Review h24: when process 0 was killed, its peer could be reaped during the
  launcher's grace period; the next `wait -n` found no such job and `set -u` made
  the launcher exit 1 ("finished: unbound variable") instead of 137."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\n"
                  'if [[ "${SJ_PROCESS_ID}" == 0 ]]; then sleep 0.5; kill -9 $$; fi\n'
                  "sleep 60\n")
  fake.chmod(0o755)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run(
      ["bash", os.path.join(repo, "launch", "local.sh"), "2", "--workdir=unused"],
      # A short grace: the fake peer ends on SIGTERM, so it is reaped within it.
      env=dict(os.environ, SJ_PYTHON=str(fake), SJ_LOG_DIR=str(tmp_path),
               SJ_STOP_GRACE_S="0.5"),
      capture_output=True, text=True, timeout=60)
  assert proc.returncode == 137, proc.stderr
  assert "unbound variable" not in proc.stderr
