"""Fitting, simulation, bands and TracIn-as-simulator on synthetic traces."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simfluence_jax as sj

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("simulators_test")


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


def test_batch_mean_scales_a_padded_step_by_its_valid_ids(tmp_path):
  """TracIn-CP's per-example effects assume a full batch (−(η/B)·score); training
  divides a step by its v valid ids, so a padded step's effects scale by B/v (they
  were v/B of the formula). Saved and loaded, searched and removed alike."""
  b = np.random.default_rng(0).normal(size=(5, 2)).astype(np.float32)
  ids = np.array([[[0, 1, 2], [3, -1, -1], [-1, -1, -1]]], np.int32)
  initial = np.ones((1, 2), np.float32)
  first = initial[0] + b[0] + b[1] + b[2]
  expected = np.stack([initial[0], first, first + 3 * b[3], first + 3 * b[3]])
  sim = sj.simulators.additive_from_scores(b, batch_size=3, batch_mean=True)
  np.testing.assert_allclose(sim.simulate(ids, initial)[0], expected, rtol=1e-6)
  plain = sj.simulators.additive_from_scores(b, batch_size=3)
  np.testing.assert_allclose(plain.simulate(ids, initial)[0, 2], first + b[3],
                             rtol=1e-6)
  sim.save(str(tmp_path / "sim"))
  loaded = sj.simulators.Simulator.load(str(tmp_path / "sim"))
  assert loaded.batch_mean
  np.testing.assert_allclose(loaded.simulate(ids, initial), sim.simulate(ids, initial))
  # A removed occurrence (weight 0) keeps the divisor, as training does.
  weights = np.ones(ids.shape, np.float32)
  weights[0, 0, 0] = 0.0
  np.testing.assert_allclose(sim.simulate(ids, initial, weights=weights)[0, 1],
                             initial[0] + b[1] + b[2], rtol=1e-6)
  result = sj.simulators.search_curriculum(sim, initial[0], ids, [0], num_iters=1,
                                           num_proposals=1, loss_floor=None)
  np.testing.assert_allclose(result.initial_objective, expected[-1, 0], rtol=1e-6)
  with pytest.raises(ValueError, match="batch_mean: only for kind='additive'"):
    sj.simulators.Simulator(A=jnp.asarray(b), B=jnp.asarray(b), kind="linear",
                            batch_mean=True)


def test_validation():
  trace, _, _ = _synthetic(runs=4, steps=6)  # the shape of the tests below: one fit
  with pytest.raises(ValueError, match="kind"):
    sj.simulators.fit("quadratic", trace)
  with pytest.raises(ValueError, match="l2"):
    sj.simulators.fit("linear", trace, l2=0.0)
  sim = sj.simulators.fit("additive", trace)
  with pytest.raises(ValueError, match="batch_ids"):
    sim.simulate(np.full((4, 6, 3), 8), trace.losses[:, 0])
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


# --- what a simulator was fitted on -------------------------------------------------------

def test_fitted_simulator_refuses_other_batch_widths_and_longer_curricula():
  trace, _, _ = _synthetic(runs=4, steps=6)
  for sim in (sj.simulators.fit("linear", trace), sj.simulators.fit("additive", trace),
              sj.simulators.additive_from_scores(np.zeros((8, 2)), batch_size=3,
                                                 num_steps=6)):
    assert (sim.batch_size, sim.num_steps) == (3, 6)
    init = trace.losses[:2, 0]
    wide = np.zeros((2, 6, 4), np.int32)
    for call in (lambda ids: sim.simulate(ids, init),
                 lambda ids: sim.simulate_with_bands(ids, init, num_samples=2),
                 lambda ids: sj.simulators.search_curriculum(sim, init[0], ids, [0])):
      with pytest.raises(ValueError) as error:
        call(wide)
      message = str(error.value)
      assert "\n" not in message
      if "posterior" in message:  # the scores simulator has no bands at all
        continue
      assert message.split(":")[0] in ("batch_ids", "start_batch_ids")
      assert "batch width 4" in message and "batch size 3" in message
    long = trace.batch_ids[:2, [0, 1, 2, 3, 4, 5, 0]]
    with pytest.raises(ValueError, match=r"^batch_ids: 7 steps, more than the 6 .*"
                                         "allow_extrapolation=True"):
      sim.simulate(long, init)
    with pytest.raises(ValueError, match="start_batch_ids: 7 steps"):
      sj.simulators.search_curriculum(sim, init[0], long, [0], num_iters=1)
    # Shorter curricula are prefixes of the fitted regime; longer ones on request.
    a = None if sim.A is None else np.asarray(sim.A)
    np.testing.assert_allclose(sim.simulate(trace.batch_ids[:2, :4], init),
                               _loop_simulate(a, np.asarray(sim.B),
                                              trace.batch_ids[:2, :4], init), rtol=1e-5)
    np.testing.assert_allclose(sim.simulate(long, init, allow_extrapolation=True),
                               _loop_simulate(a, np.asarray(sim.B), long, init),
                               rtol=1e-5)
  # A scores simulator without B, T checks nothing (the caller did not say).
  free = sj.simulators.additive_from_scores(np.zeros((8, 2)))
  assert free.simulate(np.zeros((1, 9, 5), np.int32), init[:1]).shape == (1, 10, 2)


def test_tracin_per_step_knows_the_trace_shape():
  rng = np.random.default_rng(0)
  trace = sj.Trace(batch_ids=rng.integers(0, 4, (2, 3, 2)).astype(np.int32),
                   losses=np.ones((2, 4, 1), np.float32),
                   learning_rates=np.full((2, 3), 0.1, np.float32), num_train_examples=4,
                   train_grads=rng.normal(size=(2, 3, 2, 3)).astype(np.float32),
                   test_grads=rng.normal(size=(2, 3, 1, 3)).astype(np.float32))
  sim = sj.simulators.tracin_per_step(trace)
  assert (sim.batch_size, sim.num_steps) == (2, 3)


def test_save_load_keeps_fitted_shape_and_reads_format_1(tmp_path):
  trace, _, _ = _synthetic(runs=4, steps=6)
  sim = sj.simulators.fit("linear", trace, l2=1e-2)
  sim.save(str(tmp_path / "v2"))
  loaded = sj.simulators.Simulator.load(str(tmp_path / "v2"))
  assert (loaded.batch_size, loaded.num_steps, loaded.null_a) == (3, 6, sim.null_a)
  assert loaded.fit_info == sim.fit_info
  # A simulator saved before format 2: no batch_size / num_steps / null_a in the json.
  sim.save(str(tmp_path / "v1"))
  meta_path = tmp_path / "v1" / "simulator.json"
  meta = json.loads(meta_path.read_text())
  for key in ("batch_size", "num_steps", "num_train_examples", "num_test_examples",
              "null_a", "phase_starts"):
    del meta[key]
  meta["format_version"] = 1
  meta_path.write_text(json.dumps(meta))
  old = sj.simulators.Simulator.load(str(tmp_path / "v1"))
  assert (old.batch_size, old.num_steps, old.null_a) == (3, None, None)  # width: posterior
  np.testing.assert_array_equal(old.simulate(trace.batch_ids, trace.losses[:, 0]),
                                sim.simulate(trace.batch_ids, trace.losses[:, 0]))
  with pytest.raises(ValueError, match="batch width 4"):
    old.simulate(np.zeros((1, 6, 4), np.int32), trace.losses[:1, 0])
  meta["format_version"] = 7
  meta_path.write_text(json.dumps(meta))
  with pytest.raises(ValueError, match="unsupported format_version"):
    sj.simulators.Simulator.load(str(tmp_path / "v1"))


# --- fit diagnostics ----------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), "1"])
def test_prior_alpha_must_be_finite(value):
  trace, _, _ = _synthetic(runs=2, steps=4)
  with pytest.raises(ValueError, match="prior_alpha"):
    sj.simulators.fit("linear", trace, prior_alpha=value)


def test_unconverged_cg_warns_and_records_it(monkeypatch):
  # CG's own verdict: the float64 check skipped, as on problems too large for it.
  monkeypatch.setattr(sj.simulators._solver, "FLOAT64_CHECK_MAX_FLOPS", 0)  # pylint: disable=protected-access
  # The prior-centre tests' shape: the same compiled CG programs.
  trace, _, _ = _synthetic(runs=20, steps=5)
  with pytest.warns(RuntimeWarning, match=r"max_iters=2 before every column "
                                          r"converged: relative residual "
                                          r"[0-9.e-]+, tol=1e-09") as record:
    sim = sj.simulators.fit("linear", trace, l2=1e-6, method="cg", max_iters=2,
                            tol=1e-9)
  assert record[0].filename == __file__  # points at the caller
  info = sim.fit_info
  assert info["converged"] is False and info["relative_residual"] > 1e-9
  assert f"{info['relative_residual']:.3g}" in str(record[0].message)
  assert sj.simulators.fit("linear", trace, l2=1e-6, method="cg",
                           tol=1e-6).fit_info["converged"] is True


# --- weighted occurrences -----------------------------------------------------------------

def _loop_weighted(A, B, batch_ids, weights, initial, null_a):
  """Explicit loop: α = Σ_k [w_k A_i + (1 − w_k) a₀], β = Σ_k w_k B_i (skip padding)."""
  out = [np.asarray(initial, np.float64)]
  for t in range(batch_ids.shape[1]):
    new = np.zeros_like(out[-1])
    for r in range(batch_ids.shape[0]):
      alpha = 0.0 if A is not None else 1.0
      beta = 0.0
      for k, i in enumerate(batch_ids[r, t]):
        if i < 0:
          continue
        w = weights[r, t, k]
        if A is not None:
          alpha = alpha + w * A[i] + (1 - w) * null_a
        beta = beta + w * B[i]
      new[r] = alpha * out[-1][r] + beta
    out.append(new)
  return np.stack(out, 1)


def test_weighted_occurrences_equal_explicit_loop():
  trace, _, _ = _synthetic(runs=4, steps=6)  # the shape of the tests above: one fit
  rng = np.random.default_rng(4)
  ids = trace.batch_ids.copy()
  ids[0, 2] = [1, 1, -1]
  weights = rng.choice([0.0, 1.0, 0.5, 2.0], size=ids.shape).astype(np.float32)
  weights[ids < 0] = 7.0  # ignored at padding
  init = trace.losses[:, 0]
  fitted = sj.simulators.fit("linear", trace, l2=1e-3)
  counts = np.sum(trace.batch_ids >= 0, -1)
  assert fitted.null_a == pytest.approx(1.0 / counts.mean())  # 1/b̄, "no change"
  A, B = np.asarray(fitted.A), np.asarray(fitted.B)
  np.testing.assert_allclose(fitted.simulate(ids, init, weights),
                             _loop_weighted(A, B, ids, weights, init, fitted.null_a),
                             rtol=1e-5)
  # A simulator built by hand falls back to 1/batch width for the null term.
  direct = sj.simulators.Simulator(A=jnp.asarray(A), B=jnp.asarray(B), kind="linear")
  np.testing.assert_allclose(direct.simulate(ids, init, weights),
                             _loop_weighted(A, B, ids, weights, init, 1 / 3), rtol=1e-5)
  additive = sj.simulators.additive_from_scores(B)
  np.testing.assert_allclose(additive.simulate(ids, init, weights),
                             _loop_weighted(None, B, ids, weights, init, 0.0), rtol=1e-5)
  np.testing.assert_array_equal(fitted.simulate(ids, init, np.ones(ids.shape)),
                                fitted.simulate(ids, init))
  # Removing an occurrence = swapping in a "null" example (A = a₀, B = 0).
  null_sim = sj.simulators.Simulator(
      A=jnp.concatenate([jnp.asarray(A), jnp.full((1, 2), fitted.null_a)]),
      B=jnp.concatenate([jnp.asarray(B), jnp.zeros((1, 2))]), kind="linear")
  removed = np.where(weights == 0, 8, ids)
  np.testing.assert_allclose(
      fitted.simulate(ids, init, np.where(weights == 0, 0.0, 1.0)),
      null_sim.simulate(np.where(ids < 0, -1, removed), init), rtol=1e-5)
  mean, _ = fitted.simulate_with_bands(ids, init, num_samples=2, weights=weights)
  assert not np.allclose(mean, fitted.simulate_with_bands(ids, init, num_samples=2)[0])
  with pytest.raises(ValueError, match="weights"):
    fitted.simulate(ids, init, weights[:, :3])
  with pytest.raises(ValueError, match="weights: contains NaN"):
    fitted.simulate(ids, init, np.full(ids.shape, np.nan))


# --- priors from other methods ------------------------------------------------------------

def _counts(ids, num_train):
  counts = np.zeros((len(ids), num_train))
  for p, row in enumerate(ids):
    for i in row[row >= 0]:
      counts[p, i] += 1
  return counts


def _dense_prior_ridge(trace, l2, prior_A, prior_B, linear):
  """θ = (XᵀX + l2 I)⁻¹ (Xᵀy + l2 θ₀) per test example, float64 ((A, B) or B)."""
  ids = trace.batch_ids.reshape(-1, trace.batch_size)
  counts = _counts(ids, trace.num_train_examples)
  x = trace.losses[:, :-1].reshape(len(ids), -1).astype(np.float64)
  y = trace.losses[:, 1:].reshape(len(ids), -1).astype(np.float64)
  out_a, out_b = [], []
  for m in range(y.shape[1]):
    if linear:
      design = np.concatenate([counts * x[:, m:m + 1], counts], 1)
      centre, target = np.concatenate([prior_A[:, m], prior_B[:, m]]), y[:, m]
    else:
      design, centre, target = counts, prior_B[:, m], y[:, m] - x[:, m]
    gram = design.T @ design + l2 * np.eye(design.shape[1])
    theta = np.linalg.solve(gram, design.T @ target + l2 * centre)
    out_b.append(theta[-trace.num_train_examples:])
    out_a.append(theta[:trace.num_train_examples] if linear else None)
  return (np.stack(out_a, 1) if linear else None), np.stack(out_b, 1)


@pytest.mark.parametrize("method", ["normal", "cg", "dual"])
def test_prior_centres_equal_dense_ridge_with_the_prior(method):
  trace, _, _ = _synthetic(runs=4 if method == "dual" else 20, steps=5, noise=1e-2)
  rng = np.random.default_rng(2)
  prior_A = (1 / 3 + rng.normal(scale=0.05, size=(8, 2))).astype(np.float32)
  prior_B = rng.normal(scale=0.05, size=(8, 2)).astype(np.float32)
  l2 = 0.3
  sim = sj.simulators.fit("linear", trace, l2=l2, prior_A=prior_A, prior_B=prior_B,
                          method=method, tol=1e-8, max_iters=5000)
  want_a, want_b = _dense_prior_ridge(trace, l2, prior_A, prior_B, linear=True)
  np.testing.assert_allclose(sim.A, want_a, atol=1e-4)
  np.testing.assert_allclose(sim.B, want_b, atol=1e-4)
  additive = sj.simulators.fit("additive", trace, l2=l2, prior_B=prior_B,
                               method=method, tol=1e-8, max_iters=5000)
  _, want_b = _dense_prior_ridge(trace, l2, None, prior_B, linear=False)
  np.testing.assert_allclose(additive.B, want_b, atol=1e-4)
  # Only prior_B: A keeps the default centre a₀.
  only_b = sj.simulators.fit("linear", trace, l2=l2, prior_B=prior_B, method=method,
                             tol=1e-8, max_iters=5000)
  want_a, want_b = _dense_prior_ridge(trace, l2, np.full((8, 2), sim.null_a), prior_B,
                                      linear=True)
  np.testing.assert_allclose(only_b.A, want_a, atol=1e-4)


def test_posterior_samples_are_centred_on_the_prior_where_data_is_silent():
  # The prior-centre tests' shape: the same compiled fit.
  trace, _, _ = _synthetic(runs=20, steps=5, noise=1e-2)
  rng = np.random.default_rng(3)
  prior_A = (1 / 3 + rng.normal(scale=0.05, size=(8, 2))).astype(np.float32)
  prior_B = rng.normal(scale=0.05, size=(8, 2)).astype(np.float32)
  sim = sj.simulators.fit("linear", trace, l2=1e6, prior_A=prior_A, prior_B=prior_B)
  np.testing.assert_allclose(sim.A, prior_A, atol=1e-4)  # strong prior: θ ≈ θ₀
  a, b = sim.sample_parameters(8, rng=0)
  np.testing.assert_allclose(a.mean(0), prior_A, atol=1e-3)
  np.testing.assert_allclose(b.mean(0), prior_B, atol=1e-3)


def test_prior_validation():
  trace, _, _ = _synthetic(runs=2, steps=4)
  with pytest.raises(ValueError, match=r"prior_A: expected finite float32\[8, 2\]"):
    sj.simulators.fit("linear", trace, prior_A=np.zeros((8, 3)))
  with pytest.raises(ValueError, match="prior_B.*NaN"):
    sj.simulators.fit("linear", trace, prior_B=np.full((8, 2), np.nan))
  with pytest.raises(ValueError, match="prior_A: only for linear"):
    sj.simulators.fit("additive", trace, prior_A=np.zeros((8, 2)))
  with pytest.raises(ValueError, match="prior_alpha/prior_A"):
    sj.simulators.fit("linear", trace, prior_A=np.zeros((8, 2)), prior_alpha=1.0)


# --- phases -------------------------------------------------------------------------------

def _two_phase_trace(runs=40, steps=12, seed=0):
  rng = np.random.default_rng(seed)
  num_train, num_test, batch = 8, 2, 3
  a = 1 / batch + rng.uniform(-0.03, 0.03, (2, num_train, num_test))
  b = rng.uniform(-0.05, 0.02, (2, num_train, num_test))
  ids = rng.integers(0, num_train, (runs, steps, batch)).astype(np.int32)
  losses = np.zeros((runs, steps + 1, num_test))
  losses[:, 0] = rng.uniform(2.0, 3.0, (runs, num_test))
  for t in range(steps):
    k = int(t >= steps // 2)
    losses[:, t + 1] = (a[k][ids[:, t]].sum(1) * losses[:, t] + b[k][ids[:, t]].sum(1))
  trace = sj.Trace(batch_ids=ids, losses=losses.astype(np.float32),
                   learning_rates=np.full((runs, steps), 0.1, np.float32),
                   num_train_examples=num_train)
  return trace, a, b


def test_phases_recover_a_planted_two_phase_model_and_roll_out_by_phase(tmp_path):
  trace, a, b = _two_phase_trace()
  sim = sj.simulators.fit("linear", trace, l2=1e-6, num_phases=2, method="normal")
  assert sim.phase_starts == (0, 6) and sim.phase_A.shape == (2, 8, 2)
  np.testing.assert_allclose(sim.phase_A, a, atol=2e-3)
  np.testing.assert_allclose(sim.phase_B, b, atol=5e-3)
  np.testing.assert_allclose(sim.A, a.mean(0), atol=2e-3)  # equal bins: the mean
  one_phase = sj.simulators.fit("linear", trace, l2=1e-6)
  pred = np.asarray(sim.simulate(trace.batch_ids, trace.losses[:, 0]))
  assert np.mean((pred - trace.losses) ** 2) < 0.01 * np.mean(
      (np.asarray(one_phase.simulate(trace.batch_ids, trace.losses[:, 0]))
       - trace.losses) ** 2)
  # The rollout uses phase k's parameters in its bin (and the last one past T).
  ids = trace.batch_ids[:2, [*range(12), 0, 1]]
  init = trace.losses[:2, 0]
  first = _loop_simulate(np.asarray(sim.phase_A[0]), np.asarray(sim.phase_B[0]),
                         ids[:, :6], init)
  rest = _loop_simulate(np.asarray(sim.phase_A[1]), np.asarray(sim.phase_B[1]),
                        ids[:, 6:], first[:, -1])
  np.testing.assert_allclose(sim.simulate(ids, init, allow_extrapolation=True),
                             np.concatenate([first, rest[:, 1:]], 1), rtol=1e-5)
  sim.save(str(tmp_path / "sim"))
  loaded = sj.simulators.Simulator.load(str(tmp_path / "sim"))
  assert loaded.phase_starts == (0, 6)
  np.testing.assert_array_equal(loaded.simulate(ids[:, :12], init),
                                sim.simulate(ids[:, :12], init))
  mean, _ = loaded.simulate_with_bands(ids[:, :12], init, num_samples=2)
  np.testing.assert_allclose(mean, sim.simulate(ids[:, :12], init), atol=1e-3)
  a_samples, _ = sim.sample_parameters(2)
  assert a_samples.shape == (2, 2, 8, 2)
  start = sj.data.make_curricula(1, 8, 6, 6, 3, seed=0)  # 2 steps per epoch
  result = sj.simulators.search_curriculum(sim, init[0], start, [0],
                                           num_iters=2, num_proposals=2,
                                           epoch_steps=2)
  final = np.asarray(sim.simulate(result.batch_ids, init[:1]))[0, -1, 0]
  np.testing.assert_allclose(result.objective[0], final, rtol=1e-5)
  with pytest.raises(ValueError, match="num_phases"):
    sj.simulators.fit("linear", trace, num_phases=13)


# --- import hygiene -----------------------------------------------------------------------

def test_simulators_import_no_heavy_modules():
  """simulators/ itself imports none of scipy.stats, matplotlib, orbax, tensorflow."""
  script = textwrap.dedent("""
      import os, sys, types
      package = types.ModuleType("simfluence_jax")  # skip the package __init__
      package.__path__ = [os.path.join(sys.argv[1], "simfluence_jax")]
      sys.modules["simfluence_jax"] = package
      import simfluence_jax.simulators
      heavy = ("scipy.stats", "matplotlib", "orbax", "tensorflow")
      print(sorted(m for m in sys.modules if m.startswith(heavy)))
  """)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-c", script, repo], capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip() == "[]"


def test_simulators_stay_pytrees_and_check_their_shapes_on_use():
  sims = [sj.simulators.additive_from_scores(np.full((4, 2), float(k)), batch_size=2)
          for k in range(3)]
  stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *sims)  # [3, 4, 2]
  rollouts = jax.vmap(lambda b: sj.simulators._simulator._rollout(
      b[None], b[None], jnp.zeros((1, 2, 2), jnp.int32), jnp.ones((1, 2, 2)),
      jnp.zeros(2, jnp.int32), jnp.zeros((1, 2)), 0.0, linear=False))(stacked.B)
  np.testing.assert_allclose(rollouts[:, 0, -1, 0], [0.0, 4.0, 8.0])
  with pytest.raises(ValueError, match="B: expected float32"):
    stacked.simulate(np.zeros((1, 2, 2), np.int32), np.zeros((1, 2)))
  with pytest.raises(ValueError, match="A: a linear simulator needs A"):
    sj.simulators.Simulator(A=jnp.zeros((4, 3)), B=jnp.zeros((4, 2)),
                            kind="linear").simulate(np.zeros((1, 2, 2), np.int32),
                                                    np.zeros((1, 2)))
  with pytest.raises(ValueError, match="kind"):
    sj.simulators.Simulator(A=None, B=jnp.zeros((4, 2)), kind="quadratic")
