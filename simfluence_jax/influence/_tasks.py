"""Tasks: what is differentiated, for training examples and for queries.

A Task turns `(params, batch)` into one loss per example. `params` is whatever the
task's `apply_fn` takes as its first argument: the variables dict `{"params": ...}`
for `model.apply`, or the raw parameter tree for `lambda p, x: model.apply({"params":
p}, x)`. Gradients are taken with respect to all of it, so the kernels refuse a
variables dict holding other collections (e.g. `batch_stats`): pass
`{"params": variables["params"]}` and bind the rest in `apply_fn` (`lambda p, x,
s=variables["batch_stats"]: model.apply({**p, "batch_stats": s}, x)`): one task per
set of values. JAX traces a task's loss once and keeps what it closed over, so a task
whose closed-over values changed since its first call is refused
(`check_unchanged`), and EK-FAC factors record the values their loss closed over
(`_ekfac.closed_summary`). Boxed parameters (`nn.with_logical_partitioning`) are
unboxed by the kernels.

An `nnx.Module` can stand in for `apply_fn`: `ClassificationTask(module)`. The
task then takes `params = nnx.state(module, nnx.Param)` (or the module itself) and
applies `nnx.merge(graphdef, params, rest)(inputs)`, where `graphdef` and a copy of
the non-parameter state `rest` (batch statistics, RNG counters, ...) are snapshotted
when the task is made: later updates of the module do not reach the task. Given
the module's current parameters (the module itself, or `nnx.state(module,
nnx.Param)` holding its current arrays) after its non-parameter state or its
static attributes (`train()` / `eval()`) changed, the kernels refuse, naming the
variable: make a new task to score with the module's current state. Such tasks
compare equal only to themselves.

Every kernel checks (`validate`) that the task's loss treats examples
independently: the loss of the first two examples together must equal their
losses alone (train-mode batch norm, or randomness drawn per batch, would make the
scores depend on `chunk_size`).
"""

import collections.abc
import dataclasses
import functools
import weakref
from typing import Any, Callable, Mapping, Optional, Protocol, runtime_checkable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _closures
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
  dimension), called by every kernel before it computes anything, and
  `check_params(params, argument)`: raise ValueError on params it cannot take
  (TracIn calls it for every checkpoint). Every kernel also checks that `loss`
  (`measurement` on the query batch) treats examples independently
  (`check_independent_examples`).
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


def _snapshot_leaf(x):
  # jax arrays are immutable (an NNX update replaces a variable's array): sharing
  # them is a snapshot, without a second copy of large state (frozen weights,
  # caches). numpy arrays can be written in place: those are copied.
  return np.array(x, copy=True) if isinstance(x, np.ndarray) else x


def _host_value(x) -> np.ndarray:
  """A variable's value on the host, PRNG keys as their key data."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(sharding_lib.to_host(x))


def _same_values(left, right) -> bool:
  left, right = jax.tree_util.tree_leaves(left), jax.tree_util.tree_leaves(right)
  if len(left) != len(right):
    return False
  for a, b in zip(left, right):
    if a is b:
      continue
    a, b = _host_value(a), _host_value(b)
    if a.shape != b.shape or a.dtype != b.dtype:
      return False
    if not np.array_equal(a, b, equal_nan=np.issubdtype(a.dtype, np.inexact)):
      return False
  return True


class _NNXApply:
  """`(params, inputs) -> module(inputs)` for a snapshot of an NNX module.

  `rest` is a snapshot of the module's non-parameter state (a pytree of arrays)
  taken when the task is made: new variables holding its arrays (jax arrays are
  immutable; numpy ones are copied). Every call merges fresh variables holding
  it, so neither the module's later updates nor a call that writes state reach it.
  """

  def __init__(self, module):
    self.module = module
    self.graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    self.params_structure = jax.tree_util.tree_structure(params)
    self.rest = jax.tree_util.tree_map(_snapshot_leaf, rest)  # new variables

  def __call__(self, params, inputs):
    if isinstance(params, nnx.Module):
      self.check_current(params, "params")
      params = nnx.state(params, nnx.Param)
    rest = jax.tree_util.tree_map(lambda x: x, self.rest)  # fresh variables
    return nnx.merge(self.graphdef, params, rest)(inputs)

  def holds_current_params(self, params) -> bool:
    """Whether `params` holds the very arrays of the module's current parameters."""
    current = jax.tree_util.tree_leaves(nnx.state(self.module, nnx.Param))
    given = jax.tree_util.tree_leaves(params)
    return bool(current) and len(current) == len(given) and all(
        a is b for a, b in zip(current, given))

  def check_current(self, module, argument: str) -> None:
    """Raises ValueError if `module` differs from the snapshot in anything but its
    parameter values: static attributes (train/eval mode) or non-parameter state."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    if (graphdef != self.graphdef
        or jax.tree_util.tree_structure(params) != self.params_structure):
      raise ValueError(
          f"{argument}: the module's structure or static attributes (e.g. its "
          f"train()/eval() mode) changed since the task was made, and the task "
          f"applies the module as it was then: make a new task of the module.")
    now, then = dict(nnx.to_flat_state(rest)), dict(nnx.to_flat_state(self.rest))
    for path in sorted(set(now) | set(then), key=str):
      if path in now and path in then and _same_values(now[path], then[path]):
        continue
      if isinstance(now.get(path, then.get(path)), nnx.RngState):
        # RNG keys and counts change no loss the kernels accept (a loss that draws
        # random numbers is refused): clones of a module trained with dropout
        # differ in them only (review h37).
        continue
      name = ".".join(map(str, path))
      kind = type(now.get(path, then.get(path))).__name__
      raise ValueError(
          f"{argument}: the module's {name} ({kind}) is not the task's copy (the "
          f"module changed since the task was made, or it is another module), and "
          f"the task applies the non-parameter state it copied then: make a task "
          f"of this module to score with its state (one call per checkpoint whose "
          f"state differs).")


class _ApplyTask:
  """Shared by the built-in tasks: `apply_fn` may be an `nnx.Module`."""

  def __post_init__(self):
    if isinstance(self.apply_fn, nnx.Module):
      object.__setattr__(self, "_nnx_apply", _NNXApply(self.apply_fn))
    elif isinstance(self.apply_fn, nn.Module):  # review h38: a flax error at first use
      raise ValueError(f"apply_fn: a linen {type(self.apply_fn).__name__} module; pass "
                       f"its apply (model.apply; an NNX module is taken whole).")
    elif not callable(self.apply_fn):
      raise ValueError(f"apply_fn: expected a function (model.apply) or an NNX "
                       f"module, got {type(self.apply_fn).__name__}.")

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
    """For an NNX task: params must be shaped like nnx.state(module, nnx.Param),
    and if they are the module (or its current parameter arrays), the module's
    non-parameter state must still be the task's snapshot."""
    nnx_apply = self.__dict__.get("_nnx_apply")
    if nnx_apply is None:
      return
    if isinstance(params, nnx.Module):
      nnx_apply.check_current(params, argument)
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
    if nnx_apply.holds_current_params(params):
      nnx_apply.check_current(nnx_apply.module, argument)

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


def _check_input_ids(batch, where: str) -> None:
  """Integer inputs (every integer leaf of `batch["inputs"]`) must be ≥ 0."""
  for leaf in jax.tree_util.tree_leaves(batch.get("inputs")):
    dtype = getattr(leaf, "dtype", None)
    if dtype is None:
      dtype = np.asarray(leaf).dtype
    if not np.issubdtype(dtype, np.integer):
      continue
    ids = np.asarray(sharding_lib.to_host(leaf))
    if ids.size and ids.min() < 0:
      raise ValueError(f"inputs: token ids must be ≥ 0 in {where}, got "
                       f"{ids.min()} (an embedding lookup would wrap it).")


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
    """Raises ValueError unless every batch's labels are in [0, C) and integer
    inputs are ≥ 0."""
    self.check_params(params)
    _check_dict_batches(batches, argument, ("inputs", "labels"))
    num_classes = self._num_outputs(params, batches[0]["inputs"])
    for i, batch in enumerate(batches):
      where = argument if len(batches) == 1 else f"{argument}[{i}]"
      _check_ids(batch, "labels", num_classes, "the logits' last dimension", where)
      _check_input_ids(batch, where)

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Labels drawn from the model's softmax (no gradient flows through them)."""
    logits = jax.lax.stop_gradient(self._apply(params, batch["inputs"]))
    labels = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "labels": labels.astype(jnp.asarray(batch["labels"]).dtype)}


def _check_dict_batches(batches, argument: str, keys) -> None:
  """Raises ValueError unless every batch is a mapping holding `keys` (a list of
  batches passed as one batch, or a tuple, reached `batch["inputs"]` raw)."""
  for i, batch in enumerate(batches):
    where = argument if len(batches) == 1 else f"{argument}[{i}]"
    if not isinstance(batch, collections.abc.Mapping):
      raise ValueError(f"{where}: expected one batch, a dict with keys {list(keys)}, "
                       f"got a {type(batch).__name__}.")
    missing = [k for k in keys if k not in batch]
    if missing:
      raise ValueError(f"{where}: batch has no {missing} (keys {sorted(batch)}).")


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
    _check_dict_batches(batches, argument, ("inputs", "targets", "mask"))
    vocab = self._num_outputs(params, batches[0]["inputs"])
    for i, batch in enumerate(batches):
      where = argument if len(batches) == 1 else f"{argument}[{i}]"
      if np.shape(batch["mask"]) != np.shape(batch["targets"]):
        raise ValueError(f"mask: expected the shape of targets "
                         f"{np.shape(batch['targets'])} in {where}, got "
                         f"{np.shape(batch['mask'])}.")
      mask = np.asarray(sharding_lib.to_host(batch["mask"]), np.float64)
      if not np.all(np.isfinite(mask)):
        raise ValueError(f"mask: values must be finite (token weights ≥ 0) in {where}, "
                         f"got NaN or inf.")
      if mask.size and mask.min() < 0:
        raise ValueError(f"mask: values must be ≥ 0 (token weights) in {where}, got "
                         f"values in [{mask.min()}, {mask.max()}].")
      _check_ids(batch, "targets", vocab, "the logits' last dimension", where,
                 counts=mask > 0)
      _check_input_ids(batch, where)

  def measurement(self, params, batch: Batch) -> jax.Array:
    """float32[B]: the loss."""
    return self.loss(params, batch)

  def sample_targets(self, params, batch: Batch, rng: jax.Array) -> Batch:
    """Every target token drawn from the model's predictive distribution."""
    logits = jax.lax.stop_gradient(self._apply(params, batch["inputs"]))
    targets = jax.random.categorical(rng, logits.astype(jnp.float32), axis=-1)
    return {**batch, "targets": targets.astype(jnp.asarray(batch["targets"]).dtype)}

  def token_mask(self, batch: Batch) -> jax.Array:
    """float32[B, L]: the loss mask. In the covariances, a position it zeroes
    still counts where it carries gradient (a prompt token later positions read),
    so only padding is left out (`capture_per_example`), as Kronfluence's
    attention mask does."""
    return jnp.asarray(batch["mask"], jnp.float32)


def check_collections(params, argument: str = "params") -> None:
  """Refuses a linen variables dict holding collections besides "params".

  The kernels differentiate every leaf of `params`; BatchNorm's `batch_stats` (or
  any other collection) is not trained by gradient steps, and its gradients would
  be added to the scores.
  """
  if (not isinstance(params, collections.abc.Mapping)
      or isinstance(params, nnx.State) or "params" not in params or len(params) < 2):
    return
  others = sorted(str(key) for key in params if key != "params")
  raise ValueError(
      f"{argument}: a linen variables dict with the collection(s) {others} besides "
      f"'params': the kernels would differentiate them too; pass "
      f"{{'params': variables['params']}} and bind the others in apply_fn "
      f"(e.g. lambda p, x, s=variables[{others[0]!r}]: model.apply("
      f"{{**p, {others[0]!r}: s}}, x)).")


def check_params(task, params, argument: str = "params") -> None:
  """The task is a task, then `check_collections`, then the task's own
  `check_params(params, argument)` if it defines one (an NNX task: the module's
  state; see the module docstring)."""
  if not callable(getattr(task, "loss", None)):  # review h38: arguments swapped
    raise ValueError(f"task: expected a Task (e.g. ClassificationTask(model.apply)) "
                     f"as the first argument, got {type(task).__name__}.")
  check_collections(params, argument)
  check = getattr(task, "check_params", None)
  if check is not None:
    check(params, argument)


def _first_examples(batches, count: int):
  """The first `count` examples of `batches` (fewer if they hold fewer) as one host
  batch, or None for fewer than 2; from the batches whose examples have the first
  batch's shapes (sequences of another length do not concatenate)."""
  pieces, have, shapes = [], 0, None
  for batch in batches:
    example = jax.tree_util.tree_map(lambda x: np.shape(x)[1:], batch)
    shapes = example if shapes is None else shapes
    if example != shapes:
      continue
    take = min(count - have, int(np.shape(jax.tree_util.tree_leaves(batch)[0])[0]))
    pieces.append(sharding_lib.to_host(
        jax.tree_util.tree_map(lambda x, n=take: x[:n], batch)))
    have += take
    if have == count:
      break
  if have < 2:
    return None
  return jax.tree_util.tree_map(lambda *xs: np.concatenate([np.asarray(x) for x in xs]),
                                *pieces)


# Examples among which the independence check picks example 0's partner.
_PARTNER_CANDIDATES = 16


def _pair(batches):
  """(example 0 and its partner as one host batch of 2, the partner's index), or
  None for fewer than 2 examples.

  The partner is the one among the first 16 examples whose leaves differ from
  example 0's in the most per-example sums and nonzero counts (the first on
  ties). Two examples alike in such statistics hide an interaction through them:
  a loss divided by the batch's total mask weight is each example's own where
  their masks count the same tokens (review h29: accepted, then 25% off with
  another chunk_size).
  """
  first = _first_examples(batches, _PARTNER_CANDIDATES)
  if first is None:
    return None
  leaves = [np.asarray(x) for x in jax.tree_util.tree_leaves(first)]
  num = leaves[0].shape[0]
  differing = np.zeros(num - 1, np.int64)
  for leaf in leaves:
    flat = leaf.reshape(num, -1)
    if not (np.issubdtype(flat.dtype, np.number) or flat.dtype == np.bool_):
      continue
    for stat in (flat.astype(np.float64).sum(1), np.count_nonzero(flat, axis=1)):
      differing += stat[1:] != stat[0]
  partner = 1 + int(np.argmax(differing))
  return jax.tree_util.tree_map(lambda x: x[np.array([0, partner])], first), partner


# XLA options for the independence check's one small program (`_together_and_alone`).
_CHECK_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0,
                           "xla_llvm_disable_expensive_passes": True}


def _together_and_alone(task, params, items):
  """For each `(which, argument, pair)` of `items`: `task.<which>` (loss or
  measurement) of the 2-example `pair`, and of each example alone (batches of one),
  as (float[2], float[2]), and the check's `_rounding_tolerance`. One jitted program for every item's three passes (the
  train and query checks of one kernel call compile once: 0.10 s, against 0.23 s as
  two programs and a concatenation for a 64-256-256-10 MLP on the 2-core CPU, where
  a one-shot TracIn call's first call takes 0.85 s besides). Run eagerly, each op
  compiled a program of its own (a Transformer's forward: ~100 compilations), 85 s
  against 76-79 s on 8 influence test modules with -n 2 (2026-12-06, the suite's XLA
  flags; the check off: 69 s).

  Raises:
    ValueError: naming the item's argument, where its function fails on the pair
      or returns other than one value per example.
  """

  problems = []  # raised after tracing, outside JAX's frames (a one-line message)

  def run(params, pairs):
    out = []
    for (which, argument, _), pair in zip(items, pairs):
      fn = getattr(task, which)
      try:
        together = fn(params, pair)
        alone = [fn(params, jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], pair))
                 for i in range(2)]
      except ValueError as error:
        problems.append(f"{argument}: {error}.")
        together, alone = jnp.zeros(2), [jnp.zeros(1)] * 2
      except Exception as error:  # pylint: disable=broad-except  # the user's model
        problems.append(f"{argument}: the task's {which} fails on it "
                        f"({_closures.error_line(error)}).")
        together, alone = jnp.zeros(2), [jnp.zeros(1)] * 2
      if jnp.shape(together) != (2,) or any(jnp.shape(a) != (1,) for a in alone):
        problems.append(f"{argument}: the task's {which} returned shapes "
                        f"{jnp.shape(together)} and {jnp.shape(alone[0])} for 2 and "
                        "1 examples (one value per example expected).")
        together, alone = jnp.zeros(2), [jnp.zeros(1)] * 2
      out.append((together, jnp.concatenate(alone)))
    return out
  pairs = [pair for _, _, pair in items]
  # The params' placements too: a program compiled for host params refused them
  # split over a mesh or on another device (review h34).
  placement = tuple(getattr(x, "sharding", None)
                    for x in jax.tree_util.tree_leaves(params))
  key = (tuple((which, _checks.tree_signature(params), _checks.tree_signature(pair))
               for which, _, pair in items), placement)
  try:
    programs = _CHECK_PROGRAMS.setdefault(task, {})
  except TypeError:  # a task without weak references or hash: compiled every time
    programs = {}
  if key not in programs:
    traced = jax.jit(run).trace(params, pairs)
    if problems:
      raise ValueError(problems[0])
    if _random_draws(traced.jaxpr.jaxpr):
      _check_draws(task, params, items)
    lowered = traced.lower()
    tolerance = _rounding_tolerance(traced.jaxpr.jaxpr)
    try:
      # A check of tiny passes: compiled without XLA's costly passes (0.10 against
      # 0.15 s for a 64-256-256-10 MLP on this 2-core CPU).
      programs[key] = (lowered.compile(compiler_options=_CHECK_COMPILER_OPTIONS),
                       tolerance)
    except Exception:  # pylint: disable=broad-except  # a backend without the options
      programs[key] = (lowered.compile(), tolerance)
  program, tolerance = programs[key]
  return program(params, pairs), tolerance


# Primitives that draw random bits (`_check_draws`). The pair check alone missed
# dropout at rate 0.01 on 6 of 10 keys (the partner's row of the mask was often all
# ones; row 0's is the same at batch sizes 1 and 2), and TracIn then moved 2.5-16%
# with chunk_size (review h33).
_RANDOM_PRIMITIVES = ("random_bits", "threefry2x32", "rng_bit_generator", "rng_uniform")


def _random_draws(jaxpr) -> list:
  """(primitive name, shape drawn) of every random draw from one key (not a batch
  of keys) in `jaxpr` and the jaxprs it calls."""
  return [(eqn.primitive.name, tuple(eqn.outvars[0].aval.shape))
          for eqn, _ in _closures.equations(jaxpr)
          if eqn.primitive.name in _RANDOM_PRIMITIVES
          and not getattr(eqn.invars[0].aval, "shape", ())[:1]]


def _check_draws(task, params, items) -> None:
  """Refuses an item whose function draws random numbers from one key in the shape
  of its batch (dropout with an rng): the draws of 2 examples and of 1 differ in
  shape. Draws of a fixed shape (a fixed random projection) or from per-example keys
  (`fold_in(key, example id)`, vmapped) do not tie an example to its batch, and were
  refused as well at first (review h37); the pair check covers them."""
  for which, argument, pair in items:
    fn = getattr(task, which)
    two, one = (sorted(_random_draws(jax.make_jaxpr(fn)(params, batch).jaxpr))
                for batch in (pair, jax.tree_util.tree_map(lambda x: x[:1], pair)))
    if two != one:
      name, shape = next(iter(set(two) - set(one) or set(one) - set(two)))
      raise ValueError(
          f"{argument}: the task's {which} draws random numbers in its batch's "
          f"shape ({name} of {shape} for 2 examples; e.g. dropout with an rng), so "
          f"an example's value depends on its batch and scores on chunk_size, even "
          f"where two examples happen to agree; apply the model deterministically "
          f"(deterministic=True, or module.eval()).")


# task -> {((which, params and pair signatures) per item, params' placement): the
# check's compiled program}: compiled once per task, shapes and placement, run on
# every call's examples (an interaction may show only in some examples). Weakly
# keyed, so the cache never keeps a task (and the model it holds) alive.
_CHECK_PROGRAMS = weakref.WeakKeyDictionary()


# Operations whose rounding can differ between a batch of 2 and of 1 (the order of
# a reduction); elementwise operations round each element alike in both, but a
# difference rounded to a narrower float after them (`convert_element_type`, e.g.
# float32 accumulation cast back to bfloat16) is that float's (review h40).
_REDUCING_PRIMITIVES = ("dot_general", "conv_general_dilated", "reduce_sum", "cumsum")


def _rounding_tolerance(jaxpr) -> float:
  """Relative tolerance for the same loss computed on batches of 2 and 1: float
  rounding (reduction orders) at the lowest float precision that the traced check's
  reductions (`_REDUCING_PRIMITIVES`, in `jaxpr` and the jaxprs it calls) compute
  in; float32's without any. Not that of the params' and inputs' dtypes: bfloat16
  inputs to a float32 model are promoted, and their 3.1% let examples coupled in the
  batch through (review h39: TracIn then moved 3.1%, single scores 62%, with
  chunk_size)."""
  eps = float(np.finfo(np.float32).eps)
  for eqn, _ in _closures.equations(jaxpr):
    if eqn.primitive.name in _REDUCING_PRIMITIVES + ("convert_element_type",):
      dtype = eqn.outvars[0].aval.dtype
      if jnp.issubdtype(dtype, jnp.floating):
        eps = max(eps, float(jnp.finfo(dtype).eps))
  return max(1e-4, 4 * eps)


def check_independent_examples(task, params, named_batches) -> None:
  """Raises ValueError if the task's loss of an example depends on the other
  examples of its batch: example 0 together with a partner vs each alone (`_pair`:
  the one of the first 16 unlike example 0 in the most leaves' statistics).

  `named_batches` is a list of `(batches, argument)`: the batches a kernel call
  takes and the argument's name for messages, checked in order. The query batch
  (`argument` "query_batch") is checked with the task's measurement.

  The kernels compute per-example quantities from batched passes (EK-FAC's probes)
  or per-example ones (TracIn): with interacting examples (train-mode batch norm,
  randomness drawn per batch, a loss divided by the batch's token count) the scores
  would depend on `chunk_size`. Costs a forward pass of 2 examples and two of 1 per
  argument, on every call, in one program for all of them, compiled once per task
  and shapes.
  """
  items, partners = [], []
  for batches, argument in named_batches:
    picked = _pair(batches)
    if picked is not None:
      items.append(("measurement" if argument == "query_batch" else "loss", argument,
                    picked[0]))
      partners.append(picked[1])
  if not items:
    return
  results, tolerance = _together_and_alone(task, params, items)
  results = sharding_lib.to_host(results)
  for (which, argument, _), partner, (together, alone) in zip(items, partners,
                                                              results):
    together, alone = (np.asarray(x, np.float64) for x in (together, alone))
    if not np.allclose(together, alone, rtol=tolerance, atol=tolerance,
                       equal_nan=True):
      raise ValueError(
          f"{argument}: examples interact in the batch (e.g. train-mode batch norm, "
          f"randomness drawn per batch, or a loss divided by the batch's token "
          f"count): the {which} of examples 0 and {partner} is "
          f"{np.array2string(together, precision=6)} together and "
          f"{np.array2string(alone, precision=6)} each alone, so scores would "
          f"depend on chunk_size; apply the model in eval mode and compute each "
          f"example's loss from that example alone.")


def _is_number_list(x) -> bool:
  """A non-empty Python list or tuple of numbers (or of such lists)."""
  return isinstance(x, (list, tuple)) and bool(x) and all(
      isinstance(e, (int, float, complex, np.number)) or _is_number_list(e)
      for e in x)


def validate(task, params, named_batches) -> None:
  """Checks a kernel call's batches before any kernel runs (never a silent wrong
  answer).

  `named_batches` is a list of `(batches, argument)`: each argument's list of
  batches and its name for messages (e.g. `[(batches, "train_batches"),
  ([query_batch], "query_batch")]`). Every batch must hold at least one example,
  with all leaves agreeing on the number; `params` must not be a linen variables
  dict with collections besides "params" (`check_collections`); a task that
  defines `validate(params, batches, argument)` (the built-in ones: labels /
  targets within the logits' last dimension) checks the rest; and the task's loss
  must treat examples independently (`check_independent_examples`, one compiled
  program for all the arguments).
  """
  for batches, argument in named_batches:
    for i, batch in enumerate(batches):
      where = argument if len(batches) == 1 else f"{argument}[{i}]"
      lists = [path for path, x in jax.tree_util.tree_flatten_with_path(
          batch, is_leaf=_is_number_list)[0] if _is_number_list(x)]
      if lists:  # review h38: their numbers were reported as scalars
        raise ValueError(f"{where}: {jax.tree_util.keystr(lists[0]) or 'the batch'} "
                         f"is a Python list; pass arrays (np.asarray) whose leading "
                         f"axis is the examples.")
      leaves = jax.tree_util.tree_leaves(batch)
      if not leaves:
        raise ValueError(f"{where}: the batch has no arrays.")
      sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
      if None in sizes or len(sizes) != 1:
        swapped = isinstance(batch, collections.abc.Mapping) and "params" in batch
        raise ValueError(f"{where}: every array needs the same leading example "
                         "axis, got leading sizes "
                         f"{sorted(s for s in sizes if s is not None)}"
                         + (" and scalars" if None in sizes else "")
                         + (" (a params tree: the arguments are (task, params, "
                            "batches))" if swapped else "") + ".")
      if sizes == {0}:
        raise ValueError(f"{where}: the batch is empty (0 examples).")
  check_collections(params)
  check = getattr(task, "validate", None)
  for batches, argument in named_batches:
    if check is not None:
      try:
        check(params, batches, argument)
      except ValueError:
        raise
      except Exception as error:  # pylint: disable=broad-except  # the user's model
        raise ValueError(f"{argument}: the task's model fails on it "
                         f"({_closures.error_line(error)}).") from error
  check_independent_examples(task, params, named_batches)
  check_unchanged(task, params, named_batches)


def check_unchanged(task, params, named_batches) -> None:
  """Refuses a task whose loss (measurement for the query batch), traced anew on one
  example of each argument's batches, computes other operations or reads other
  closed-over values than at the task's first call with these shapes
  (`_closures.check_unchanged`): the kernels compiled for the task (this package's
  caches and JAX's, both keyed by the task) would still use the old values (review
  h38: a linen task closing over `batch_stats`, reused across checkpoints, scored
  TracIn 84% off; h40: a measurement's closure, and a query of the old shapes).
  Traced on the params' shapes and dtypes alone (a weakly typed param and its
  trained value trace alike). Each shape among an argument's batches is checked
  (the kernels compile a program per shape), and a model failing on one is one line
  naming that batch. Skipped while nothing the function reads changed since the
  last check (`_closures.memoized`)."""
  shapes = _closures.abstract(params)
  for batches, argument in named_batches:
    which = "measurement" if argument == "query_batch" else "loss"
    examples = {}  # signature -> (position, one example), the first of each shape
    for i, batch in enumerate(batches):
      example = _closures.one_example(batch)
      examples.setdefault(_checks.tree_signature(example), (i, example))
    key = (which, _checks.tree_signature(shapes), tuple(examples))
    _closures.memoized(task, key, getattr(task, which), functools.partial(
        _trace_and_compare, task, which, argument, shapes, list(examples.values())))


def _trace_and_compare(task, which, argument, shapes, examples) -> None:
  """`check_unchanged` for one argument: one example of each of its batches' shapes
  traced (a model failing on one is one line naming that batch) and compared with
  the task's first call at those shapes: every shape the kernels compile for is
  checked, not only the first batch's (review h42: a later batch's sequence length,
  compiled at the first call and never recorded, scored 0.98 off after a change)."""
  for i, example in examples:
    where = argument if i == 0 else f"{argument}[{i}]"
    try:
      closed = _closures.trace(getattr(task, which), shapes, example)
    except Exception as error:  # pylint: disable=broad-except  # the user's model
      raise ValueError(f"{where}: the task's {which} fails on its first example "
                       f"({_closures.error_line(error)}).") from error
    _closures.check_unchanged(
        task, closed, {which: (shapes, example)},
        f"task: its {which} computes something other than at this task's first "
        "call with these shapes: a value it reads from outside its arguments "
        "changed (e.g. the batch_stats its apply_fn closes over, or a global), and "
        "what JAX compiled for this task would still use the old one; make a new "
        "task for the new value, binding it (apply_fn=lambda p, x, s=stats: ...).")
