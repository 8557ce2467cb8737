"""Counterfactual curricula: search, curriculum files, the simulate CLI, verification."""

import itertools
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

import _cli as cli

import simfluence_jax as sj
from simfluence_jax import counterfactual
from simfluence_jax import data
from simfluence_jax import simulate

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("counterfactual_test")


def _linear_simulator(num_train, num_test, seed):
  rng = np.random.default_rng(seed)
  a = rng.uniform(0.5, 1.0, size=(num_train, num_test)).astype(np.float32)
  b = rng.normal(size=(num_train, num_test)).astype(np.float32)
  return sj.simulators.Simulator(A=jnp.asarray(a), B=jnp.asarray(b), kind="linear",
                                 name="truth")


# --- search ------------------------------------------------------------------------------

def test_additive_search_finds_the_planted_best_subset():
  num_train, num_test = 30, 4
  b = np.random.default_rng(0).uniform(0, 0.01, (num_train, num_test)).astype(np.float32)
  best = [3, 7, 11, 20, 25]
  b[best] -= 1.0
  sim = sj.simulators.additive_from_scores(b)
  start = data.make_curricula(3, num_train, 5, 2, 2, seed=0)
  result = sj.simulators.search_curriculum(sim, np.full(num_test, 100, np.float32),
                                           start, [0, 1], num_iters=100,
                                           num_proposals=16)
  for ids in result.batch_ids:
    assert sorted(set(ids[ids >= 0].tolist())) == best
  # Each of the 5 examples is seen in both epochs: final = 100 + 2·Σ b.
  expected = 100.0 + 2 * b[best][:, :2].sum(0).mean()
  np.testing.assert_allclose(result.objective, expected, rtol=1e-5)
  assert np.all(result.objective <= result.initial_objective)
  assert np.all(np.diff(result.history, axis=1) <= 0)  # never gets worse


def test_linear_search_matches_brute_force_over_subsets_and_orders():
  sim = _linear_simulator(7, 3, seed=1)
  initial = np.array([2.0, 1.0, 3.0], np.float32)
  # Brute force: every subset of 3 in every order, one run each (simulated at once:
  # one call, not 210).
  orders = np.array([order for subset in itertools.combinations(range(7), 3)
                     for order in itertools.permutations(subset)], np.int32)
  assert orders.shape == (210, 3)
  finals = np.asarray(sim.simulate(orders[:, :, None],
                                   np.repeat(initial[None], len(orders), axis=0)))
  best = float(finals[:, -1].mean(-1).min())
  start = data.make_curricula(4, 7, 3, 1, 1, seed=0)
  result = sj.simulators.search_curriculum(sim, initial, start, [0, 1, 2],
                                           num_iters=100, num_proposals=16,
                                           loss_floor=None)
  np.testing.assert_allclose(result.objective.min(), best, rtol=1e-5)
  # The reported objective is what the simulator says of the returned curriculum.
  rollout = np.asarray(sim.simulate(result.batch_ids,
                                    np.repeat(initial[None], 4, axis=0)))
  np.testing.assert_allclose(rollout[:, -1].mean(-1), result.objective, rtol=1e-5)


def _step_simulator(b, final_only=False, initial=None):
  """An additive simulator with one phase per step: b float32[T, N, M]."""
  info = {} if initial is None else {"initial_losses": list(map(float, initial))}
  return sj.simulators.Simulator(
      A=None, B=jnp.asarray(b.mean(0)), kind="additive", phase_B=jnp.asarray(b),
      phase_starts=tuple(range(len(b))), final_only=final_only,
      batch_size=1 if final_only else None, num_steps=len(b) if final_only else None,
      fit_info_items=sj.simulators._simulator.fit_info_items(info))  # pylint: disable=protected-access


def test_search_with_one_phase_per_step_reorders_to_the_brute_force_best():
  """Where an example sits matters when every step has its own effects (the
  metagradient table's simulator): the search swaps positions by default. With
  the pool restricted to the starting subset, only order moves can help."""
  b = np.random.default_rng(3).normal(size=(4, 7, 2)).astype(np.float32)
  sim = _step_simulator(b)
  initial = np.array([2.0, 1.0], np.float32)
  start = data.make_curricula(1, 7, 4, 1, 1, seed=0)
  subset = np.unique(start)
  value = lambda order: float(initial.mean() + sum(b[t, i].mean()
                                                   for t, i in enumerate(order)))
  best = min(value(order) for order in itertools.permutations(subset))
  # NumPy integers are integers (they were refused as "not a positive integer").
  kwargs = dict(pool=subset, num_iters=np.int64(100), num_proposals=np.int32(16),
                loss_floor=None)
  result = sj.simulators.search_curriculum(sim, initial, start, [0, 1], **kwargs)
  np.testing.assert_allclose(result.objective, best, rtol=1e-5)
  fixed = sj.simulators.search_curriculum(sim, initial, start, [0, 1], reorder=False,
                                          **kwargs)
  np.testing.assert_allclose(fixed.objective, value(start[0, :, 0]), rtol=1e-5)
  assert fixed.objective[0] > best + 1e-3


def test_search_reorders_a_batch_mean_simulator_around_padded_steps():
  """Review h25: with `batch_mean` (the job's TracIn-CP simulator) a padded step
  divides its ids' effects by fewer valid ids, so the same ids in another order
  give another final loss; the default search only moved ids in and out and
  returned a worse curriculum than the brute-force best."""
  b = np.array([[-0.3], [-0.1], [-0.2]], np.float32)  # N=3, M=1
  sim = sj.simulators.additive_from_scores(b, "tracin_like", batch_size=2,
                                           num_steps=2, batch_mean=True)
  initial = np.array([5.0], np.float32)
  start = np.array([[[0, 1], [2, -1]]], np.int32)  # one epoch: 3 ids, one padded slot
  orders = [np.array([[[x, y], [z, -1]]], np.int32)
            for x, y, z in itertools.permutations(range(3))]
  finals = [float(sim.simulate(c, initial[None])[0, -1, 0]) for c in orders]
  assert max(finals) - min(finals) > 0.05  # the order matters
  result = sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=50,
                                           num_proposals=8)
  np.testing.assert_allclose(result.objective[0], min(finals), rtol=1e-6)
  # Without padding the order does not matter, and no swaps are proposed.
  assert not sj.simulators._search.reorders(sim, np.array([[[0, 1], [2, 0]]]))  # pylint: disable=protected-access


def test_search_clips_simulated_losses_at_the_floor():
  """A simulator that extrapolates below zero cannot reward going further below."""
  b = np.zeros((6, 1), np.float32)
  b[0], b[1] = -3.0, -1.0  # 0 is "better" than 1 only below zero
  sim = sj.simulators.additive_from_scores(b)
  start = np.array([[[2], [3]]], np.int32)
  clipped = sj.simulators.search_curriculum(sim, np.ones(1, np.float32), start, [0],
                                            num_iters=40, num_proposals=8)
  free = sj.simulators.search_curriculum(sim, np.ones(1, np.float32), start, [0],
                                         num_iters=40, num_proposals=8, loss_floor=None)
  np.testing.assert_allclose(clipped.objective, 0.0)
  np.testing.assert_allclose(free.objective, 1.0 - 3.0 - 1.0)
  # A final-only simulator's intermediate steps are not predictions: only its final
  # loss is clipped (1 − 3 + 2.5 = 0.5, where clipping after step 0 would give 2.5).
  b = np.zeros((2, 6, 1), np.float32)
  b[0, 2], b[1, 3] = -3.0, 2.5
  final_only = _step_simulator(b, final_only=True, initial=[1.0])
  result = sj.simulators.search_curriculum(final_only, np.ones(1, np.float32), start,
                                           [0], num_iters=1, num_proposals=1)
  np.testing.assert_allclose(result.initial_objective, 0.5)


def test_search_keeps_the_shape_padding_size_and_pool():
  sim = _linear_simulator(40, 5, seed=2)
  start = data.make_curricula(2, 40, 10, 2, 4, seed=3)  # 3 batches/epoch, last padded
  pool = np.arange(20)
  result = sj.simulators.search_curriculum(sim, np.ones(5, np.float32), start, [4],
                                           pool=pool, num_iters=30, num_proposals=8,
                                           epoch_steps=3)
  assert result.batch_ids.shape == start.shape
  np.testing.assert_array_equal(result.batch_ids < 0, start < 0)
  for before, after in zip(start, result.batch_ids):
    kept = set(before[before >= 0].tolist())
    chosen = set(after[after >= 0].tolist())
    assert len(chosen) == 10
    assert chosen - kept <= set(pool.tolist())  # new examples come from the pool
    for epoch in after.reshape(2, -1):  # still every example once per epoch
      assert sorted(epoch[epoch >= 0].tolist()) == sorted(chosen)
  np.testing.assert_allclose(result.target_weights, [0, 0, 0, 0, 1])


@pytest.mark.parametrize("targets, match", [
    ([], "empty"), ([5], r"\[0, 5\)"), (np.zeros(5), "not all zero"),
    (np.ones(4), r"shape \(5,\)")])
def test_search_rejects_bad_targets(targets, match):
  sim = _linear_simulator(10, 5, seed=0)
  with pytest.raises(ValueError, match=match):
    sj.simulators.search_curriculum(sim, np.ones(5, np.float32),
                                    data.make_curricula(1, 10, 4, 1, 2, 0), targets)


def test_search_rejects_bad_start_curricula():
  sim = _linear_simulator(10, 3, seed=0)
  with pytest.raises(ValueError, match="start_batch_ids: ids must be in"):
    sj.simulators.search_curriculum(sim, np.ones(3, np.float32),
                                    np.full((1, 2, 2), 10), [0])
  uneven = np.array([[[0, 1]], [[2, 2]]])
  with pytest.raises(ValueError, match="same number of distinct examples"):
    sj.simulators.search_curriculum(sim, np.ones(3, np.float32), uneven, [0])


# --- curriculum files --------------------------------------------------------------------

@pytest.mark.parametrize("content, expected", [
    ([[1, 2], [3]], [[[1, 2], [3, -1]]]),
    ({"batch_ids": [[[0, 1]], [[2, -1]]]}, [[[0, 1]], [[2, -1]]]),
])
def test_load_curriculum_json(tmp_path, content, expected):
  path = tmp_path / "c.json"
  path.write_text(json.dumps(content))
  got = data.load_curriculum(str(path), num_train_examples=4)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, expected)


def test_load_curriculum_csv(tmp_path):
  path = tmp_path / "c.csv"
  path.write_text("# step per line\n0,1,2\n\n3,,4\n5\n")
  np.testing.assert_array_equal(data.load_curriculum(str(path), 6),
                                [[[0, 1, 2], [3, -1, 4], [5, -1, -1]]])
  # Trailing commas (a spreadsheet's export) made every step one slot wider.
  path.write_text("0,1,2,\n3,,4,\n")
  np.testing.assert_array_equal(data.load_curriculum(str(path), 6),
                                [[[0, 1, 2], [3, -1, 4]]])
  # Saved with a UTF-8 byte order mark (Excel's "CSV UTF-8"; editors' JSON).
  for name, text in (("bom.csv", "1,2\n3,4\n"), ("bom.json", "[[1, 2], [3, 4]]")):
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    np.testing.assert_array_equal(data.load_curriculum(str(tmp_path / name), 6),
                                  [[[1, 2], [3, 4]]])


@pytest.mark.parametrize("name, text, match", [
    ("c.json", "[[0, 9]]", r"step 0, slot 1: id 9 is outside \[0, 4\)"),
    ("c.json", "[[0, -2]]", "id -2 is outside"),
    ("c.json", "[[0, 1.5]]", "slot 1: 1.5 is not an integer id"),
    ("c.json", '[[0, "x"]]', "'x' is not an integer id"),
    ("c.json", "[[[0]], [[1], [2]]]", "different numbers of steps"),
    ("c.json", "[]", "non-empty list"),
    ("c.json", "[0, 1]", "step 0: expected a list of ids"),
    ("c.json", '{"ids": []}', "must hold \"batch_ids\""),
    # Weights in the file were silently not applied.
    ("c.json", '{"batch_ids": [[0]], "weights": [[0.0]]}',
     r"unknown keys \['weights'\]: a JSON object holds only \"batch_ids\""),
    ("c.json", "[[0,", "not valid JSON"),
    ("c.json", "[[-1, -1]]", "all padding"),
    ("c.csv", "0,1\n2,z\n", "step 1, slot 1: 'z' is not an integer id"),
    ("c.txt", "0", "unsupported extension"),
])
def test_load_curriculum_rejects_bad_files(tmp_path, name, text, match):
  path = tmp_path / name
  path.write_text(text)
  with pytest.raises(ValueError, match=match) as info:
    data.load_curriculum(str(path), num_train_examples=4)
  assert name in str(info.value)  # the message names the file


def test_load_curriculum_missing_file(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    data.load_curriculum(str(tmp_path / "none.json"), 4)


# --- saved simulators and the simulate CLI -----------------------------------------------

@pytest.fixture(scope="module")
def fitted_workdir(tmp_path_factory):
  """A workdir laid out like the main job's: trace/ and simulators/<method>/."""
  workdir = str(tmp_path_factory.mktemp("workdir"))
  truth = _linear_simulator(20, 3, seed=5)
  ids = data.make_curricula(12, 20, 8, 2, 2, seed=0)
  initial = np.full((12, 3), 3.0, np.float32)
  losses = np.asarray(truth.simulate(ids, initial))
  trace = sj.Trace(batch_ids=ids, losses=losses,
                   learning_rates=np.full(ids.shape[:2], 0.1, np.float32),
                   num_train_examples=20)
  trace.save(os.path.join(workdir, "trace"))
  sims = {f"simfluence_{kind}": sj.simulators.fit(kind, trace, l2=1e-2)
          for kind in ("linear", "additive")}
  sims["scores"] = sj.simulators.additive_from_scores(np.asarray(sims[
      "simfluence_additive"].B), name="scores")
  for name, sim in sims.items():
    sim.save(os.path.join(workdir, counterfactual.SIMULATORS_DIR, name))
  return workdir, sims, trace


def test_saved_simulators_round_trip(fitted_workdir):
  workdir, sims, trace = fitted_workdir
  loaded = counterfactual.load_simulators(workdir)
  assert sorted(loaded) == sorted(sims)
  for name, sim in sims.items():
    assert loaded[name].kind == sim.kind and loaded[name].fit_info == sim.fit_info
    np.testing.assert_array_equal(loaded[name].simulate(trace.batch_ids,
                                                        trace.losses[:, 0]),
                                  sim.simulate(trace.batch_ids, trace.losses[:, 0]))
  mean, std = loaded["simfluence_linear"].simulate_with_bands(
      trace.batch_ids[:2], trace.losses[:2, 0], num_samples=4, rng=1)
  mean0, std0 = sims["simfluence_linear"].simulate_with_bands(
      trace.batch_ids[:2], trace.losses[:2, 0], num_samples=4, rng=1)
  np.testing.assert_allclose(mean, mean0, rtol=1e-6)
  np.testing.assert_allclose(std, std0, rtol=1e-5, atol=1e-7)
  assert loaded["scores"].posterior is None


def test_load_simulators_errors(fitted_workdir, tmp_path):
  workdir, _, _ = fitted_workdir
  with pytest.raises(FileNotFoundError, match="no fitted simulators"):
    counterfactual.load_simulators(str(tmp_path))
  with pytest.raises(ValueError, match=r"--methods: \['nope'\] not fitted"):
    counterfactual.load_simulators(workdir, ["nope"])
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "simulator.json").write_text("{")
  with pytest.raises(ValueError, match="corrupt"):
    sj.simulators.Simulator.load(str(broken))


def test_simulate_run_writes_every_simulators_trajectories(fitted_workdir, tmp_path):
  workdir, sims, trace = fitted_workdir
  path = tmp_path / "mine.json"
  curriculum = trace.batch_ids[:2].tolist()
  path.write_text(json.dumps(curriculum))
  result = simulate.run(workdir, str(path), output_dir=str(tmp_path / "out"),
                        targets=[0, 2], num_band_samples=4)
  written = json.loads((tmp_path / "out" / "trajectories.json").read_text())
  assert (tmp_path / "out" / "trajectories.png").stat().st_size > 0
  assert written["batch_ids_shape"] == [2, trace.num_steps, trace.batch_size]
  assert written["targets"] == [0, 2]
  assert written["methods"]["scores"]["std"] is None
  assert written["methods"]["simfluence_linear"]["std"] is not None
  expected = np.asarray(sims["scores"].simulate(trace.batch_ids[:2],
                                                trace.losses[:2, 0]))
  np.testing.assert_allclose(written["methods"]["scores"]["mean"], expected, atol=1e-5)
  np.testing.assert_allclose(result["trajectories"]["scores"]["mean"], expected)


def test_simulate_refuses_steps_shorter_than_any_recorded_step(fitted_workdir,
                                                               tmp_path):
  """The recorded runs' steps hold 2 ids; a step of 1 sums half the effects a
  simulator was fitted on (Simfluence-Linear predicted the loss falling to a
  quarter), so it is extrapolation; an empty step stays a no-op."""
  workdir, _, _ = fitted_workdir
  path = tmp_path / "short.csv"
  path.write_text("0,1\n2\n3,4\n")
  with pytest.raises(ValueError, match=r"short.csv: curriculum 0, step 1 holds 1 "
                     r"ids, the recorded runs' steps at least 2 \(of 2\).*pass "
                     r"--allow_extrapolation"):
    simulate.run(workdir, str(path), output_dir=str(tmp_path / "out"),
                 num_band_samples=0)
  simulate.run(workdir, str(path), output_dir=str(tmp_path / "out"),
               num_band_samples=0, allow_extrapolation=True)
  path.write_text("0,1\n,\n3,4\n")  # an empty step
  simulate.run(workdir, str(path), output_dir=str(tmp_path / "out2"),
               num_band_samples=0)
  # Review h25: a narrower batch is refused for its width, which no flag lifts
  # (it was refused as extrapolation first, and for its width once allowed).
  path.write_text("0\n2\n3\n")
  with pytest.raises(ValueError, match=r"short.csv: batch width 1 differs from the "
                     r"batch size 2") as error:
    simulate.run(workdir, str(path), output_dir=str(tmp_path / "out3"),
                 num_band_samples=0)
  assert "allow_extrapolation" not in str(error.value)


def test_simulate_cli_rejects_a_bad_curriculum_in_one_line(fitted_workdir, tmp_path):
  workdir, _, _ = fitted_workdir
  path = tmp_path / "bad.csv"
  path.write_text("0,1\n2,99\n")
  proc = cli.simulate(workdir, path)
  assert proc.returncode == 1, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: curriculum file") and "id 99 is outside" in last
  assert "Traceback" not in proc.stderr


# --- verification ------------------------------------------------------------------------

def test_search_and_verify_with_an_exact_simulator():
  """Retraining with the simulator itself: actual and simulated improvements agree."""
  truth = _linear_simulator(24, 4, seed=7)
  initial = np.full(4, 5.0, np.float32)
  random_ids = data.make_curricula(9, 24, 8, 2, 2, seed=0)
  retrain = lambda ids: np.asarray(truth.simulate(
      ids, np.repeat(initial[None], len(ids), axis=0)))
  start = data.make_curricula(3, 24, 8, 2, 2, seed=0, first_run=9)
  result = counterfactual.search_and_verify(
      {"truth": truth, "additive": sj.simulators.additive_from_scores(truth.B)},
      initial_losses=initial, start_batch_ids=start, random_batch_ids=random_ids,
      random_losses=retrain(random_ids), targets=[1, 2], retrain=retrain,
      methods=["truth"], num_iters=60, num_proposals=16, epoch_steps=4)
  searched = result["searched"]["truth"]
  assert list(result["searched"]) == ["truth"]
  assert searched["actual_improvement"] > 0
  assert searched["fraction_beating_median"] == 1.0
  np.testing.assert_allclose(searched["actual_final"], searched["simulated_final"],
                             rtol=1e-5)
  np.testing.assert_allclose(result["random"]["actual_final"],
                             result["random"]["simulated_final"]["truth"], rtol=1e-5)
  np.testing.assert_allclose(searched["actual_improvement"],
                             searched["simulated_improvement"], rtol=1e-4)
  assert result["batch_ids"]["truth"].shape == start.shape
  json.dumps({k: v for k, v in result.items() if k != "batch_ids"})  # serialisable


def test_reported_simulated_losses_are_the_searched_objective():
  """The search minimises losses clipped at 0 every step; the report showed the
  unclipped rollout (a simulated final loss of −2.0 for TracIn-CP, and an
  improvement the search never saw)."""
  b = np.zeros((6, 1), np.float32)
  b[0], b[1] = -3.0, -1.0
  sim = sj.simulators.additive_from_scores(b)
  initial = np.ones(1, np.float32)
  start = np.array([[[2], [3]]], np.int32)
  random_ids = np.array([[[0], [1]], [[4], [5]], [[1], [4]]], np.int32)
  # Unclipped: 1 − 3 − 1 = −3, 1, 0; clipped every step: max(1 − 3, 0) − 1 → 0
  # (clipped again), 1, 0.
  result = counterfactual.search_and_verify(
      {"scores": sim}, initial_losses=initial, start_batch_ids=start,
      random_batch_ids=random_ids, random_losses=np.ones((3, 3, 1), np.float32),
      targets=[0], retrain=lambda ids: np.ones((len(ids), 3, 1), np.float32),
      num_iters=40, num_proposals=8)
  searched = result["searched"]["scores"]
  np.testing.assert_allclose(result["random"]["simulated_final"]["scores"],
                             [0.0, 1.0, 0.0])
  objective = sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=40,
                                              num_proposals=8).objective
  np.testing.assert_allclose(searched["simulated_final"], objective)
  np.testing.assert_allclose(searched["simulated_final"], [0.0])
  np.testing.assert_allclose(searched["simulated_improvement"], 0.0)


def test_a_simulator_diverging_off_the_targets_does_not_stop_the_search(caplog):
  """Column 2 (not a target) overflows under α = 2 per step: the search and its
  verification read the targets only, and their simulated finals are the exact
  (constant) ones; `simulate_curricula` keeps the inf and says where."""
  num_train, num_test, num_steps, batch = 20, 3, 200, 4
  a = np.full((num_train, num_test), 1.0 / batch, np.float32)  # α = 1: unchanged
  a[:, 2] = 0.5  # α = 2: overflows within 200 steps
  sim = sj.simulators.Simulator(
      A=jnp.asarray(a), B=jnp.zeros((num_train, num_test), jnp.float32),
      kind="linear", name="simfluence_linear", batch_size=batch,
      num_steps=num_steps).check_shapes()
  rng = np.random.default_rng(0)
  ids = lambda runs: rng.integers(0, num_train, (runs, num_steps, batch)).astype(
      np.int32)
  initial = np.full(num_test, 2.0, np.float32)
  constant = lambda runs: np.broadcast_to(initial, (runs, num_steps + 1, num_test))
  retrained = []

  def retrain(batch_ids):
    retrained.append(len(batch_ids))
    return constant(len(batch_ids))

  random_ids = ids(4)
  result = counterfactual.search_and_verify(
      {"simfluence_linear": sim}, initial_losses=initial,
      start_batch_ids=data.make_curricula(2, num_train, num_train, 40, batch, seed=0),
      random_batch_ids=random_ids, random_losses=constant(4), targets=[0, 1],
      retrain=retrain, num_iters=3, num_proposals=4, epoch_steps=5)
  assert retrained == [2]
  np.testing.assert_allclose(result["searched"]["simfluence_linear"]
                             ["simulated_final"], 2.0, rtol=1e-6)
  np.testing.assert_allclose(result["random"]["simulated_final"]["simfluence_linear"],
                             2.0, rtol=1e-6)
  with caplog.at_level("WARNING"):
    out = counterfactual.simulate_curricula({"simfluence_linear": sim}, random_ids,
                                            initial, num_band_samples=0)
  assert np.isinf(out["simfluence_linear"]["mean"][:, -1, 2]).all()
  np.testing.assert_array_equal(out["simfluence_linear"]["mean"][:, :, :2], 2.0)
  assert "simfluence_linear diverges on curriculum 0 (non-finite loss of test " \
         "example 2" in caplog.text


def test_choose_targets_picks_the_most_variable_examples():
  losses = np.ones((5, 3, 4), np.float32)
  losses[:, -1, 2] = np.arange(5)
  losses[:, -1, 0] = np.arange(5) * 0.5
  np.testing.assert_array_equal(counterfactual.choose_targets(losses, 2), [0, 2])
  with pytest.raises(ValueError, match="num_targets=5"):
    counterfactual.choose_targets(losses, 5)


# --- the main job's stage ----------------------------------------------------------------

def test_stage_says_which_requested_methods_it_does_not_search(caplog):
  """A counterfactual method the job does not compute is named in a warning, not
  dropped silently; with none left the stage returns before any work."""
  from simfluence_jax import config_lib  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import stages  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "default.py:tiny"))
  config.methods = ("curriculum_blind", "simfluence_linear")
  config.counterfactual.enabled = True
  config.counterfactual.methods = ("tracin_cp", "metagradient")
  with caplog.at_level("WARNING", logger="simfluence_jax.pipeline"):
    assert stages.counterfactual(None, config, None, None, None, None, sims={}) is None
  assert ("counterfactual: not searching on ['tracin_cp', 'metagradient']: not in "
          "config.methods (searching on none).") in caplog.messages
  caplog.clear()
  config.counterfactual.enabled = False
  assert stages.counterfactual(None, config, None, None, None, None, sims={}) is None
  assert not caplog.messages


def test_simulate_says_when_a_prediction_goes_below_zero(fitted_workdir, tmp_path,
                                                         caplog):
  # Review h32: simulate returned a final loss of -23 with no flag.
  _, sims, trace = fitted_workdir
  workdir = str(tmp_path / "workdir")  # its own: the shared one keeps its simulators
  trace.save(os.path.join(workdir, "trace"))
  sims["simfluence_linear"].save(os.path.join(workdir, counterfactual.SIMULATORS_DIR,
                                              "simfluence_linear"))
  falling = sj.simulators.additive_from_scores(np.full((20, 3), -0.5, np.float32),
                                               name="falling")
  falling.save(os.path.join(workdir, counterfactual.SIMULATORS_DIR, "falling"))
  path = tmp_path / "mine.json"
  path.write_text(json.dumps(trace.batch_ids[:2].tolist()))
  with caplog.at_level("WARNING"):
    simulate.run(workdir, str(path), output_dir=str(tmp_path / "out"),
                 methods=["falling", "simfluence_linear"])
  written = json.loads((tmp_path / "out" / "trajectories.json").read_text())
  want = float(np.min(falling.simulate(trace.batch_ids[:2], trace.losses[:2, 0])))
  assert want < 0 and set(written["below_zero"]) == {"falling"}
  assert written["below_zero"]["falling"] == pytest.approx(want)
  assert "simulate: falling predicts losses below 0" in caplog.text
