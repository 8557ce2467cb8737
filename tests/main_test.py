"""The main job end to end on the tiny config: outputs, reruns, refusals, CLI errors."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import config_lib
from simfluence_jax import pipeline

METRICS = ("all_steps_mse", "final_step_mse", "spearman", "spearman_across_runs")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")


# The stages that reruns which check reuse or retraining need not run again.
_NO_EXTRA_STAGES = {"counterfactual.enabled": False, "removal.enabled": False,
                    "learning_curve": ()}


def _config(**overrides):
  config = config_lib.load_config(TINY)
  for name, value in overrides.items():
    section = config
    *parents, leaf = name.split(".")
    for part in parents:
      section = section[part]
    section[leaf] = value
  return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tiny") / "job")
  # Every stage, and the counterfactual search on the metagradient too (off in :tiny).
  config = _config(**{"counterfactual.methods": ("simfluence_linear", "metagradient")})
  return config, workdir, pipeline.run(config, workdir)


def _copy(workdir, tmp_path):
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy, ignore=shutil.ignore_patterns(".lock"))
  return copy


def test_outputs(tiny_run):
  config, workdir, result = tiny_run
  with open(os.path.join(workdir, "metrics.json")) as f:
    metrics = json.load(f)
  for method in config.methods:
    for name in METRICS:
      if method == "curriculum_blind" and name == "spearman_across_runs":
        # Constant across runs by construction: undefined, and the reason is given.
        assert metrics[method][name] is None
        assert "same for every run" in metrics[method]["undefined"][name]
        continue
      assert np.isfinite(metrics[method][name]), (method, name)
      assert metrics[method][name] == pytest.approx(result[method][name], rel=1e-6)
    if method != "curriculum_blind":
      assert metrics[method]["all_steps_mse_ratio"] == pytest.approx(
          metrics[method]["all_steps_mse"] / metrics["curriculum_blind"][
              "all_steps_mse"])
      assert metrics["cost"][method]["run_equivalents"] > 0
  assert {"data", "record_runs", "evaluate"} <= set(metrics["timings"])
  # The removal benchmark, and whether its reference run amplifies perturbations.
  assert config.removal.enabled and "metagradient" in config.methods
  assert set(metrics["removal_lds"]["metagradient"]) == {"1%", "5%"}
  assert 0 < metrics["regime"]["removal_derivative_growth"] < np.inf
  assert not any(stage["reused"] for stage in metrics["stages"].values())
  # Curricula searched on the metagradient's table too, retrained, summarised.
  searched = metrics["counterfactual"]["searched"]
  assert set(searched) == {"simfluence_linear", "metagradient"}
  assert np.all(np.isfinite(searched["metagradient"]["simulated_final"]))
  assert set(metrics["counterfactual_summary"]) == set(searched) | {"median_random"}
  report = open(os.path.join(workdir, "report.md")).read()
  assert "| curriculum_blind |" in report and "**total**" in report
  # What computed it: the packages and the CPU (tests/evaluation_test.py).
  assert metrics["summary"]["environment"]["packages"]["jax"] == jax.__version__
  assert "Computed with Python" in report
  assert "| counterfactual_summary |" not in report
  assert any(f.endswith(".png") for f in os.listdir(os.path.join(workdir, "plots")))
  # TensorBoard: per-run curves and the evaluation scalars (tests/writers_test.py).
  tensorboard = os.path.join(workdir, "tensorboard")
  assert len(os.listdir(os.path.join(tensorboard, "runs"))) == (
      config.num_runs + config.num_held_out_runs + config.unseen.num_runs)
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tensorboard))
  # Shared workdirs: files readable by the group and others (umask 022 here).
  mode = os.stat(os.path.join(workdir, "trace", "losses.npy")).st_mode
  assert mode & 0o044 == 0o044 & ~_umask()


def _umask():
  mask = os.umask(0)
  os.umask(mask)
  return mask


def test_rerun_reuses_every_stage_and_gives_same_numbers(tiny_run, tmp_path):
  config, workdir, first = tiny_run
  copy = _copy(workdir, tmp_path)
  second = pipeline.run(config, copy)
  assert all(stage["reused"] for name, stage in second["stages"].items()
             if name != "data"), second["stages"]
  for method in config.methods:
    for name in METRICS:
      assert second[method][name] == pytest.approx(first[method][name], rel=1e-6,
                                                   nan_ok=True)
  # What each method cost is what it cost when computed, not the time to reload it.
  for method, cost in first["cost"].items():
    assert second["cost"][method] == pytest.approx(cost, rel=1e-6), method
  assert second["cost"]["metagradient"]["seconds"] > 0


@pytest.mark.parametrize("field, value", [
    ("learning_rate", 0.01), ("seed", 1), ("model.d_model", 16),
    ("optimizer", "adam"), ("num_runs", 6), ("num_steps", 4)])
def test_rerun_with_other_run_settings_refuses_naming_the_field(tiny_run, tmp_path,
                                                                 field, value):
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  with pytest.raises(pipeline.StaleWorkdirError, match=rf"{field} [^;]* -> "):
    pipeline.run(_config(**{field: value}), copy)
  # Nothing was discarded: the old trace is still there.
  assert os.path.exists(os.path.join(copy, "trace", "trace.json"))


def test_rerun_with_other_l2_recomputes_only_the_fits(tiny_run, tmp_path):
  _, workdir, first = tiny_run
  copy = _copy(workdir, tmp_path)
  # Only the l2 changes what is computed; leaving out the stages after the fits that
  # do not check reuse keeps the test short.
  result = pipeline.run(_config(**{"simulators.l2": 1.0, **_NO_EXTRA_STAGES}), copy)
  stages = result["stages"]
  assert stages["record_runs"]["reused"] and stages["tracin_cp_scores"]["reused"]
  assert not stages["fit_simfluence_linear"]["reused"]
  # Exactly the metrics of that l2 on the stored runs (what a fresh job would give).
  trace = sj.Trace.load(os.path.join(copy, "trace"))
  config = _config()
  fit = trace.select_runs(slice(0, config.num_runs))
  held = trace.select_runs(slice(config.num_runs, config.num_runs +
                                 config.num_held_out_runs))
  sim = sj.simulators.fit("linear", fit, l2=1.0)
  expected = sj.evaluation.evaluate(sim, held)
  for name in METRICS:
    assert result["simfluence_linear"][name] == pytest.approx(expected[name],
                                                              rel=1e-5)
  assert result["simfluence_linear"]["all_steps_mse"] != pytest.approx(
      first["simfluence_linear"]["all_steps_mse"])


def test_recorded_runs_of_other_curricula_are_refused(tiny_run, tmp_path,
                                                      monkeypatch):
  # The curricula are drawn again from the seed on every job; a NumPy whose random
  # stream changed would draw others, and every method would be scored on runs it
  # did not predict. Stand-in: the fitted runs drawn in another order.
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  draw = pipeline.stages.make_curricula
  monkeypatch.setattr(pipeline.stages, "make_curricula", lambda config: (
      dataclasses.replace(draw(config), fit=draw(config).fit[::-1].copy())))
  with open(os.path.join(copy, "metrics.json")) as f:
    before = f.read()
  # The record holds the curricula's digest (stages/record_runs.json "checks").
  with pytest.raises(ValueError, match=r"stage record_runs was computed with other "
                     r"settings \(curricula [0-9a-f]+ -> [0-9a-f]+ \(drawn again"):
    pipeline.run(_config(**_NO_EXTRA_STAGES), copy)
  with open(os.path.join(copy, "metrics.json")) as f:
    assert f.read() == before
  # A record written before the digest existed: the stored trace is compared.
  record_path = os.path.join(copy, "stages", "record_runs.json")
  with open(record_path) as f:
    record = json.load(f)
  del record["checks"]
  with open(record_path, "w") as f:
    json.dump(record, f)
  with pytest.raises(ValueError, match=r"stage record_runs holds runs of other "
                     r"curricula than this config's seed draws \(run 0;"):
    pipeline.run(_config(**_NO_EXTRA_STAGES), copy)
  # --overwrite discards every record from record_runs on (none says which
  # curricula it was computed from), so the job retrains and recomputes them all.
  config = _config(**_NO_EXTRA_STAGES)
  wd = pipeline.workdir.Workdir(copy, config, overwrite=True)
  batch_ids = pipeline.stages.make_curricula(config).all_runs()
  pipeline.stages._check_legacy_curricula(wd, batch_ids)
  assert sorted(os.listdir(os.path.join(copy, "stages"))) == [
      "base_model.json", "data.json"]


def test_stages_computed_from_drawn_inputs_record_their_digests(tiny_run):
  # What a rerun compares (fingerprint.Inputs.checks): each stage that reads the
  # curricula, the removal sets or the metagradient's reference, and every stage
  # downstream of one, holds their digests; stages before the runs hold none.
  config, workdir, _ = tiny_run
  checks = {}
  for name in os.listdir(os.path.join(workdir, "stages")):
    with open(os.path.join(workdir, "stages", name)) as f:
      checks[name[:-len(".json")]] = set(json.load(f)["checks"])
  assert checks["data"] == checks["base_model"] == checks["features"] == set()
  assert checks["record_runs"] == checks["fit_simfluence_linear"] == {"curricula"}
  assert "curricula" in checks["evaluate"] & checks["counterfactual"]
  assert checks["metagradient"] == {"curricula", "metagradient_reference"}
  assert checks["removal_runs"] == checks["removal_metagradients"] == {
      "curricula", "removal_sets"}
  with open(os.path.join(workdir, "stages", "record_runs.json")) as f:
    recorded = json.load(f)["checks"]["curricula"]
  assert recorded == pipeline.fingerprint.array_digest(
      pipeline.stages.make_curricula(config).all_runs())


def test_an_overwrite_that_dies_in_training_leaves_no_result(tiny_run, tmp_path,
                                                             monkeypatch):
  # --overwrite deleted the old runs and died retraining: the old metrics.json and
  # report stayed, and `tables` rendered them as the workdir's result.
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)

  def killed(*args, **kwargs):
    del args, kwargs
    raise RuntimeError("killed while training")

  monkeypatch.setattr(pipeline.stages.training, "train_runs", killed)
  with pytest.raises(RuntimeError, match="killed while training"):
    pipeline.run(_config(learning_rate=0.002, **_NO_EXTRA_STAGES), copy,
                 overwrite=True)
  assert not os.path.exists(os.path.join(copy, "trace"))
  for name in ("metrics.json", "report.md", "plots"):
    assert not os.path.exists(os.path.join(copy, name)), name


def test_a_resumed_run_times_one_whole_run(monkeypatch, tmp_path):
  # A job killed after training 3 of 4 steps resumes and trains 1: that step's
  # time is one run's quarter, and every method's cost is in units of one run.
  clock, calls = None, []
  monkeypatch.setattr(pipeline.stages.time, "perf_counter", lambda: next(clock))

  def train_runs(params, batch_ids, **kwargs):
    del params, kwargs
    calls.append(batch_ids.shape)
    return types.SimpleNamespace(resumed_step=case["resumed"])

  monkeypatch.setattr(pipeline.stages.training, "train_runs", train_runs)
  config = _config()
  model = types.SimpleNamespace(params=None, loss_fn=None)
  dataset = types.SimpleNamespace(train=None, test=None)
  batch_ids = np.zeros((2, 4, 3), np.int32)
  for case in ({"resumed": 0, "want": 3.0}, {"resumed": 3, "want": 12.0},
               {"resumed": 4, "want": float("nan")}):
    clock = iter([10.0, 16.0])
    _, seconds = pipeline.stages._train(config, model, dataset, batch_ids, None,
                                        False)
    np.testing.assert_equal(seconds, case["want"])
  assert calls == [(2, 4, 3)] * 3
  # With checkpoints: the time is kept beside them, and a call that finds nothing
  # left to train (its process stopped before the stage was saved) reads it back;
  # it was NaN for good (review h22).
  runs_dir = str(tmp_path / "runs" / "grads")
  for case in ({"resumed": 0, "want": 3.0}, {"resumed": 4, "want": 3.0},
               {"resumed": 3, "want": 12.0}, {"resumed": 4, "want": 12.0}):
    clock = iter([10.0, 16.0])
    _, seconds = pipeline.stages._train(config, model, dataset, batch_ids, runs_dir,
                                        False)
    np.testing.assert_equal(seconds, case["want"])
  clock = iter([10.0, 16.0])
  case = {"resumed": 4}
  _, seconds = pipeline.stages._train(config, model, dataset, batch_ids,
                                      str(tmp_path / "other"), False)
  assert np.isnan(seconds)


def test_overwrite_discards_and_retrains(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  # No gradient-recording or unseen-example runs: their segments would compile again
  # for the new learning rate, and neither shows more of what overwriting does.
  config = _config(learning_rate=0.002, methods=("curriculum_blind", "simfluence_linear"),
                   record_grads=False, **{"unseen.num_examples": 0,
                                          "unseen.num_runs": 0},
                   **_NO_EXTRA_STAGES)
  result = pipeline.run(config, copy, overwrite=True)
  trace = sj.Trace.load(os.path.join(copy, "trace"))
  np.testing.assert_allclose(trace.learning_rates, 0.002)
  assert not result["stages"]["record_runs"]["reused"]


def test_deleted_tracin_checkpoint_is_an_error(tiny_run, tmp_path):
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  shutil.rmtree(os.path.join(copy, "runs", "grads", "tracin_ckpt", "4"))
  shutil.rmtree(os.path.join(copy, "arrays"))
  os.remove(os.path.join(copy, "stages", "tracin_cp_scores.json"))
  with pytest.raises(FileNotFoundError, match=r"steps \[4\] are missing .* restore "
                     r"them, or delete .*record_runs.json to train the runs again"):
    pipeline.run(_config(), copy)


def test_deleted_gradient_trace_is_refused_not_dropped(tiny_run, tmp_path):
  """grad_trace/ (the largest output) deleted: the rerun reused record_runs without
  it and tracin_per_step's rows vanished from metrics.json unsaid."""
  _, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  shutil.rmtree(os.path.join(copy, "grad_trace"))
  with pytest.raises(pipeline.StaleWorkdirError, match=r"stage record_runs: its "
                     r"stored outputs cannot be read \(.*grad_trace is missing \(the "
                     r"per-step gradients of the first \d+ fitted runs\)\); restore "
                     r"them, or --overwrite"):
    pipeline.run(_config(), copy)


def test_command_line_error_is_one_clear_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.num_runs=0",
       f"--workdir={tmp_path / 'job'}"], cwd=REPO, capture_output=True, text=True,
      timeout=300)
  assert proc.returncode != 0
  assert "config.num_runs=0: must be a positive integer" in proc.stderr
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(tmp_path / "job")  # nothing created before validation


def test_unknown_config_field_is_one_clear_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.nonexistent=3",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert proc.stderr.strip() == ("error: --config.nonexistent: the config has no "
                                 "field 'nonexistent'")
  # The suggestion reads as text, not as the repr of a KeyError.
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.num_run=3",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert proc.stderr.strip() == (
      "error: --config.num_run: the config has no field 'num_run'; Did you mean "
      '"num_runs" instead of "num_run"?')
  # A config file whose get_config raised: one line, not its traceback.
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:huge", f"--workdir={tmp_path}"], cwd=REPO,
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "error: flag --config=configs/default.py:huge: Error whilst parsing config "
      "file: ValueError: config argument 'huge' is unknown; known: ['rough', "
      "'tiny'].")
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main", "--config=configs/missing.py",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip() == ("error: --config: [Errno 2] No such file or "
                                 "directory: 'configs/missing.py'")


def test_stale_workdir_from_the_command_line(tiny_run, tmp_path):
  config, workdir, _ = tiny_run
  copy = _copy(workdir, tmp_path)
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.learning_rate=0.01",
       f"--workdir={copy}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert (last.startswith("error: ")
          and f"learning_rate {config.learning_rate!r} -> 0.01" in last), last
  assert "--overwrite" in last and "Traceback" not in proc.stderr


def test_workdir_lock_refuses_a_second_job(tmp_path):
  with pipeline.workdir_lock(str(tmp_path)):
    proc = subprocess.run(
        [sys.executable, "-c", "from simfluence_jax import pipeline\n"
         f"with pipeline.workdir_lock({str(tmp_path)!r}): pass"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "is in use by another job" in proc.stderr
  with pipeline.workdir_lock(str(tmp_path)):  # released: can be taken again
    pass


def test_a_seed_folder_in_use_refuses_the_multi_seed_job(tmp_path):
  # A seed rerun alone (`--workdir=DIR/seed_0`) and the multi-seed job on DIR each
  # took only their own folder's lock, and wrote seed_0/ at the same time.
  config = _config(num_seeds=2, **_NO_EXTRA_STAGES)
  with pipeline.workdir_lock(str(tmp_path / "seed_0")):
    with pytest.raises(ValueError, match=r"seed_0'? is in use by another job"):
      pipeline.run(config, str(tmp_path))
  assert not (tmp_path / "seed_0" / "stages").exists()


def test_diverged_run_stops_with_run_and_step_named(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.learning_rate=1e9",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: train_runs: non-finite training loss in run 0 at step")
  assert "Traceback" not in proc.stderr
  assert os.path.isdir(os.path.join(tmp_path, "runs", "grads", "runs_ckpt"))  # kept
  # A rerun with other settings never resumes the diverged checkpoints.
  again = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.learning_rate=0.003",
       f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert again.returncode == 1
  assert "learning_rate 1000000000.0 -> 0.003" in again.stderr.strip().splitlines()[-1]
