"""The main job end to end on the tiny config: outputs, resume, command-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import main as main_lib

METRICS = ("all_steps_mse", "final_step_mse", "spearman", "spearman_across_runs", "lds")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny"))
  config = config_lib.load_config(TINY)
  return config, workdir, main_lib.train_and_evaluate(config, workdir)


def test_outputs(tiny_run):
  config, workdir, result = tiny_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  for method in main_lib.METHODS:
    for name in METRICS:
      assert np.isfinite(metrics[method][name]), (method, name)
      assert metrics[method][name] == pytest.approx(result[method][name], rel=1e-6)
  assert {"data", "train_runs", "evaluate"} <= set(metrics["timings"])
  assert os.path.exists(os.path.join(workdir, "report.md"))
  assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "plots")))
  # TensorBoard: per-run curves and the evaluation scalars (tests/writers_test.py).
  tensorboard = os.path.join(workdir, "tensorboard")
  assert len(os.listdir(os.path.join(tensorboard, "runs"))) == (
      config.num_runs + config.num_held_out_runs)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tensorboard))


def test_rerun_with_same_workdir_gives_same_numbers(tiny_run):
  config, workdir, first = tiny_run
  second = main_lib.train_and_evaluate(config, workdir)
  for method in main_lib.METHODS:
    for name in METRICS:
      assert second[method][name] == pytest.approx(first[method][name], rel=1e-6)


def test_command_line_error_is_one_clear_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.num_runs=0",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert "config.num_runs=0: must be a positive integer" in proc.stderr
  assert "Traceback" not in proc.stderr


def test_workdir_lock_refuses_a_second_job(tmp_path):
  with main_lib.workdir_lock(str(tmp_path)):
    proc = subprocess.run(
        [sys.executable, "-c", "from simfluence_jax import main\n"
         f"with main.workdir_lock({str(tmp_path)!r}): pass"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is in use by another job" in proc.stderr
  with main_lib.workdir_lock(str(tmp_path)):  # released: can be taken again
    pass


def test_diverged_run_stops_with_run_and_step_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.learning_rate=1e9",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: train_runs: non-finite training loss in run 0 at step")
  assert "Traceback" not in proc.stderr
  assert os.path.isdir(os.path.join(tmp_path, "runs", "runs_ckpt"))  # kept
