"""Tasks: what is differentiated, for training examples and for queries.

A Task turns `(params, batch)` into one loss per example. `params` is whatever the
task's `apply_fn` takes as its first argument: the variables dict `{"params": ...}`
for `model.apply`, or the raw parameter tree for `lambda p, x: model.apply({"params":
p}, x)`. Both are accepted; gradients are taken with respect to all of it (so pass
only trainable collections if the variables dict also holds e.g. `batch_stats`).
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from simfluence_jax import losses

Batch = Mapping[str, Any]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


@runtime_checkable
class Task(Protocol):
  """What the influence kernels need from a model and its data.

  Write your own by implementing these three methods (a frozen dataclass is the
  easiest way: tasks are used as static arguments of `jax.jit`, so they must be
  hashable). A Task may also define `token_mask(batch) -> float[B, L] | None`: the
  token positions that count in the EK-FAC covariances of sequence models.
  """

  def loss(self, params, batch: Batch) -> jax.Array:
    """Per-example training loss, float32[B]; its gradient is the train gradient."""

  def measurement(self, params, batch: Batch) -> jax.Array:
    """Per-example query measurement, float32[B] (usually the loss)."""

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """`batch` with its labels replaced by samples from the model (true Fisher)."""


def token_mask(task, batch: Batch) -> Optional[jax.Array]:
  """The task's `token_mask(batch)` if it defines one, else None."""
  mask_fn = getattr(task, "token_mask", None)
  return None if mask_fn is None else mask_fn(batch)


@dataclasses.dataclass(frozen=True)
class ClassificationTask:
  """Softmax cross-entropy per example.

  Attributes:
    apply_fn: `(params, inputs) -> float[B, C]` logits, e.g. `model.apply`.

  The batch is `{"inputs": [B, ...], "labels": int[B]}`.
  """

  apply_fn: ApplyFn

  def loss(self, params, batch: Batch) -> jax.Array:
    """float32[B] cross-entropy of the batch labels."""
    return losses.classification_loss(self.apply_fn(params, batch["inputs"]),
                                      batch["labels"])

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Labels drawn from the model's softmax (no gradient flows through them)."""
    logits = jax.lax.stop_gradient(self.apply_fn(params, batch["inputs"]))
    labels = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "labels": labels.astype(jnp.asarray(batch["labels"]).dtype)}


@dataclasses.dataclass(frozen=True)
class LanguageModelingTask:
  """Next-token cross-entropy summed over the masked tokens of each sequence.

  Attributes:
    apply_fn: `(params, inputs) -> float[B, L, V]` logits.

  The batch is `{"inputs": int[B, L], "targets": int[B, L], "mask": float[B, L]}`.
  """

  apply_fn: ApplyFn

  def loss(self, params, batch: Batch) -> jax.Array:
    """float32[B] summed token cross-entropy."""
    return losses.language_modeling_loss(self.apply_fn(params, batch["inputs"]),
                                         batch["targets"], batch["mask"])

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Every target token drawn from the model's predictive distribution."""
    logits = jax.lax.stop_gradient(self.apply_fn(params, batch["inputs"]))
    targets = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "targets": targets.astype(jnp.asarray(batch["targets"]).dtype)}

  def token_mask(self, batch: Batch) -> jax.Array:
    """float32[B, L]: padding positions do not count in the covariances."""
    return jnp.asarray(batch["mask"], jnp.float32)
