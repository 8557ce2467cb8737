"""A main job SIGKILLed mid-stage resumes from its workdir to the same results.

One job is killed twice: first in `record_runs` (once the first training checkpoint
of the runs recording gradients is complete), then, after it resumed training, in
`ekfac_scores`. The third start finishes it. Its metrics, losses and recorded
gradients must equal those of an uninterrupted job, every stage finished before a
kill must be reused and the killed ones recomputed. What a kill can leave behind (an
orbax temporary checkpoint directory, a half-written array, a trace directory
without its trace.json, the output of a stage whose record still says "running")
must never be read as complete.
"""

import json
import os
import re
import signal
import time

import numpy as np

FINAL_STEP = re.compile(r"^\d+$")


def _kill_when(proc, log_path, ready, what, timeout=300):
  """SIGKILLs `proc` as soon as `ready()` holds; returns the job's log."""
  try:
    deadline = time.monotonic() + timeout
    while not ready():
      assert proc.poll() is None, f"the job ended before {what}:\n" + (
          log_path.read_text()[-3000:])
      assert time.monotonic() < deadline, f"no {what} after {timeout} s"
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
  finally:
    proc.kill()
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  return log_path.read_text()


def _finished_steps(workdir, group):
  path = os.path.join(workdir, "runs", group, "runs_ckpt")
  if not os.path.isdir(path):
    return []
  return sorted(int(n) for n in os.listdir(path) if FINAL_STEP.match(n))


def _status(workdir, stage):
  path = os.path.join(workdir, "stages", stage + ".json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)["status"]


def _assert_same_arrays(workdir, reference, path):
  got = np.load(os.path.join(workdir, path))
  want = np.load(os.path.join(reference, path))
  assert got.shape == want.shape, path
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=0, err_msg=path)


def test_killed_job_resumes_to_the_same_results(tmp_path, tiny_job, tiny_reference):
  workdir = str(tmp_path / "job")

  # 1. Killed in record_runs, as soon as the gradient-recording runs' first
  # checkpoint (step 4 of 8) is complete.
  log1 = tmp_path / "killed_in_record_runs.log"
  _kill_when(tiny_job.start(workdir, log1), log1,
             lambda: _finished_steps(workdir, "grads"), "training checkpoint")
  assert _finished_steps(workdir, "grads")[0] == 4
  assert _status(workdir, "base_model") == "done"
  assert _status(workdir, "record_runs") == "running"
  assert not os.path.exists(os.path.join(workdir, "trace", "trace.json"))
  assert not os.path.exists(os.path.join(workdir, "metrics.json"))
  # Leftovers of writes that a kill interrupted: none may be taken as complete.
  runs_ckpt = os.path.join(workdir, "runs", "grads", "runs_ckpt")
  os.makedirs(os.path.join(runs_ckpt, "8.orbax-checkpoint-tmp-1234", "state"))
  with open(os.path.join(runs_ckpt, "8.orbax-checkpoint-tmp-1234", "state", "x"),
            "w") as f:
    f.write("partial")
  os.makedirs(os.path.join(workdir, "trace"), exist_ok=True)
  np.save(os.path.join(workdir, "trace", "losses.npy"), np.zeros(3))  # no trace.json
  os.makedirs(os.path.join(workdir, "arrays"), exist_ok=True)
  with open(os.path.join(workdir, "arrays", "ekfac_scores.npy.tmp.npy"), "wb") as f:
    f.write(b"\x93NUMPY partial")

  # 2. Resumed: training goes on from the checkpoint. Killed again in ekfac_scores,
  # once its covariances are accumulated.
  log2 = tmp_path / "killed_in_ekfac_scores.log"
  text = _kill_when(tiny_job.start(workdir, log2), log2,
                    lambda: "fit_ekfac: covariances" in log2.read_text(),
                    "EK-FAC covariances")
  assert "stage base_model: reusing its outputs" in text
  assert re.search(r"train_runs: resumed 4 runs from step [48]/8 in \S*runs/grads",
                   text), text[-3000:]
  assert "=== stage record_runs done" in text
  assert "=== stage tracin_cp_scores done" in text
  assert _status(workdir, "ekfac_scores") == "running"
  # The killed stage's output file, as if it had been written before its record:
  # a stage whose record says "running" must recompute, not load it.
  with open(os.path.join(workdir, "arrays", "ekfac_scores.npy"), "wb") as f:
    f.write(b"\x93NUMPY partial")

  # 3. Finishes: what was done before a kill is reused, the rest recomputed.
  log3 = tmp_path / "finished.log"
  text = tiny_job.finish(tiny_job.start(workdir, log3), log3)
  for stage in ("base_model", "record_runs", "tracin_cp_scores"):
    assert f"stage {stage}: reusing its outputs" in text, stage
  assert "=== stage ekfac_scores done" in text
  assert "=== stage record_runs ===" not in text and "train_runs:" not in text
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  reused = {name: stage["reused"] for name, stage in metrics["stages"].items()}
  assert reused["record_runs"] and reused["tracin_cp_scores"]
  assert not reused["ekfac_scores"] and not reused["evaluate"]

  reference_dir, reference_metrics = tiny_reference
  tiny_job.assert_same_metrics(metrics, reference_metrics)
  for path in ("trace/losses.npy", "grad_trace/losses.npy",
               "grad_trace/train_grads.npy", "grad_trace/test_grads.npy",
               "arrays/tracin_cp_scores.npy", "arrays/ekfac_scores.npy"):
    _assert_same_arrays(workdir, reference_dir, path)
  assert np.load(os.path.join(workdir, "trace", "losses.npy")).shape == (12, 9, 8)
  # TracIn-CP needs the params of every checkpoint step of the runs it uses (the
  # first 2 fitted runs: runs/grads), including one whose TracIn save the kill may
  # have cut off.
  assert sorted(os.listdir(os.path.join(workdir, "runs", "grads", "tracin_ckpt"))) == [
      "0", "4", "8"]
