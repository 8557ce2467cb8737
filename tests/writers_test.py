"""TensorBoard metrics (clu.metric_writers): event files read back with TF."""

import glob
import os
import subprocess
import sys

import numpy as np
import pytest

import simfluence_jax as sj


def _read_scalars(directory):
  """{tag: {step: value}} of every event file directly in `directory`."""
  # Imported here, not at collection: TF takes ~5 s to import in every xdist worker.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        scalar = (float(tf.make_ndarray(value.tensor)) if value.HasField("tensor")
                  else value.simple_value)
        out.setdefault(value.tag, {})[event.step] = scalar
  return out


def _trace(runs=3, steps=4, num_test=5, num_train=6, seed=0):
  rng = np.random.default_rng(seed)
  return sj.Trace(
      batch_ids=rng.integers(0, num_train, (runs, steps, 2)).astype(np.int32),
      losses=rng.uniform(1, 3, (runs, steps + 1, num_test)).astype(np.float32),
      learning_rates=np.full((runs, steps), 0.1, np.float32),
      num_train_examples=num_train)


def test_training_metrics(tmp_path):
  trace = _trace()
  train_losses = np.arange(12, dtype=np.float32).reshape(3, 4)
  train_losses[1, 2] = np.nan  # non-finite values are skipped, not written
  written = sj.evaluation.write_training_metrics(str(tmp_path), trace, train_losses)
  # Per run: 5 test losses + 4 train losses (one NaN); means over runs: 5 + 3.
  assert written == 3 * 5 + 3 * 4 - 1 + 5 + 3
  run1 = _read_scalars(tmp_path / "runs" / "run_001")
  assert sorted(run1["test_loss"]) == [0, 1, 2, 3, 4]
  assert sorted(run1["train_loss"]) == [1, 2, 4]  # step 3's loss was NaN
  assert run1["train_loss"][4] == pytest.approx(7.0)
  assert run1["test_loss"][2] == pytest.approx(trace.losses[1, 2].mean(), rel=1e-6)
  top = _read_scalars(tmp_path)
  assert top["test_loss/mean_over_runs"][0] == pytest.approx(
      trace.losses[:, 0].mean(), rel=1e-6)
  assert top["train_loss/mean_over_runs"][1] == pytest.approx(4.0)  # (0 + 4 + 8) / 3


def test_evaluation_metrics(tmp_path):
  trace = _trace()
  sim = sj.simulators.fit("linear", trace, l2=1e-2)
  metrics = {"simfluence_linear": sj.evaluation.evaluate(sim, trace)}
  written = sj.evaluation.write_evaluation_metrics(
      str(tmp_path), {"simfluence_linear": sim}, metrics)
  scalars = _read_scalars(tmp_path)
  assert len(scalars) == written
  assert scalars["fit/simfluence_linear/relative_residual"][0] == pytest.approx(
      sim.fit_info["relative_residual"], rel=1e-6)
  assert scalars["fit/simfluence_linear/l2"][0] == pytest.approx(1e-2)
  assert "fit/simfluence_linear/method" not in scalars  # strings are not scalars
  for name in sj.evaluation.METRICS:
    if np.isfinite(metrics["simfluence_linear"][name]):
      assert scalars[f"held_out/simfluence_linear/{name}"][0] == pytest.approx(
          float(metrics["simfluence_linear"][name]), rel=1e-6)


def test_only_process_zero_writes_files(tmp_path, monkeypatch):
  monkeypatch.setattr(sj.evaluation._writers.jax, "process_index", lambda: 1)
  assert sj.evaluation.write_training_metrics(str(tmp_path / "tb"), _trace()) == 0
  assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)


def test_writing_event_files_does_not_import_tensorflow(tmp_path):
  # TensorFlow is installed here (the test extra), and tensorboard's own event file
  # writer would import it: seconds of every job's start-up.
  code = ("import sys, numpy as np\n"
          "from simfluence_jax import evaluation\n"
          "from simfluence_jax.trace import Trace\n"
          "trace = Trace(batch_ids=np.zeros((1, 2, 1), np.int32),\n"
          "              losses=np.ones((1, 3, 2), np.float32),\n"
          "              learning_rates=np.full((1, 2), 0.1, np.float32),\n"
          "              num_train_examples=1)\n"
          f"assert evaluation.write_training_metrics({str(tmp_path)!r}, trace) == 6\n"
          "assert 'tensorflow' not in sys.modules, 'tensorflow was imported'\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert _read_scalars(tmp_path)["test_loss/mean_over_runs"] == {0: 1.0, 1: 1.0,
                                                                 2: 1.0}
