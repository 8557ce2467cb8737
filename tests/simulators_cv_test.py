"""`simulators.fit_cv`: l2 by K-fold cross-validation with runs as folds."""

import numpy as np
import pytest

import simfluence_jax as sj


def _noisy_trace(runs=12, steps=8, seed=0):
  rng = np.random.default_rng(seed)
  num_train, num_test, batch = 10, 2, 2
  a = 1 / batch + rng.uniform(-0.05, 0.05, (num_train, num_test))
  b = rng.uniform(-0.05, 0.02, (num_train, num_test))
  ids = rng.integers(0, num_train, (runs, steps, batch)).astype(np.int32)
  losses = np.zeros((runs, steps + 1, num_test))
  losses[:, 0] = rng.uniform(2.0, 3.0, (runs, num_test))
  for t in range(steps):
    losses[:, t + 1] = (a[ids[:, t]].sum(1) * losses[:, t] + b[ids[:, t]].sum(1)
                        + 0.05 * rng.normal(size=(runs, num_test)))
  return sj.Trace(batch_ids=ids, losses=losses.astype(np.float32),
                  learning_rates=np.full((runs, steps), 0.1, np.float32),
                  num_train_examples=num_train)


def _brute_force(kind, trace, grid, folds, score, **kwargs):
  """float[K, G]: one `fit` per fold and l2, scored on the fold's runs."""
  fold_of_run = np.arange(trace.num_runs) % folds
  out = np.zeros((folds, len(grid)))
  for k in range(folds):
    train = trace.select_runs(np.flatnonzero(fold_of_run != k))
    held = trace.select_runs(np.flatnonzero(fold_of_run == k))
    for g, l2 in enumerate(grid):
      sim = sj.simulators.fit(kind, train, l2=l2, **kwargs)
      out[k, g] = score(np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0])),
                        held.losses)
  return out


def _spearman_across_runs(pred, actual):
  return sj.evaluation.spearman_across_runs(pred, actual)


@pytest.mark.parametrize("kind, metric", [
    ("linear", "all_steps_mse"), ("additive", "final_step_mse"),
    ("linear", "spearman_across_runs")])
def test_fit_cv_picks_what_a_brute_force_loop_picks(kind, metric):
  trace = _noisy_trace()
  grid = (1e-3, 0.1, 3.0, 100.0)
  sim = sj.simulators.fit_cv(kind, trace, grid, num_folds=3, metric=metric,
                             method="normal")
  if metric == "spearman_across_runs":
    score = lambda p, a: -_spearman_across_runs(p, a)
  else:
    score = getattr(sj.evaluation, metric)
  want = _brute_force(kind, trace, grid, 3, score, method="normal")
  cv = sim.fit_info["cv"]
  np.testing.assert_allclose(cv["fold_scores"], want, rtol=2e-3, atol=1e-9)
  np.testing.assert_allclose(cv["mean_scores"], want.mean(0), rtol=2e-3, atol=1e-9)
  chosen = grid[int(np.argmin(want.mean(0)))]
  assert cv["chosen_l2"] == chosen and cv["l2_grid"] == list(grid)
  assert cv["metric"] == metric and cv["num_folds"] == 3
  # The returned simulator is the refit on every run with the chosen l2.
  refit = sj.simulators.fit(kind, trace, l2=chosen, method="normal")
  np.testing.assert_allclose(sim.B, refit.B, atol=1e-6)
  assert sim.fit_info["l2"] == chosen
  if metric == "all_steps_mse":  # the noise makes neither end of the grid best
    assert chosen not in (grid[0], grid[-1])


def test_fit_cv_with_a_callable_metric_and_phases_survives_save_load(tmp_path):
  trace = _noisy_trace()
  grid = (1e-2, 1.0)
  sim = sj.simulators.fit_cv("linear", trace, grid, num_folds=2,
                             metric=sj.evaluation.final_step_mse, num_phases=2,
                             method="cg", tol=1e-7, name="cv")
  want = _brute_force("linear", trace, grid, 2, sj.evaluation.final_step_mse,
                      num_phases=2, method="cg", tol=1e-7)
  np.testing.assert_allclose(sim.fit_info["cv"]["fold_scores"], want, rtol=2e-3)
  assert sim.name == "cv" and sim.fit_info["cv"]["metric"] == "final_step_mse"
  sim.save(str(tmp_path / "sim"))
  assert sj.simulators.Simulator.load(str(tmp_path / "sim")).fit_info == sim.fit_info


def test_fit_cv_validation():
  trace = _noisy_trace(runs=4)
  with pytest.raises(ValueError, match="num_folds"):
    sj.simulators.fit_cv("linear", trace, num_folds=5)
  with pytest.raises(ValueError, match="l2_grid"):
    sj.simulators.fit_cv("linear", trace, (1.0, -1.0), num_folds=2)
  with pytest.raises(ValueError, match="l2_grid"):
    sj.simulators.fit_cv("linear", trace, (), num_folds=2)
  with pytest.raises(ValueError, match="metric"):
    sj.simulators.fit_cv("linear", trace, num_folds=2, metric="r2")
  with pytest.raises(ValueError, match="l2: fit_cv chooses"):
    sj.simulators.fit_cv("linear", trace, num_folds=2, l2=1.0)
  with pytest.raises(ValueError, match="unknown keyword"):
    sj.simulators.fit_cv("linear", trace, num_folds=2, damping=1.0)


def test_solver_columns_may_have_their_own_l2():
  """The vectorisation fit_cv rests on: per-column l2 = separate solves."""
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, 12, (60, 3)).astype(np.int32)
  x = rng.uniform(1, 2, (60, 1)).astype(np.float32)
  y = rng.normal(size=(60, 1)).astype(np.float32)
  grid = np.array([1e-2, 1.0, 10.0], np.float32)
  for method in ("normal", "cg", "dual"):
    together, _ = sj.simulators.solve(ids, np.tile(x, 3), np.tile(y, 3), 12, grid,
                                      linear=True, method=method, tol=1e-8,
                                      max_iters=5000)
    for g, l2 in enumerate(grid):
      alone, _ = sj.simulators.solve(ids, x, y, 12, float(l2), linear=True,
                                     method=method, tol=1e-8, max_iters=5000)
      # Float32 CG on the dual system stops at its noise floor (~5e-4 here at
      # l2 = 0.01, depending on how XLA orders the sums); another column's l2 would
      # move the solution by > 0.05.
      np.testing.assert_allclose(together[:, :, g], alone[:, :, 0],
                                 atol=2e-3 if method == "dual" else 1e-5,
                                 err_msg=method)
  with pytest.raises(ValueError, match="l2"):
    sj.simulators.solve(ids, x, y, 12, np.array([1.0, 2.0]), linear=True)


def test_cv_score_conventions():
  rng = np.random.default_rng(0)
  actual = rng.normal(size=(4, 3, 2))
  pred = actual + 0.1 * rng.normal(size=actual.shape)
  score = sj.simulators._fit.cv_score
  assert score("all_steps_mse", pred, actual) == pytest.approx(
      sj.evaluation.all_steps_mse(pred, actual))
  assert score("spearman_across_runs", pred, actual) == pytest.approx(
      -sj.evaluation.spearman_across_runs(pred, actual))
  ties = pred.copy()
  ties[1, -1] = ties[0, -1]  # tied ranks share their mean rank, as in scipy
  assert score("spearman_across_runs", ties, actual) == pytest.approx(
      -sj.evaluation.spearman_across_runs(ties, actual))
  assert np.isnan(score("spearman_across_runs", pred[:2], actual[:2]))  # < 3 runs
  # Rows differing across runs only by float rounding (an order-blind simulator on
  # permuted runs) carry no ranking: undefined, as in the held-out evaluation.
  rounding = np.repeat(pred[:1], 4, axis=0)
  rounding[:, -1] += 3e-7 * np.arange(4)[:, None] * np.array([1.0, -1.0])
  assert np.isnan(sj.evaluation.spearman_across_runs(rounding, actual))
  assert np.isnan(score("spearman_across_runs", rounding, actual))
  diverged = pred.copy()
  diverged[0, 1, 0] = np.inf
  assert score("all_steps_mse", diverged, actual) == np.inf  # worst, never skipped


def test_a_fold_with_nothing_to_fit_is_named():
  """Control runs (all padding) in every run of a fold's complement: the fold is
  named, where the whole trace was blamed."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 5, (4, 3, 2)).astype(np.int32)
  ids[[0, 2]] = -1
  losses = (2 + 0.1 * rng.standard_normal((4, 4, 2))).astype(np.float32)
  trace = sj.Trace(batch_ids=ids, losses=losses,
                   learning_rates=np.ones((4, 3), np.float32), num_train_examples=5)
  sj.simulators.fit("linear", trace, l2=0.1)  # the whole trace has data
  with pytest.raises(ValueError, match=(
      r"^num_folds=2: fold 1's fitting runs \(every run r with r % 2 != 1\) are all "
      r"padding")):
    sj.simulators.fit_cv("linear", trace, [0.1, 1.0], num_folds=2)


def test_priors_are_refitted_on_each_folds_fitting_runs():
  # Review h32: priors fitted on every run had seen each fold's held-out runs.
  trace = _noisy_trace()
  grid = (1e-3, 0.1, 3.0)
  seen = []

  def priors(runs):  # a data-dependent prior: the runs' mean step change per id
    seen.append(np.asarray(runs.losses[:, 0, 0]))
    shift = float(np.mean(runs.losses[:, 1:] - runs.losses[:, :-1]))
    return (np.full((10, 2), 0.5, np.float32),
            np.full((10, 2), shift / 2, np.float32))

  sim = sj.simulators.fit_cv("linear", trace, grid, num_folds=3, priors=priors,
                             method="normal")
  fold_of_run = np.arange(trace.num_runs) % 3
  for k in range(3):  # each fold's prior saw only its fitting runs
    np.testing.assert_array_equal(
        seen[k], np.asarray(trace.losses)[fold_of_run != k, 0, 0])
  np.testing.assert_array_equal(seen[3], np.asarray(trace.losses)[:, 0, 0])
  want = np.zeros((3, len(grid)))
  for k in range(3):
    train = trace.select_runs(np.flatnonzero(fold_of_run != k))
    held = trace.select_runs(np.flatnonzero(fold_of_run == k))
    prior_a, prior_b = priors(train)
    for g, l2 in enumerate(grid):
      fitted = sj.simulators.fit("linear", train, l2=l2, prior_A=prior_a,
                                 prior_B=prior_b, method="normal")
      want[k, g] = sj.evaluation.all_steps_mse(
          np.asarray(fitted.simulate(held.batch_ids, held.losses[:, 0])), held.losses)
  np.testing.assert_allclose(sim.fit_info["cv"]["fold_scores"], want, rtol=2e-3)
  with pytest.raises(ValueError, match="^priors: pass either"):
    sj.simulators.fit_cv("linear", trace, grid, num_folds=3, priors=priors,
                         prior_B=np.zeros((10, 2), np.float32))
