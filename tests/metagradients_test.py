"""Metagradients and first-order predictions against brute force on a tiny MLP.

References: dense forward mode (a jvp per weight, as `jax.jacfwd`) through a
hand-written training loop (no scan, no remat, no vmap of a pullback), central
finite differences of real retraining with `train_runs`, and the effective-weight
identities of the step objective. Every row (test example m) of every metagradient
is checked.
"""

import functools
import importlib
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import models
from simfluence_jax import training
from simfluence_jax.training import optim

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("metagradients_test")

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 10, 4, 5, 3
NUM_RUNS, NUM_STEPS, BATCH = 2, 5, 3
CONFIGS = {
    "sgd": dict(optimizer="sgd", learning_rate=0.5),
    "momentum": dict(optimizer="momentum", learning_rate=0.2, momentum=0.8,
                     lr_schedule="linear"),
    "adam": dict(optimizer="adam", learning_rate=0.05, b1=0.8, b2=0.9),
}


class _TanhMLP(nn.Module):
  """A smooth MLP: finite differences never straddle a ReLU kink.

  Its `dead` ReLU units never fire (bias -1000), so their weights always have
  gradient 0, numerically (through the ReLU's 0 slope): Adam's second moment stays
  0 there, where jnp.sqrt's derivative would make every metagradient NaN.
  """

  @nn.compact
  def __call__(self, x):
    dead = nn.relu(nn.Dense(2, bias_init=nn.initializers.constant(-1e3),
                            name="dead")(x))
    return nn.Dense(NUM_CLASSES)(jnp.concatenate([jnp.tanh(nn.Dense(6)(x)), dead], -1))


# The module (`training.metagradients` is also the name of its function).
metagradients_lib = importlib.import_module("simfluence_jax.training.metagradients")

# One loss function for every test: the compiled metagradients are cached per loss.
_LOSS_FN = training.make_loss_fn(_TanhMLP(), "classification")


def _other_numbers(config):
  """`config` with every number the compiled programs take as an argument changed
  (`optim.RUNTIME_FIELDS`: learning rate, momentum, Adam's b1 and b2)."""
  return {k: (v * 0.6 if k in optim.RUNTIME_FIELDS else v) for k, v in config.items()}


def _setup(seed=0):
  """loss_fn, params0, train, test, (batch_ids, weights): fresh copies of the arrays
  around one initialisation per seed (compiled once, not once per test)."""
  params0, train, test, (batch_ids, weights) = _setup_once(seed)
  copy = lambda arrays: {k: v.copy() for k, v in arrays.items()}
  return _LOSS_FN, params0, copy(train), copy(test), (batch_ids.copy(), weights.copy())


@functools.lru_cache(maxsize=None)
def _setup_once(seed):
  rng = np.random.default_rng(seed)
  make = lambda n: {
      "inputs": rng.normal(size=(n, DIM)).astype(np.float32),
      "labels": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
  train, test = make(NUM_TRAIN), make(NUM_TEST)
  params0 = models.init_variables(_TanhMLP(), train["inputs"], seed=seed)
  batch_ids = rng.integers(0, NUM_TRAIN, (NUM_RUNS, NUM_STEPS, BATCH)).astype(np.int32)
  batch_ids[0, 3, 2] = -1  # padding slots get 0
  batch_ids[1, 4, 0] = -1
  weights = rng.uniform(0.5, 1.5, batch_ids.shape).astype(np.float32)
  return params0, train, test, (batch_ids, weights)


def _dense_reference(params0, train, test, config, batch_ids, weights):
  """Forward mode through a plain Python loop of the step objective written out
  here: one tangent per weight w[t, b] (a dense jacfwd, [R, T, B, M]).

  The loop stays in Python, its one step a jitted jvp (vmapped over the T·B tangents
  and the runs) called T times: jacfwd of the whole unrolled loop compiled every
  step into one program (2.4 s for Adam, against 0.5). The optimizer's numbers are
  arguments of the programs (compiled once per optimizer kind, as the programs under
  test are), its build `training.make_optimizer`'s own (`optim.joined_optimizer`)."""
  structure, numbers = optim.split_settings(config, batch_ids.shape[1])
  init, step, final = _dense_programs(structure)
  num_runs, num_steps, batch = batch_ids.shape
  # Tangent d = t·B + b is 1 at w[t, b] and 0 at every other weight.
  directions = np.eye(num_steps * batch, dtype=np.float32).reshape(-1, num_steps, batch)
  carry, tangents = init(params0, numbers, num_runs, len(directions))
  for t in range(num_steps):
    carry, tangents = step(carry, tangents, numbers, train, weights[:, t],
                           directions[:, t], batch_ids[:, t])
  jacobian = np.array(final(carry, tangents, test))  # [R, T·B, M]
  return jacobian.reshape(num_runs, num_steps, batch, -1)


@functools.lru_cache(maxsize=None)
def _dense_programs(structure):
  """(init, step, final) of `_dense_reference` for one optimizer kind."""
  def train_step(params, state, numbers, train, w_t, ids_t):
    optimizer, _ = optim.joined_optimizer(structure, numbers)
    valid = (ids_t >= 0).astype(jnp.float32)
    batch = jax.tree_util.tree_map(
        lambda x: jnp.take(x, jnp.maximum(ids_t, 0), axis=0), train)
    grads = jax.grad(lambda p: jnp.sum(w_t * valid * _LOSS_FN(p, batch))
                     / jnp.maximum(valid.sum(), 1.0))(params)
    updates, state = optimizer.update(grads, state, params)
    return jax.tree_util.tree_map(jnp.add, params, updates), state

  # Tangents of the float leaves of (params, optimizer state); the optimizer's step
  # counts (int) have none.
  is_float = lambda x: jnp.issubdtype(x.dtype, jnp.floating)
  floats = lambda tree: [x for x in jax.tree_util.tree_leaves(tree) if is_float(x)]

  def with_floats(tree, values):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    values = iter(values)
    return jax.tree_util.tree_unflatten(
        treedef, [next(values) if is_float(x) else x for x in leaves])

  def init(params0, numbers, num_runs, num_tangents):
    optimizer, _ = optim.joined_optimizer(structure, numbers)
    carry = (params0, optimizer.init(params0))
    tangents = [jnp.zeros((num_tangents,) + x.shape, x.dtype) for x in floats(carry)]
    return jax.tree_util.tree_map(
        lambda x: jnp.broadcast_to(x, (num_runs,) + x.shape), (carry, tangents))

  def step(carry, tangents, numbers, train, w_t, w_dots, ids_t):
    """One run's step: its new carry, and the new tangents of every direction."""
    def f(values, w):
      new = train_step(*with_floats(carry, values), numbers, train, w, ids_t)
      return floats(new), new

    def one(tangent, w_dot):
      _, new_tangent, new = jax.jvp(f, (floats(carry), w_t), (tangent, w_dot),
                                    has_aux=True)
      return new, new_tangent

    return jax.vmap(one, out_axes=(None, 0))(tangents, w_dots)

  def final(carry, tangents, test):
    f = lambda values: _LOSS_FN(with_floats(carry, values)[0], test)
    return jax.vmap(lambda tangent: jax.jvp(f, (floats(carry),), (tangent,))[1])(
        tangents)

  return (jax.jit(init, static_argnums=(2, 3)),
          jax.jit(jax.vmap(step, in_axes=(0, 0, None, None, 0, None, 0))),
          jax.jit(jax.vmap(final, in_axes=(0, 0, None))))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_metagradients_equal_dense_jacfwd_every_row(name):
  loss_fn, params0, train, test, (batch_ids, weights) = _setup()
  config = CONFIGS[name]
  grads = training.metagradients(params0, batch_ids, loss_fn=loss_fn, config=config,
                                 train_arrays=train, test_arrays=test, weights=weights)
  assert grads.shape == (NUM_RUNS, NUM_STEPS, BATCH, NUM_TEST)
  assert grads.dtype == np.float32
  expected = _dense_reference(params0, train, test, config, batch_ids, weights)
  expected[batch_ids < 0] = 0.0
  scale = np.abs(expected).max(axis=(1, 2), keepdims=True)  # per run and row m
  assert np.all(scale > 1e-3)
  # 2e-5 of each row's scale: float32 rounding of Adam's 1/√v differs between CPUs
  # (1.01e-5 on one Xeon); a wrong row (the vmapped-vjp bug) is off by O(1).
  np.testing.assert_allclose(grads / scale, expected / scale, atol=2e-5, rtol=0)
  np.testing.assert_array_equal(grads[batch_ids < 0], 0.0)
  # Other numbers (learning rate, momentum, b1, b2): the same compiled program, with
  # the new values (a stale one would return the rows above).
  programs = metagradients_lib._metagradients_fn.cache_info().misses  # pylint: disable=protected-access
  other = _other_numbers(config)
  grads = training.metagradients(params0, batch_ids, loss_fn=loss_fn, config=other,
                                 train_arrays=train, test_arrays=test, weights=weights)
  assert metagradients_lib._metagradients_fn.cache_info().misses == programs  # pylint: disable=protected-access
  expected_other = _dense_reference(params0, train, test, other, batch_ids, weights)
  expected_other[batch_ids < 0] = 0.0
  assert np.abs(expected_other - expected).max() > 0.1 * scale.max()
  np.testing.assert_allclose(grads / scale, expected_other / scale, atol=2e-5, rtol=0)


def test_vmapped_cotangents_segment_remat_and_single_run_give_the_same_rows():
  loss_fn, params0, train, test, (batch_ids, weights) = _setup()
  kwargs = dict(loss_fn=loss_fn, config=CONFIGS["momentum"], train_arrays=train,
                test_arrays=test)
  plain = training.metagradients(params0, batch_ids, weights=weights, **kwargs)
  scale = np.abs(plain).max(axis=(1, 2), keepdims=True)
  # M = 4 cotangents 3 at a time: one padded chunk; T = 5 in segments of 2 + 1.
  batched = training.metagradients(params0, batch_ids, weights=weights,
                                   cotangents_at_once=3, remat_every=2, **kwargs)
  np.testing.assert_allclose(batched / scale, plain / scale, atol=1e-6, rtol=0)
  alone = training.metagradients(params0, batch_ids[1], weights=weights[1], **kwargs)
  assert alone.shape == (NUM_STEPS, BATCH, NUM_TEST)
  np.testing.assert_allclose(alone / scale[1], plain[1] / scale[1], atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_metagradients_equal_finite_differences_of_retraining(name):
  loss_fn, params0, train, test, (batch_ids, _) = _setup(1)
  config = CONFIGS[name]
  grads, final_losses = training.metagradients(
      params0, batch_ids, loss_fn=loss_fn, config=config, train_arrays=train,
      test_arrays=test, return_final_losses=True)
  # Occurrences at the first, middle and last steps of both runs: 7, so that with
  # both runs unperturbed 16 runs are retrained, as in the removal test (one
  # compiled program for both).
  occurrences = [(0, 0, 1), (0, 1, 1), (0, 2, 0), (0, NUM_STEPS - 1, 2), (1, 0, 2),
                 (1, 3, 1), (1, NUM_STEPS - 1, 1)]
  # Adam's first step is nearly sign(g): with h = 0.01 a small gradient coordinate
  # already changes sign (the expansion is exact, the map has a kink nearby).
  h = 0.003
  ids, weights = [], []
  for run, t, b in occurrences:
    for sign in (1, -1):
      w = np.ones((NUM_STEPS, BATCH), np.float32)
      w[t, b] += sign * h
      ids.append(batch_ids[run])
      weights.append(w)
  ids += list(batch_ids)  # and both runs unperturbed
  weights += [np.ones((NUM_STEPS, BATCH), np.float32)] * len(batch_ids)
  result = training.train_runs(params0, np.stack(ids), loss_fn=loss_fn, config=config,
                               train_arrays=train, test_arrays=test,
                               weights=np.stack(weights), progress=False)
  # The reverse pass's primal output is the runs' final test losses.
  np.testing.assert_allclose(final_losses, result.trace.losses[-2:, -1], atol=1e-5)
  final = result.trace.losses[:-2, -1].reshape(len(occurrences), 2, NUM_TEST)
  finite_differences = (final[:, 0] - final[:, 1]) / (2 * h)  # [occurrences, M]
  got = np.stack([grads[run, t, b] for run, t, b in occurrences])
  assert np.abs(got).max(axis=0).min() > 1e-3  # every row m carries signal
  np.testing.assert_allclose(got, finite_differences, rtol=0.05,
                             atol=1e-3 * np.abs(got).max())


def test_bad_inputs_are_refused():
  loss_fn, params0, train, test, (batch_ids, weights) = _setup()
  kwargs = dict(loss_fn=loss_fn, config=CONFIGS["sgd"], train_arrays=train,
                test_arrays=test)
  with pytest.raises(ValueError, match="weights must be float"):
    training.metagradients(params0, batch_ids, weights=weights[:, :2], **kwargs)
  bad = weights.copy()
  bad[1, 2, 0] = np.nan
  with pytest.raises(ValueError, match=r"weights\[1, 2, 0\]"):
    training.metagradients(params0, batch_ids, weights=bad, **kwargs)
  with pytest.raises(ValueError, match="batch_ids must be in"):
    training.metagradients(params0, batch_ids + NUM_TRAIN, **kwargs)
  with pytest.raises(ValueError, match="T=4 steps, the reference T=5"):
    training.first_order_losses(params0, batch_ids[0], batch_ids[:, :4], **kwargs)
  with pytest.raises(ValueError, match="reference_batch_ids must be int"):
    training.first_order_losses(params0, batch_ids, batch_ids, **kwargs)
  # 1.7 was truncated to 1 (segments of one step) before.
  with pytest.raises(ValueError, match="remat_every must be a positive int or None, "
                     "got 1.7"):
    training.metagradients(params0, batch_ids, remat_every=1.7, **kwargs)
  for chunk_size in (1.5, True, 0):  # 1.5 and True were truncated to 1
    with pytest.raises(ValueError, match=r"chunk_size must be a positive integer, "
                       rf"got {chunk_size!r}\."):
      training.first_order_losses(params0, batch_ids[0], batch_ids,
                                  chunk_size=chunk_size, **kwargs)


def _combined_curriculum(reference_ids, curriculum_ids, curriculum_weights, epsilon):
  """Batch ids [T, S+B] and weights whose effective weights are
  (1-ε)·e_ref + ε·e_c (reference weights 1), for retraining with `train_runs`."""
  ref_valid = (reference_ids >= 0).sum(1, keepdims=True).astype(np.float32)
  own_valid = np.maximum((curriculum_ids >= 0).sum(1, keepdims=True), 1)
  combined = np.concatenate([reference_ids, curriculum_ids], axis=1)
  total = (combined >= 0).sum(1, keepdims=True).astype(np.float32)
  weights = np.concatenate([
      np.broadcast_to((1 - epsilon) * total / ref_valid, reference_ids.shape),
      epsilon * curriculum_weights * total / own_valid], axis=1)
  return combined, weights.astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_order_losses_of_a_full_batch_reference(name):
  """Use (a): predict curricula from a full-batch run, no fitted runs."""
  loss_fn, params0, train, test, (batch_ids, _) = _setup(3)
  config = CONFIGS[name]
  reference = np.tile(np.arange(NUM_TRAIN, dtype=np.int32), (NUM_STEPS, 1))
  curricula = np.concatenate([batch_ids, batch_ids[:1, ::-1]])  # R' = 3, chunks of 2
  kwargs = dict(loss_fn=loss_fn, config=config, train_arrays=train, test_arrays=test)
  result = training.first_order_losses(params0, reference, curricula, chunk_size=2,
                                       **kwargs)
  assert result.losses.shape == (3, NUM_STEPS + 1, NUM_TEST)
  assert result.reference_losses.shape == (NUM_STEPS + 1, NUM_TEST)

  # Brute force: retrain along e(ε) = (1-ε)·e_ref + ε·e_c, central differences at 0
  # (ε small: Adam's steps are nearly sign(g), with kinks at larger ε). The reference
  # run itself is retrained with them, its [T, N] batches padded to their width
  # N + B (padding counts for nothing): one compiled program, not one more for R = 1.
  epsilon = 1e-3
  padded_reference = np.pad(reference, ((0, 0), (0, BATCH)), constant_values=-1)
  ids, weights = [padded_reference], [np.ones(padded_reference.shape, np.float32)]
  for curriculum in curricula:
    for sign in (1, -1):
      combined, w = _combined_curriculum(reference, curriculum,
                                         np.ones(curriculum.shape, np.float32),
                                         sign * epsilon)
      ids.append(combined)
      weights.append(w)
  retrain = lambda **settings: training.train_runs(
      params0, np.stack(ids), weights=np.stack(weights), progress=False,
      **settings).trace.losses
  runs = retrain(**kwargs)
  ref_run, retrained = runs[0], runs[1:].reshape(3, 2, NUM_STEPS + 1, NUM_TEST)
  np.testing.assert_allclose(result.reference_losses, ref_run, atol=1e-5)
  np.testing.assert_allclose(result.losses[:, 0],
                             np.broadcast_to(ref_run[0], (3, NUM_TEST)))

  directional = (retrained[:, 0] - retrained[:, 1]) / (2 * epsilon)
  predicted_change = result.losses - result.reference_losses[None]
  scale = np.abs(directional[:, 1:]).max()
  assert scale > 1e-3
  np.testing.assert_allclose(predicted_change, directional, rtol=0, atol=0.02 * scale)
  # The curricula differ from the reference, and from each other, to first order.
  assert np.abs(predicted_change[:, -1]).max() > 10 * 0.02 * scale
  assert np.abs(predicted_change[0, -1] - predicted_change[2, -1]).max() > 0.1 * scale

  # Reverse mode agrees at the final step: Σ_{t,i} ∂L/∂e_t[i] (e_c − e_ref)_t[i], with
  # ∂L/∂e_t[i] = N·∂L/∂w_{t,i} in the full batch (slot i holds example i).
  grads = training.metagradients(params0, reference, **kwargs)
  assert grads.shape == (NUM_STEPS, NUM_TRAIN, NUM_TEST)
  delta = np.asarray(training.effective_weights(curricula, NUM_TRAIN)) - 1 / NUM_TRAIN
  np.testing.assert_allclose(predicted_change[:, -1],
                             np.einsum("tim,kti->km", NUM_TRAIN * grads, delta),
                             atol=1e-4 * scale, rtol=0)

  # Other numbers: the same compiled program; its reference run is the new one.
  programs = metagradients_lib._first_order_fn.cache_info().misses  # pylint: disable=protected-access
  kwargs["config"] = _other_numbers(config)
  other = training.first_order_losses(params0, reference, curricula, chunk_size=2,
                                      **kwargs)
  assert metagradients_lib._first_order_fn.cache_info().misses == programs  # pylint: disable=protected-access
  other_run = retrain(**kwargs)[0]
  assert np.abs(other_run - ref_run).max() > 1e-3
  np.testing.assert_allclose(other.reference_losses, other_run, atol=1e-5)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_first_order_losses_of_removals_match_retraining_and_metagradients(name):
  """Use (b), MAGIC's removal: the same batch ids with some weights set to 0."""
  loss_fn, params0, train, test, (batch_ids, _) = _setup(4)
  config = CONFIGS[name]
  kwargs = dict(loss_fn=loss_fn, config=config, train_arrays=train, test_arrays=test)
  reference = batch_ids[0]
  rng = np.random.default_rng(0)
  removals = np.ones((4, NUM_STEPS, BATCH), np.float32)
  for k in range(3):  # the last curriculum is the reference itself
    removals[k].flat[rng.choice(NUM_STEPS * BATCH, 2, replace=False)] = 0.0
  curricula = np.broadcast_to(reference, removals.shape)
  result = training.first_order_losses(params0, reference, curricula,
                                       curricula_weights=removals, **kwargs)
  # Zero tangent: a curriculum equal to the reference is predicted as the reference.
  np.testing.assert_allclose(result.losses[3], result.reference_losses, atol=1e-6)

  # Final step: the same number as the metagradients of the reference run.
  grads = training.metagradients(params0, reference, **kwargs)
  np.testing.assert_allclose(
      result.losses[:, -1] - result.reference_losses[-1],
      np.einsum("tbm,ktb->km", grads, removals - 1),
      atol=1e-5 * max(1.0, np.abs(grads).sum()), rtol=0)

  # Brute force: retrain with weights 1 + s·(removal − 1) for s = ±ε; the error of
  # the expansion at s = 0.2 and 0.1 shrinks like s² (ratio ≈ 4; not for Adam,
  # whose nearly sign(g) steps have kinks at such perturbations).
  epsilon = 1e-3
  scales = [epsilon, -epsilon, 0.2, 0.1]
  weights = np.concatenate([1 + s * (removals - 1) for s in scales])
  retrained = training.train_runs(
      params0, np.broadcast_to(reference, weights.shape), weights=weights,
      progress=False, **kwargs).trace.losses.reshape(len(scales), 4, NUM_STEPS + 1,
                                                     NUM_TEST)
  # Curriculum 3 removes nothing (weights 1 at every scale): the reference run itself,
  # retrained alongside the others (one compiled program, not one more for R = 1).
  assert np.all(weights.reshape(len(scales), 4, -1)[:, 3] == 1.0)
  for ref_run in retrained[:, 3]:
    np.testing.assert_allclose(result.reference_losses, ref_run, atol=1e-5)
  directional = (retrained[0] - retrained[1]) / (2 * epsilon)
  predicted_change = result.losses - result.reference_losses[None]
  scale = np.abs(directional).max()
  assert scale > 1e-3
  np.testing.assert_allclose(predicted_change, directional, rtol=0, atol=0.02 * scale)
  error = lambda k: np.abs(retrained[k] - result.reference_losses
                           - scales[k] * predicted_change).max()
  if name != "adam":
    assert 3.0 < error(2) / error(3) < 5.0, (error(2), error(3))


def _quadratic_growth(curvature, learning_rate, num_steps=8, batch=2):
  """(derivative_growth of SGD on ℓ_i(θ) = λ(θ − y_i)²/2, its closed form)."""
  rng = np.random.default_rng(0)
  targets = rng.normal(size=6).astype(np.float32)
  loss_fn = lambda params, data: 0.5 * curvature * (
      params["params"]["theta"] - data["y"]) ** 2
  ids = rng.integers(0, 6, (num_steps, batch)).astype(np.int32)
  config = dict(optimizer="sgd", learning_rate=learning_rate)
  table = training.metagradients(
      {"params": {"theta": jnp.float32(0.3)}}, ids, loss_fn=loss_fn, config=config,
      train_arrays={"y": targets}, test_arrays={"y": np.float32([1.0, -2.0])})
  # Closed form: θ_{t+1} = θ_t − η·λ·mean_b(θ_t − y_b), so
  # ∂L_T[m]/∂w_{t,b} = λ(θ_T − y_m)·(1 − ηλ)^{T−1−t}·(−ηλ/B)(θ_t − y_b).
  theta = [np.float64(0.3)]
  for t in range(num_steps):
    theta.append(theta[-1] - learning_rate * curvature * np.mean(
        theta[-1] - targets[ids[t]]))
  size = [abs(1 - learning_rate * curvature) ** (num_steps - 1 - t) * curvature
          * np.abs(theta[t] - targets[ids[t]]).sum() / batch for t in range(num_steps)]
  expected = np.mean(size[:2]) / np.mean(size[-2:])  # T = 8: quarters of 2 steps
  rates = np.full(num_steps, learning_rate, np.float32)
  return training.derivative_growth(table, rates), expected


@pytest.mark.parametrize("curvature", [0.5, 2.5])  # η·λ below and above 2
def test_derivative_growth_of_sgd_on_a_quadratic_equals_the_closed_form(curvature):
  growth, expected = _quadratic_growth(curvature, learning_rate=1.0)
  assert growth == pytest.approx(expected, rel=1e-4)
  # Stable (|1 − ηλ| = 0.5): early perturbations fade. Unstable (1.5): they grow,
  # partly offset here by gradients that grow as θ diverges (3.3 for 1.5^6 = 11).
  if curvature < 2:
    assert growth < 0.1
  else:
    assert growth > training.metagradients_lib.GROWTH_WARNING


def test_derivative_growth_divides_by_the_step_size_and_skips_zero_steps():
  per_step = np.array([0.0, 1.0, 2.0, 4.0, 4.0, 8.0, 8.0, 8.0, 16.0])
  rates = np.array([0.0, 0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0])
  table = np.zeros((9, 3, 2))
  table[:, 0, 1] = -per_step  # |·| summed over slots and test examples
  # s_t = per_step / rate over steps 1..8 = 2, 4, 4, 4, 8, 8, 4, 8: quarters of 2.
  assert training.derivative_growth(table, rates) == pytest.approx((2 + 4) / (4 + 8))
  assert np.isnan(training.derivative_growth(table[:2], rates[:2]))
  with pytest.raises(ValueError, match="learning_rates"):
    training.derivative_growth(table, rates[:3])
  # A NaN or negative rate was skipped like a warm-up step, a NaN table gave NaN.
  for bad in (np.nan, -0.5):
    with pytest.raises(ValueError, match=r"^derivative_growth: learning_rates must be "
                       "finite and >= 0"):
      training.derivative_growth(table, np.where(np.arange(9) == 3, bad, rates))
  with pytest.raises(ValueError, match=r"^derivative_growth: metagradients_table must "
                     r"be finite, got nan at \[4, 0, 0\]"):
    training.derivative_growth(np.where(np.arange(9)[:, None, None] == 4, np.nan,
                                        table), rates)


def test_final_losses_from_one_reverse_table_equal_the_jvps(name="adam"):
  """`first_order_final_losses`: the table route (one reverse pass per test example,
  then a gather-sum per curriculum) against the jvp route, on a reference whose slots
  are permuted per step, padded and weighted, and weighted, padded curricula. Adam
  only (the routes share every optimizer's code; SGD passed too, measured)."""
  loss_fn, params0, train, test, (batch_ids, weights) = _setup(5)
  rng = np.random.default_rng(5)
  # [T, N] like the full-batch test's reference (its compiled programs are reused),
  # but slot s does not hold id s, and one slot of step 0 is padding.
  reference = np.stack([rng.permutation(NUM_TRAIN) for _ in range(NUM_STEPS)])
  reference = reference.astype(np.int32)
  reference_weights = rng.uniform(0.5, 1.5, reference.shape).astype(np.float32)
  curricula = np.concatenate([batch_ids, batch_ids[:1, ::-1]])  # R' = 3
  curricula_weights = np.concatenate([weights, weights[:1, ::-1]])
  unused = np.setdiff1d(np.arange(NUM_TRAIN), curricula[:, 0])[0]
  reference[0, reference[0] == unused] = -1
  kwargs = dict(loss_fn=loss_fn, config=CONFIGS[name], train_arrays=train,
                test_arrays=test, reference_weights=reference_weights,
                curricula_weights=curricula_weights)
  jvp = training.first_order_final_losses(params0, reference, curricula, route="jvp",
                                          chunk_size=2, **kwargs)
  table = training.first_order_final_losses(params0, reference, curricula,
                                            route="table", cotangents_at_once=1,
                                            **kwargs)
  assert (jvp.route, table.route) == ("jvp", "table")
  assert table.losses.shape == (3, NUM_TEST)
  np.testing.assert_allclose(table.reference_losses, jvp.reference_losses, atol=1e-5)
  change = jvp.losses - jvp.reference_losses
  scale = np.abs(change).max()
  assert scale > 1e-3 and np.abs(change[0] - change[2]).max() > 0.1 * scale
  np.testing.assert_allclose(table.losses, jvp.losses, rtol=0, atol=1e-4 * scale)
  one = training.first_order_final_losses(params0, reference, curricula[2],
                                          route="table", cotangents_at_once=1, **{
                                              **kwargs, "curricula_weights":
                                                  curricula_weights[2]})
  np.testing.assert_allclose(one.losses, table.losses[2], atol=1e-6)
  auto = training.first_order_final_losses(params0, reference, curricula, chunk_size=2,
                                           **kwargs)
  assert auto.route == "jvp"  # 3 curricula < 1.8 × 4 test examples
  np.testing.assert_allclose(auto.losses, jvp.losses)

  # predict_from_table's chunk: a negative one returned np.empty's contents.
  derivatives, final = training.metagradients(
      params0, reference, loss_fn=loss_fn, config=CONFIGS[name], train_arrays=train,
      test_arrays=test, weights=reference_weights, cotangents_at_once=1,
      return_final_losses=True)
  for chunk in (-1, 0, 1.5):
    with pytest.raises(ValueError, match=r"^predict_from_table: chunk must be a "
                       "positive integer"):
      training.predict_from_table(derivatives, reference, final, curricula,
                                  num_train_examples=NUM_TRAIN,
                                  reference_weights=reference_weights,
                                  curricula_weights=curricula_weights, chunk=chunk)
  np.testing.assert_allclose(training.predict_from_table(
      derivatives, reference, final, curricula, num_train_examples=NUM_TRAIN,
      reference_weights=reference_weights, curricula_weights=curricula_weights,
      chunk=1), table.losses, atol=1e-6)
  with pytest.raises(ValueError, match=r"^metagradients: cotangents_at_once must be "
                     "a positive integer, got 1.7"):
    training.first_order_final_losses(params0, reference, curricula, route="table",
                                      cotangents_at_once=1.7, **kwargs)
  # A curriculum using an example the reference's step does not hold: refused by
  # the function called, before the table is computed.
  absent = int(curricula[1, 2, 0])
  reference[2, reference[2] == absent] = -1
  computed = []
  original = training.metagradients_lib.metagradients
  with mock.patch.object(training.metagradients_lib, "metagradients",
                         lambda *a, **k: computed.append(1) or original(*a, **k)):
    with pytest.raises(ValueError, match=rf"^first_order_final_losses: curricula"
                       rf"\[\d, 2, \d\] = example {absent}, which the reference's "
                       "step 2 does not hold"):
      training.first_order_final_losses(params0, reference, curricula, route="table",
                                        cotangents_at_once=1, **kwargs)
  assert not computed
  # A reference of several runs is refused, not read as its first run.
  with pytest.raises(ValueError, match=r"reference_batch_ids must be int\[T, S\]"):
    training.first_order_final_losses(params0, np.stack([reference] * 2), curricula,
                                      route="table", **{**kwargs, "reference_weights":
                                                        np.stack([reference_weights] * 2)})
  with pytest.raises(ValueError, match="route must be"):
    training.first_order_final_losses(params0, reference, curricula, route="fast",
                                      **kwargs)
  stochastic = lambda p, batch, rng=None: loss_fn(p, batch)
  with pytest.raises(ValueError, match="deterministic loss"):
    training.first_order_final_losses(params0, reference, curricula, route="table",
                                      **{**kwargs, "loss_fn": stochastic})


def test_route_choice_weighs_the_table_rows_against_the_jvps():
  choose = training.metagradients_lib.choose_route
  # The default job: 40 curricula, M = 32 (break-even 1.8·M ≈ 58).
  assert choose(40, 32) == "jvp"
  assert choose(4 * 300 * 64, 32) == "table"  # a curriculum search's proposals
  assert choose(60, 32) == "table"
  assert choose(3, 1) == "table" and choose(1, 1) == "jvp"


def test_table_simulator_predicts_the_jvps_final_losses_and_refuses_the_rest(tmp_path):
  """`table_simulator`: the reverse-mode table as a final-only additive simulator
  with one phase per step, against the jvp route's final losses, on a full-batch
  reference whose slots are permuted and weighted; a table of two of the four test
  examples (columns 1 and 3) leaves the others NaN. Then what it refuses, a search
  on it, and a save/load round trip."""
  from simfluence_jax import data  # pylint: disable=g-import-not-at-top
  from simfluence_jax import simulators  # pylint: disable=g-import-not-at-top
  loss_fn, params0, train, test, _ = _setup(6)
  rng = np.random.default_rng(6)
  reference = np.stack([rng.permutation(NUM_TRAIN) for _ in range(NUM_STEPS)])
  reference = reference.astype(np.int32)
  reference_weights = rng.uniform(0.5, 1.5, reference.shape).astype(np.float32)
  curricula = np.stack([np.stack([rng.choice(NUM_TRAIN, BATCH, replace=False)
                                  for _ in range(NUM_STEPS)]) for _ in range(3)])
  curricula = np.concatenate([curricula, curricula[:1, ::-1]]).astype(np.int32)
  kwargs = dict(loss_fn=loss_fn, config=CONFIGS["adam"], train_arrays=train,
                test_arrays=test)
  jvp = training.first_order_final_losses(params0, reference, curricula, route="jvp",
                                          chunk_size=2,
                                          reference_weights=reference_weights, **kwargs)
  table, final = training.metagradients(params0, reference, weights=reference_weights,
                                        return_final_losses=True, **kwargs)
  run = training.train_runs(params0, reference[None], weights=reference_weights[None],
                            progress=False, **kwargs).trace.losses[0]
  np.testing.assert_allclose(final, run[-1], atol=1e-5)  # one run: [M]
  columns = np.array([1, 3])
  sim = training.table_simulator(
      table[..., columns], reference, run[-1, columns], run[0, columns],
      num_train_examples=NUM_TRAIN, batch_size=BATCH,
      reference_weights=reference_weights, test_columns=columns,
      num_test_examples=NUM_TEST)
  assert sim.final_only and sim.kind == "additive" and sim.num_phases == NUM_STEPS
  initial = np.repeat(run[:1], len(curricula), 0)
  simulated = np.asarray(sim.simulate(curricula, initial))
  assert simulated.shape == (len(curricula), NUM_STEPS + 1, NUM_TEST)
  np.testing.assert_array_equal(simulated[:, 0], initial)
  assert np.isnan(simulated[:, 1:-1]).all() and np.isnan(simulated[:, -1, [0, 2]]).all()
  change = jvp.losses[:, columns] - jvp.reference_losses[columns]
  scale = np.abs(change).max()
  # The reversed curriculum (row 3) has the same examples as row 0: order matters.
  assert scale > 1e-3 and np.abs(change[0] - change[3]).max() > 0.05 * scale
  np.testing.assert_allclose(simulated[:, -1, columns], jvp.losses[:, columns],
                             rtol=0, atol=1e-4 * scale)

  with pytest.raises(ValueError, match="exactly 5 full batches; got 4 steps"):
    sim.simulate(curricula[:, :-1], initial)
  padded = curricula.copy()
  padded[0, 1, 0] = -1
  with pytest.raises(ValueError, match="with padding"):
    sim.simulate(padded, initial)
  with pytest.raises(ValueError, match="unweighted curricula only"):
    sim.simulate(curricula, initial, weights=np.full(curricula.shape, 0.5))
  with pytest.raises(ValueError, match="predicts final losses from the base model's"):
    sim.simulate(curricula, initial + 0.1)

  start = data.make_curricula(2, NUM_TRAIN, 9, 2, BATCH, seed=0)[:, :NUM_STEPS]
  search = simulators.search_curriculum(sim, run[0], start, [1, 3], num_iters=20,
                                        num_proposals=8, loss_floor=None,
                                        epoch_steps=3)
  found = np.asarray(sim.simulate(search.batch_ids, initial[:2]))[:, -1, columns]
  np.testing.assert_allclose(search.objective, found.mean(-1), rtol=1e-5)
  assert np.all(search.objective <= search.initial_objective)
  assert np.any(search.batch_ids != start)
  with pytest.raises(ValueError, match=r"no finite parameters for test examples \[0\]"):
    simulators.search_curriculum(sim, run[0], curricula[:2], [0, 1], num_iters=2)

  sim.save(str(tmp_path / "sim"))
  loaded = simulators.Simulator.load(str(tmp_path / "sim"))
  assert loaded.final_only and loaded.fit_info == sim.fit_info
  np.testing.assert_array_equal(np.asarray(loaded.simulate(curricula, initial)),
                                simulated)

  # A reference step without some example has no derivative for it: refused.
  with pytest.raises(ValueError, match="step 0 does not hold example 4"):
    training.table_simulator(table, np.where(reference == 4, -1, reference), run[-1],
                             run[0], num_train_examples=NUM_TRAIN, batch_size=BATCH,
                             reference_weights=reference_weights)


class _BagOfTokens(nn.Module):
  """Mean of token embeddings, then a linear head: a token's embedding row has
  gradient 0 wherever no example in the batch holds that token."""

  @nn.compact
  def __call__(self, tokens):
    return nn.Dense(NUM_CLASSES)(nn.Embed(6, 4)(tokens).mean(-2))


def test_adam_around_a_reference_that_never_trained_on_a_token_is_refused():
  """Review h20: with Adam and a reference that never holds the only example with
  token 5, that token's embedding row has second moment 0; a curriculum training on
  it moves the row with slope 1/eps (1e8), and the first-order prediction was
  −5.4e6 times the retrained change, finite, with no error."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 5, (8, 3)).astype(np.int32)
  tokens[7, 1] = 5  # the only example with token 5
  train = {"inputs": tokens, "labels": rng.integers(0, NUM_CLASSES, 8).astype(np.int32)}
  test = {"inputs": np.array([[5, 0, 1], [2, 3, 4]], np.int32),
          "labels": np.array([0, 1], np.int32)}
  params0 = models.init_variables(_BagOfTokens(), tokens, seed=0)
  loss_fn = training.make_loss_fn(_BagOfTokens(), "classification")
  reference = np.array([[0, 1, 2, 3], [4, 5, 6, 0], [1, 2, 3, 4]], np.int32)
  curricula = np.array([[[0, 1, 2, 3], [4, 5, 6, 7], [1, 2, 3, 4]]], np.int32)
  kwargs = dict(loss_fn=loss_fn, train_arrays=train, test_arrays=test)
  adam = dict(optimizer="adam", learning_rate=0.01)
  with pytest.raises(training.SingularExpansionError,
                     match=r"curriculum 0 trains at step 1 on parameters "
                     r"whose Adam second moment is exactly 0"):
    training.first_order_losses(params0, reference, curricula, config=adam, **kwargs)
  # SGD around the same reference, and Adam around the full batch, are fine: the
  # prediction is first-order accurate (central differences of retraining along
  # the curriculum, as above).
  full = np.tile(np.arange(8, dtype=np.int32), (3, 1))
  for ref, config in ((reference, dict(optimizer="sgd", learning_rate=0.5)),
                      (full, adam)):
    result = training.first_order_losses(params0, ref, curricula, config=config,
                                         **kwargs)
    epsilon = 1e-3
    ids, weights = [], []
    for sign in (1, -1):
      combined, w = _combined_curriculum(ref, curricula[0],
                                         np.ones(curricula[0].shape, np.float32),
                                         sign * epsilon)
      ids.append(combined)
      weights.append(w)
    runs = training.train_runs(params0, np.stack(ids), weights=np.stack(weights),
                               progress=False, config=config, **kwargs).trace.losses
    directional = (runs[0] - runs[1]) / (2 * epsilon)
    change = result.losses[0] - result.reference_losses
    scale = np.abs(directional).max()
    assert scale > 1e-3
    np.testing.assert_allclose(change, directional, rtol=0, atol=0.03 * scale)
