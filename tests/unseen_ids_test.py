"""Train ids no fitted run contained: simulators refuse them, searches avoid them.

A simulator fitted per id on recorded runs (Simfluence-Linear / -Additive, per-step
TracIn) has only its prior for an id no run contained, so `simulate` refuses such
curricula unless `allow_unfitted_ids=True`; the counterfactual search draws its
starts and moves from the fitted ids; the simulate CLI refuses them naming the file,
and records which fit each trajectory came from.
"""

import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

import _cli as cli

import simfluence_jax as sj
from simfluence_jax import config_lib
from simfluence_jax import counterfactual
from simfluence_jax import data
from simfluence_jax import simulate
from simfluence_jax.pipeline import stages

N, M, B, T = 6, 2, 2, 3
UNSEEN = 3  # never in a fitted run
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESSAGE = (
    "simulate: batch_ids hold train ids [3] (1 in all) that no fitted run contained;"
    " simulator 'simfluence_{kind}' has only its prior for them (simfluence_featurized"
    ", tracin_cp, ekfac_if and metagradient can predict them); pass "
    "allow_unfitted_ids=True to roll out anyway.")


def _trace(with_grads=False):
  """Four runs over ids {0, 1, 2, 4, 5}; id 3 occurs nowhere."""
  ids = np.array([[[0, 1], [2, 4], [5, -1]],
                  [[4, 5], [0, 2], [1, 1]],
                  [[2, 0], [5, 1], [4, -1]],
                  [[1, 4], [5, 0], [2, 2]]], np.int32)
  rng = np.random.default_rng(0)
  losses = (2.0 + rng.uniform(-0.3, 0.3, (4, T + 1, M))).astype(np.float32)
  grads = {}
  if with_grads:
    grads = dict(train_grads=rng.normal(size=(4, T, B, 3)).astype(np.float32),
                 test_grads=rng.normal(size=(4, T, M, 3)).astype(np.float32))
  return sj.Trace(batch_ids=ids, losses=losses,
                  learning_rates=np.full((4, T), 0.1, np.float32),
                  num_train_examples=N, **grads)


def _explicit_rollout(sim, batch_ids, initial):
  """The rollout L_t = (Σ A_i) L_{t−1} + Σ B_i (α ≡ 1 if additive), in numpy."""
  a = None if sim.A is None else np.asarray(sim.A, np.float64)
  b = np.asarray(sim.B, np.float64)
  out = np.zeros((len(batch_ids), batch_ids.shape[1] + 1, b.shape[1]))
  for r, run in enumerate(batch_ids):
    loss = np.asarray(initial[r], np.float64)
    out[r, 0] = loss
    for t, step in enumerate(run):
      step = step[step >= 0]
      alpha = 1.0 if a is None else a[step].sum(0)
      loss = alpha * loss + b[step].sum(0)
      out[r, t + 1] = loss
  return out


WITH_3 = np.array([[[0, 3], [1, 2], [4, 5]], [[3, 3], [3, 3], [3, -1]]], np.int32)
WITHOUT_3 = np.array([[[0, 1], [2, 4], [5, -1]]], np.int32)


@pytest.mark.parametrize("kind", ["linear", "additive"])
def test_fit_records_coverage_and_simulate_refuses_unfitted_ids(kind):
  sim = sj.simulators.fit(kind, _trace(), l2=0.5)
  assert sim.fitted_ids == (0, 1, 2, 4, 5)
  initial = np.full((2, M), 2.0, np.float32)
  with pytest.raises(ValueError) as info:
    sim.simulate(WITH_3, initial)
  assert str(info.value) == MESSAGE.format(kind=kind)
  with pytest.raises(ValueError, match=r"^simulate_with_bands: batch_ids hold train "
                     r"ids \[3\] \(1 in all\)"):
    sim.simulate_with_bands(WITH_3, initial, num_samples=2)
  # Accepted without id 3: the explicit rollout.
  got = np.asarray(sim.simulate(WITHOUT_3, initial[:1]))
  np.testing.assert_allclose(got, _explicit_rollout(sim, WITHOUT_3, initial[:1]),
                             rtol=1e-5)
  # With the flag: the old numbers, i.e. id 3 rolled out on its prior (A = a₀,
  # B = 0), exactly what a check-free simulator gives.
  a0 = sim.fit_info["prior_a"]
  np.testing.assert_array_equal(np.asarray(sim.B)[UNSEEN], 0.0)
  if kind == "linear":
    np.testing.assert_allclose(np.asarray(sim.A)[UNSEEN], a0, rtol=1e-6)
  flagged = np.asarray(sim.simulate(WITH_3, initial, allow_unfitted_ids=True))
  unchecked = sj.simulators.Simulator(A=sim.A, B=sim.B, kind=sim.kind, name=sim.name,
                                      batch_size=B, num_steps=T, null_a=sim.null_a)
  np.testing.assert_array_equal(flagged, np.asarray(unchecked.simulate(WITH_3,
                                                                       initial)))
  np.testing.assert_allclose(flagged, _explicit_rollout(sim, WITH_3, initial),
                             rtol=1e-5)
  mean, _ = sim.simulate_with_bands(WITH_3, initial, num_samples=2,
                                    allow_unfitted_ids=True)
  assert np.all(np.isfinite(mean))


def test_the_message_lists_ten_ids_and_the_count():
  sim = sj.simulators.Simulator(A=None, B=jnp.zeros((30, 1)), kind="additive",
                                name="x", fitted_ids=[0])
  ids = np.arange(1, 25, dtype=np.int32).reshape(1, 12, 2)
  with pytest.raises(ValueError, match=r"batch_ids hold train ids \[1, 2, 3, 4, 5, "
                     r"6, 7, 8, 9, 10, \.\.\.\] \(24 in all\)"):
    sim.simulate(ids, np.zeros((1, 1), np.float32))


def test_tracin_per_step_records_the_gradient_runs_ids():
  sim = sj.simulators.tracin_per_step(_trace(with_grads=True))
  assert sim.fitted_ids == (0, 1, 2, 4, 5)
  with pytest.raises(ValueError, match="simulator 'tracin_per_step' has only its prior"):
    sim.simulate(WITH_3, np.zeros((2, M), np.float32))
  out = np.asarray(sim.simulate(WITH_3, np.zeros((2, M), np.float32),
                                allow_unfitted_ids=True))
  # Run 1 holds only id 3: per-step TracIn's B = 0 there, "no effect".
  np.testing.assert_array_equal(out[1], 0.0)


def test_simulators_covering_every_id_are_not_restricted():
  trace = _trace()
  phi = np.random.default_rng(1).normal(size=(N, 3)).astype(np.float32)
  featurized = sj.simulators.fit("featurized", trace, l2=1.0, features=phi)
  prior = sj.simulators.fit("linear", trace, l2=1.0, prior_A=np.asarray(featurized.A),
                            prior_B=np.asarray(featurized.B))
  scores = sj.simulators.additive_from_scores(np.ones((N, M), np.float32))
  initial = np.full((2, M), 2.0, np.float32)
  for sim in (featurized, prior, scores):
    assert sim.fitted_ids is None
    np.testing.assert_allclose(np.asarray(sim.simulate(WITH_3, initial)),
                               _explicit_rollout(sim, WITH_3, initial), rtol=1e-5)


def test_fit_cv_keeps_the_coverage():
  sim = sj.simulators.fit_cv("linear", _trace(), l2_grid=(0.1, 1.0), num_folds=2)
  assert sim.fitted_ids == (0, 1, 2, 4, 5)


def test_coverage_round_trips_and_old_saves_load_unchecked(tmp_path):
  sim = sj.simulators.fit("linear", _trace(), l2=0.5)
  path = str(tmp_path / "sim")
  sim.save(path)
  loaded = sj.simulators.Simulator.load(path)
  assert loaded.fitted_ids == sim.fitted_ids
  initial = np.full((2, M), 2.0, np.float32)
  with pytest.raises(ValueError, match=r"train ids \[3\]"):
    loaded.simulate(WITH_3, initial)
  # A simulator saved before coverage was recorded: no fitted_ids.npy, no
  # num_fitted_ids. It loads, and simulates unchecked (unknown coverage).
  meta_path = os.path.join(path, "simulator.json")
  meta = json.load(open(meta_path))
  corrupt = dict(meta, num_fitted_ids=4)
  with open(meta_path, "w") as f:
    json.dump(corrupt, f)
  with pytest.raises(ValueError, match="fitted_ids int32 \\[5\\] but simulator.json "
                     "says 4 ids"):
    sj.simulators.Simulator.load(path)
  del meta["num_fitted_ids"]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  os.remove(os.path.join(path, "fitted_ids.npy"))
  old = sj.simulators.Simulator.load(path)
  assert old.fitted_ids is None
  np.testing.assert_array_equal(
      np.asarray(old.simulate(WITH_3, initial)),
      np.asarray(sim.simulate(WITH_3, initial, allow_unfitted_ids=True)))


def test_fitted_ids_out_of_range_are_refused():
  with pytest.raises(ValueError, match=r"fitted_ids: expected train ids in \[0, N=6\)"):
    sj.simulators.additive_from_scores(np.zeros((N, M)), fitted_ids=[0, 6])


# --- the counterfactual search ---------------------------------------------------------

def _planted(num_train=12, num_test=2, unfitted=(3,)):
  """Additive simulator whose best ids are 3 (unfitted: an artifact) then 0, 5, 7."""
  b = np.full((num_train, num_test), 0.01, np.float32)
  b[list(unfitted)] = -5.0
  b[[0, 5, 7]] = -1.0
  fitted = [i for i in range(num_train) if i not in unfitted]
  return sj.simulators.Simulator(A=None, B=jnp.asarray(b), kind="additive",
                                 name="simfluence_additive", fitted_ids=fitted)


def _verify(sim, starts, random_ids, **kwargs):
  initial = np.full(2, 10.0, np.float32)
  retrain = lambda ids: np.asarray(sim.simulate(
      ids, np.repeat(initial[None], len(ids), 0), allow_unfitted_ids=True))
  random_losses = kwargs.pop("random_losses", None)
  if random_losses is None:
    random_losses = retrain(random_ids)
  return counterfactual.search_and_verify(
      {"simfluence_additive": sim}, initial_losses=initial, start_batch_ids=starts,
      random_batch_ids=random_ids, random_losses=random_losses,
      retrain=retrain, num_iters=60, num_proposals=16, **dict(dict(targets=[0, 1]),
                                                               **kwargs))


def test_search_moves_only_among_fitted_ids_and_finds_their_best():
  sim = _planted()
  pool = np.asarray(sim.fitted_ids)
  starts = data.make_curricula(2, 12, 3, 2, 1, seed=0, pool=pool)
  random_ids = data.make_curricula(5, 12, 3, 2, 1, seed=1, pool=pool)
  result = _verify(sim, starts, random_ids)
  searched = result["batch_ids"]["simfluence_additive"]
  # Brute force over the pool's 3-subsets: {0, 5, 7}; id 3 (better, but only the
  # prior's artifact here) is never brought in.
  for ids in searched:
    assert sorted(set(ids[ids >= 0].tolist())) == [0, 5, 7]
  out = result["searched"]["simfluence_additive"]
  np.testing.assert_allclose(out["simulated_final"], 10.0 - 2 * 3 * 1.0, rtol=1e-5)
  assert out["pool_size"] == 11 and out["random_unfitted_ids"] == []


def test_search_curriculum_defaults_to_the_fitted_ids_and_refuses_others():
  sim = _planted()
  initial = np.full(2, 10.0, np.float32)
  starts = data.make_curricula(2, 12, 3, 2, 1, seed=0, pool=np.asarray(sim.fitted_ids))
  result = sj.simulators.search_curriculum(sim, initial, starts, [0, 1], num_iters=60,
                                           num_proposals=16)
  best = result.batch_ids[result.best]
  assert sorted(set(best[best >= 0].tolist())) == [0, 5, 7]  # never the artifact 3
  for name, kwargs in (("start_batch_ids", dict(start_batch_ids=np.where(
      starts == starts[0, 0, 0], 3, starts))), ("pool", dict(pool=[0, 3, 5]))):
    arguments = {"start_batch_ids": starts, "pool": None, **kwargs}
    with pytest.raises(ValueError, match=(
        rf"^search_curriculum: {name} hold train ids \[3\] \(1 in all\) that no "
        "fitted run contained")):
      sj.simulators.search_curriculum(sim, initial, targets=[0, 1], num_iters=2,
                                      num_proposals=2, **arguments)
  # Asked for: the prior's artifact wins the search, as before these checks.
  result = sj.simulators.search_curriculum(sim, initial, starts, [0, 1], num_iters=60,
                                           num_proposals=16, allow_unfitted_ids=True)
  best = result.batch_ids[result.best]
  assert 3 in best


def test_search_refuses_starts_with_unfitted_ids_and_reports_random_ones(caplog):
  sim = _planted()
  pool = np.asarray(sim.fitted_ids)
  bad = data.make_curricula(2, 12, 3, 2, 1, seed=0, pool=pool)
  bad[1, 2, 0] = bad[1, 5, 0] = 3  # one of its 3 ids replaced by the unfitted 3
  random_ids = data.make_curricula(5, 12, 3, 2, 1, seed=1, pool=pool)
  with pytest.raises(ValueError) as info:
    _verify(sim, bad, random_ids)
  assert str(info.value) == (
      "start_batch_ids: holds train ids [3] (1 in all) that no fitted run of "
      "simulator 'simfluence_additive' contained; draw its starts from its "
      "Simulator.fitted_ids.")
  # A dict of starts per method, and random curricula that hold id 3: rolled out,
  # listed and warned about.
  good = data.make_curricula(2, 12, 3, 2, 1, seed=0, pool=pool)
  random_ids = random_ids.copy()
  random_ids[0, 0, 0] = 3
  with caplog.at_level("WARNING"):
    result = _verify(sim, {"simfluence_additive": good}, random_ids)
  assert result["searched"]["simfluence_additive"]["random_unfitted_ids"] == [3]
  assert "the random curricula hold train ids [3]" in caplog.text


@pytest.mark.parametrize("change, message", [
    (dict(starts=(2, 5, 1)), r"^start_batch_ids: expected int\[C, T=6, B=1\] like "
     r"random_batch_ids, got shape \[2, 5, 1\]\.$"),
    (dict(starts=(2, 6, 2)), r"^start_batch_ids: expected int\[C, T=6, B=1\] like "
     r"random_batch_ids, got shape \[2, 6, 2\]\.$"),
    (dict(random_losses=(5, 6, 2)), r"^random_losses: expected \[R', T\+1=7, M=2\] "
     r"\(random_batch_ids has T=6 steps, initial_losses M=2\), got shape "
     r"\[5, 6, 2\]\.$"),
    (dict(targets=[-1, 0]), r"^targets: test examples must be in \[0, M=2\), got "
     r"\[-1\]\.$"),
    (dict(targets=[0, 2]), r"^targets: test examples must be in \[0, M=2\), got "
     r"\[2\]\.$"),
])
def test_search_and_verify_refuses_bad_shapes_and_targets(change, message):
  sim = _planted()
  pool = np.asarray(sim.fitted_ids)
  random_ids = data.make_curricula(5, 12, 3, 2, 1, seed=1, pool=pool)
  starts = data.make_curricula(2, 12, 3, 2, 1, seed=0, pool=pool)
  kwargs = {}
  if "starts" in change:
    starts = np.zeros(change["starts"], np.int32)
  if "random_losses" in change:
    kwargs["random_losses"] = np.zeros(change["random_losses"], np.float32)
  if "targets" in change:
    kwargs["targets"] = change["targets"]
  with pytest.raises(ValueError, match=message):
    _verify(sim, starts, random_ids, **kwargs)


# --- the main job's stages -------------------------------------------------------------

class _Workdir:
  """Runs every stage's compute (no records)."""

  def stage(self, name, *, compute, **kwargs):
    del name, kwargs
    return compute()

  def path(self, *parts):
    return os.path.join("/nonexistent", *parts)


@pytest.fixture(scope="module")
def tiny_job():
  """The tiny config's curricula and runs simulated by a known simulator."""
  config = config_lib.load_config("configs/default.py:tiny")
  curricula = stages.make_curricula(config)
  assert len(curricula.unseen_ids) == 8
  rng = np.random.default_rng(0)
  n, m = config.num_train_examples, config.num_test_examples
  truth = sj.simulators.Simulator(
      A=None, B=jnp.asarray(rng.uniform(-0.05, 0.0, (n, m)).astype(np.float32)),
      kind="additive", name="truth")
  batch_ids = curricula.all_runs()
  initial = np.full((len(batch_ids), m), 3.0, np.float32)
  losses = np.asarray(truth.simulate(batch_ids, initial))
  trace = sj.Trace(batch_ids=batch_ids, losses=losses,
                   learning_rates=np.full(batch_ids.shape[:2], 0.1, np.float32),
                   num_train_examples=n)
  runs = stages.Runs(trace, None, 1.0, None)
  fit_trace = runs.group(curricula, "fit")
  sims = {"simfluence_linear": sj.simulators.fit("linear", fit_trace, l2=1.0,
                                                 name="simfluence_linear"),
          "tracin_cp": sj.simulators.additive_from_scores(truth.B, name="tracin_cp")}
  return config, curricula, runs, sims, truth


def test_evaluate_rolls_the_unseen_runs_out_on_purpose(tiny_job):
  config, curricula, runs, sims, _ = tiny_job
  linear = sims["simfluence_linear"]
  unseen = runs.group(curricula, "unseen")
  assert linear.unfitted_ids(unseen.batch_ids).size  # would be refused
  config = config.copy_and_resolve_references()
  config.methods = ("curriculum_blind", "simfluence_linear", "tracin_cp")
  result = stages.evaluate(_Workdir(), config, runs, curricula, sims, {}, ())
  expected = sj.evaluation.compute_metrics(
      np.asarray(linear.simulate(unseen.batch_ids, unseen.losses[:, 0],
                                 allow_unfitted_ids=True)), unseen.losses)
  for metric, value in expected.items():
    np.testing.assert_allclose(result.metrics["unseen"]["simfluence_linear"][metric],
                               value, rtol=1e-6)


def test_counterfactual_stage_searches_fitted_ids_only(tiny_job, monkeypatch):
  config, curricula, runs, sims, truth = tiny_job
  config = config.copy_and_resolve_references()
  config.methods = ("simfluence_linear", "tracin_cp")
  config.counterfactual.methods = ("simfluence_linear", "tracin_cp")
  config.counterfactual.num_iters = 20
  retrained = []

  def fake_train(config, model, dataset, batch_ids, workdir, record_grads):
    del config, model, dataset, workdir, record_grads
    retrained.append(np.asarray(batch_ids))
    initial = np.full((len(batch_ids), truth.num_test_examples), 3.0, np.float32)
    return types.SimpleNamespace(trace=types.SimpleNamespace(
        losses=np.asarray(truth.simulate(batch_ids, initial)))), 1.0

  monkeypatch.setattr(stages, "_train", fake_train)
  result = stages.counterfactual(_Workdir(), config, None, None, runs, curricula, sims)
  unseen = set(curricula.unseen_ids.tolist())
  linear_ids = result["batch_ids"]["simfluence_linear"]
  assert not set(np.unique(linear_ids).tolist()) & unseen
  assert set(np.unique(linear_ids[linear_ids >= 0]).tolist()) <= set(
      sims["simfluence_linear"].fitted_ids)
  # The linear search started from curricula of its fitted ids; tracin_cp (scores
  # of all N ids) from the same all-N starts as before.
  linear_starts = stages.counterfactual_starts(
      config, curricula, pool=sims["simfluence_linear"].fitted_ids)
  all_starts = stages.counterfactual_starts(config, curricula)
  assert set(np.unique(all_starts).tolist()) & unseen  # the old starts held them
  assert not set(np.unique(linear_starts).tolist()) & unseen
  initial = np.full((len(all_starts), truth.num_test_examples), 3.0, np.float32)
  targets = result["targets"]
  for name, starts in (("simfluence_linear", linear_starts), ("tracin_cp", all_starts)):
    expected = np.asarray(sims[name].simulate(starts, initial))[:, -1][:, targets]
    np.testing.assert_allclose(result["searched"][name]["start_simulated_final"],
                               expected.mean(-1), rtol=1e-5)
  assert result["searched"]["simfluence_linear"]["pool_size"] == len(
      sims["simfluence_linear"].fitted_ids)
  assert result["searched"]["tracin_cp"]["pool_size"] == config.num_train_examples


# --- the simulate CLI ------------------------------------------------------------------

@pytest.fixture
def workdir(tmp_path):
  """A main job's layout: trace/, simulators/, stages/ records."""
  root = tmp_path / "job"
  trace = _trace()
  trace.save(str(root / "trace"))
  sims = {"simfluence_linear": sj.simulators.fit("linear", trace, l2=0.5),
          "tracin_cp": sj.simulators.additive_from_scores(
              np.full((N, M), -0.01, np.float32), name="tracin_cp")}
  (root / "stages").mkdir()
  _record(root, "record_runs", "runs1")
  for name, sim in sims.items():
    sim.save(str(root / "simulators" / name))
    _record(root, f"fit_{name}", f"fit-{name}-1", upstream={"record_runs": "runs1"})
  return root, sims


def _record(root, name, fingerprint, **extra):
  (root / "stages" / f"{name}.json").write_text(json.dumps(
      dict(status="done", fingerprint=fingerprint, **extra)))


def test_simulate_run_refuses_unfitted_ids_naming_the_file(workdir, tmp_path):
  root, sims = workdir
  path = tmp_path / "c.json"
  path.write_text(json.dumps(WITH_3[0].tolist()))
  with pytest.raises(ValueError) as info:
    simulate.run(str(root), str(path), num_band_samples=0)
  assert str(info.value) == (
      f"--curriculum={path}: holds train ids [3] (1 in all) that no fitted run "
      "contained; simulators ['simfluence_linear'] have only their prior for them; "
      "--methods=tracin_cp keeps the saved simulators that predict every id; pass "
      "--allow_unfitted_ids to roll out anyway.")
  assert not (root / "simulated").exists()
  result = simulate.run(str(root), str(path), num_band_samples=0,
                        allow_unfitted_ids=True)
  written = json.loads((root / "simulated" / "c" / "trajectories.json").read_text())
  assert written["unfitted_ids"] == {"simfluence_linear": [3], "tracin_cp": []}
  assert written["fits"] == {"simfluence_linear": "fit-simfluence_linear-1",
                             "tracin_cp": "fit-tracin_cp-1"}
  assert written["curriculum"] == str(path)
  initial = np.repeat(np.asarray(_trace().losses[0, 0])[None], 1, 0)
  expected = _explicit_rollout(sims["simfluence_linear"], WITH_3[:1], initial)
  np.testing.assert_allclose(written["methods"]["simfluence_linear"]["mean"], expected,
                             atol=2e-6)
  assert result["output_dir"] == str(root / "simulated" / "c")


def test_simulate_records_the_fit_and_refuses_a_stem_collision(workdir, tmp_path):
  root, _ = workdir
  first = tmp_path / "c.json"
  first.write_text(json.dumps(WITHOUT_3[0].tolist()))
  simulate.run(str(root), str(first), num_band_samples=0)
  out = root / "simulated" / "c" / "trajectories.json"
  assert json.loads(out.read_text())["fits"]["simfluence_linear"] == (
      "fit-simfluence_linear-1")
  # The main job refits: the same file rewritten names the new fit.
  _record(root, "fit_simfluence_linear", "fit-simfluence_linear-2",
          upstream={"record_runs": "runs1"})
  simulate.run(str(root), str(first), num_band_samples=0)
  assert json.loads(out.read_text())["fits"]["simfluence_linear"] == (
      "fit-simfluence_linear-2")
  # c.csv shares the stem: refused, the first file's output kept.
  second = tmp_path / "c.csv"
  second.write_text("0,1\n2,4\n5,-1\n")
  before = out.read_text()
  with pytest.raises(ValueError) as info:
    simulate.run(str(root), str(second), num_band_samples=0)
  assert str(info.value) == (
      f"--curriculum={second}: its default output folder {root}/simulated/c holds "
      f"the trajectories of another curriculum file ({first}) with the same stem; "
      "pass --output_dir, or delete that folder.")
  assert out.read_text() == before
  simulate.run(str(root), str(second), output_dir=str(tmp_path / "csv"),
               num_band_samples=0)
  assert json.loads((tmp_path / "csv" / "trajectories.json").read_text())[
      "curriculum"] == str(second)


def test_simulate_cli_refuses_unfitted_ids_in_one_line(workdir, tmp_path):
  root, _ = workdir
  path = tmp_path / "c.json"
  path.write_text(json.dumps(WITH_3[0].tolist()))
  proc = cli.simulate(root, path, "--num_band_samples=0")
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: --curriculum={path}: holds train ids [3]"), last
  proc = cli.simulate(root, path, "--num_band_samples=0", "--allow_unfitted_ids")
  assert proc.returncode == 0, proc.stderr
  assert "simfluence_linear has no fitted run with train ids [3]" in proc.stderr
