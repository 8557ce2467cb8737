"""Simulator review fixes, each checked against a brute-force reference.

1. Phased simulators record their fitted coverage per (phase, id): an id a phase
   never saw has only that phase's prior, and is refused there.
2. CG's `converged` reads the residual recomputed from its solution (dense float64
   reference), not its recursive residual.
3. The featurized solve refuses non-finite inputs and results, naming them.
"""

import json
import os
import re

import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax.simulators import _featurized
from simfluence_jax.simulators import _solver

EPS = float(np.finfo(np.float32).eps)

# --- 1. per-phase fitted coverage -----------------------------------------------------

N, M, T, B = 6, 2, 4, 2
PHASE_OF_STEP = (0, 0, 1, 1)  # fit(num_phases=2) on T = 4 steps: bins [0, 2), [2, 4)
PRIOR_MESSAGE = (
    "has only its prior for them (simfluence_featurized, tracin_cp, ekfac_if and "
    "metagradient can predict them); pass allow_unfitted_ids=True to roll out "
    "anyway.")
PHASE_MESSAGE = (
    "simulate: batch_ids hold train ids [5] (1 in all) that no fitted run contained "
    "in the phase of their steps (phase 1: [5]); simulator 'simfluence_linear' "
    + PRIOR_MESSAGE)
POOL_MESSAGE = (
    "search_curriculum: pool hold train ids [5] (1 in all) that no fitted run "
    "contained in some phase, and they may go to any step (missing from phase 1: "
    "[5]); simulator 'simfluence_linear' " + PRIOR_MESSAGE)
# Id 5 in a phase-1 step (step 3); the same ids with 5 in a phase-0 step (step 0).
LATE_5 = np.array([[[0, 1], [1, 2], [2, 3], [5, 4]]], np.int32)
EARLY_5 = np.array([[[5, 4], [1, 2], [2, 3], [0, 1]]], np.int32)


def _phase_trace():
  """Four runs over ids 0..4; id 5 occurs only at step 0 (phase 0)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 5, (4, T, B)).astype(np.int32)
  ids[:, 0, 0] = 5
  losses = rng.uniform(1, 3, (4, T + 1, M)).astype(np.float32)
  return sj.Trace(batch_ids=ids, losses=losses,
                  learning_rates=np.full((4, T), 0.1, np.float32),
                  num_train_examples=N)


def _brute_force_coverage(trace):
  """Per phase, the set of ids of the trace's steps in it (a loop over slots)."""
  seen = [set(), set()]
  for run in trace.batch_ids:
    for t, step in enumerate(run):
      seen[PHASE_OF_STEP[t]].update(int(i) for i in step if i >= 0)
  return seen


def _loop_rollout(sim, batch_ids, initial):
  """L_t = (Σ A[k, i]) L_{t−1} + Σ B[k, i] with k the phase of step t, in float64."""
  a, b = (np.asarray(v, np.float64) for v in (sim.phase_A, sim.phase_B))
  out = [np.asarray(initial[0], np.float64)]
  for t, step in enumerate(batch_ids[0]):
    k = PHASE_OF_STEP[t]
    out.append(a[k, step].sum(0) * out[-1] + b[k, step].sum(0))
  return np.stack(out)[None]


def _fit_phased():
  return sj.simulators.fit("linear", _phase_trace(), l2=0.1, num_phases=2,
                           method="normal")


def test_phased_fit_checks_each_id_against_the_phase_of_its_step():
  trace = _phase_trace()
  sim = _fit_phased()
  seen = _brute_force_coverage(trace)
  assert 5 in seen[0] and 5 not in seen[1]
  assert sim.phase_starts == (0, 2)
  assert sim.phase_fitted_ids == tuple(tuple(sorted(s)) for s in seen)
  assert sim.fitted_ids == tuple(sorted(seen[0] & seen[1])) == (0, 1, 2, 3, 4)
  # What the old per-id-over-all-phases check let through: id 5 has only phase 1's
  # prior there (A = a₀, B = 0), no prediction.
  np.testing.assert_array_equal(np.asarray(sim.phase_A)[1, 5],
                                np.full(M, sim.fit_info["prior_a"], np.float32))
  np.testing.assert_array_equal(np.asarray(sim.phase_B)[1, 5], np.zeros(M))
  assert np.all(np.asarray(sim.phase_B)[0, 5] != 0)  # fitted in phase 0
  initial = trace.losses[:1, 0]
  np.testing.assert_array_equal(sim.unfitted_ids(LATE_5), [5])
  assert [(k, ids.tolist()) for k, ids in sim.unfitted_by_phase(LATE_5)] == [(1, [5])]
  with pytest.raises(ValueError, match=re.escape(PHASE_MESSAGE)):
    sim.simulate(LATE_5, initial)
  with pytest.raises(ValueError, match=re.escape(PHASE_MESSAGE.replace(
      "simulate:", "simulate_with_bands:"))):
    sim.simulate_with_bands(LATE_5, initial, num_samples=2)
  # Past T the rollout uses the last phase, and so does the check.
  late_past_t = np.concatenate([EARLY_5, [[[0, 1], [5, 2]]]], 1).astype(np.int32)
  np.testing.assert_array_equal(sim.unfitted_ids(late_past_t), [5])
  # The same ids with 5 in a phase that saw it: accepted, and rolled out per phase.
  assert sim.unfitted_ids(EARLY_5).size == 0
  np.testing.assert_allclose(sim.simulate(EARLY_5, initial),
                             _loop_rollout(sim, EARLY_5, initial), rtol=1e-5)
  np.testing.assert_allclose(
      sim.simulate(LATE_5, initial, allow_unfitted_ids=True),
      _loop_rollout(sim, LATE_5, initial), rtol=1e-5)


def test_ids_without_steps_must_be_fitted_in_every_phase_and_search_keeps_to_them():
  sim = _fit_phased()
  np.testing.assert_array_equal(sim.unfitted_ids(np.array([0, 5, -1])), [5])
  with pytest.raises(ValueError, match=re.escape(POOL_MESSAGE)):
    sim.check_fitted_ids(np.array([0, 5]), who="pool", caller="search_curriculum")
  initial = _phase_trace().losses[0, 0]
  start = sj.data.make_curricula(2, N, 4, 2, B, seed=0,
                                 pool=np.asarray(sim.fitted_ids))[:, :T]
  with pytest.raises(ValueError, match=re.escape(POOL_MESSAGE)):
    sj.simulators.search_curriculum(sim, initial, start, [0], pool=[0, 1, 2, 3, 5],
                                    num_iters=2, num_proposals=2, epoch_steps=2)
  # Default pool: the ids of every phase, so no move brings 5 into a phase without it.
  result = sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=20,
                                           num_proposals=8, epoch_steps=2)
  assert set(np.unique(result.batch_ids).tolist()) <= set(sim.fitted_ids)
  assert sim.unfitted_ids(result.batch_ids).size == 0


def test_per_phase_coverage_round_trips_and_old_saves_load_as_before(tmp_path):
  sim = _fit_phased()
  path = str(tmp_path / "sim")
  sim.save(path)
  meta_path = os.path.join(path, "simulator.json")
  meta = json.load(open(meta_path))
  rows = np.load(os.path.join(path, "phase_fitted_ids.npy"))
  assert meta["num_phase_fitted_ids"] == len(rows) == sum(
      len(ids) for ids in sim.phase_fitted_ids)
  loaded = sj.simulators.Simulator.load(path)
  assert loaded.phase_fitted_ids == sim.phase_fitted_ids
  assert loaded.fitted_ids == sim.fitted_ids
  initial = _phase_trace().losses[:1, 0]
  with pytest.raises(ValueError, match=re.escape(PHASE_MESSAGE)):
    loaded.simulate(LATE_5, initial)
  with open(meta_path, "w") as f:
    json.dump(dict(meta, num_phase_fitted_ids=len(rows) - 1), f)
  with pytest.raises(ValueError, match=re.escape(
      f"holds phase_fitted_ids int32 [{len(rows)}, 2] but simulator.json says "
      f"{len(rows) - 1} (phase, id) rows of 2 phases.")):
    sj.simulators.Simulator.load(path)
  # Saved before per-phase coverage was recorded: fitted_ids held the ids of any
  # phase and no phase_fitted_ids. It loads as before: checked per id over all
  # phases, so id 5 in phase 1 is let through (documented).
  del meta["num_phase_fitted_ids"]
  meta["num_fitted_ids"] = N
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  os.remove(os.path.join(path, "phase_fitted_ids.npy"))
  np.save(os.path.join(path, "fitted_ids.npy"), np.arange(N, dtype=np.int32))
  old = sj.simulators.Simulator.load(path)
  assert old.phase_fitted_ids is None and old.fitted_ids == tuple(range(N))
  np.testing.assert_array_equal(
      old.simulate(LATE_5, initial),
      sim.simulate(LATE_5, initial, allow_unfitted_ids=True))


def test_phase_fitted_ids_are_validated():
  sim = _fit_phased()
  kwargs = dict(A=sim.A, B=sim.B, kind="linear", phase_A=sim.phase_A,
                phase_B=sim.phase_B, phase_starts=sim.phase_starts)
  built = sj.simulators.Simulator(**kwargs, phase_fitted_ids=[[3, 0, 1, 1], [1, 2]])
  assert built.phase_fitted_ids == ((0, 1, 3), (1, 2)) and built.fitted_ids == (1,)
  with pytest.raises(ValueError, match=re.escape(
      "phase_fitted_ids: expected one sequence of ids per phase (2 phases), got 1.")):
    sj.simulators.Simulator(**kwargs, phase_fitted_ids=[[0]])
  with pytest.raises(ValueError, match=re.escape(
      "fitted_ids: with phase_fitted_ids it is the ids fitted in every phase")):
    sj.simulators.Simulator(**kwargs, phase_fitted_ids=[[0, 1], [1]],
                            fitted_ids=[0, 1])
  with pytest.raises(ValueError, match=re.escape(
      "phase_fitted_ids[1]: expected train ids in [0, N=6), found [0, 6].")):
    sj.simulators.Simulator(**kwargs, phase_fitted_ids=[[0], [0, 6]]).check_shapes()
  with pytest.raises(ValueError, match="without phases use fitted_ids"):
    sj.simulators.Simulator(A=sim.A, B=sim.B, kind="linear", phase_fitted_ids=[[0]])


# --- 2. converged from the recomputed residual ----------------------------------------

def _dense_design(ids, x_column, num_train):
  """float64[P, 2N] the linear design [n ⊙ x, n] (n: id counts per row)."""
  counts = np.zeros((len(ids), num_train))
  for p, row in enumerate(ids):
    for i in row[row >= 0]:
      counts[p, i] += 1
  return np.concatenate([counts * x_column[:, None], counts], 1)


def _dense_check(designs, y, l2, theta):
  """Per column c, in float64: the relative residual ‖(XᵀX + l2·I)θ − Xᵀy‖ / ‖Xᵀy‖
  of θ[:, c], its float32 rounding bound ε‖|X|ᵀ|X||θ| + l2|θ| + |X|ᵀ|y|‖ / ‖Xᵀy‖,
  and θ's largest error relative to the dense solution's largest entry."""
  out = []
  for c, design in enumerate(designs):
    gram = design.T @ design + l2 * np.eye(design.shape[1])
    rhs = design.T @ y[:, c]
    exact = np.linalg.solve(gram, rhs)
    t = theta[:, c]
    abs_design = np.abs(design)
    bound = abs_design.T @ (abs_design @ np.abs(t)) + l2 * np.abs(t) + (
        abs_design.T @ np.abs(y[:, c]))
    out.append((np.linalg.norm(gram @ t - rhs) / np.linalg.norm(rhs),
                EPS * np.linalg.norm(bound) / np.linalg.norm(rhs),
                np.max(np.abs(t - exact)) / np.max(np.abs(exact))))
  return np.array(out).T


def _drifting_problem():
  """A CG problem whose recursive residual drifts below tol=1e-4 while the true one
  stays at 2.4e-2 (under the tests' XLA flags): losses x spanning ~8 orders of
  magnitude, 400 rows, N = 100."""
  rng = np.random.default_rng(2)
  ids = rng.integers(-1, 100, (400, 4)).astype(np.int32)
  x = np.exp(rng.normal(0, 3, (400, 2))).astype(np.float32)
  y = (rng.normal(size=(400, 2)) * np.exp(rng.normal(0, 2, (400, 1)))).astype(
      np.float32)
  return ids, x, y


def _solver_check(theta, ids, x, y, l2):
  flat = np.asarray(theta, np.float64).transpose(1, 0, 2).reshape(-1, y.shape[1])
  designs = [_dense_design(ids, x[:, c].astype(np.float64), theta.shape[0])
             for c in range(y.shape[1])]
  return _dense_check(designs, y.astype(np.float64), l2, flat)


def test_cg_converged_means_the_true_residual_meets_tol():
  ids, x, y = _drifting_problem()
  l2, tol = 3e-3, 1e-4
  theta, info = sj.simulators.solve(ids, x, y, 100, l2, linear=True, method="cg",
                                    tol=tol, max_iters=3000)
  residual, bound, error = _solver_check(theta, ids, x, y, l2)
  # The reported residual is θ's own (up to the rounding of its float32 evaluation).
  assert abs(info["relative_residual"] - residual.max()) <= bound.max()
  # Converged: every column's true residual is within tol, or within float32
  # rounding where tol is below it (plus the rounding of the check itself). The old
  # flag read CG's recursive residual: True here, with a true residual of 2.4e-2,
  # 3.5 times that allowance.
  assert info["converged"]
  np.testing.assert_array_less(residual, np.maximum(tol, bound) + bound)
  np.testing.assert_array_less(error, 1e-3)


def test_cg_without_restarts_reports_the_drift(monkeypatch):
  # CG's own verdict: the float64 check skipped, as on problems too large for it.
  monkeypatch.setattr(sj.simulators._solver, "FLOAT64_CHECK_MAX_FLOPS", 0)  # pylint: disable=protected-access
  ids, x, y = _drifting_problem()
  monkeypatch.setattr(_solver, "_MAX_RESTARTS", 0)
  with pytest.warns(RuntimeWarning, match=re.escape(
      "simulators.solve: CG's recursive residual met tol after ")) as record:
    theta, info = sj.simulators.solve(ids, x, y, 100, 3e-3, linear=True,
                                      method="cg", tol=1e-4, max_iters=3000)
  residual, bound, _ = _solver_check(theta, ids, x, y, 3e-3)
  assert not info["converged"] and info["iterations"] < 3000
  assert np.any(residual > np.maximum(1e-4, bound) + bound)  # really unconverged
  assert f"relative residual {info['relative_residual']:.3g}, tol=0.0001" in str(
      record[0].message)


def test_featurized_cg_converged_means_the_true_residual_meets_tol():
  """The featurized CG had the same recursive-residual flag: True here with a true
  relative residual of 0.39, 1.8 times the allowance below."""
  rng = np.random.default_rng(4)
  summed = (rng.normal(size=(1000, 16)) @ np.diag(np.exp(rng.normal(0, 3, 16)))
            @ rng.normal(size=(16, 16))).astype(np.float32)
  x = np.exp(rng.normal(0, 3, (1000, 2))).astype(np.float32)
  y = (rng.normal(size=(1000, 2)) * np.exp(rng.normal(0, 2, (1000, 1)))).astype(
      np.float32)
  l2, tol = np.full(2, 1e-4, np.float32), 1e-4
  w, info = _featurized.solve(summed, x, y, l2, linear=True, method="cg", tol=tol,
                              max_iters=3000)
  s64 = summed.astype(np.float64)
  designs = [np.concatenate([s64 * x[:, c:c + 1], s64], 1) for c in range(2)]
  residual, bound, _ = _dense_check(designs, y.astype(np.float64), 1e-4,
                                    np.asarray(w, np.float64))
  assert abs(info["relative_residual"] - residual.max()) <= bound.max()
  assert info["converged"]  # after a restart from W on the true residual
  np.testing.assert_array_less(residual, np.maximum(tol, bound) + bound)


# --- 3. non-finite featurized fits ----------------------------------------------------

def _featurized_trace(num_train=12, seen=12):
  rng = np.random.default_rng(0)
  ids = rng.integers(0, seen, (6, 8, 3)).astype(np.int32)
  losses = rng.uniform(1, 3, (6, 9, 2)).astype(np.float32)
  return sj.Trace(batch_ids=ids, losses=losses,
                  learning_rates=np.full((6, 8), 0.1, np.float32),
                  num_train_examples=num_train)


def test_featurized_fit_refuses_an_overflowing_solve():
  """Finite features of 1e20 overflow float32 normal equations (SᵀS ~ 1e40): the
  CG solve gave W = 0, "converged" with a NaN relative residual, silently (and so
  did the float32 normal solve, with NaN A, B). The normal equations are float64
  now (review h25), where they do not overflow: that fit is finite."""
  trace = _featurized_trace()
  features = np.random.default_rng(1).normal(size=(12, 4)).astype(np.float32)
  with pytest.raises(ValueError, match=re.escape(
      "featurized solve: the 'cg' solve gave non-finite relative residuals (first "
      "at [0]): the features or losses overflow float32 in the normal equations, or "
      "they are ill-conditioned at l2=0.001; rescale the features or use a larger "
      "l2.")):
    sj.simulators.fit("featurized", trace, features=features * 1e20, method="cg")
  for method in ("normal", "cg"):
    sim = sj.simulators.fit("featurized", trace, features=features, method=method)
    assert np.all(np.isfinite(np.asarray(sim.A))) and sim.fit_info["converged"]
  sim = sj.simulators.fit("featurized", trace, features=features * 1e20,
                          method="normal")
  assert np.all(np.isfinite(np.asarray(sim.A))) and sim.fit_info["converged"]


def test_featurized_fit_refuses_overflowing_effects_of_an_unseen_id():
  """W is finite, but A = features·W of an id no run contained overflows."""
  trace = _featurized_trace(seen=10)  # ids 10, 11 in no run
  features = np.random.default_rng(1).normal(size=(12, 3)).astype(np.float32)
  features[:10] *= 1e-4
  features[11] = 1e38
  with pytest.raises(ValueError, match=re.escape(
      "features: the fitted A = features·W is not finite (first at train id 11, "
      "test example 0): the features overflow float32; rescale them.")):
    sj.simulators.fit("featurized", trace, features=features, l2=1e-9,
                      intercept=False, method="normal")


@pytest.mark.parametrize("method", ["normal", "cg"])
def test_featurized_solve_refuses_nonfinite_inputs(method):
  """A NaN row used to give W = NaN (normal) or W = 0 (CG), "converged", with
  relative residual 0.0."""
  rng = np.random.default_rng(0)
  summed = rng.normal(size=(20, 3)).astype(np.float32)
  x = rng.uniform(1, 2, (20, 2)).astype(np.float32)
  y = rng.normal(size=(20, 2)).astype(np.float32)
  l2 = np.full(2, 0.1, np.float32)
  bad = summed.copy()
  bad[4, 1] = np.nan
  with pytest.raises(ValueError, match=re.escape(
      "summed: contains NaN or inf (first at row 4, column 1).")):
    _featurized.solve(bad, x, y, l2, linear=True, method=method)
  bad = y.copy()
  bad[2, 0] = np.inf
  with pytest.raises(ValueError, match=re.escape(
      "y: contains NaN or inf (first at row 2, column 0).")):
    _featurized.solve(summed, x, bad, l2, linear=True, method=method)
  bad = x.copy()
  bad[7, 1] = -np.inf
  with pytest.raises(ValueError, match=re.escape(
      "x: contains NaN or inf (first at row 7, column 1).")):
    _featurized.solve(summed, bad, y, l2, linear=True, method=method)
  # Additive fits do not read x (as `_solver.solve`).
  w, _ = _featurized.solve(summed, bad, y, l2, linear=False, method=method)
  assert np.all(np.isfinite(w))


def test_a_reordering_search_refuses_start_ids_a_swap_could_move_to_an_unseen_phase():
  sim = _fit_phased()
  initial = _phase_trace().losses[0, 0]
  both = sorted(set(sim.phase_fitted_ids[0]) & set(sim.phase_fitted_ids[1]))[:3]
  assert len(both) == 3 and 4 in sim.phase_fitted_ids[1]
  assert 5 not in sim.phase_fitted_ids[1]
  # One 4-step epoch over 4 ids, steps 2-3 padding: a swap may move any id to any
  # step, so each must have been fitted in both phases. Ids of both phases: runs.
  start = np.array([[both[:2], [both[2], 4], [-1, -1], [-1, -1]]], np.int32)
  result = sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=20,
                                           num_proposals=8, epoch_steps=4)
  assert sim.unfitted_ids(result.batch_ids).size == 0
  # Id 5 at step 0 (phase 0, which saw it) passes the per-step check, but a swap
  # could move it to step 2 or 3 (phase 1, which never saw it): refused.
  start[0, 0, 0] = 5
  assert sim.unfitted_ids(start).size == 0
  with pytest.raises(ValueError, match=re.escape(
      "search_curriculum: start_batch_ids (order swaps move ids within their epoch) "
      "hold train ids [5] (1 in all) that no fitted run contained in the phase of "
      "their steps (phase 1: [5]); ")):
    sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=2,
                                    num_proposals=2, epoch_steps=4)
  # Membership moves alone (no reordering) keep 5 where it is.
  result = sj.simulators.search_curriculum(sim, initial, start, [0], num_iters=2,
                                           num_proposals=2, epoch_steps=4,
                                           reorder=False)
  assert result.batch_ids.shape == start.shape
