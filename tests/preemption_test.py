"""A main job SIGKILLed mid-training resumes from its workdir to the same metrics.

Also checks that what a killed job can leave behind (an orbax temporary checkpoint
directory, a half-written array, a trace directory without its trace.json) is never
read as complete.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np

FINAL_STEP = re.compile(r"^\d+$")


def _finished_steps(workdir):
  path = os.path.join(workdir, "runs", "runs_ckpt")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if FINAL_STEP.match(n))


def test_killed_job_resumes_to_the_same_metrics(tmp_path, tiny_job, tiny_reference):
  workdir = str(tmp_path / "job")
  log = tmp_path / "killed.log"
  with open(log, "w") as f:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simfluence_jax.main", *tiny_job.flags,
         f"--workdir={workdir}"], cwd=tiny_job.repo, env=tiny_job.env(
             tiny_job.num_devices), stdout=f, stderr=subprocess.STDOUT)
    try:
      deadline = time.monotonic() + 300
      # Kill as soon as the first training checkpoint is complete (step 4 of 8).
      while not _finished_steps(workdir):
        assert proc.poll() is None, "the job ended before its first checkpoint:\n" + (
            log.read_text()[-3000:])
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
      proc.send_signal(signal.SIGKILL)
    finally:
      proc.kill()
      proc.wait()
  assert proc.returncode == -signal.SIGKILL
  steps = _finished_steps(workdir)
  assert steps and steps[0] == 4
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  assert not os.path.exists(os.path.join(workdir, "trace", "trace.json"))

  # Leftovers of writes that a kill interrupted: none may be taken as complete.
  runs_ckpt = os.path.join(workdir, "runs", "runs_ckpt")
  os.makedirs(os.path.join(runs_ckpt, "8.orbax-checkpoint-tmp-1234", "state"))
  with open(os.path.join(runs_ckpt, "8.orbax-checkpoint-tmp-1234", "state", "x"),
            "w") as f:
    f.write("partial")
  os.makedirs(os.path.join(workdir, "trace"), exist_ok=True)
  np.save(os.path.join(workdir, "trace", "losses.npy"), np.zeros(3))  # no trace.json
  os.makedirs(os.path.join(workdir, "arrays"), exist_ok=True)
  with open(os.path.join(workdir, "arrays", "ekfac_scores.npy.tmp.npy"), "wb") as f:
    f.write(b"\x93NUMPY partial")

  resumed = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main", *tiny_job.flags,
       f"--workdir={workdir}"], cwd=tiny_job.repo, env=tiny_job.env(
           tiny_job.num_devices), capture_output=True, text=True, timeout=400)
  assert resumed.returncode == 0, resumed.stderr[-4000:]
  assert re.search(r"train_runs: resumed 12 runs from step [48]/8", resumed.stderr), (
      resumed.stderr[-3000:])
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  tiny_job.assert_same_metrics(metrics, tiny_reference)
  assert np.load(os.path.join(workdir, "trace", "losses.npy")).shape == (12, 9, 8)
  # TracIn-CP needs the params of every checkpoint step, including one whose
  # TracIn save the kill may have cut off.
  assert sorted(os.listdir(os.path.join(workdir, "runs", "tracin_ckpt"))) == [
      "0", "4", "8"]
