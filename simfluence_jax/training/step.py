"""Per-example loss functions and the pure single-run training step.

A training step sees one run: its parameters, optimizer state, and the ids of the
examples in its batch. Train and test examples live on the device as arrays dicts
(row i = example i), so a step gathers its batch by id and the whole multi-step,
multi-run loop (`runs.py`) stays inside one jitted computation.
"""

from typing import Any, Callable, Dict, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from simfluence_jax import losses
from simfluence_jax.kernels import per_example
from simfluence_jax.kernels import projection

KINDS = ("lm", "classification")

# loss_fn(params, batch) -> float32[n]; params is the variables dict {"params": ...}.
LossFn = Callable[[Any, Dict[str, jax.Array]], jax.Array]
# train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays)
#   -> (params, opt_state, test_losses, extras)
TrainStep = Callable[..., Any]


def make_loss_fn(model: nn.Module, kind: str) -> LossFn:
  """Per-example loss of `model` on a batch.

  Args:
    model: a linen module, applied as `model.apply(params, inputs)`.
    kind: "lm" (batch `{"inputs", "targets", "mask"}`, next-token cross-entropy
      summed over the masked tokens) or "classification" (batch
      `{"inputs", "labels"}`, softmax cross-entropy).

  Returns:
    `loss_fn(params, batch) -> float32[n]` with `params` the variables dict
    `{"params": ...}`.

  Raises:
    ValueError: unknown `kind`.
  """
  if kind == "lm":
    def loss_fn(params, batch):
      logits = model.apply(params, batch["inputs"])
      return losses.language_modeling_loss(logits, batch["targets"], batch["mask"])
  elif kind == "classification":
    def loss_fn(params, batch):
      logits = model.apply(params, batch["inputs"])
      return losses.classification_loss(logits, batch["labels"])
  else:
    raise ValueError(f"make_loss_fn: kind must be one of {KINDS}, got {kind!r}.")
  return loss_fn


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
  if chunk_size is None or chunk_size >= num_examples:
    return None
  return max(d for d in range(1, chunk_size + 1) if num_examples % d == 0)


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation,
                    schedule: Callable[[Any], Any], *, record_grads: bool = False,
                    projection_dim: int = 32, key: Optional[jax.Array] = None,
                    grad_chunk_size: Optional[int] = None) -> TrainStep:
  """Builds the pure step of one run.

  Args:
    loss_fn: per-example loss `(params, batch) -> float32[n]`.
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

  Returns:
    `train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays)
    -> (params, opt_state, test_losses, extras)` where `batch_ids_t` is
    int32[B] (-1 = padding, weight 0), the update minimises the mean loss over
    the valid batch examples, `test_losses` is float32[M] after the update and
    `extras` is a dict with `train_loss` (float32[], mean valid batch loss before
    the update), `learning_rate` (float32[], `schedule(step)`) and, when
    recording, `train_grads` float32[B, K] (zeros at padding) and `test_grads`
    float32[M, K].
  """
  key = projection_key(0) if key is None else key

  def train_step(params, opt_state, step, batch_ids_t, train_arrays, test_arrays):
    batch, weights = gather_batch(train_arrays, batch_ids_t)
    num_valid = jnp.maximum(jnp.sum(weights), 1.0)
    extras = {}
    if record_grads:
      # The per-example gradients are needed anyway, so the batch gradient is their
      # weighted mean rather than a second backward pass.
      batch_size = batch_ids_t.shape[0]
      example_grads = per_example.per_example_grads(
          loss_fn, params, batch, _chunk_size(batch_size, grad_chunk_size))
      grads = jax.tree_util.tree_map(
          lambda g: jnp.tensordot(weights, g, axes=1) / num_valid, example_grads)
      example_losses = loss_fn(params, batch)
      extras["train_grads"] = projection.project_pytree(
          example_grads, key, projection_dim) * weights[:, None]
      num_test = jax.tree_util.tree_leaves(test_arrays)[0].shape[0]
      test_grads = per_example.per_example_grads(
          loss_fn, params, test_arrays, _chunk_size(num_test, grad_chunk_size))
      extras["test_grads"] = projection.project_pytree(test_grads, key, projection_dim)
    else:
      def mean_loss(p):
        example_losses = loss_fn(p, batch)
        return jnp.sum(example_losses * weights) / num_valid, example_losses
      (_, example_losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    extras["train_loss"] = jnp.sum(example_losses * weights) / num_valid
    extras["learning_rate"] = jnp.asarray(schedule(step), jnp.float32)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    test_losses = loss_fn(params, test_arrays)
    return params, opt_state, test_losses, extras

  return train_step
