"""Counterfactual inputs that would make a number mean something else are refused.

* `search_curriculum` / `search_and_verify`: start curricula whose epochs are not
  those of `epoch_steps` (the search would return an id twice in one epoch);
  repeated targets; base losses other than the random runs' first ones; retrained
  losses of another shape; repeated or no methods.
* `load_simulators`: a fit whose upstream stages (any, at any depth) were recomputed.
* `choose_targets`: non-integer counts, losses of another shape, a single run.
* The simulate CLI and curriculum files: one `error:` line naming the flag/field.
"""

import json
import os
import re
import types

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import _cli as cli

import simfluence_jax as sj
from simfluence_jax import config_lib
from simfluence_jax import counterfactual
from simfluence_jax import data
from simfluence_jax import simulate
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import workdir as workdir_lib
from simfluence_jax.simulators import _search

N, M, B = 16, 3, 2


def _linear(seed=0, num_steps=None, batch_size=None):
  rng = np.random.default_rng(seed)
  return sj.simulators.Simulator(
      A=jnp.asarray(rng.uniform(0.3, 0.6, (N, M)).astype(np.float32)),
      B=jnp.asarray(rng.normal(0, 0.1, (N, M)).astype(np.float32)), kind="linear",
      name="lin", batch_size=batch_size, num_steps=num_steps)


def _rollout(sim, ids, initial):
  return np.asarray(sim.simulate(ids, np.repeat(initial[None], len(ids), 0)))


# --- epochs of the start curricula ----------------------------------------------------

def test_search_refuses_starts_whose_epochs_are_not_epoch_steps():
  sim = _linear()
  initial = np.ones(M, np.float32)
  starts = data.make_curricula(2, N, 6, 2, B, seed=0)  # 2 epochs of 3 steps
  search = lambda **kw: sj.simulators.search_curriculum(
      sim, initial, starts, [0, 1], num_iters=200, num_proposals=16, seed=0,
      loss_floor=None, **kw)
  for epoch_steps, message in (
      (None, r"^start_batch_ids: curriculum 0 repeats id \d+ within the whole "
             r"curriculum \(epoch_steps=None: one epoch of 6 steps\): pass the "
             r"curricula's epoch length .* as epoch_steps\.$"),
      (2, r"^start_batch_ids: curriculum 0 holds 4 of its 6 ids in the epoch of "
          r"epoch_steps=2 at steps 0-1, not each once: pass"),
      (4, r"^start_batch_ids: curriculum 0 repeats id \d+ within the epoch of "
          r"epoch_steps=4 at steps 0-3: pass"),
      (6, r"epoch_steps=6 at steps 0-5")):
    with pytest.raises(ValueError, match=message):
      search(epoch_steps=epoch_steps)
  # The real epoch length: every epoch holds each id of the curriculum once, no
  # batch an id twice, and the objective is what the simulator says of them.
  result = search(epoch_steps=3)
  for ids in result.batch_ids:
    chosen = np.unique(ids)
    assert chosen.size == 6
    for epoch in (ids[:3], ids[3:]):
      np.testing.assert_array_equal(np.sort(epoch.ravel()), chosen)
  final = _rollout(sim, result.batch_ids, initial)[:, -1, :2].mean(-1)
  np.testing.assert_allclose(result.objective, final, rtol=1e-5)
  assert np.all(result.objective <= result.initial_objective)
  # One-epoch starts are one epoch of the whole curriculum, as before.
  one = sj.simulators.search_curriculum(sim, initial, starts[:, :3], [0, 1],
                                        num_iters=50, num_proposals=8,
                                        loss_floor=None)
  np.testing.assert_allclose(
      one.objective, _rollout(sim, one.batch_ids, initial)[:, -1, :2].mean(-1),
      rtol=1e-5)


def test_an_additive_search_moves_no_position_and_needs_no_epoch_steps():
  """Without order moves (one-phase additive), every epoch keeps its ids: a
  two-epoch start needs no epoch_steps; final = initial + 2 Σ b of the best 3."""
  b = np.full((N, M), 0.01, np.float32)
  b[[2, 5, 9]] = -1.0
  sim = sj.simulators.additive_from_scores(b)
  starts = data.make_curricula(2, N, 3, 2, 1, seed=0)
  result = sj.simulators.search_curriculum(sim, np.full(M, 10.0, np.float32), starts,
                                           [0], num_iters=80, num_proposals=16)
  np.testing.assert_allclose(result.objective, 10.0 - 2 * 3 * 1.0, rtol=1e-6)


def test_the_pipelines_start_curricula_pass_with_its_epoch_steps():
  """`stages.counterfactual_starts` (3-step epochs cut at num_steps=8: a shorter
  last epoch) with the `epoch_steps` the stage passes."""
  config = config_lib.apply_tiny(config_lib.base_config())
  config.subset_size = 12
  spe = data.steps_per_epoch(config.subset_size, config.batch_size)
  assert (spe, config.num_steps) == (3, 8)
  curricula = types.SimpleNamespace(steps_per_epoch=spe,
                                    all_runs=lambda: np.zeros(16))
  starts = stages.counterfactual_starts(config, curricula)
  _search.check_epochs(starts, spe)  # no error
  with pytest.raises(ValueError, match="epoch_steps=None"):
    _search.check_epochs(starts, None)


def _verify_setup():
  sim = sj.simulators.Simulator(
      A=None, B=jnp.asarray(np.random.default_rng(0).normal(
          -0.05, 0.1, (N, 4)).astype(np.float32)), kind="additive", name="add")
  initial = np.full(4, 2.0, np.float32)
  random_ids = data.make_curricula(3, N, 8, 1, B, seed=0, first_run=10)
  return sim, initial, random_ids, _rollout(sim, random_ids, initial)


def _verify(fitted, initial, random_ids, random_losses, starts, retrain, **kwargs):
  return counterfactual.search_and_verify(
      fitted, initial_losses=initial, start_batch_ids=starts,
      random_batch_ids=random_ids, random_losses=random_losses, retrain=retrain,
      **{"targets": [0, 1], "num_iters": 20, "num_proposals": 8, **kwargs})


def test_search_and_verify_refuses_starts_whose_epochs_are_not_epoch_steps():
  sim = _linear(seed=1)
  initial = np.ones(M, np.float32)
  starts = data.make_curricula(2, N, 6, 2, B, seed=0)
  random_ids = data.make_curricula(3, N, 6, 2, B, seed=0, first_run=10)
  a, b = np.asarray(sim.A), np.asarray(sim.B)

  def retrain(ids):  # the simulator's system, losses clipped at 0 as searched
    losses = np.zeros((len(ids), ids.shape[1] + 1, M), np.float32)
    losses[:, 0] = initial
    for t in range(ids.shape[1]):
      step = np.where(ids[:, t, :, None] >= 0, 1.0, 0.0)
      rows = np.maximum(ids[:, t], 0)
      losses[:, t + 1] = np.maximum(
          (step * a[rows]).sum(1) * losses[:, t] + (step * b[rows]).sum(1), 0.0)
    return losses
  args = ({"lin": sim}, initial, random_ids, retrain(random_ids), starts, retrain)
  calls = []
  counting = lambda ids: calls.append(len(ids)) or retrain(ids)
  for epoch_steps in (None, 2):
    with pytest.raises(ValueError, match=(
        rf"^start_batch_ids: curriculum 0 .*epoch_steps={epoch_steps}")):
      _verify(*args[:5], counting, epoch_steps=epoch_steps)
  assert not calls  # refused before any search or retraining
  result = _verify(*args, epoch_steps=3)
  for ids in result["batch_ids"]["lin"]:
    np.testing.assert_array_equal(np.sort(ids[:3].ravel()), np.sort(ids[3:].ravel()))
  searched = result["searched"]["lin"]
  np.testing.assert_allclose(searched["actual_final"], searched["simulated_final"],
                             rtol=1e-5)


# --- targets, base losses, retrained shapes, methods ----------------------------------

def test_repeated_targets_are_refused():
  with pytest.raises(ValueError, match=r"^targets: repeats test example 0; "):
    sj.simulators.target_weights(np.array([0, 0, 1]), 4)
  np.testing.assert_allclose(sj.simulators.target_weights([0, 2], 4),
                             [0.5, 0, 0.5, 0])
  sim, initial, random_ids, random_losses = _verify_setup()
  starts = data.make_curricula(2, N, 8, 1, B, seed=0, first_run=100)
  retrain = lambda ids: _rollout(sim, ids, initial)
  with pytest.raises(ValueError, match=r"^targets: repeats test example 0; give each "
                                       r"once\.$"):
    _verify({"add": sim}, initial, random_ids, random_losses, starts, retrain,
            targets=[0, 0, 1])
  result = _verify({"add": sim}, initial, random_ids, random_losses, starts, retrain,
                   targets=[1, 0])
  final = _rollout(sim, result["batch_ids"]["add"], initial)[:, -1]
  np.testing.assert_allclose(result["searched"]["add"]["simulated_final"],
                             final[:, [0, 1]].mean(-1), rtol=1e-6)


def test_initial_losses_must_be_the_random_runs_first_losses():
  sim, initial, random_ids, random_losses = _verify_setup()
  starts = data.make_curricula(2, N, 8, 1, B, seed=0, first_run=100)
  retrain = lambda ids: _rollout(sim, ids, initial)
  with pytest.raises(ValueError, match=(
      r"^random_losses: run 0 starts at loss 2 of test example 0, not "
      r"initial_losses\[0\]=7; both must be the base model's losses\.$")):
    _verify({"add": sim}, initial + 5.0, random_ids, random_losses, starts, retrain)
  # The same model's losses evaluated another way (float noise) are the same.
  noisy = random_losses.copy()
  noisy[:, 0] *= 1 + 1e-6
  result = _verify({"add": sim}, initial, random_ids, noisy, starts, retrain)
  exact = _verify({"add": sim}, initial, random_ids, random_losses, starts, retrain)
  assert result["searched"]["add"]["simulated_improvement"] == pytest.approx(
      exact["searched"]["add"]["simulated_improvement"], rel=1e-6)
  np.testing.assert_allclose(exact["random"]["actual_final"],
                             random_losses[:, -1, :2].mean(-1), rtol=1e-6)


@pytest.mark.parametrize("extra, shape", [(3, [2, 5, 7]), (-1, [2, 5, 3])])
def test_retrained_losses_must_have_the_random_runs_shape(extra, shape):
  sim, initial, random_ids, random_losses = _verify_setup()
  starts = data.make_curricula(2, N, 8, 1, B, seed=0, first_run=100)
  retrain = lambda ids: _rollout(sim, ids, initial)
  if extra > 0:
    other = lambda ids: np.concatenate(
        [retrain(ids), np.zeros((len(ids), 5, extra), np.float32)], -1)
  else:
    other = lambda ids: retrain(ids)[..., :extra]
  with pytest.raises(ValueError, match=(
      rf"^retrain returned losses of shape \[{shape[0]}, {shape[1]}, {shape[2]}\]; "
      r"expected \[2, 5, 4\] \(C'=2 curricula, T\+1=5, M=4 test examples like "
      r"random_losses\)\.$")):
    _verify({"add": sim}, initial, random_ids, random_losses, starts, other)
  result = _verify({"add": sim}, initial, random_ids, random_losses, starts, retrain)
  searched = result["searched"]["add"]
  np.testing.assert_allclose(searched["actual_final"], searched["simulated_final"],
                             rtol=1e-6)


def test_repeated_or_no_methods_are_refused():
  sim, initial, random_ids, random_losses = _verify_setup()
  starts = data.make_curricula(2, N, 8, 1, B, seed=0, first_run=100)
  calls = []
  retrain = lambda ids: calls.append(len(ids)) or _rollout(sim, ids, initial)
  fitted = {"add": sim, "other": sim}
  with pytest.raises(ValueError, match=r"^methods: \['add'\] named more than once"):
    _verify(fitted, initial, random_ids, random_losses, starts, retrain,
            methods=["add", "other", "add"])
  with pytest.raises(ValueError, match=r"^methods: empty; name at least one"):
    _verify(fitted, initial, random_ids, random_losses, starts, retrain, methods=[])
  assert not calls
  result = _verify(fitted, initial, random_ids, random_losses, starts, retrain,
                   methods=["other", "add"])
  assert calls == [4] and list(result["searched"]) == ["other", "add"]


# --- choose_targets -------------------------------------------------------------------

def test_choose_targets_refuses_what_it_cannot_rank():
  losses = np.ones((5, 3, 4), np.float32)
  losses[:, -1, 2] = np.arange(5)
  losses[:, -1, 0] = np.arange(5) * 0.5
  for k in (2, np.int64(2)):
    np.testing.assert_array_equal(counterfactual.choose_targets(losses, k), [0, 2])
  for k in (2.7, np.float64(2.0), True, 0, 5):
    with pytest.raises(ValueError, match=r"^num_targets=.*: must be an integer in "
                                         r"\[1, M=4\]\.$"):
      counterfactual.choose_targets(losses, k)
  for bad in (losses[0], losses[:1]):
    with pytest.raises(ValueError, match=(
        r"^train_losses: expected float\[R, T\+1, M\] of R >= 2 runs .* got shape "
        + re.escape(f"{list(bad.shape)}.") + "$")):
      counterfactual.choose_targets(bad, 2)


# --- load_simulators: every upstream stage ----------------------------------------------

def _job(workdir, damping, learning_rate=0.1, stop_after=None):
  """A main job through `Workdir.stage`: base_model -> record_runs -> ekfac_scores ->
  fit_ekfac_if (and fit_simfluence_linear on record_runs alone); `stop_after`: the
  last stage run (a job stopped there)."""
  config = ml_collections.ConfigDict({
      "learning_rate": learning_rate, "influence": {"damping": damping},
      "simulators": {"l2": 0.1}})
  wd = workdir_lib.Workdir(str(workdir), config, overwrite=True)
  plan = [("base_model", ("learning_rate",), ()),
          ("record_runs", (), ("base_model",)),
          ("ekfac_scores", ("influence",), ("base_model",)),
          ("fit_simfluence_linear", ("simulators",), ("record_runs",)),
          ("fit_ekfac_if", ("simulators",), ("ekfac_scores", "record_runs"))]
  for name, fields, upstream in plan:
    save = None
    if name.startswith("fit_"):
      path = wd.path(counterfactual.SIMULATORS_DIR, name[4:])
      save = lambda sim, path=path: sim.save(path)
    scale = 1.0 if damping is None else float(damping)
    wd.stage(name, fields=fields, upstream=upstream, save=save,
             compute=lambda scale=scale: sj.simulators.additive_from_scores(
                 np.full((N, M), -0.01 * scale, np.float32), name="fake"))
    if name == stop_after:
      return


def test_a_fit_on_a_recomputed_upstream_stage_is_refused(tmp_path):
  _job(tmp_path, None)
  loaded = counterfactual.load_simulators(str(tmp_path), ["ekfac_if"])
  np.testing.assert_allclose(loaded["ekfac_if"].B, -0.01)
  # Another influence.damping; the job stopped before refitting ekfac_if.
  _job(tmp_path, 0.5, stop_after="ekfac_scores")
  with pytest.raises(ValueError) as info:
    counterfactual.load_simulators(str(tmp_path), ["ekfac_if"])
  message = str(info.value)
  assert message.startswith(
      f"simulators/ekfac_if in --workdir={str(tmp_path)!r} is stale: stage "
      "ekfac_scores was recomputed since fit_ekfac_if used it (ekfac_scores ")
  assert "in stages/ekfac_scores.json); rerun simfluence_jax.main." in message
  assert "\n" not in message
  # Unnamed, it is left out; the simulator fitted on record_runs alone loads.
  assert list(counterfactual.load_simulators(str(tmp_path))) == [
      "simfluence_linear"]
  _job(tmp_path, 0.5)  # refitted: current again, with its new values
  loaded = counterfactual.load_simulators(str(tmp_path), ["ekfac_if"])
  np.testing.assert_allclose(loaded["ekfac_if"].B, -0.005)


def test_a_fit_on_a_base_model_recomputed_since_is_refused(tmp_path):
  """Deeper upstream: a new base model, the job stopped before recording runs."""
  _job(tmp_path, None)
  _job(tmp_path, None, learning_rate=0.2, stop_after="base_model")
  with pytest.raises(ValueError, match=(
      r"is stale: stage base_model was recomputed since record_runs used it")):
    counterfactual.load_simulators(str(tmp_path), ["simfluence_linear"])


# --- the simulate CLI and curriculum files ----------------------------------------------

@pytest.fixture(scope="module")
def fitted_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("workdir")
  truth = _linear(seed=5)
  ids = data.make_curricula(8, N, 8, 1, B, seed=0)
  trace = sj.Trace(batch_ids=ids, losses=_rollout(truth, ids, np.full(M, 3.0,
                                                                      np.float32)),
                   learning_rates=np.full(ids.shape[:2], 0.1, np.float32),
                   num_train_examples=N)
  trace.save(str(workdir / "trace"))
  sim = sj.simulators.fit("linear", trace, l2=1e-2)
  sim.save(str(workdir / counterfactual.SIMULATORS_DIR / "simfluence_linear"))
  curriculum = workdir / "mine.json"
  curriculum.write_text(json.dumps(ids[:2].tolist()))
  return workdir, curriculum, sim, trace


@pytest.mark.parametrize("flag, message", [
    ("--targets=1.5", "error: --targets: '1.5' is not a test example index (an "
     "integer in [0, 3))."),
    ("--targets=0,2,0", "error: --targets: repeats test example 0; give each once."),
    ("--num_band_samples=-3", "error: --num_band_samples=-3: must be an integer >= 0 "
     "(0: no bands)."),
    ("--methods=", "error: --methods: empty; name at least one of the fitted "
     "simulators ['simfluence_linear'], or leave it out for all."),
])
def test_simulate_cli_refuses_bad_flags_in_one_line(fitted_workdir, tmp_path, flag,
                                                    message):
  workdir, curriculum, _, _ = fitted_workdir
  proc = cli.simulate(workdir, curriculum, f"--output_dir={tmp_path}", flag)
  assert proc.returncode == 1, proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == message
  assert "Traceback" not in proc.stderr


def test_simulate_run_keeps_its_numbers_with_valid_flags(fitted_workdir, tmp_path):
  workdir, curriculum, sim, trace = fitted_workdir
  result = simulate.run(str(workdir), str(curriculum), output_dir=str(tmp_path),
                        targets=["2", "0"], num_band_samples=0)
  np.testing.assert_array_equal(result["targets"], [2, 0])
  expected = np.asarray(sim.simulate(trace.batch_ids[:2], trace.losses[:2, 0]))
  np.testing.assert_allclose(result["trajectories"]["simfluence_linear"]["mean"],
                             expected, rtol=1e-6)
  assert result["trajectories"]["simfluence_linear"]["std"] is None
  for bad in (-3, 2.5, True):
    with pytest.raises(ValueError, match=rf"^num_band_samples={bad!r}: must be an "
                                         r"integer >= 0"):
      counterfactual.simulate_curricula({"lin": sim}, trace.batch_ids[:1],
                                        trace.losses[0, 0], bad)


def test_simulate_rolls_out_past_the_fitted_steps_only_when_asked(fitted_workdir,
                                                                    tmp_path):
  workdir, _, sim, trace = fitted_workdir
  longer = np.concatenate([trace.batch_ids[:2], trace.batch_ids[2:4]], axis=1)
  path = tmp_path / "longer.json"
  path.write_text(json.dumps(longer.tolist()))
  with pytest.raises(ValueError, match=(
      r"8 steps, more than the 4 .* pass allow_extrapolation=True \(the simulate "
      r"command: --allow_extrapolation\)")):
    simulate.run(str(workdir), str(path), output_dir=str(tmp_path / "a"),
                 num_band_samples=0)
  proc = cli.simulate(workdir, path, f"--output_dir={tmp_path / 'b'}",
                      "--num_band_samples=0", "--allow_extrapolation")
  assert proc.returncode == 0, proc.stderr
  written = json.loads((tmp_path / "b" / "trajectories.json").read_text())
  expected = np.asarray(sim.simulate(longer, np.repeat(trace.losses[:1, 0], 2, 0),
                                     allow_extrapolation=True))
  assert written["allow_extrapolation"] is True
  np.testing.assert_allclose(written["methods"]["simfluence_linear"]["mean"],
                             expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, text, shown", [
    ("huge.json", "[[[100000000000000000000, 1], [2, 3]]]", "100000000000000000000"),
    ("huger.json", "[[1, 2], [3, " + "9" * 400 + "]]", "9" * 400),
    ("huge.csv", "0,1\n2,1e20\n", "1e20"),
], ids=["json", "json_beyond_float", "csv"])
def test_a_huge_id_is_out_of_range_in_one_line(tmp_path, name, text, shown):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError) as info:
    data.load_curriculum(str(path), 48)
  step = 0 if name == "huge.json" else 1
  slot = 0 if name == "huge.json" else 1
  assert str(info.value) == (
      f"curriculum file {str(path)!r}: curriculum 0, step {step}, slot {slot}: id "
      f"{shown} is outside [0, 48) (-1 = padding).")
  path.write_text(text.replace("100000000000000000000", "47").replace(
      "9" * 400, "47").replace("1e20", "47"))
  np.testing.assert_array_equal(data.load_curriculum(str(path), 48).max(), 47)


@pytest.mark.parametrize("num_phases", [1, 2])
def test_fitted_ids_of_equals_what_fit_records(num_phases):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 28, (4, 6, 3)).astype(np.int32)
  ids[1, 5] = -1  # a padded step
  ids[:, :3, 0] = 28  # only in the first phase's steps
  ids[0, 4, 1] = 29  # only in the second's
  assert {28, 29} <= set(sj.simulators.fitted_ids_of(ids))
  assert not {28, 29} & set(sj.simulators.fitted_ids_of(ids, 2))
  trace = sj.Trace(batch_ids=ids, losses=rng.uniform(1, 2, (4, 7, 2)).astype(
      np.float32), learning_rates=np.full((4, 6), 0.1, np.float32),
                   num_train_examples=30)
  for kind in ("linear", "additive"):
    fitted = sj.simulators.fit(kind, trace, l2=1.0, num_phases=num_phases)
    assert sj.simulators.fitted_ids_of(ids, num_phases) == fitted.fitted_ids


def test_a_search_pool_below_subset_size_is_refused_before_training():
  # One step per run: the fitted runs hold fewer ids than a start curriculum needs.
  # The search refused this after every stage before it had run.
  config = config_lib.load_config(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "default.py") + ":tiny")
  stages.check_counterfactual_pools(config, stages.make_curricula(config))
  with config.unlocked():
    config.num_steps = 1
  curricula = stages.make_curricula(config)
  held = len(sj.simulators.fitted_ids_of(curricula.fit))
  assert held < config.subset_size
  with pytest.raises(ValueError, match="^" + re.escape(
      f"counterfactual: simfluence_linear is fitted on {held} train ids, fewer than "
      f"subset_size={config.subset_size}: a start curriculum")):
    stages.check_counterfactual_pools(config, curricula)
  with config.unlocked():
    config.counterfactual.methods = ("metagradient",)  # draws from all N ids
  stages.check_counterfactual_pools(config, curricula)
