"""Tasks: what is differentiated, for training examples and for queries.

A Task turns `(params, batch)` into one loss per example. `params` is whatever the
task's `apply_fn` takes as its first argument: the variables dict `{"params": ...}`
for `model.apply`, or the raw parameter tree for `lambda p, x: model.apply({"params":
p}, x)`. Both are accepted; gradients are taken with respect to all of it (so pass
only trainable collections if the variables dict also holds e.g. `batch_stats`).
Boxed parameters (`nn.with_logical_partitioning`) are unboxed by the kernels.

An `nnx.Module` can stand in for `apply_fn`: `ClassificationTask(module)`. The
task then takes `params = nnx.state(module, nnx.Param)` (or the module itself) and
applies `nnx.merge(graphdef, params, rest)(inputs)`, where `graphdef` and the
non-parameter state `rest` (batch statistics, RNG counters, ...) are snapshotted
when the task is made. Such tasks compare equal only to themselves.
"""

import dataclasses
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import losses
from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _layers
from simfluence_jax.influence._nnx import nnx  # flax.nnx once the user imports it

Batch = Mapping[str, Any]
ApplyFn = Callable[[Any, jax.Array], jax.Array]


@runtime_checkable
class Task(Protocol):
  """What the influence kernels need from a model and its data.

  Write your own by implementing these three methods (a frozen dataclass is the
  easiest way: tasks are used as static arguments of `jax.jit`, so they must be
  hashable). A Task may also define `token_mask(batch) -> float[B, L] | None`: the
  token positions that count in the EK-FAC covariances of sequence models, and
  `validate(params, batches, argument)`: raise ValueError on batches it cannot
  score (the built-in tasks check labels / targets against the logits' last
  dimension), called by every kernel before it computes anything.
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


class _NNXApply:
  """`(params, inputs) -> module(inputs)` for a snapshot of an NNX module."""

  def __init__(self, module):
    self.graphdef, params, self.rest = nnx.split(module, nnx.Param, ...)
    self.params_structure = jax.tree_util.tree_structure(params)

  def __call__(self, params, inputs):
    if isinstance(params, nnx.Module):
      params = nnx.state(params, nnx.Param)
    return nnx.merge(self.graphdef, params, self.rest)(inputs)


class _ApplyTask:
  """Shared by the built-in tasks: `apply_fn` may be an `nnx.Module`."""

  def __post_init__(self):
    if isinstance(self.apply_fn, nnx.Module):
      object.__setattr__(self, "_nnx_apply", _NNXApply(self.apply_fn))

  def _apply(self, params, inputs):
    nnx_apply = self.__dict__.get("_nnx_apply")
    return (self.apply_fn if nnx_apply is None else nnx_apply)(params, inputs)

  def _key(self):
    # An NNX task holds a snapshot of the module's state: equal only to itself.
    nnx_apply = self.__dict__.get("_nnx_apply")
    return (self.apply_fn,) if nnx_apply is None else (id(nnx_apply),)

  def __eq__(self, other):
    return type(self) is type(other) and self._key() == other._key()

  def __hash__(self):
    return hash((type(self).__name__,) + self._key())

  def check_params(self, params, argument: str = "params") -> None:
    """For an NNX task: params must be shaped like nnx.state(module, nnx.Param)."""
    nnx_apply = self.__dict__.get("_nnx_apply")
    if nnx_apply is None or isinstance(params, nnx.Module):
      return
    variables = jax.tree_util.tree_leaves(
        params, is_leaf=lambda x: isinstance(x, nnx.Variable))
    others = sorted({type(v).__name__ for v in variables
                     if not isinstance(v, nnx.Param)})
    if (others or not isinstance(params, nnx.State)
        or jax.tree_util.tree_structure(params) != nnx_apply.params_structure):
      raise ValueError(
          f"{argument}: an NNX task takes nnx.state(module, nnx.Param) of its module "
          f"(or the module), got a {type(params).__name__} with "
          f"{len(variables)} leaves" + (f" holding {others}" if others else "")
          + " that does not match it.")

  def _num_outputs(self, params, inputs) -> int:
    """The logits' last dimension (one trace per task and shapes, then cached)."""
    first = _layers.example_shapes(inputs)
    key = (self, _checks.tree_signature(params), _checks.tree_signature(first))
    try:
      return _NUM_OUTPUTS[key]
    except TypeError:
      return int(jax.eval_shape(self._apply, params, first).shape[-1])
    except KeyError:
      pass
    if len(_NUM_OUTPUTS) > 256:
      _NUM_OUTPUTS.clear()
    _NUM_OUTPUTS[key] = int(jax.eval_shape(self._apply, params, first).shape[-1])
    return _NUM_OUTPUTS[key]


_NUM_OUTPUTS = {}


def _check_ids(batch, key: str, limit: int, what: str, argument: str,
               counts: Optional[np.ndarray] = None) -> None:
  """Integer ids the loss reads rightly (`losses.misread_class_ids`): in [0, limit)
  where they count (`counts`, e.g. LM targets under mask > 0), in [-limit, limit)
  elsewhere (padding, e.g. -100, that does not change the loss)."""
  if key not in batch:
    raise ValueError(f"{argument}: batch has no {key!r} (keys {sorted(batch)}).")
  ids = np.asarray(sharding_lib.to_host(batch[key]))
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{key}: expected integer ids in {argument}, got dtype "
                     f"{ids.dtype}.")
  counted_bad, padding_bad = losses.misread_class_ids(ids, limit, counts)
  if counted_bad.any():
    counted = ids if counts is None else ids[counts]
    raise ValueError(f"{key}: values must be in [0, {limit}) ({what})"
                     + ("" if counts is None else " where the mask is > 0")
                     + f", got values in [{counted.min()}, {counted.max()}] in "
                     f"{argument}.")
  if padding_bad.any():
    raise ValueError(f"{key}: values must be in [-{limit}, {limit}) even where the "
                     f"mask is 0 (outside, the loss reads NaN), got values in "
                     f"[{ids.min()}, {ids.max()}] in {argument}.")


@dataclasses.dataclass(frozen=True, eq=False)
class ClassificationTask(_ApplyTask):
  """Softmax cross-entropy per example.

  Attributes:
    apply_fn: `(params, inputs) -> float[B, C]` logits, e.g. `model.apply`, or an
      `nnx.Module` (see the module docstring).

  The batch is `{"inputs": [B, ...], "labels": int[B]}`.
  """

  apply_fn: ApplyFn

  def loss(self, params, batch: Batch) -> jax.Array:
    """float32[B] cross-entropy of the batch labels."""
    return losses.classification_loss(self._apply(params, batch["inputs"]),
                                      batch["labels"])

  def validate(self, params, batches, argument: str) -> None:
    """Raises ValueError unless every batch's labels are in [0, C)."""
    self.check_params(params)
    num_classes = self._num_outputs(params, batches[0]["inputs"])
    for i, batch in enumerate(batches):
      where = argument if len(batches) == 1 else f"{argument}[{i}]"
      _check_ids(batch, "labels", num_classes, "the logits' last dimension", where)

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Labels drawn from the model's softmax (no gradient flows through them)."""
    logits = jax.lax.stop_gradient(self._apply(params, batch["inputs"]))
    labels = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "labels": labels.astype(jnp.asarray(batch["labels"]).dtype)}


@dataclasses.dataclass(frozen=True, eq=False)
class LanguageModelingTask(_ApplyTask):
  """Next-token cross-entropy summed over the masked tokens of each sequence.

  Attributes:
    apply_fn: `(params, inputs) -> float[B, L, V]` logits, or an `nnx.Module`.

  The batch is `{"inputs": int[B, L], "targets": int[B, L], "mask": float[B, L]}`.
  """

  apply_fn: ApplyFn

  def loss(self, params, batch: Batch) -> jax.Array:
    """float32[B] summed token cross-entropy."""
    return losses.language_modeling_loss(self._apply(params, batch["inputs"]),
                                         batch["targets"], batch["mask"])

  def validate(self, params, batches, argument: str) -> None:
    """Raises ValueError unless mask matches targets and is finite and ≥ 0,
    targets are in [0, V) where the mask is > 0, and integer input ids are ≥ 0."""
    self.check_params(params)
    vocab = self._num_outputs(params, batches[0]["inputs"])
    for i, batch in enumerate(batches):
      where = argument if len(batches) == 1 else f"{argument}[{i}]"
      if "targets" not in batch:
        raise ValueError(f"{where}: batch has no 'targets' (keys {sorted(batch)}).")
      if "mask" not in batch or np.shape(batch["mask"]) != np.shape(batch["targets"]):
        raise ValueError(f"mask: expected the shape of targets "
                         f"{np.shape(batch['targets'])} in {where}, got "
                         f"{np.shape(batch.get('mask'))}.")
      mask = np.asarray(sharding_lib.to_host(batch["mask"]), np.float64)
      if not np.all(np.isfinite(mask)):
        raise ValueError(f"mask: values must be finite (token weights ≥ 0) in {where}, "
                         f"got NaN or inf.")
      if mask.size and mask.min() < 0:
        raise ValueError(f"mask: values must be ≥ 0 (token weights) in {where}, got "
                         f"values in [{mask.min()}, {mask.max()}].")
      _check_ids(batch, "targets", vocab, "the logits' last dimension", where,
                 counts=mask > 0)
      inputs = np.asarray(sharding_lib.to_host(batch["inputs"]))
      if np.issubdtype(inputs.dtype, np.integer) and inputs.size and inputs.min() < 0:
        raise ValueError(f"inputs: token ids must be ≥ 0 in {where}, got "
                         f"{inputs.min()} (an embedding lookup would wrap it).")

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Every target token drawn from the model's predictive distribution."""
    logits = jax.lax.stop_gradient(self._apply(params, batch["inputs"]))
    targets = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "targets": targets.astype(jnp.asarray(batch["targets"]).dtype)}

  def token_mask(self, batch: Batch) -> jax.Array:
    """float32[B, L]: padding positions do not count in the covariances."""
    return jnp.asarray(batch["mask"], jnp.float32)


def validate(task, params, batches, argument: str) -> None:
  """Checks batches before any kernel runs (never a silent wrong answer).

  Every batch must hold at least one example, with all leaves agreeing on the
  number; a task that defines `validate(params, batches, argument)` (the built-in
  ones: labels / targets within the logits' last dimension) checks the rest.
  """
  for i, batch in enumerate(batches):
    where = argument if len(batches) == 1 else f"{argument}[{i}]"
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
      raise ValueError(f"{where}: the batch has no arrays.")
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
      raise ValueError(f"{where}: every array needs the same leading example axis, "
                       f"got leading sizes {sorted(s for s in sizes if s is not None)}"
                       + (" and scalars" if None in sizes else "") + ".")
    if sizes == {0}:
      raise ValueError(f"{where}: the batch is empty (0 examples).")
  check = getattr(task, "validate", None)
  if check is not None:
    check(params, batches, argument)
