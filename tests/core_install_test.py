"""The core install: without an extra, a feature says in one line which to install.

A missing package is emulated by `sys.modules[name] = None` (the import then fails
as if it were not installed): here with monkeypatch, and for the main job in a
subprocess that blocks every optional package before running it.
"""

import glob
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import _optional
from simfluence_jax import data as data_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every optional package (all extras but tpu and bench).
OPTIONAL = ("tensorflow", "tensorflow_datasets", "seqio", "clu", "tensorboard",
            "matplotlib", "sklearn", "grain", "array_record")


# Modules of this package that import an optional package at their top: forgotten
# while a test blocks it, so that importing them again fails as it would.
_IMPORTERS = ("simfluence_jax.data.tasks",)


def _block(monkeypatch, *names):
  """Makes `import name` (and of its already imported submodules) fail."""
  for name in names:
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
      monkeypatch.setitem(sys.modules, loaded, None)
    monkeypatch.setitem(sys.modules, name, None)
  for name in _IMPORTERS:
    monkeypatch.delitem(sys.modules, name, raising=False)
  monkeypatch.setattr(_optional, "_skipped", set())


def _trace(runs=2, steps=3, num_test=4, num_train=5, seed=0):
  rng = np.random.default_rng(seed)
  return sj.Trace(
      batch_ids=rng.integers(0, num_train, (runs, steps, 2)).astype(np.int32),
      losses=rng.uniform(1, 3, (runs, steps + 1, num_test)).astype(np.float32),
      learning_rates=np.full((runs, steps), 0.1, np.float32),
      num_train_examples=num_train)


def test_missing_extra_is_one_importerror_line_naming_the_extra(monkeypatch):
  _block(monkeypatch, "seqio")
  with pytest.raises(ImportError) as error:
    _optional.import_module("simfluence_jax.data.tasks", "seqio",
                            "config.data.name='glue_rte'")
  assert isinstance(error.value, _optional.MissingExtraError)
  assert str(error.value) == (
      "config.data.name='glue_rte' needs the 'seqio' extra (import of seqio halted; "
      "None in sys.modules): pip install 'simfluence_jax[seqio]'")
  assert error.value.name == "seqio"
  with pytest.raises(ValueError, match="extra='sql'"):
    _optional.install_hint("sql")


def test_present_module_is_returned():
  assert _optional.import_module("json", "report") is json


@pytest.mark.parametrize("name, extra, blocked, field", [
    ("digits", "digits", "sklearn", "config.data.name='digits'"),
    ("glue_rte", "seqio", "seqio", "config.data.name='glue_rte'"),
    ("grain", "grain", "grain", "data.grain_source"),
])
def test_data_sources_name_their_extra(monkeypatch, name, extra, blocked, field):
  _block(monkeypatch, blocked)
  config = data_lib.default_data_config()
  config.name = name
  with pytest.raises(_optional.MissingExtraError) as error:
    data_lib.get_dataset(config)
  message = str(error.value)
  assert "\n" not in message
  assert message.startswith(f"{field} needs the {extra!r} extra")
  assert message.endswith(f"pip install 'simfluence_jax[{extra}]'")


def test_generated_default_data_needs_no_extra(monkeypatch):
  _block(monkeypatch, *OPTIONAL)
  config = data_lib.default_data_config()
  config.num_train_examples, config.num_test_examples = 8, 4
  dataset = data_lib.get_dataset(config)
  assert dataset.train["inputs"].shape == (8, config.seq_len)


def test_tensorboard_skipped_in_one_line_without_the_report_extra(monkeypatch, caplog,
                                                                  tmp_path):
  _block(monkeypatch, "clu", "tensorboard")
  caplog.set_level(logging.INFO)
  trace = _trace()
  assert sj.evaluation.write_training_metrics(str(tmp_path), trace) == 0
  assert sj.evaluation.write_training_metrics(str(tmp_path), trace) == 0
  assert sj.evaluation.write_evaluation_metrics(
      str(tmp_path), {}, {"m": {"all_steps_mse": 1.0}}) == 0
  lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
  assert lines == ["TensorBoard skipped: pip install 'simfluence_jax[report]'"]
  assert not glob.glob(str(tmp_path / "**" / "events.out.tfevents.*"), recursive=True)


def _read_events(directory):
  """{tag: {step: value}} through tensorboard's own reader (no TensorFlow)."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  out = {}
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        out.setdefault(value.tag, {})[event.step] = float(
            tensor_util.make_ndarray(value.tensor))
  return out


def test_event_files_without_clu_or_tensorflow(monkeypatch, tmp_path, caplog):
  """clu's writers need TensorFlow; the `report` extra alone writes the same scalars
  with tensorboard's TensorFlow-free writer."""
  pytest.importorskip("tensorboard")
  _block(monkeypatch, "clu")
  caplog.set_level(logging.INFO)
  trace = _trace()
  train_losses = np.arange(6, dtype=np.float32).reshape(2, 3)
  written = sj.evaluation.write_training_metrics(str(tmp_path), trace, train_losses)
  assert written == 2 * 4 + 2 * 3 + 4 + 3
  run1 = _read_events(str(tmp_path / "runs" / "run_001"))
  assert sorted(run1["test_loss"]) == [0, 1, 2, 3]
  assert run1["test_loss"][2] == pytest.approx(trace.losses[1, 2].mean(), rel=1e-6)
  assert run1["train_loss"] == {1: 3.0, 2: 4.0, 3: 5.0}
  top = _read_events(str(tmp_path))
  assert top["train_loss/mean_over_runs"][2] == pytest.approx(2.5)
  assert top["test_loss/mean_over_runs"][0] == pytest.approx(
      trace.losses[:, 0].mean(), rel=1e-6)
  # The means over runs are also logged (as clu's LoggingWriter would), not per run.
  logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("[")]
  assert len(logged) == 4 and logged[1].startswith("[1] test_loss/mean_over_runs=")
  evaluation_dir = tmp_path / "evaluation"
  assert sj.evaluation.write_evaluation_metrics(
      str(evaluation_dir), {}, {"m": {"all_steps_mse": 0.25, "name": "x"}}) == 1
  assert _read_events(str(evaluation_dir)) == {"held_out/m/all_steps_mse": {0: 0.25}}


_JOB = """
import runpy, sys
for name in {blocked!r}:
  sys.modules[name] = None
sys.argv = ["simfluence_jax.main", *{flags!r}]
runpy.run_module("simfluence_jax.main", run_name="__main__", alter_sys=True)
"""


def test_main_job_without_any_extra_writes_metrics_and_report(tmp_path):
  """The tiny job with every optional package blocked: metrics.json and report.md,
  one line each for the plots and TensorBoard it skipped."""
  workdir = tmp_path / "job"
  # The cheap methods only: what is tested is the missing extras, not the methods.
  flags = ["--config=configs/default.py:tiny", "--config.counterfactual.enabled=False",
           "--config.methods=('curriculum_blind','simfluence_linear','tracin_cp','ekfac_if')",
           "--config.removal.enabled=False", "--config.learning_curve=()",
           "--config.unseen.num_runs=0", "--config.unseen.num_examples=0",
           f"--workdir={workdir}"]
  proc = subprocess.run(
      [sys.executable, "-c", _JOB.format(blocked=OPTIONAL, flags=flags)], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  log = proc.stdout + proc.stderr
  for line in ("TensorBoard skipped: pip install 'simfluence_jax[report]'",
               "Plots skipped: pip install 'simfluence_jax[report]'"):
    assert log.count(line) == 1, (line, log[-3000:])
  with open(workdir / "metrics.json") as f:
    metrics = json.load(f)
  for method in ("simfluence_linear", "tracin_cp", "ekfac_if", "curriculum_blind"):
    assert np.isfinite(metrics[method]["all_steps_mse"]), method
  assert (workdir / "report.md").read_text().startswith("#")
  assert not glob.glob(str(workdir / "plots" / "*.png"))
  assert not glob.glob(str(workdir / "**" / "events.out.tfevents.*"), recursive=True)
