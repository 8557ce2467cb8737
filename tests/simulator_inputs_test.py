"""Empty (all-padding) steps are no-ops; bad solver / simulate inputs name the field.

References are explicit numpy loops and dense ridge solves.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import simulators
from simfluence_jax.simulators import _simulator

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("simulator_inputs_test")

NUM_TRAIN, NUM_TEST, BATCH = 6, 2, 3


def _trace(seed=0, runs=6, steps=6, empty=((0, 2), (1, 0), (3, 5))):
  """A random trace whose steps `empty` (run, step) are all padding."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, NUM_TRAIN, (runs, steps, BATCH)).astype(np.int32)
  ids[:, ::3, -1] = -1
  for r, t in empty:
    ids[r, t] = -1
  losses = rng.uniform(1.0, 2.0, (runs, steps + 1, NUM_TEST)).astype(np.float32)
  return sj.Trace(batch_ids=ids, losses=losses,
                  learning_rates=np.full((runs, steps), 0.1, np.float32),
                  num_train_examples=NUM_TRAIN)


def _loop(A, B, batch_ids, initial):
  """L_{t+1} = (Σ_{i∈c_t} A_i) L_t + Σ_{i∈c_t} B_i (A None: additive, α = 1)."""
  out = [np.asarray(initial, np.float64)]
  for t in range(batch_ids.shape[1]):
    new = np.zeros_like(out[-1])
    for r in range(batch_ids.shape[0]):
      valid = batch_ids[r, t][batch_ids[r, t] >= 0]
      alpha = 1.0 if A is None else A[valid].sum(0)
      new[r] = alpha * out[-1][r] + B[valid].sum(0)
    out.append(new)
  return np.stack(out, 1)


def _counts(ids):
  counts = np.zeros((len(ids), NUM_TRAIN))
  for p, row in enumerate(ids):
    for i in row[row >= 0]:
      counts[p, i] += 1
  return counts


# --- empty steps: rollout ----------------------------------------------------------

@pytest.mark.parametrize("step", [0, 2, 4])
def test_empty_step_rollout_equals_rollout_without_it(step):
  rng = np.random.default_rng(1)
  A = rng.uniform(0.2, 0.45, (NUM_TRAIN, NUM_TEST)).astype(np.float32)
  B = rng.normal(scale=0.1, size=(NUM_TRAIN, NUM_TEST)).astype(np.float32)
  ids = rng.integers(0, NUM_TRAIN, (2, 5, BATCH)).astype(np.int32)
  ids[1, :, -1] = -1
  init = rng.uniform(1.0, 2.0, (2, NUM_TEST)).astype(np.float32)
  with_empty = ids.copy()
  with_empty[0, step] = -1
  without = np.delete(ids[:1], step, axis=1)  # run 0 with the empty step removed
  for A_, kind in ((A, "linear"), (None, "additive")):
    sim = simulators.Simulator(A=None if A_ is None else jnp.asarray(A),
                               B=jnp.asarray(B), kind=kind)
    got = np.asarray(sim.simulate(with_empty, init))
    want = _loop(A_, B, without, init[:1])[0]
    np.testing.assert_allclose(np.delete(got[0], step + 1, axis=0), want, rtol=1e-5)
    np.testing.assert_array_equal(got[0, step + 1], got[0, step])  # the no-op
    np.testing.assert_allclose(got[1], _loop(A_, B, ids[1:], init[1:])[0], rtol=1e-5)
    # Weights are ignored at padding, so a weighted empty step is a no-op too; and
    # the search's `final_losses` rolls out the same way.
    weights = np.full(with_empty.shape, 0.5, np.float32)
    weighted = np.asarray(sim.simulate(with_empty, init, weights))
    np.testing.assert_array_equal(weighted[0, step + 1], weighted[0, step])
    a, b = sim.phase_parameters()
    final = _simulator.final_losses(a, b, jnp.asarray(with_empty[0]),
                                    jnp.asarray(init[0]), linear=kind == "linear")
    np.testing.assert_allclose(final, want[-1], rtol=1e-5)


def test_fitted_and_banded_rollouts_keep_the_loss_over_an_empty_step():
  trace = _trace()
  ids = trace.batch_ids[:2].copy()
  ids[:, 3] = -1
  init = trace.losses[:2, 0]
  for kind in ("linear", "additive"):
    sim = simulators.fit(kind, trace, l2=0.1, method="normal")
    out = np.asarray(sim.simulate(ids, init))
    np.testing.assert_array_equal(out[:, 4], out[:, 3])
    mean, std = sim.simulate_with_bands(ids, init, num_samples=3)
    np.testing.assert_allclose(mean[:, 4], mean[:, 3], rtol=1e-6)
    np.testing.assert_allclose(std[:, 4], std[:, 3], rtol=1e-5, atol=1e-7)
  phased = simulators.fit("linear", trace, l2=0.1, num_phases=2, method="normal")
  out = np.asarray(phased.simulate(ids, init))
  np.testing.assert_array_equal(out[:, 4], out[:, 3])


# --- empty steps: fit --------------------------------------------------------------

def _dense_fit(trace, l2, linear):
  """Ridge on the non-empty steps only, prior centre a₀ = 1/b̄ (b̄ over them)."""
  ids = trace.batch_ids.reshape(-1, BATCH)
  x = trace.losses[:, :-1].reshape(len(ids), -1).astype(np.float64)
  y = trace.losses[:, 1:].reshape(len(ids), -1).astype(np.float64)
  keep = np.any(ids >= 0, axis=1)
  ids, x, y = ids[keep], x[keep], y[keep]
  counts = _counts(ids)
  null_a = 1.0 / counts.sum(1).mean()
  a, b, noise = [], [], []
  for m in range(NUM_TEST):
    if linear:
      design = np.concatenate([counts * x[:, m:m + 1], counts], 1)
      target = y[:, m] - x[:, m] * null_a * counts.sum(1)
    else:
      design, target = counts, y[:, m] - x[:, m]
    theta = np.linalg.solve(design.T @ design + l2 * np.eye(design.shape[1]),
                            design.T @ target)
    noise.append(np.mean((target - design @ theta) ** 2))
    b.append(theta[-NUM_TRAIN:])
    a.append(theta[:NUM_TRAIN] + null_a if linear else None)
  return (np.stack(a, 1) if linear else None), np.stack(b, 1), null_a, noise, len(ids)


@pytest.mark.parametrize("kind", ["linear", "additive"])
@pytest.mark.parametrize("method", ["normal", "cg"])
def test_fit_ignores_empty_steps(kind, method):
  trace = _trace()
  l2 = 0.05
  sim = simulators.fit(kind, trace, l2=l2, method=method, tol=1e-8, max_iters=5000)
  want_a, want_b, null_a, noise, rows = _dense_fit(trace, l2, kind == "linear")
  np.testing.assert_allclose(sim.B, want_b, atol=1e-4)
  if kind == "linear":
    np.testing.assert_allclose(sim.A, want_a, atol=1e-4)
    assert sim.null_a == pytest.approx(null_a)  # b̄ over the non-empty batches
  assert sim.posterior.ids.shape == (rows, BATCH)  # no row of an empty step
  assert np.all(np.any(sim.posterior.ids >= 0, axis=1))
  np.testing.assert_allclose(sim.posterior.noise_var, noise, rtol=1e-3)


def test_cv_folds_fit_and_score_traces_with_empty_steps():
  sim = simulators.fit_cv("linear", _trace(runs=6), l2_grid=(0.01, 1.0), num_folds=2,
                          method="normal")
  assert np.all(np.isfinite(sim.fit_info["cv"]["mean_scores"]))


# --- Trace: runs without any valid id -------------------------------------------

def test_a_run_of_padding_only_is_a_control_run_every_simulator_keeps_constant():
  """A run with no valid id (trained on nothing: a no-op in training) is a valid
  trace row; every simulator keeps its losses at their initial values, and the fit
  of the other runs is the fit without it (it has no row)."""
  trace = _trace()
  ids = trace.batch_ids.copy()
  ids[2] = -1
  losses = trace.losses.copy()
  losses[2] = losses[2, :1]
  control = sj.Trace(batch_ids=ids, losses=losses,
                     learning_rates=trace.learning_rates, num_train_examples=NUM_TRAIN)
  rest = np.array([r for r in range(trace.num_runs) if r != 2])
  for kind in ("linear", "additive"):
    sim = simulators.fit(kind, control, l2=1.0)
    alone = simulators.fit(kind, control.select_runs(rest), l2=1.0)
    np.testing.assert_allclose(np.asarray(sim.B), np.asarray(alone.B), rtol=1e-5,
                               atol=1e-6)
    pred = np.asarray(sim.simulate(ids[2:3], losses[2:3, 0]))
    np.testing.assert_array_equal(pred, np.broadcast_to(losses[2:3, :1], pred.shape))


# --- solve: inputs ---------------------------------------------------------------

def _solver_problem():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, NUM_TRAIN, (20, BATCH)).astype(np.int32)
  ids[::4, -1] = -1
  x = rng.uniform(1.0, 2.0, (20, 4)).astype(np.float32)
  y = rng.normal(size=(20, 4)).astype(np.float32)
  return ids, x, y


def _nan_row(a):
  a = a.copy()
  a[2] = np.nan
  return a


_BAD_SOLVES = {
    "id == N": (lambda i, x, y: (np.where(i == 0, NUM_TRAIN, i), x, y, NUM_TRAIN),
                r"ids: must be in \[-1, num_train=6\)"),
    "id < -1": (lambda i, x, y: (np.where(i == 0, -3, i), x, y, NUM_TRAIN),
                r"ids: must be in \[-1"),
    "N below the ids": (lambda i, x, y: (i, x, y, 4), r"ids: must be in \[-1, num_train=4"),
    "float ids": (lambda i, x, y: (i + 0.7, x, y, NUM_TRAIN), "ids: expected int"),
    "1-D ids": (lambda i, x, y: (i[:, 0], x, y, NUM_TRAIN), "ids: expected int"),
    "N = 0": (lambda i, x, y: (i, x, y, 0), "num_train: expected a positive integer"),
    "bool N": (lambda i, x, y: (i, x, y, True), "num_train: expected a positive"),
    "x wider": (lambda i, x, y: (i, np.concatenate([x, x], 1), y, NUM_TRAIN),
                r"x: expected float32\[20, 4\] like y"),
    "x one column": (lambda i, x, y: (i, x[:, :1], y, NUM_TRAIN), "x: expected"),
    "x fewer rows": (lambda i, x, y: (i, x[:10], y, NUM_TRAIN), "x: expected"),
    "ids fewer rows": (lambda i, x, y: (i[:10], x, y, NUM_TRAIN),
                       r"y: expected float32\[P=10"),
    "y 1-D": (lambda i, x, y: (i, x[:, 0], y[:, 0], NUM_TRAIN), "y: expected"),
    "y no columns": (lambda i, x, y: (i, x[:, :0], y[:, :0], NUM_TRAIN), "y: expected"),
    "y NaN": (lambda i, x, y: (i, x, _nan_row(y), NUM_TRAIN),
              r"y: contains NaN or inf \(first at row 2"),
    "x NaN": (lambda i, x, y: (i, _nan_row(x), y, NUM_TRAIN),
              r"x: contains NaN or inf \(first at row 2"),
}


@pytest.mark.parametrize("method", ["cg", "normal", "dual"])
@pytest.mark.parametrize("case", sorted(_BAD_SOLVES))
def test_solve_names_the_bad_argument(case, method):
  make, match = _BAD_SOLVES[case]
  ids, x, y, num_train = make(*_solver_problem())
  with pytest.raises(ValueError, match=match):
    simulators.solve(ids, x, y, num_train, 1e-2, linear=True, method=method)


@pytest.mark.parametrize("method", ["cg", "normal", "dual"])
def test_solve_refuses_nan_targets_of_the_additive_kind(method):
  # CG used to answer θ = 0, converged=True, relative_residual=0.0 here.
  ids, x, y = _solver_problem()
  with pytest.raises(ValueError, match="y: contains NaN or inf"):
    simulators.solve(ids, x, _nan_row(y), NUM_TRAIN, 1e-2, linear=False,
                     method=method)
  with pytest.raises(ValueError, match="l2: expected a positive"):
    simulators.solve(ids, x, y, NUM_TRAIN, -1.0, linear=False, method=method)
  # The additive kind ignores x's values (only its shape is checked).
  theta, _ = simulators.solve(ids, _nan_row(x), y, NUM_TRAIN, 1e-2, linear=False,
                              method=method)
  clean, _ = simulators.solve(ids, x, y, NUM_TRAIN, 1e-2, linear=False, method=method)
  np.testing.assert_array_equal(theta, clean)


# --- simulate: weights and non-finite rollouts ------------------------------------

def _fitted():
  trace = _trace()
  return trace, simulators.fit("linear", trace, l2=0.1, method="normal")


def test_simulate_refuses_negative_weights():
  trace, sim = _fitted()
  ids, init = trace.batch_ids[:1], trace.losses[:1, 0]
  weights = np.ones(ids.shape, np.float32)
  weights[0, 1, 0] = -1.0
  with pytest.raises(ValueError, match=r"weights: must be non-negative .* at \[0, 1, 0\]"):
    sim.simulate(ids, init, weights)
  with pytest.raises(ValueError, match="weights: must be non-negative"):
    sim.simulate_with_bands(ids, init, num_samples=2, weights=weights)
  sim.simulate(ids, init, np.zeros(ids.shape))  # 0 = removed is fine


def test_bands_take_an_int_seed_or_a_key_and_refuse_anything_else():
  trace, sim = _fitted()
  ids, init = trace.batch_ids[:1], trace.losses[:1, 0]
  by_seed = sim.simulate_with_bands(ids, init, num_samples=2, rng=3)
  by_key = sim.simulate_with_bands(ids, init, num_samples=2, rng=jax.random.key(3))
  np.testing.assert_array_equal(by_seed[1], by_key[1])
  for rng in (1.5, None, "3"):  # review h38: a JAX traceback from inside
    with pytest.raises(ValueError, match="^rng: expected an int seed or a JAX random "
                       "key .* to draw the posterior samples, got "):
      sim.simulate_with_bands(ids, init, num_samples=2, rng=rng)


def test_simulate_refuses_non_finite_losses_naming_the_run():
  trace, sim = _fitted()
  ids, init = trace.batch_ids[:2], trace.losses[:2, 0]
  weights = np.ones(ids.shape, np.float32)
  weights[1] = 1e38  # finite weights whose rollout overflows float32
  with pytest.raises(ValueError, match=r"simulate: run 1 of batch_ids gives non-finite"):
    sim.simulate(ids, init, weights)
  with pytest.raises(ValueError, match=r"simulate: run 1 of batch_ids gives non-finite"):
    sim.simulate_with_bands(ids, init, num_samples=2, weights=weights)
  out = np.asarray(sim.simulate(ids, init, weights, allow_nonfinite=True))
  assert np.all(np.isfinite(out[0])) and not np.all(np.isfinite(out[1]))
  growing = simulators.Simulator(  # α = 1.5 per full batch
      A=jnp.full((NUM_TRAIN, NUM_TEST), 0.5), B=jnp.zeros((NUM_TRAIN, NUM_TEST)),
      kind="linear")
  huge = np.stack([np.full(NUM_TEST, 3e38, np.float32), init[1]])
  with pytest.raises(ValueError, match=r"simulate: run 0 of batch_ids gives non-finite"):
    growing.simulate(np.zeros((2, 3, BATCH), np.int32), huge)
  broken = simulators.Simulator(A=None, B=jnp.full((NUM_TRAIN, NUM_TEST), jnp.nan),
                                kind="additive")
  with pytest.raises(ValueError, match="simulate: run 0"):
    broken.simulate(ids, init)


def test_final_only_checks_only_the_columns_it_predicts():
  def final_only(b):
    return simulators.Simulator(
        A=None, B=jnp.asarray(b), kind="additive", batch_size=BATCH, num_steps=2,
        final_only=True,
        fit_info_items=_simulator.fit_info_items({"initial_losses": [1.0, None]}))
  ids, init = np.zeros((1, 2, BATCH), np.int32), np.ones((1, NUM_TEST), np.float32)
  b = np.zeros((NUM_TRAIN, NUM_TEST), np.float32)
  b[:, 1] = np.nan  # a column without a prediction: NaN by design
  out = np.asarray(final_only(b).simulate(ids, init))
  assert out[0, -1, 0] == 1.0 and np.isnan(out[0, -1, 1])
  b[:, 0] = 3e38
  with pytest.raises(ValueError, match="run 0 .* test example 0"):
    final_only(b).simulate(ids, init)


def test_fit_guards_a_trace_without_any_valid_id():
  trace = _trace()
  trace = sj.Trace(batch_ids=np.full_like(trace.batch_ids, -1), losses=trace.losses,
                   learning_rates=trace.learning_rates, num_train_examples=NUM_TRAIN)
  with pytest.raises(ValueError, match="trace: every step of every run is padding"):
    simulators.fit("linear", trace)


@pytest.mark.parametrize("legacy", [False, True])
def test_load_refuses_a_posterior_that_lost_its_prior_centres(tmp_path, legacy):
  """A saved fit with per-example prior centres that lost a centre file sampled its
  bands around prior_a / 0 instead (posterior mean B 0.72 -> 0.42 in the review's
  reproduction): refused. `legacy`: a save from before the list of optional arrays
  was recorded falls back to the fit's own prior flags."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  trace = _trace(empty=())
  prior_a = np.full((NUM_TRAIN, NUM_TEST), 0.6, np.float32)
  prior_b = np.full((NUM_TRAIN, NUM_TEST), 0.3, np.float32)
  sim = simulators.fit("linear", trace, l2=0.5, method="normal", prior_A=prior_a,
                       prior_B=prior_b)
  path = str(tmp_path / "sim")
  sim.save(path)
  # Intact: loads with the same centres and bands.
  loaded = simulators.Simulator.load(path)
  np.testing.assert_array_equal(loaded.posterior.prior_B, sim.posterior.prior_B)
  if legacy:
    meta_path = os.path.join(path, "simulator.json")
    with open(meta_path) as f:
      meta = json.load(f)
    del meta["posterior"]["optional_arrays"]
    with open(meta_path, "w") as f:
      json.dump(meta, f)
  os.remove(os.path.join(path, "posterior_prior_B.npy"))
  with pytest.raises(FileNotFoundError, match=r"posterior_prior_B\.npy' is missing"):
    simulators.Simulator.load(path)
