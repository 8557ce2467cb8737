"""Per-example loss functions and the pure single-run training step.

A training step sees one run: its parameters, optimizer state, and the ids of the
examples in its batch. Train and test examples live on the device as arrays dicts
(row i = example i), so a step gathers its batch by id and the whole multi-step,
multi-run loop (`runs.py`) stays inside one jitted computation.

The step's objective with occurrence weights `w` (1 = the plain curriculum) is

    L_t(θ) = Σ_b w_b · valid_b · ℓ(z_{id_b}; θ) / max(Σ_b valid_b, 1),

valid_b = [id_b ≥ 0]. The denominator counts valid slots whatever their weight:
a weight-0 occurrence is removed without renormalising the rest of the batch
(MAGIC's convention), so the loss is linear in `w` and
`∂L_t/∂w_b = ℓ_b · valid_b / num_valid`. `effective_weights` gives the resulting
factor `e_t[i]` that multiplies example i's loss in step t.

Stochastic losses (dropout): a `loss_fn` with an `rng` parameter
(`make_loss_fn(..., train_kwargs=...)`) gets, for the training batch, one key per
slot, `fold_in(fold_in(fold_in(dropout_key(seed), run), step), slot)`, so a run is
reproducible and resumable; test losses and recorded test gradients use eval mode
(no key).
"""

import inspect
import re
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax import _checks
from simfluence_jax import losses
from simfluence_jax.kernels import per_example
from simfluence_jax.kernels import projection

KINDS = ("lm", "classification")
TRAINABLE_COLLECTION = "params"

# loss_fn(params, batch[, rng]) -> float32[n]; params is the variables dict
# {"params": ...[, "batch_stats": ...]}.
LossFn = Callable[..., jax.Array]
# train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays
#            [, weights_t, run]) -> (params, opt_state, test_losses, extras)
TrainStep = Callable[..., Any]


def make_loss_fn(model: nn.Module, kind: str, *,
                 eval_kwargs: Optional[Mapping[str, Any]] = None,
                 train_kwargs: Optional[Mapping[str, Any]] = None,
                 rng_names: Sequence[str] = ("dropout",)) -> LossFn:
  """Per-example loss of `model` on a batch.

  Only the `"params"` collection is trained: every other collection of the
  variables dict (e.g. BatchNorm `batch_stats`) is passed to `model.apply` behind
  `stop_gradient`, so its gradient is exactly zero and no optimizer moves it. The
  model must then run those layers in eval mode (`use_running_average=True`; say so
  through `eval_kwargs` / `train_kwargs`); updating them (`mutable`) is not
  supported. Training holds Flax's state collections (`STATE_COLLECTIONS`:
  batch_stats, cache, intermediates) fixed whatever the loss (`trainable_only`); a
  custom loss whose other collections must not train needs the same two lines:

      frozen = {k: jax.lax.stop_gradient(v) for k, v in params.items() if k != "params"}
      logits = model.apply({"params": params["params"], **frozen}, batch["inputs"])

  Args:
    model: a linen module, applied as `model.apply(params, inputs, **kwargs)`.
    kind: "lm" (batch `{"inputs", "targets", "mask"}`, next-token cross-entropy
      summed over the masked tokens) or "classification" (batch
      `{"inputs", "labels"}`, softmax cross-entropy).
    eval_kwargs: keyword arguments of `model.apply` for the losses without a key
      (test losses, pre-training, influence), e.g. `{"train": False}`.
    train_kwargs: keyword arguments for the training batch, e.g.
      `{"deterministic": False}` for dropout. When given, the loss takes a key:
      `loss_fn(params, batch, rng=None)`; with `rng` it applies the model with
      `train_kwargs` and `rngs={name: fold_in(rng, k)}` for `rng_names`, without it
      in eval mode. `train_runs` passes a key per training slot (see the module
      docstring).
    rng_names: the rng collections the model draws from in training mode.

  Returns:
    `loss_fn(params, batch) -> float32[n]` (or `loss_fn(params, batch, rng=None)`
    when `train_kwargs` is given) with `params` the variables dict
    `{"params": ...}` (plus any non-trainable collections).

  Raises:
    ValueError: unknown `kind`.
  """
  if not callable(getattr(model, "apply", None)):
    raise ValueError(f"make_loss_fn: model must be a linen module (applied as "
                     f"model.apply(variables, inputs)), got a {type(model).__name__}; "
                     f"for an NNX module, write a loss over nnx.state(module, "
                     f"nnx.Param) that merges the module.")
  if kind == "lm":
    loss_of = lambda logits, batch: losses.language_modeling_loss(
        logits, batch["targets"], batch["mask"])
  elif kind == "classification":
    loss_of = lambda logits, batch: losses.classification_loss(logits, batch["labels"])
  else:
    raise ValueError(f"make_loss_fn: kind must be one of {KINDS}, got {kind!r}.")
  eval_kwargs = dict(eval_kwargs or {})

  def apply(params, inputs, **kwargs):
    return model.apply(_freeze_non_trainable(params), inputs, **kwargs)

  if train_kwargs is None:
    def loss_fn(params, batch):
      return loss_of(apply(params, batch["inputs"], **eval_kwargs), batch)
  else:
    train_kwargs, rng_names = dict(train_kwargs), tuple(rng_names)

    def loss_fn(params, batch, rng=None):
      if rng is None:
        return loss_of(apply(params, batch["inputs"], **eval_kwargs), batch)
      rngs = {name: jax.random.fold_in(rng, k) for k, name in enumerate(rng_names)}
      return loss_of(apply(params, batch["inputs"], rngs=rngs, **train_kwargs), batch)

  known = {}

  def num_classes(params, inputs) -> int:
    """C of the batch's class ids (labels, or LM targets): the logits' last
    dimension, from shapes only (`jax.eval_shape`: nothing compiled or run; one
    trace per shapes of params and inputs)."""
    shape = lambda x: jax.ShapeDtypeStruct((1,) + np.shape(x)[1:], jnp.result_type(x))
    first = jax.tree_util.tree_map(shape, inputs)
    key = str(jax.tree_util.tree_map(shape, (params, first)))
    if key not in known:
      known[key] = int(jax.eval_shape(lambda p, x: apply(p, x, **eval_kwargs), params,
                                      first).shape[-1])
    return known[key]

  # `train_runs` / `metagradients` refuse class ids outside [0, C) with it.
  loss_fn.class_ids_key = "targets" if kind == "lm" else "labels"
  loss_fn.num_classes = num_classes
  # What the resume fingerprint of `train_runs` records about the loss; object
  # addresses (functions held by the module) differ between processes.
  loss_fn.description = re.sub(r" at 0x[0-9a-fA-F]+", "", (
      f"{kind}|{model!r}|eval={sorted(eval_kwargs.items())}|"
      f"train={None if train_kwargs is None else sorted(train_kwargs.items())}|"
      f"rngs={tuple(rng_names)}"))
  return loss_fn


def _freeze_non_trainable(variables, collections=None):
  """A linen variables dict with its collections other than "params" behind
  `stop_gradient` (only those named in `collections`, if given); anything else as
  it is."""
  if not isinstance(variables, Mapping) or TRAINABLE_COLLECTION not in variables:
    return variables
  frozen = lambda name: name != TRAINABLE_COLLECTION and (
      collections is None or name in collections)
  return {name: jax.tree_util.tree_map(jax.lax.stop_gradient, value)
          if frozen(name) else value for name, value in variables.items()}


# Collections Flax's own layers keep as state, never trained: held fixed in every
# training gradient (`trainable_only`), whatever the loss. Other keys beside
# "params" in a custom loss's dict (an adapter, a temperature) still train (frozen,
# they stopped training: review h37).
STATE_COLLECTIONS = ("batch_stats", "cache", "intermediates")


def takes_rng(loss_fn: LossFn) -> bool:
  """Whether `loss_fn` accepts a key (`loss_fn(params, batch, rng=...)`)."""
  try:
    return "rng" in inspect.signature(loss_fn).parameters
  except (TypeError, ValueError):
    return False


def dropout_key(seed: int) -> jax.Array:
  """Base key of the training-batch randomness of a job (distinct from the
  projection key of the same seed)."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), 1)


def slot_keys(base_key: jax.Array, run, step, num_slots: int,
              first_slot: int = 0) -> jax.Array:
  """Keys of slots first_slot..first_slot+num_slots-1 of `run`'s batch at `step`."""
  key = jax.random.fold_in(jax.random.fold_in(base_key, run), step)
  return jax.vmap(lambda slot: jax.random.fold_in(key, slot))(
      first_slot + jnp.arange(num_slots))


def trainable_only(loss_fn: LossFn) -> LossFn:
  """`loss_fn` whose params' `STATE_COLLECTIONS` (beside "params") are behind
  `stop_gradient`. Every gradient of a training step goes through it, so a custom
  loss that applies the whole variables dict does not train BatchNorm statistics
  (it did: they moved by 0.05-0.3 and metagradients were 3-15% off; review h36).
  `make_loss_fn`'s losses hold every collection but "params" fixed themselves."""
  def frozen(params, batch, **kwargs):
    return loss_fn(_freeze_non_trainable(params, STATE_COLLECTIONS), batch, **kwargs)
  return frozen


def example_losses(loss_fn: LossFn, params, batch, keys: Optional[jax.Array] = None):
  """float32[n] training-mode losses of `batch`; `keys` [n] one per example (None =
  the loss without a key). Only the "params" collection has a gradient
  (`trainable_only`)."""
  loss_fn = trainable_only(loss_fn)
  if keys is None:
    return loss_fn(params, batch)
  one = lambda example, key: loss_fn(
      params, jax.tree_util.tree_map(lambda x: x[None], example), rng=key)[0]
  return jax.vmap(one)(batch, keys)


def slot_coefficients(batch_ids_t: jax.Array, weights_t: Optional[jax.Array] = None):
  """(w·valid float32[B], num_valid float32[]) of one step's slots.

  The step loss is `Σ_b coefficients_b ℓ_b / num_valid`; num_valid counts the
  valid slots (id ≥ 0) whatever their weights.
  """
  valid = (batch_ids_t >= 0).astype(jnp.float32)
  coefficients = valid if weights_t is None else weights_t.astype(jnp.float32) * valid
  return coefficients, jnp.maximum(jnp.sum(valid), 1.0)


def effective_weights(batch_ids: Any, num_train_examples: int,
                      weights: Any = None):
  """The factor e_t[i] multiplying example i's loss in each step's objective.

  Args:
    batch_ids: int[..., T, B] (-1 = padding).
    num_train_examples: N.
    weights: float[..., T, B] occurrence weights (None = ones).

  Returns:
    float32[..., T, N]: Σ over the slots b holding i of w_b / num_valid_t.
  """
  batch_ids = jnp.asarray(batch_ids)
  coefficients, num_valid = jnp.vectorize(
      slot_coefficients, signature="(b),(b)->(b),()")(
          batch_ids, jnp.ones(batch_ids.shape, jnp.float32) if weights is None
          else jnp.asarray(weights, jnp.float32))
  values = coefficients / num_valid[..., None]
  if not isinstance(batch_ids, jax.core.Tracer) and batch_ids.size:
    low, high = int(jnp.min(batch_ids)), int(jnp.max(batch_ids))
    if low < -1 or high >= num_train_examples:
      raise ValueError(f"batch_ids: ids must be in [-1, num_train_examples="
                       f"{num_train_examples}) (-1 = padding), found "
                       f"{low if low < -1 else high}.")
  one_hot = jax.nn.one_hot(jnp.maximum(batch_ids, 0), num_train_examples,
                           dtype=jnp.float32)
  return jnp.einsum("...b,...bn->...n", values, one_hot)


def gather_batch(arrays: Dict[str, jax.Array], batch_ids: jax.Array):
  """Rows `batch_ids` of every array, and a weight per slot (0 for padding).

  Args:
    arrays: dict of arrays with a leading example axis N.
    batch_ids: int32[B], ids in [0, N) or -1 for padding.

  Returns:
    (batch dict with leading axis B, weights float32[B]). Padding slots hold
    example 0 so that every slot computes a finite loss; their weight is 0.
  """
  safe_ids = jnp.maximum(batch_ids, 0)
  batch = jax.tree_util.tree_map(lambda x: jnp.take(x, safe_ids, axis=0), arrays)
  return batch, (batch_ids >= 0).astype(jnp.float32)


def projection_key(seed: int) -> jax.Array:
  """The key of the projection used for recorded gradients of a training job."""
  return jax.random.PRNGKey(seed)


def _chunk_size(num_examples: int, chunk_size: Optional[int]) -> Optional[int]:
  """Largest divisor of `num_examples` not above `chunk_size` (None = no chunks)."""
  if chunk_size is not None and (not _checks.is_int(chunk_size) or chunk_size < 1):
    raise ValueError(f"grad_chunk_size={chunk_size!r}: must be a positive integer "
                     "(or None: all of a step's examples at once).")
  if chunk_size is None or chunk_size >= num_examples:
    return None
  return max(d for d in range(1, chunk_size + 1) if num_examples % d == 0)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], *, record_grads: bool = False,
                    projection_dim: int = 32, key: Optional[jax.Array] = None,
                    grad_chunk_size: Optional[int] = None,
                    rng_key: Optional[jax.Array] = None) -> TrainStep:
  """Builds the pure step of one run.

  Args:
    loss_fn: per-example loss `(params, batch) -> float32[n]`, or
      `(params, batch, rng=None)` for a stochastic one (see `make_loss_fn`).
    optimizer: the optax transformation.
    schedule: `step -> learning rate`, recorded per step.
    record_grads: also return projected per-example gradients of the batch and
      of the test examples at the parameters before the update.
    projection_dim: K, the dimension of the recorded projections.
    key: the projection key; the same key is used at every step and for train
      and test examples so that all recorded dot products are comparable.
      Default: `projection_key(0)`.
    grad_chunk_size: per-example gradients computed this many at a time
      (bounds memory when recording test gradients for large M).
    rng_key: base key of a stochastic loss's training-batch keys
      (`slot_keys(rng_key, run, step, B)`); default `dropout_key(0)`. Unused for
      a deterministic loss.

  Returns:
    `train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays,
    weights_t=None, run=0) -> (params, opt_state, test_losses, extras)` where
    `batch_ids_t` is int32[B] (-1 = padding), `weights_t` float32[B] the
    occurrence weights (None = ones; objective in the module docstring), `run` the
    run index (keys of a stochastic loss only), `test_losses` is float32[M] after
    the update and `extras` is a dict with `train_loss` (float32[], the step's
    objective before the update), `learning_rate` (float32[], `schedule(step)`)
    and, when recording, `train_grads` float32[B, K] (per-example, unweighted,
    zeros at padding) and `test_grads` float32[M, K].
  """
  key = projection_key(0) if key is None else key
  stochastic = takes_rng(loss_fn)
  rng_key = dropout_key(0) if rng_key is None else rng_key

  def train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays,
                 weights_t=None, run=0):
    batch, valid = gather_batch(train_arrays, batch_ids_t)
    coefficients, num_valid = slot_coefficients(batch_ids_t, weights_t)
    batch_size = batch_ids_t.shape[0]
    keys = slot_keys(rng_key, run, step, batch_size) if stochastic else None
    extras = {}
    if record_grads:
      # The per-example gradients are needed anyway, so the batch gradient is their
      # weighted mean rather than a second backward pass.
      example_grads = _per_example_grads(
          loss_fn, params, batch, keys, _chunk_size(batch_size, grad_chunk_size))
      grads = jax.tree_util.tree_map(
          lambda g: jnp.tensordot(coefficients, g, axes=1) / num_valid, example_grads)
      losses_t = example_losses(loss_fn, params, batch, keys)
      extras["train_grads"] = projection.project_pytree(
          example_grads, key, projection_dim) * valid[:, None]
      num_test = jax.tree_util.tree_leaves(test_arrays)[0].shape[0]
      test_grads = per_example.per_example_grads(
          _eval_loss(trainable_only(loss_fn)), params, test_arrays,
          _chunk_size(num_test, grad_chunk_size))
      extras["test_grads"] = projection.project_pytree(test_grads, key, projection_dim)
    else:
      def objective(p):
        losses_p = example_losses(loss_fn, p, batch, keys)
        return jnp.sum(losses_p * coefficients) / num_valid, losses_p
      (_, losses_t), grads = jax.value_and_grad(objective, has_aux=True)(params)
    extras["train_loss"] = jnp.sum(losses_t * coefficients) / num_valid
    extras["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    test_losses = loss_fn(params, test_arrays)
    return params, opt_state, test_losses, extras

  return train_step


def make_update(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                rng_key: Optional[jax.Array] = None):
  """The parameter update of `make_train_step` alone (no test losses, no records).

  Returns:
    `update(params, opt_state, step, batch_ids_t, weights_t, train_arrays, run=0)
    -> (params, opt_state)`, the same arithmetic as the step of `train_runs`
    without recorded gradients; differentiable in `weights_t` (metagradients).
  """
  stochastic = takes_rng(loss_fn)
  rng_key = dropout_key(0) if rng_key is None else rng_key

  def update(params, opt_state, step, batch_ids_t, weights_t, train_arrays, run=0):
    batch, _ = gather_batch(train_arrays, batch_ids_t)
    coefficients, num_valid = slot_coefficients(batch_ids_t, weights_t)
    keys = (slot_keys(rng_key, run, step, batch_ids_t.shape[0]) if stochastic
            else None)
    grads = jax.grad(lambda p: jnp.sum(
        example_losses(loss_fn, p, batch, keys) * coefficients) / num_valid)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  return update


def _eval_loss(loss_fn: LossFn) -> LossFn:
  """`loss_fn` as a two-argument function (eval mode for a stochastic one)."""
  return lambda params, batch: loss_fn(params, batch)


def _per_example_grads(loss_fn: LossFn, params, batch, keys, chunk_size):
  """Per-example gradients in training mode (with one key per example, if any), of
  the "params" collection (`trainable_only`)."""
  loss_fn = trainable_only(loss_fn)
  if keys is None:
    return per_example.per_example_grads(loss_fn, params, batch, chunk_size)
  def single(example, key):
    example = jax.tree_util.tree_map(lambda x: x[None], example)
    return jax.grad(lambda p: loss_fn(p, example, rng=key)[0])(params)
  n = keys.shape[0]
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(single)(batch, keys)
  chunked = jax.tree_util.tree_map(
      lambda x: jnp.reshape(x, (n // chunk_size, chunk_size) + x.shape[1:]),
      (batch, keys))
  grads = jax.lax.map(lambda args: jax.vmap(single)(*args), chunked)
  return jax.tree_util.tree_map(lambda g: jnp.reshape(g, (n,) + g.shape[2:]), grads)
