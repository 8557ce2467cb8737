"""Fitting, simulation, bands and TracIn-as-simulator on synthetic traces."""

import numpy as np
import pytest

import simfluence_jax as sj


def _synthetic(seed=0, runs=40, steps=30, batch=3, num_train=8, num_test=2, noise=0.0,
               A=None, B=None):
  rng = np.random.default_rng(seed)
  if A is None:
    A = (1.0 / batch + rng.uniform(-0.03, 0.03, (num_train, num_test)))
    B = rng.uniform(-0.05, 0.02, (num_train, num_test))
  ids = rng.integers(0, num_train, (runs, steps, batch)).astype(np.int32)
  ids[:, ::4, -1] = -1
  losses = np.zeros((runs, steps + 1, num_test))
  losses[:, 0] = rng.uniform(2.0, 3.0, (runs, num_test))
  for r in range(runs):
    for t in range(steps):
      valid = ids[r, t][ids[r, t] >= 0]
      alpha = A[valid].sum(0)
      beta = B[valid].sum(0)
      losses[r, t + 1] = alpha * losses[r, t] + beta + noise * rng.normal(size=num_test)
  trace = sj.Trace(batch_ids=ids, losses=losses.astype(np.float32),
                   learning_rates=np.full((runs, steps), 0.1, np.float32),
                   num_train_examples=num_train)
  return trace, A, B


def _loop_simulate(A, B, batch_ids, initial):
  out = [np.asarray(initial, np.float64)]
  for t in range(batch_ids.shape[1]):
    prev = out[-1].copy()
    new = np.zeros_like(prev)
    for r in range(batch_ids.shape[0]):
      valid = batch_ids[r, t][batch_ids[r, t] >= 0]
      alpha = A[valid].sum(0) if A is not None else 1.0
      new[r] = alpha * prev[r] + B[valid].sum(0)
    out.append(new)
  return np.stack(out, 1)


@pytest.mark.parametrize("method", ["normal", "cg"])  # "dual" needs P < 2N
def test_linear_fit_recovers_parameters(method):
  trace, A, B = _synthetic()
  sim = sj.simulators.fit("linear", trace, l2=1e-6, method=method, tol=1e-7)
  assert sim.kind == "linear" and sim.A.shape == (8, 2) and sim.B.shape == (8, 2)
  np.testing.assert_allclose(sim.A, A, atol=2e-3)
  np.testing.assert_allclose(sim.B, B, atol=5e-3)
  assert sim.fit_info["method"] == method


def test_additive_fit_recovers_parameters():
  trace, _, _ = _synthetic()
  B = np.random.default_rng(1).uniform(-0.05, 0.02, (8, 2))
  losses = _loop_simulate(None, B, trace.batch_ids, trace.losses[:, 0])
  trace = sj.Trace(batch_ids=trace.batch_ids, losses=losses.astype(np.float32),
                   learning_rates=trace.learning_rates, num_train_examples=8)
  sim = sj.simulators.fit("additive", trace, l2=1e-6)
  assert sim.A is None and sim.kind == "additive"
  np.testing.assert_allclose(sim.B, B, atol=1e-4)


def test_noisy_fit_is_close():
  trace, A, B = _synthetic(noise=1e-3, runs=60)
  sim = sj.simulators.fit("linear", trace, l2=1e-4)
  np.testing.assert_allclose(sim.A, A, atol=0.02)
  np.testing.assert_allclose(sim.B, B, atol=0.05)


def test_simulate_equals_loop():
  trace, A, B = _synthetic(runs=3, steps=7)
  sim = sj.simulators.Simulator(A=A.astype(np.float32), B=B.astype(np.float32),
                                kind="linear")
  ids = trace.batch_ids.copy()
  ids[0, 2] = [1, 1, -1]  # repeated ids count twice
  pred = sim.simulate(ids, trace.losses[:, 0])
  np.testing.assert_allclose(pred, _loop_simulate(A, B, ids, trace.losses[:, 0]),
                             rtol=1e-5)
  additive = sj.simulators.additive_from_scores(B, name="s")
  np.testing.assert_allclose(additive.simulate(ids, trace.losses[:, 0]),
                             _loop_simulate(None, B, ids, trace.losses[:, 0]), rtol=1e-5)


def test_validation():
  trace, _, _ = _synthetic(runs=3, steps=5)
  with pytest.raises(ValueError, match="kind"):
    sj.simulators.fit("quadratic", trace)
  with pytest.raises(ValueError, match="l2"):
    sj.simulators.fit("linear", trace, l2=0.0)
  sim = sj.simulators.fit("additive", trace)
  with pytest.raises(ValueError, match="batch_ids"):
    sim.simulate(np.full((3, 5, 3), 8), trace.losses[:, 0])
  with pytest.raises(ValueError, match="batch_ids"):
    sim.simulate(trace.batch_ids[0], trace.losses[:, 0])
  with pytest.raises(ValueError, match="initial_losses"):
    sim.simulate(trace.batch_ids, trace.losses[:2, 0])
  with pytest.raises(ValueError, match="B"):
    sj.simulators.additive_from_scores(np.zeros(3))


def test_bands_shrink_with_data_and_mean_near_map():
  small, _, _ = _synthetic(noise=1e-2, runs=6, seed=3)
  large, _, _ = _synthetic(noise=1e-2, runs=60, seed=3)
  test_ids = large.batch_ids[:2]
  init = large.losses[:2, 0]
  stds = []
  for trace in (small, large):
    sim = sj.simulators.fit("linear", trace, l2=1e-2)
    mean, std = sim.simulate_with_bands(test_ids, init, num_samples=64, rng=0)
    assert mean.shape == std.shape == (2, 31, 2)
    stds.append(float(np.mean(std[:, -1])))
    map_pred = np.asarray(sim.simulate(test_ids, init))
    np.testing.assert_allclose(mean, map_pred, atol=4 * float(np.max(std)) + 1e-3)
  assert stds[1] < 0.7 * stds[0]
  with pytest.raises(ValueError, match="posterior"):
    sj.simulators.additive_from_scores(np.zeros((8, 2))).simulate_with_bands(
        test_ids, init)


def test_tracin_per_step_matches_loop():
  rng = np.random.default_rng(0)
  runs, steps, batch, num_train, num_test, dim = 2, 4, 3, 6, 2, 5
  ids = rng.integers(0, num_train - 1, (runs, steps, batch)).astype(np.int32)
  ids[0, 1, 2] = -1
  train_grads = rng.normal(size=(runs, steps, batch, dim)).astype(np.float32)
  train_grads[0, 1, 2] = 0
  test_grads = rng.normal(size=(runs, steps, num_test, dim)).astype(np.float32)
  lrs = rng.uniform(0.1, 0.2, (runs, steps)).astype(np.float32)
  trace = sj.Trace(batch_ids=ids, losses=np.zeros((runs, steps + 1, num_test), np.float32),
                   learning_rates=lrs, num_train_examples=num_train,
                   train_grads=train_grads, test_grads=test_grads)
  sim = sj.simulators.tracin_per_step(trace)
  expected = np.zeros((num_train, num_test))
  count = np.zeros(num_train)
  for r in range(runs):
    for t in range(steps):
      size = np.sum(ids[r, t] >= 0)
      for k in range(batch):
        i = ids[r, t, k]
        if i < 0:
          continue
        for m in range(num_test):
          expected[i, m] += -lrs[r, t] / size * train_grads[r, t, k] @ test_grads[r, t, m]
        count[i] += 1
  expected = np.where(count[:, None] > 0, expected / np.maximum(count, 1)[:, None], 0)
  assert sim.kind == "additive" and sim.name == "tracin_per_step"
  np.testing.assert_allclose(sim.B, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.asarray(sim.B)[num_train - 1] == 0)  # never seen
