"""No result computed from stale inputs is read as current.

* `counterfactual.load_simulators` (the simulate CLI) refuses a saved simulator that
  is not the last job's: an unfinished job, a method since dropped, a fit record not
  done or fitted on other runs, the top level of a multi-seed job.
* A job removes its metrics.json, report.md and plots/ once its runs are settled (a
  sweep its sweep.json when it starts), so one that stops after that leaves none;
  `tables` refuses a missing one; one refused by a precious stage keeps them.
* The report clears plots/; TensorBoard folders are rewritten, not appended to, when
  the stage they show is recomputed; a multi-seed summary holds the job's config;
  duplicate methods are refused.

Fast: the main job runs with its stages replaced by light fakes (`fake_stages`) that
keep the real `Workdir.stage` records, reuse and refusals; no model is trained.
"""

import glob
import json
import os
import subprocess
import sys
import types

import ml_collections
import numpy as np
import pytest

import _cli as cli

import simfluence_jax as sj
from simfluence_jax import config_lib
from simfluence_jax import counterfactual
from simfluence_jax import pipeline
from simfluence_jax import sweep
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import workdir as workdir_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")
N, M = 20, 3  # train and test examples of the hand-made simulators


def _simulator(scale: float):
  return sj.simulators.additive_from_scores(np.full((N, M), -0.01 * scale, np.float32),
                                            name="fake")


# --- load_simulators on workdirs with real stage records ----------------------------

def _job(workdir, learning_rate, methods, fit=None, finish=True, fail=None):
  """Writes what a main job leaves for load_simulators, through `Workdir.stage`:
  stages/record_runs.json, stages/fit_<m>.json and simulators/<m>/ for each method of
  `fit` (default: `methods`), then metrics.json if `finish`. `fail`: a method whose
  fit raises (its record stays "running")."""
  config = ml_collections.ConfigDict({"learning_rate": learning_rate,
                                      "simulators": {"l2": 0.1},
                                      "methods": tuple(methods)})
  wd = workdir_lib.Workdir(workdir, config, overwrite=True)
  wd.stage("record_runs", fields=("learning_rate",), compute=lambda: None)
  for method in methods if fit is None else fit:
    path = wd.path(counterfactual.SIMULATORS_DIR, method)

    def compute(method=method):
      if method == fail:
        raise RuntimeError("killed")
      return _simulator(learning_rate)

    wd.stage(f"fit_{method}", fields=("simulators",), upstream=("record_runs",),
             compute=compute, save=lambda sim, path=path: sim.save(path))
  if finish:
    _write_metrics(workdir, {"summary": {"config": config.to_dict()}})


def _write_metrics(workdir, payload):
  with open(os.path.join(workdir, "metrics.json"), "w") as f:
    json.dump(payload, f)


def _refusal(workdir, methods=None) -> str:
  with pytest.raises(ValueError) as info:
    counterfactual.load_simulators(str(workdir), methods)
  message = str(info.value)
  assert "\n" not in message
  return message


BOTH = ("simfluence_linear", "simfluence_additive")


def test_the_last_jobs_simulators_load(tmp_path):
  _job(tmp_path, 0.1, BOTH)
  _job(tmp_path, 0.1, BOTH)  # a rerun with the same runs
  assert sorted(counterfactual.load_simulators(str(tmp_path))) == sorted(BOTH)
  # The stage records are where the pipeline writes them.
  assert os.path.exists(tmp_path / workdir_lib.STAGES_DIR / "fit_simfluence_linear.json")


def test_a_simulator_fitted_on_older_runs_is_refused(tmp_path):
  _job(tmp_path, 0.1, BOTH)
  # --overwrite with another learning rate: new runs, and the job stopped after
  # refitting one simulator.
  metrics = (tmp_path / "metrics.json").read_text()
  _job(tmp_path, 0.2, BOTH, fit=["simfluence_linear"], finish=False)
  message = _refusal(tmp_path, ["simfluence_additive"])
  assert message.startswith(f"simulators/simfluence_additive in --workdir="
                            f"{str(tmp_path)!r} is stale: it was fitted on other runs")
  assert "rerun simfluence_jax.main" in message
  assert sorted(counterfactual.load_simulators(str(tmp_path), ["simfluence_linear"])
                ) == ["simfluence_linear"]
  # Unnamed, the stale one is left out (with a warning), the current one loads.
  assert list(counterfactual.load_simulators(str(tmp_path))) == ["simfluence_linear"]
  # The same with the older job's metrics.json left in place (what a job did before
  # it removed its metrics.json on starting).
  (tmp_path / "metrics.json").write_text(metrics)
  assert _refusal(tmp_path, ["simfluence_additive"]) == message


def test_a_fit_whose_record_is_not_done_is_refused(tmp_path):
  _job(tmp_path, 0.1, BOTH)
  metrics = (tmp_path / "metrics.json").read_text()
  with pytest.raises(RuntimeError):
    _job(tmp_path, 0.1, BOTH, finish=False, fail="simfluence_additive")
  (tmp_path / "metrics.json").write_text(metrics)
  assert "stages/fit_simfluence_additive.json is 'running', not 'done'" in _refusal(
      tmp_path, BOTH)
  os.remove(tmp_path / "stages" / "fit_simfluence_additive.json")
  assert "fit_simfluence_additive.json is missing" in _refusal(tmp_path, BOTH)


def test_a_method_dropped_from_the_config_is_refused(tmp_path):
  _job(tmp_path, 0.1, BOTH)
  _job(tmp_path, 0.1, ["simfluence_linear"])  # the same runs: only the methods changed
  message = _refusal(tmp_path, ["simfluence_additive"])
  assert "simulators/simfluence_additive" in message
  assert "is not in the config.methods ['simfluence_linear']" in message
  assert list(counterfactual.load_simulators(str(tmp_path), ["simfluence_linear"])
              ) == ["simfluence_linear"]
  assert list(counterfactual.load_simulators(str(tmp_path))) == ["simfluence_linear"]
  # Every saved one stale: refused, naming the first.
  _job(tmp_path, 0.1, ["simfluence_linear"], fit=[], finish=False)
  (tmp_path / "stages" / "fit_simfluence_linear.json").unlink()
  _write_metrics(tmp_path, {"summary": {"config": {"methods": ["simfluence_linear"]}}})
  assert "simulators/simfluence_additive" in _refusal(tmp_path)


def test_stages_called_one_by_one_load(tmp_path):
  """As colabs/counterfactual_curricula.ipynb does: no metrics.json, the records
  decide."""
  _job(tmp_path, 0.1, BOTH, finish=False)
  assert sorted(counterfactual.load_simulators(str(tmp_path))) == sorted(BOTH)


def test_an_unfinished_multi_seed_job_is_refused(tmp_path):
  _job(tmp_path, 0.1, BOTH)  # an earlier single-seed job's simulators
  os.remove(tmp_path / "metrics.json")  # a multi-seed job started, did not finish
  (tmp_path / "seed_1").mkdir()
  (tmp_path / "seed_0").mkdir()
  assert _refusal(tmp_path) == (
      f"--workdir={str(tmp_path)!r}: its last main job did not finish (no "
      "metrics.json) and it holds the seed_<k>/ workdirs of a multi-seed job, so its "
      "own simulators may be an older job's; use one seed's workdir "
      f"({tmp_path / 'seed_0'}, {tmp_path / 'seed_1'}) or rerun simfluence_jax.main.")


def test_the_top_level_of_a_multi_seed_job_is_refused(tmp_path):
  _job(tmp_path, 0.1, BOTH)  # an earlier single-seed job's simulators
  _write_metrics(tmp_path, {"seeds": [3, 4], "summary": {}})
  assert _refusal(tmp_path) == (
      f"--workdir={str(tmp_path)!r} is the top level of a 2-seed job (metrics.json "
      f"has \"seeds\"), which fits no simulator; use one seed's workdir: "
      f"{tmp_path / 'seed_0'}, {tmp_path / 'seed_1'}.")


def test_simulate_refuses_in_one_line(tmp_path):
  _job(tmp_path, 0.1, BOTH)
  _job(tmp_path, 0.1, ["simfluence_linear"])
  curriculum = tmp_path / "c.json"
  curriculum.write_text(json.dumps([[0, 1]] * 4))
  proc = cli.simulate(tmp_path, curriculum, "--methods=simfluence_additive")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: simulators/simfluence_additive in --workdir="), last


# --- the main job with fake stages ---------------------------------------------------

@pytest.fixture
def fake_stages(monkeypatch):
  """Replaces the main job's expensive stages by fakes with real records: the runs
  (precious, like the real ones) are random losses drawn from the learning rate,
  the simulators of simfluence_linear / _additive constant scores, evaluate scores
  the held-out runs with a fixed prediction per method."""

  def load_data(wd, config):
    wd.stage("data", fields=("num_train_examples",), compute=lambda: None)
    return types.SimpleNamespace(name="fake", test_texts=None)

  def record_runs(wd, config, dataset, model, curricula):
    del dataset, model

    def compute():
      ids = curricula.all_runs()
      rng = np.random.default_rng(int(config.learning_rate * 1e6))
      losses = rng.uniform(1, 2, (len(ids), config.num_steps + 1,
                                  config.num_test_examples)).astype(np.float32)
      return stages.Runs(sj.Trace(
          batch_ids=ids, losses=losses, num_train_examples=config.num_train_examples,
          learning_rates=np.full(ids.shape[:2], config.learning_rate, np.float32)),
          None, 1.0, None)

    return wd.stage(
        "record_runs", fields=("learning_rate", "seed"), compute=compute,
        save=lambda runs: runs.trace.save(wd.path("trace")),
        load=lambda: stages.Runs(sj.Trace.load(wd.path("trace")), None, 1.0, None),
        outputs=("trace",), precious=True)

  def fit_simulators(wd, config, runs, curricula, scores):
    del curricula, scores
    scale = float(runs.trace.learning_rates[0, 0])
    return {name: stages._simulator_stage(  # pylint: disable=protected-access
        wd, name, lambda: _simulator(scale), fields=("simulators",),
        upstream=("record_runs",)) for name in BOTH if name in config.methods}

  def evaluate(wd, config, runs, curricula, sims, direct, upstream):
    del sims, direct
    actual = runs.group(curricula, "held_out").losses

    def compute():
      predictions = {m: actual + 0.1 * (i + 1) for i, m in enumerate(config.methods)}
      metrics = {m: {"all_steps_mse": float(np.mean((p - actual) ** 2)),
                     "spearman": 0.5} for m, p in predictions.items()}
      return stages.Evaluation({"held_out": metrics}, predictions, {}, actual)

    return wd.stage("evaluate", fields=("methods",),
                    upstream=("record_runs",) + tuple(upstream), compute=compute,
                    load=compute)

  for name, fake in (("load_data", load_data), ("base_model", lambda *a: None),
                     ("record_runs", record_runs), ("fit_simulators", fit_simulators),
                     ("evaluate", evaluate)):
    monkeypatch.setattr(stages, name, fake)


def _config(**overrides):
  config = config_lib.load_config(TINY)
  config.methods = ("curriculum_blind", "simfluence_linear")
  config.learning_curve = ()
  config.removal.enabled = False
  config.counterfactual.enabled = False
  config.unseen.num_examples = config.unseen.num_runs = 0
  for name, value in overrides.items():
    setattr(config, name, value)
  return config


def _tables(*flags):
  return subprocess.run([sys.executable, "-m", "simfluence_jax.tables", *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=300)


def test_a_refused_rerun_keeps_the_result_of_what_the_workdir_holds(fake_stages,
                                                                    tmp_path):
  """Refused by a precious stage, a rerun changes nothing stored: the last result
  still describes the workdir and stays (tables reads it)."""
  workdir = str(tmp_path)
  pipeline.run(_config(), workdir)
  before = open(os.path.join(workdir, "metrics.json")).read()
  with pytest.raises(pipeline.StaleWorkdirError, match="learning_rate"):
    pipeline.run(_config(learning_rate=0.5), workdir)
  assert open(os.path.join(workdir, "metrics.json")).read() == before
  assert {"report.md", "plots"} <= set(os.listdir(workdir))
  assert _tables(f"--workdir={workdir}").returncode == 0
  pipeline.run(_config(learning_rate=0.5), workdir, overwrite=True)
  assert open(os.path.join(workdir, "metrics.json")).read() != before


def test_a_job_that_fails_after_its_runs_leaves_no_result(fake_stages, monkeypatch,
                                                          tmp_path):
  workdir = str(tmp_path)
  pipeline.run(_config(), workdir)

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(stages, "evaluate", killed)
  with pytest.raises(KeyboardInterrupt):
    pipeline.run(_config(), workdir)
  assert not {"metrics.json", "report.md", "plots"} & set(os.listdir(workdir))
  proc = _tables(f"--workdir={workdir}")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: --workdir={workdir!r} has no metrics.json: its last main job did not "
      "finish (or never ran there); rerun it.")


def _events(directory) -> list:
  return sorted(os.path.relpath(p, directory) for p in glob.glob(
      os.path.join(directory, "**", "events.out.tfevents.*"), recursive=True))


def _test_losses(directory) -> set:
  """Every value of the tag test_loss at step 1 in `directory`'s event files."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  values = set()
  for path in glob.glob(os.path.join(directory, "events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(path).Load():
      values |= {round(float(tensor_util.make_ndarray(v.tensor)), 6)
                 for v in event.summary.value if v.tag == "test_loss" and
                 event.step == 1}
  return values


def test_tensorboard_shows_only_the_current_outputs(fake_stages, tmp_path):
  pytest.importorskip("tensorboard")
  workdir = str(tmp_path)
  tensorboard = os.path.join(workdir, "tensorboard")
  config = _config()
  num_runs = config.num_runs + config.num_held_out_runs
  pipeline.run(config, workdir)
  first = _events(tensorboard)
  assert len(first) == num_runs + 2  # a file per run, the means, the evaluation
  pipeline.run(config, workdir)  # every stage reused: nothing appended
  assert _events(tensorboard) == first
  # Other methods: evaluate is recomputed, the runs are not.
  pipeline.run(_config(methods=("curriculum_blind",)), workdir)
  after = _events(tensorboard)
  assert len(after) == num_runs + 2
  assert [p for p in after if p.startswith("runs")] == [
      p for p in first if p.startswith("runs")]
  # Other runs (--overwrite): every curve is the new runs' only.
  pipeline.run(_config(learning_rate=0.5), workdir, overwrite=True)
  assert len(_events(tensorboard)) == num_runs + 2
  trace = sj.Trace.load(os.path.join(workdir, "trace"))
  assert _test_losses(os.path.join(tensorboard, "runs", "run_000")) == {
      round(float(trace.losses[0, 1].mean()), 6)}


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs://bucket/ served from a local directory in this process (no network);
  yields the local directory holding gs://bucket/'s objects."""
  import fake_bucket  # pylint: disable=g-import-not-at-top
  (tmp_path / "objects" / "bucket").mkdir(parents=True)
  fake_bucket.install(str(tmp_path / "objects"), setitem=monkeypatch.setitem,
                      setattr_=monkeypatch.setattr)
  yield str(tmp_path / "objects" / "bucket")
  monkeypatch.undo()
  fake_bucket.uninstall()


def test_a_bucket_workdir_too(fake_stages, bucket):
  from etils import epath  # pylint: disable=g-import-not-at-top
  workdir = "gs://bucket/job"
  root = epath.Path(workdir)
  pipeline.run(_config(methods=("curriculum_blind",) + BOTH), workdir)
  assert (root / "plots" / "trajectories_simfluence_additive.png").exists()
  assert sorted(counterfactual.load_simulators(workdir)) == sorted(BOTH)
  tensorboard = os.path.join(bucket, "job", "tensorboard")  # its objects
  events = _events(tensorboard)
  assert events
  pipeline.run(_config(), workdir)  # simfluence_additive dropped
  assert not (root / "plots" / "trajectories_simfluence_additive.png").exists()
  assert "simulators/simfluence_additive" in _refusal(workdir, ["simfluence_additive"])
  assert list(counterfactual.load_simulators(workdir)) == ["simfluence_linear"]
  assert len(_events(tensorboard)) == len(events)
  with pytest.raises(pipeline.StaleWorkdirError):
    pipeline.run(_config(learning_rate=0.5), workdir)  # refused: the result stays
  assert all((root / name).exists() for name in ("metrics.json", "report.md", "plots"))


def test_the_report_clears_plots_of_dropped_methods(tmp_path):
  actual = np.random.default_rng(0).uniform(1, 2, (2, 3, 4)).astype(np.float32)
  old = tmp_path / "plots" / "trajectories_dropped.png"
  old.parent.mkdir()
  old.write_bytes(b"png")
  paths = sj.evaluation.write_report(
      str(tmp_path), payload={"m": {"all_steps_mse": 0.1}},
      predictions={"m": actual + 0.1}, actual=actual)
  assert not old.exists()
  assert sorted(os.listdir(tmp_path / "plots")) == sorted(
      os.path.basename(p) for p in paths["plots"])


def test_multi_seed_job_over_a_single_seed_workdir(fake_stages, tmp_path):
  workdir = str(tmp_path)
  pipeline.run(_config(), workdir)
  assert os.path.exists(tmp_path / "plots" / "trajectories_simfluence_linear.png")
  pipeline.run(_config(num_seeds=2, seed=5), workdir)
  metrics = json.loads((tmp_path / "metrics.json").read_text())
  assert metrics["seeds"] == [5, 6]
  # The job's config, not its first seed's.
  assert metrics["summary"]["config"]["num_seeds"] == 2
  assert metrics["summary"]["config"]["seed"] == 5
  # Only the mean's plots; none of the single-seed job's.
  assert os.listdir(tmp_path / "plots") == ["metrics_bars.png"]
  # The earlier single-seed simulators at the top level are not the job's.
  assert "use one seed's workdir" in _refusal(tmp_path)
  assert list(counterfactual.load_simulators(str(tmp_path / "seed_1"))) == [
      "simfluence_linear"]


# --- the sweep, and duplicate methods ----------------------------------------------

def test_an_unfinished_sweep_leaves_no_sweep_json(tmp_path):
  config = config_lib.load_config(TINY)

  def cell(cell_config, workdir, overwrite):
    del workdir, overwrite
    if cell_config.batch_size == 4 and broken:
      raise KeyboardInterrupt
    return {"simfluence_linear": {"spearman_across_runs": 0.5,
                                  "all_steps_mse_ratio": 0.5}}

  broken = False
  sweep.run(config, str(tmp_path), ["batch_size:2,4"], run_fn=cell)
  assert (tmp_path / "sweep.json").exists()
  broken = True
  with pytest.raises(KeyboardInterrupt):
    sweep.run(config, str(tmp_path), ["batch_size:2,4"], run_fn=cell)
  assert not (tmp_path / "sweep.json").exists()
  assert not (tmp_path / "sweep.png").exists()
  proc = _tables(f"--sweep={tmp_path}")
  assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
      f"error: --sweep={str(tmp_path)!r} has no sweep.json: its last sweep did not "
      "finish (or never ran there); rerun it."), proc.stderr


@pytest.mark.parametrize("field", ["methods", "counterfactual.methods"])
def test_duplicate_methods_are_refused(field):
  config = config_lib.load_config(TINY)
  *parents, leaf = field.split(".")
  section = config
  for part in parents:
    section = section[part]
  # `--config.methods=...` given twice: ml_collections joins the tuples.
  section[leaf] = ("simfluence_linear", "metagradient", "simfluence_linear")
  with pytest.raises(ValueError) as info:
    pipeline.validate_config(config)
  assert str(info.value) == (
      f"config.{field}=('simfluence_linear', 'metagradient', 'simfluence_linear'): "
      "['simfluence_linear'] listed more than once (was the flag given twice?).")


def _tree(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, files in os.walk(root) for f in files)


def test_a_multi_seed_job_adopts_the_single_seed_job_at_its_top(tmp_path, caplog):
  """Review h22: after num_seeds 1 -> 2 the top level's tensorboard/ (the single-seed
  job's, maybe of another config) showed beside the seeds' as the job's own, and
  seed 0 was trained again in seed_0/."""
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top
  record = json.dumps({"fields": {"seed": 3}})
  files = {"stages/record_runs.json": record,
           "tensorboard/evaluation/events": "events",
           "simulators/linear/params.npy": "params", "metrics.json": "{}",
           ".lock": "lock", "seed_1/stages/data.json": "{}"}

  def write(root):
    for name, text in files.items():
      os.makedirs(os.path.dirname(root / name), exist_ok=True)
      (root / name).write_text(text)

  write(tmp_path)
  with caplog.at_level("WARNING", logger="simfluence_jax.pipeline"):
    experiment.adopt_single_seed_job(str(tmp_path), first_seed=3)
  assert _tree(tmp_path) == [
      ".lock", "seed_0/metrics.json", "seed_0/simulators/linear/params.npy",
      "seed_0/stages/record_runs.json", "seed_0/tensorboard/evaluation/events",
      "seed_1/stages/data.json"]
  assert (tmp_path / "seed_0/stages/record_runs.json").read_text() == record
  assert "is its seed 0; moved into seed_0/" in caplog.text

  # Another seed than the job's first (seeds 5, 6 over a seed-3 job), or seed_0/
  # already holding a job: the top level's job stays, its TensorBoard goes.
  for first_seed, where in ((5, tmp_path / "other"), (3, tmp_path)):
    write(where)
    experiment.adopt_single_seed_job(str(where), first_seed=first_seed)
    assert (where / "stages/record_runs.json").exists()
    assert (where / "simulators/linear/params.npy").exists()
    assert not (where / "tensorboard").exists()
    assert not (where / "seed_0").exists() or where == tmp_path
  assert "its tensorboard/ was removed" in caplog.text
  assert (tmp_path / "seed_0/stages/record_runs.json").read_text() == record
  # Nothing at the top: nothing happens.
  empty = tmp_path / "empty"
  empty.mkdir()
  experiment.adopt_single_seed_job(str(empty), first_seed=0)
  assert not os.listdir(empty)
