"""Every config field is recorded by a stage, or declared as shaping nothing stored.

A stage's record, `workdir/stages/<stage>.json` (`pipeline/workdir.py`), keeps the
config fields its fingerprint was computed from: its own and its upstream stages'.
A field that shapes an output but that no stage records would let a rerun with
another value reuse outputs computed from the old one. So every leaf of the job's
config (`fingerprint.flatten_config`) must be recorded by some stage of a job that
ran them all, or be named in `fingerprint.UNCACHED_FIELDS` (how the job runs, not
what it computes).

The workdir is main_test's tiny job (every stage) when it ran earlier in this
process (conftest puts this module on main_test's xdist worker); run alone, this
module runs that job itself.
"""

import json
import os

import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import pipeline
from simfluence_jax.pipeline import fingerprint as fp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")
# Stages the tiny job must have run for the check to mean anything: its optional
# ones too (every method, unseen-example runs, the removal benchmark, the learning
# curve and the counterfactual search), whose fields no other stage reads.
STAGES = ("data", "base_model", "record_runs", "tracin_cp_scores", "ekfac_scores",
          "fit_simfluence_linear", "fit_simfluence_additive", "fit_tracin_cp",
          "fit_tracin_per_step", "fit_ekfac_if", "features",
          "fit_simfluence_featurized", "metagradient", "evaluate", "learning_curve",
          "removal_runs", "removal_metagradients", "counterfactual")


@pytest.fixture(scope="module")
def tiny_workdir(main_tiny_run, tmp_path_factory):
  """`(config, workdir)` of the tiny job with every stage, run to the end."""
  if main_tiny_run:
    return main_tiny_run[0]
  config = config_lib.load_config(TINY)
  workdir = str(tmp_path_factory.mktemp("tiny_all_stages") / "job")
  pipeline.run(config, workdir)
  return config, workdir


def _records(workdir) -> dict:
  """stage name -> its record, for every record in the workdir."""
  directory = os.path.join(workdir, "stages")
  records = {}
  for name in sorted(os.listdir(directory)):
    if name.endswith(".json"):
      with open(os.path.join(directory, name)) as f:
        records[name[:-len(".json")]] = json.load(f)
  return records


def _covered(field: str, names) -> bool:
  """Whether `field` is one of `names` or inside a section one of them names."""
  return any(field == name or field.startswith(name + ".") for name in names)


def test_every_config_field_is_recorded_by_a_stage_or_uncached(tiny_workdir):
  config, workdir = tiny_workdir
  records = _records(workdir)
  missing = sorted(set(STAGES) - set(records))
  assert not missing, f"the tiny job ran no stage {missing}: {sorted(records)}"
  unfinished = sorted(n for n, r in records.items() if r.get("status") != "done")
  assert not unfinished, f"stages not done: {unfinished}"
  flat = fp.flatten_config(config)
  # The records are of this config (else the check below would prove nothing).
  differ = sorted({f"{stage}: {field}" for stage, record in records.items()
                   for field, value in record["fields"].items()
                   if flat.get(field, "<not a config field>") != value})
  assert not differ, f"recorded fields differ from the job's config: {differ}"
  recorded = set().union(*(record["fields"] for record in records.values()))
  # A field added later is left out of records at its old-behaviour value
  # (`test_fields_added_later_...` checks it is recorded at any other value).
  uncovered = sorted(field for field in flat
                     if not _covered(field, recorded)
                     and not _covered(field, fp.UNCACHED_FIELDS)
                     and fp.FIELDS_ADDED_LATER.get(field, object()) != flat[field])
  assert not uncovered, (
      f"config fields that no stage records and that are not in "
      f"fingerprint.UNCACHED_FIELDS: {uncovered}. A rerun with another value would "
      "reuse outputs computed from the old one: add each to the `fields` of the "
      "stage that reads it (pipeline/stages.py), or to UNCACHED_FIELDS if it shapes "
      "nothing stored.")


def test_band_samples_and_feature_dim_refit_no_simulator(tiny_workdir):
  """Review h22: the fits recorded the whole `simulators` section, so changing
  num_band_samples (read by evaluate only) refitted three simulators, redid the
  learning curve and retrained the counterfactual curricula, bit-identical."""
  _, workdir = tiny_workdir
  records = _records(workdir)
  for stage in ("fit_simfluence_linear", "fit_simfluence_additive",
                "fit_simfluence_featurized", "learning_curve"):
    fields = set(records[stage]["fields"])
    assert {"simulators.l2_grid", "simulators.cv_folds"} <= fields, stage
    assert "simulators.num_band_samples" not in fields, stage
    # feature_dim only through the features stage (Featurized's upstream).
    assert ("simulators.feature_dim" in fields) == (stage == "fit_simfluence_featurized")
  assert "simulators.num_band_samples" in records["evaluate"]["fields"]
  assert "simulators.feature_dim" in records["features"]["fields"]


def test_uncached_fields_are_config_fields_no_stage_records(tiny_workdir):
  config, workdir = tiny_workdir
  flat = fp.flatten_config(config)
  unknown = [name for name in fp.UNCACHED_FIELDS
             if not any(_covered(field, [name]) for field in flat)]
  assert not unknown, f"UNCACHED_FIELDS names no config field: {unknown}"
  read = {}  # UNCACHED_FIELDS name -> the stages that record it
  for stage, record in _records(workdir).items():
    for name in fp.UNCACHED_FIELDS:
      if any(_covered(field, [name]) for field in record["fields"]):
        read.setdefault(name, []).append(stage)
  assert not read, (f"fields declared in UNCACHED_FIELDS are recorded by stages: "
                    f"{read}; a field shaping a stored output is not uncached.")


def test_fields_added_later_keep_old_records_and_record_other_values():
  """A workdir from before `model.use_bias` existed still matches at its old value
  (True); False is recorded like any field, so it refuses or recomputes."""
  from simfluence_jax.pipeline import stages  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  before = fp.flatten_config(config)
  del before["model.use_bias"]  # the config as it was before the field existed
  now = fp.flatten_config(config)
  assert now["model.use_bias"] is True
  assert (fp.select_fields(now, stages.MODEL_FIELDS)
          == fp.select_fields(before, stages.MODEL_FIELDS))
  config.model.use_bias = False
  changed = fp.select_fields(fp.flatten_config(config), stages.MODEL_FIELDS)
  assert changed["model.use_bias"] is False
  old = fp.Inputs(fp.select_fields(before, stages.MODEL_FIELDS), {})
  assert fp.compare({"fingerprint": old.fingerprint, "status": "done"},
                    fp.Inputs(changed, {})) == "changed"


class _Recording(dict):
  """A config dict that records every name read through `get`."""

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self.read = set()

  def get(self, name, default=None):
    self.read.add(name)
    return super().get(name, default)


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("schedule", ["constant", "linear"])
def test_every_optimizer_setting_is_a_config_field_the_runs_record(optimizer,
                                                                   schedule):
  """A field the updates read but no stage records (e.g. `warmup_steps` before it
  was a config field) would let a rerun reuse runs trained with the old value."""
  from simfluence_jax import training  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import stages  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  recording = _Recording(optimizer=optimizer, lr_schedule=schedule,
                         learning_rate=0.1, num_steps=4)
  settings = training.optim.optimizer_settings(recording)
  read = recording.read - {"num_steps"}  # num_steps: a curricula field
  assert set(settings) - {"num_steps"} <= read
  assert read <= set(stages.OPTIMIZER_FIELDS), read - set(stages.OPTIMIZER_FIELDS)
  flat = fp.flatten_config(config)
  assert read <= set(flat), f"not config fields: {sorted(read - set(flat))}"
  config.optimizer, config.lr_schedule = optimizer, schedule
  before = fp.select_fields(fp.flatten_config(config), stages.RECORD_FIELDS)
  for field in sorted(read - {"optimizer", "lr_schedule"}):
    changed = config_lib.load_config(TINY)
    changed.optimizer, changed.lr_schedule = optimizer, schedule
    changed[field] = type(changed[field])(2 * changed[field] + 1)
    after = fp.select_fields(fp.flatten_config(changed), stages.RECORD_FIELDS)
    assert fp.Inputs(after, {}).fingerprint != fp.Inputs(before, {}).fingerprint, field


def test_a_redrawn_check_blames_the_random_stream_only_when_no_field_changed():
  old = {"fields": {"batch_size": 4}, "version": 1, "checks": {"curricula": "a"}}
  redrawn = fp.Inputs({"batch_size": 4}, {}, checks={"curricula": "b"})
  assert fp.describe_changes(old, redrawn) == [
      "curricula a -> b (drawn again from the seed: another NumPy random stream?)"]
  # batch_size explains the new curricula: no hint about NumPy's stream.
  resized = fp.Inputs({"batch_size": 2}, {}, checks={"curricula": "b"})
  assert fp.describe_changes(old, resized) == ["batch_size 4 -> 2", "curricula a -> b"]
  # A field recorded only away from its old default shows that default, not
  # "<unset>" (momentum 0.9 is left out of records so that old ones stay valid).
  assert fp.describe_changes({"fields": {}, "version": 1},
                             fp.Inputs({"momentum": 0.5}, {})) == ["momentum 0.9 -> 0.5"]


def test_a_check_drawn_again_refuses_or_recomputes_every_stage_below_it(tmp_path):
  """`checks` (the curricula's digest): not in the fingerprint, so records written
  before it existed stay valid; another value is "changed" for the stage and every
  stage downstream of it (NumPy's stream changed under the same config)."""
  from simfluence_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  calls = []

  def job(draw, overwrite=False):
    wd = workdir_lib.Workdir(str(tmp_path / "job"), config, overwrite)
    for name, kwargs in (("runs", dict(precious=True, checks={"curricula": draw})),
                         ("fit", dict(upstream=("runs",))), ("other", {})):
      wd.stage(name, fields=("seed",), compute=lambda name=name: calls.append(name),
               load=lambda: None, **kwargs)

  job("a")
  assert calls == ["runs", "fit", "other"]
  calls.clear()
  job("a")
  assert not calls
  with pytest.raises(fp.StaleWorkdirError, match=r"stage runs was computed with "
                     r"other settings \(curricula a -> b \(drawn again from the seed"):
    job("b")
  job("b", overwrite=True)
  assert calls == ["runs", "fit"]  # "other" does not read the curricula
  path = os.path.join(tmp_path, "job", "stages", "runs.json")
  with open(path) as f:
    record = json.load(f)
  assert record["checks"] == {"curricula": "b"}
  del record["checks"]  # as written before the checks existed
  with open(path, "w") as f:
    json.dump(record, f)
  calls.clear()
  job("b")
  assert not calls


def test_a_reused_stage_names_the_packages_that_computed_it(tmp_path):
  """The report said "computed with" this job's packages for numbers an earlier job
  computed under others (stages reused across a package upgrade)."""
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  old = {"python": "3.11", "machine": "x86_64", "cpu": "A",
         "packages": {"jax": "0.4.1", "numpy": "1.21.0"}}
  new = dict(old, packages={"jax": "0.10.2", "numpy": "2.4.6"})

  def job(env, names):
    wd = workdir_lib.Workdir(str(tmp_path / "job"), config, environment=env)
    for name in names:
      wd.stage(name, fields=("seed",), compute=lambda: None, load=lambda: None)
    return wd

  assert job(old, ["runs"]).other_environments() == {}
  wd = job(new, ["runs", "fit"])  # runs reused (old packages), fit computed now
  assert wd.other_environments() == {"runs": old}
  text = _report.environment_text({"summary": {
      "environment": new, "other_environments": wd.other_environments()}})
  assert text == (" Computed with Python 3.11, jax 0.10.2, numpy 2.4.6, on A. Reused "
                  "stages computed with Python 3.11, jax 0.4.1, numpy 1.21.0, on A: "
                  "runs.")
  path = os.path.join(tmp_path, "job", "stages", "runs.json")
  with open(path) as f:
    record = json.load(f)
  del record["environment"]  # a record from before environments were recorded
  with open(path, "w") as f:
    json.dump(record, f)
  assert job(new, ["runs"]).other_environments() == {"runs": "not recorded"}


def _stage_job(tmp_path, config, calls, overwrite=False):
  """A precious stage "runs" (a file in runs/), a stage "scores" (an array) and a
  stage "data" that stores nothing; `calls` collects what was computed."""
  from simfluence_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir(str(tmp_path / "job"), config, overwrite)
  runs = str(tmp_path / "job" / "runs" / "losses.npy")
  scores = str(tmp_path / "job" / "arrays" / "scores.npy")

  def save(path, value):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.save(path, value)

  def compute(name, value):
    calls.append(name)
    return value

  wd.stage("data", fields=("data",), compute=lambda: compute("data", None))
  wd.stage("runs", fields=("seed",), upstream=("data",), precious=True,
           compute=lambda: compute("runs", np.arange(3.0)),
           save=lambda v: save(runs, v), load=lambda: np.load(runs),
           outputs=("runs",))
  return wd.stage("scores", fields=(), upstream=("runs",),
                  compute=lambda: compute("scores", np.ones(2)),
                  save=lambda v: save(scores, v), load=lambda: np.load(scores),
                  outputs=("arrays/scores.npy",))


def test_unreadable_outputs_and_records_recompute_or_refuse_by_name(tmp_path):
  """A stage whose stored outputs cannot be read is recomputed; a precious one is
  refused with its name and `--overwrite` then recomputes it (it was "done", so
  --overwrite did nothing and the error came back). A torn or non-object record
  of a precious stage whose outputs exist is refused (its runs were deleted and
  retrained unasked); a non-object record was an AttributeError traceback."""
  config = config_lib.load_config(TINY)
  calls = []
  _stage_job(tmp_path, config, calls)
  assert calls == ["data", "runs", "scores"]
  job = tmp_path / "job"
  os.remove(job / "arrays" / "scores.npy")
  calls.clear()
  np.testing.assert_array_equal(_stage_job(tmp_path, config, calls), np.ones(2))
  assert calls == ["data", "scores"]
  (job / "runs" / "losses.npy").write_text("not an array")
  calls.clear()
  with pytest.raises(fp.StaleWorkdirError, match=r"stage runs: its stored outputs "
                     r"cannot be read \(.*\); restore them, or --overwrite to "
                     r"discard runs/ and recompute\."):
    _stage_job(tmp_path, config, calls)
  _stage_job(tmp_path, config, calls, overwrite=True)
  assert calls == ["data", "data", "runs"]  # the same inputs: scores reused
  for torn in ("{", "[]"):
    (job / "stages" / "runs.json").write_text(torn)
    calls.clear()
    with pytest.raises(fp.StaleWorkdirError, match=r"stage runs: its record .*runs"
                       r".json is unreadable, so what runs/ were computed from is "
                       r"unknown; restore the record, or --overwrite"):
      _stage_job(tmp_path, config, calls)
    assert calls == ["data"] and (job / "runs" / "losses.npy").exists()
  (job / "stages" / "scores.json").write_text("[]")  # not precious: recomputed
  _stage_job(tmp_path, config, calls, overwrite=True)
  assert calls == ["data", "data", "runs", "scores"]


def test_a_stage_without_a_record_never_keeps_old_outputs(tmp_path):
  """Outputs left without a record (records discarded by --overwrite of a legacy
  workdir, or a job killed first) are cleared before the stage recomputes, not
  only for precious stages: removal/ then held another job's checkpoints and every
  rerun failed."""
  config = config_lib.load_config(TINY)
  calls = []
  _stage_job(tmp_path, config, calls)
  stale = tmp_path / "job" / "arrays" / "scores.npy"
  np.save(stale, np.zeros(5))
  os.remove(tmp_path / "job" / "stages" / "scores.json")
  calls.clear()
  seen = []
  from simfluence_jax.pipeline import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  wd = workdir_lib.Workdir(str(tmp_path / "job"), config)
  wd.stage("data", fields=("data",), compute=lambda: None)
  wd.stage("runs", fields=("seed",), upstream=("data",), precious=True,
           compute=lambda: None, load=lambda: None, outputs=("runs",))
  wd.stage("scores", fields=(), upstream=("runs",), outputs=("arrays/scores.npy",),
           compute=lambda: seen.append(stale.exists()), load=lambda: None)
  assert seen == [False]


def test_a_refused_job_leaves_the_records_as_it_found_them(tmp_path):
  """A stage that stores nothing ("data") writes its record only once the next
  stage starts: refused by the precious stage after it, the job rewrote
  stages/data.json and `simulate` then refused the untouched workdir."""
  config = config_lib.load_config(TINY)
  calls = []
  _stage_job(tmp_path, config, calls)
  record = (tmp_path / "job" / "stages" / "data.json").read_bytes()
  other = config_lib.load_config(TINY)
  other.data.seed += 1
  other.seed += 1
  with pytest.raises(fp.StaleWorkdirError, match="stage runs was computed with "
                     "other settings"):
    _stage_job(tmp_path, other, calls)
  assert (tmp_path / "job" / "stages" / "data.json").read_bytes() == record
  _stage_job(tmp_path, other, calls, overwrite=True)
  assert (tmp_path / "job" / "stages" / "data.json").read_bytes() != record


def test_results_name_the_code_that_computed_each_reused_stage():
  """Stage versions are bumped by hand; the environment also records a digest of
  the package's sources, so reused stages computed by other code are named."""
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top
  env = experiment.environment()
  assert len(env["code"]) == 16 and env["code"] == experiment.source_digest()
  older = dict(env, code="0" * 16)
  text = _report.environment_text({"summary": {
      "environment": env, "other_environments": {"runs": older}}})
  assert f"(simfluence_jax sources {env['code']})." in text
  assert text.endswith(f"(simfluence_jax sources {'0' * 16}): runs.")


def test_reused_stages_of_several_seeds_are_named_once_with_their_seeds():
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  older = {"python": "3.11", "cpu": "A", "packages": {"jax": "0.4.1"}}
  names = ["seed_0/runs", "seed_0/fit", "seed_1/runs", "seed_1/fit", "seed_2/runs",
           "seed_0/scores", "data"]
  text = _report.environment_text({"summary": {
      "environment": dict(older, packages={"jax": "0.10.2"}),
      "other_environments": {name: older for name in names}}})
  assert text.endswith(
      "Reused stages computed with Python 3.11, jax 0.4.1, on A: data; fit (seeds 0, "
      "1); runs (seeds 0, 1, 2); scores (seed 0).")
  assert _report.stage_list(["seed_0/a", "seed_1/a", "seed_0/b", "seed_1/b"]) == (
      "a, b (seeds 0, 1)")


def test_learning_curve_counts_above_the_fitted_runs_are_named(caplog):
  from simfluence_jax.pipeline import stages  # pylint: disable=g-import-not-at-top
  with caplog.at_level("WARNING", logger="simfluence_jax.pipeline"):
    assert stages.curve_counts((8, 16, 32), 48) == [8, 16, 32, 48]
  assert not caplog.records
  with caplog.at_level("WARNING", logger="simfluence_jax.pipeline"):
    assert stages.curve_counts((4, 16, 32), 8) == [4, 8]
  assert "[16, 32] exceed the 8 fitted runs" in caplog.text


def test_cost_charges_the_metagradient_its_held_out_share():
  """Review h27: the metagradient stage predicts the held-out and the unseen-example
  runs; the metagradient and the hybrid were charged both, so their cost grew with
  `unseen.num_runs`. Costs in run-equivalents: runs fitted on + seconds / run."""
  import types  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config("configs/default.py:tiny")
  config.num_held_out_runs, config.unseen.num_runs = 4, 12
  assert config.unseen.num_examples
  timings = {name: types.SimpleNamespace(computed_seconds=seconds) for name, seconds in
             (("metagradient", 8.0), ("fit_simfluence_linear", 1.0))}
  runs = types.SimpleNamespace(seconds_per_run=2.0, seconds_per_grad_run=None,
                               grad_trace=None)
  cost = experiment._cost(  # pylint: disable=protected-access
      config, runs, types.SimpleNamespace(timings=timings),
      ("metagradient", "simfluence_hybrid", "simfluence_linear"))
  assert cost["metagradient"]["seconds"] == pytest.approx(8.0 * 4 / 16)
  assert cost["metagradient"]["run_equivalents"] == pytest.approx(1.0)
  assert cost["simfluence_hybrid"]["run_equivalents"] == pytest.approx(
      config.num_runs + (2.0 + 1.0) / 2.0)
  assert cost["simfluence_linear"]["run_equivalents"] == pytest.approx(
      config.num_runs + 0.5)
