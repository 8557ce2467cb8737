"""TracIn-CP (Pruthi et al., 2020): learning-rate weighted gradient dot products.

`score[q, i] = Σ_k η_k ⟨∇m_q(θ_k), ∇ℓ_i(θ_k)⟩` over checkpoints θ_k; positive = a
gradient step on train example i lowers the query's measurement. Gradients are taken
with respect to every leaf of the checkpoint pytrees.

Exact scores use factored inner products where they are cheaper: the gradient of a
layer with tokens is `G = Σ_t g_t a_tᵀ`, so `⟨G_q, G_i⟩ = Σ_{s,t} (g_qs·g_it)(a_qs·a_it)`
costs S·T·(I+O) per pair instead of I·O, and per-example weight gradients are
never formed. Each layer's `CurvatureBlock` picks the cheaper form from the shapes
alone. Leaves no block covers (LayerNorm scales, biases of unsupported modules, ...)
get ordinary per-example gradients of those leaves only, from the same vmapped
backward pass. With `projection_dim`, both sides are instead projected by the same
seeded matrix (`kernels.projection`, a fresh one per checkpoint via
`fold_in(rng, k)`), so the dot products are unbiased estimates.
"""

import collections.abc
import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _closures
from simfluence_jax import kernels
from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _blocks
from simfluence_jax.influence import _common
from simfluence_jax.influence import _layers
from simfluence_jax.influence import _tasks
from simfluence_jax.influence._nnx import nnx  # flax.nnx once the user imports it

DEFAULT_CHUNK_SIZE = 256


# --- projected gradients (projection_dim) ------------------------------------------------


def _projected_grads(fn, params, batch, projection_dim, key):
  grads = kernels.per_example_grads(fn, params, batch)
  return kernels.project_pytree(grads, key, projection_dim)


def _projected_scores(task, projection_dim, params, query, learning_rate, chunk, key):
  train = _projected_grads(task.loss, params, chunk, projection_dim, key)
  return learning_rate * query @ train.T


def _projected_self(task, projection_dim, params, learning_rate, chunk, key):
  train = _projected_grads(task.loss, params, chunk, projection_dim, key)
  return learning_rate * jnp.sum(train * train, axis=1)


@functools.lru_cache(maxsize=64)
def _projected_query_kernel(task, projection_dim):
  return jax.jit(lambda params, batch, key: _projected_grads(
      task.measurement, params, batch, projection_dim, key))


@functools.lru_cache(maxsize=64)
def _projected_kernel(task, projection_dim, mesh):
  return _common.data_parallel(
      functools.partial(_projected_scores, task, projection_dim), mesh,
      in_specs=(None, None, None, 0, None), out_specs=1)


@functools.lru_cache(maxsize=64)
def _projected_self_kernel(task, projection_dim, mesh):
  return _common.data_parallel(
      functools.partial(_projected_self, task, projection_dim), mesh,
      in_specs=(None, None, 0, None), out_specs=0)


# --- exact gradients: blocks (factored or materialised) + other leaves ---------------------


class _Plan:
  """Static split of the parameters: layers with blocks, other leaves, and forms."""

  def __init__(self, layers, other_paths, factored):
    self.layers = layers
    self.other_paths = other_paths
    self.factored = factored  # by layer name: use factored inner products

  def _key(self):
    return (self.layers, self.other_paths, tuple(sorted(self.factored.items())))

  def __eq__(self, other):
    return isinstance(other, _Plan) and self._key() == other._key()

  def __hash__(self):
    return hash(self._key())


def _discover(fn, params, batch):
  try:
    return _layers.find_layers(fn, params, batch, warn=False, kinds="all",
                               strict=False)
  except ValueError:
    return ()  # No usable layer: every leaf gets plain per-example gradients.


_plans = {}


def _cached_plan(task, params, query_batch, train_batch, num_query) -> _Plan:
  """`_make_plan`, reused for the same task and shapes (it traces the model)."""
  try:
    key = (task, _checks.tree_signature(params), _checks.tree_signature(_layers.example_shapes(query_batch)),
           _checks.tree_signature(_layers.example_shapes(train_batch)), num_query)
    hash(key)
  except TypeError:
    return _make_plan(task, params, query_batch, train_batch, num_query)
  if key not in _plans:
    if len(_plans) >= 64:
      _plans.clear()
    _plans[key] = _make_plan(task, params, query_batch, train_batch, num_query)
  return _plans[key]


def _make_plan(task, params, query_batch, train_batch, num_query) -> _Plan:
  """Layers both the loss and the measurement call, the rest as plain leaves."""
  train_layers = _discover(task.loss, params, train_batch)
  query_names = {spec for spec in _discover(task.measurement, params, query_batch)}
  layers = tuple(spec for spec in train_layers if spec in query_names)
  covered = set()
  for spec in layers:
    covered.add(spec.kernel_path)
    if spec.has_bias:
      covered.add(spec.bias_path)
  other = tuple(p for p in _layers._leaf_paths(params) if p not in covered)  # pylint: disable=protected-access
  factored = {}
  if layers:
    tokens = lambda fn, batch: {name: act.output_grads.shape[1] for name, act in
                                jax.eval_shape(lambda p, b: _layers.capture(
                                    fn, p, b, layers)[0], params, batch).items()}
    train_tokens = tokens(task.loss, _layers.example_shapes(train_batch))
    query_tokens = tokens(task.measurement, _layers.example_shapes(query_batch))
    for spec in layers:
      factored[spec.name] = _blocks.block(spec).use_factored(
          num_query, query_tokens[spec.name], train_tokens[spec.name])
  return _Plan(layers, other, factored)


def _flatten_other(grads):
  return [jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32) for g in grads]


def _query_side(task, plan, params, batch):
  activations, _, grads = _layers.capture_per_example(
      task.measurement, params, batch, plan.layers, wrt_paths=plan.other_paths)
  query = {}
  for spec in plan.layers:
    act = activations[spec.name]
    query[spec.name] = (act if plan.factored[spec.name]
                        else _blocks.block(spec).per_example_grads(act))
  return query, _flatten_other(grads)


@functools.lru_cache(maxsize=64)
def _query_kernel(task, plan):
  return jax.jit(functools.partial(_query_side, task, plan))


def _chunk_scores(task, plan, params, query, learning_rate, chunk):
  activations, _, grads = _layers.capture_per_example(
      task.loss, params, chunk, plan.layers, wrt_paths=plan.other_paths)
  layer_query, other_query = query
  total = 0.0
  for spec in plan.layers:
    block, act = _blocks.block(spec), activations[spec.name]
    if plan.factored[spec.name]:
      total = total + block.factored_products(layer_query[spec.name], act)
    else:
      total = total + block.dot(layer_query[spec.name], act)
  for q, t in zip(other_query, _flatten_other(grads)):
    total = total + q @ t.T
  return learning_rate * total


def _chunk_self(task, plan, params, learning_rate, chunk):
  activations, _, grads = _layers.capture_per_example(
      task.loss, params, chunk, plan.layers, wrt_paths=plan.other_paths)
  total = 0.0
  for spec in plan.layers:
    total = total + _blocks.block(spec).self_inner_products(activations[spec.name])
  for t in _flatten_other(grads):
    total = total + jnp.sum(t * t, axis=1)
  return learning_rate * total


@functools.lru_cache(maxsize=64)
def _chunk_kernel(task, plan, mesh):
  return _common.data_parallel(functools.partial(_chunk_scores, task, plan), mesh,
                               in_specs=(None, None, None, 0), out_specs=1)


@functools.lru_cache(maxsize=64)
def _self_kernel(task, plan, mesh):
  return _common.data_parallel(functools.partial(_chunk_self, task, plan), mesh,
                               in_specs=(None, None, 0), out_specs=0)


# --- drivers -----------------------------------------------------------------------------


def _nnx_variables(checkpoint):
  """ids of the nnx.Variable objects of an NNX checkpoint (state or module)."""
  if isinstance(checkpoint, nnx.Module):
    checkpoint = nnx.state(checkpoint, nnx.Param)
  return {id(leaf) for leaf in jax.tree_util.tree_leaves(
      checkpoint, is_leaf=lambda x: isinstance(x, nnx.Variable))
          if isinstance(leaf, nnx.Variable)}


def _check_not_aliased(checkpoints) -> None:
  """Refuses NNX checkpoints sharing nnx.Variable objects: `nnx.state(module,
  nnx.Param)` holds the module's live variables, so states taken during training
  all read the latest values."""
  seen = {}
  for k, checkpoint in enumerate(checkpoints):
    for variable in _nnx_variables(checkpoint):
      if variable in seen and seen[variable] != k:
        raise ValueError(
            f"checkpoints[{k}]: holds the same nnx.Variable objects as "
            f"checkpoints[{seen[variable]}] (nnx.state(module, nnx.Param) is the "
            f"module's live state, which training overwrites): keep a copy per "
            f"checkpoint, jax.tree.map(jnp.copy, nnx.state(module, nnx.Param)).")
      seen[variable] = k


def _validate(task, checkpoints, learning_rates, projection_dim, rng):
  if isinstance(checkpoints, collections.abc.Mapping) or isinstance(
      checkpoints, nnx.Module):
    raise ValueError(f"checkpoints: expected a sequence of parameter trees (one per "
                     f"checkpoint), got one {type(checkpoints).__name__}; pass "
                     "[params] for a single checkpoint.")
  checkpoints = list(checkpoints)
  if np.ndim(learning_rates) > 1:
    raise ValueError(f"learning_rates must be float[K] (one per checkpoint), got "
                     f"shape {np.shape(learning_rates)}.")
  try:
    if np.asarray(learning_rates).dtype.kind not in "biuf":  # "0.1", objects
      raise TypeError
    learning_rates = [float(lr) for lr in np.ravel(np.asarray(learning_rates))]
  except (TypeError, ValueError):  # review h38: None, a dict, swapped arguments
    raise ValueError(f"learning_rates must be float[K] (one step size per "
                     f"checkpoint), got {type(learning_rates).__name__}.") from None
  if not checkpoints:
    raise ValueError("checkpoints is empty.")
  if len(checkpoints) != len(learning_rates):
    raise ValueError(f"learning_rates has {len(learning_rates)} entries but there are "
                     f"{len(checkpoints)} checkpoints.")
  if not all(np.isfinite(learning_rates)) or min(learning_rates) < 0:
    raise ValueError(f"learning_rates must be finite and ≥ 0 (a schedule's step "
                     f"sizes), got {learning_rates}.")
  _check_not_aliased(checkpoints)
  # Before unboxing: an NNX module passed as a checkpoint is checked against the
  # task's snapshot of its non-parameter state (unboxed, it is its Param state
  # alone, which would score under the task's batch statistics: review h33, 1.2-4x
  # off for another module's checkpoint).
  for k, checkpoint in enumerate(checkpoints):
    _tasks.check_params(task, checkpoint, "params" if len(checkpoints) == 1 and k == 0
                        else f"checkpoints[{k}]")
  checkpoints = [_layers.unbox(c) for c in checkpoints]
  first = _checks.tree_signature(checkpoints[0])
  for k, checkpoint in enumerate(checkpoints[1:], 1):
    if _checks.tree_signature(checkpoint) != first:
      raise ValueError(f"checkpoints[{k}]: its tree, shapes or dtypes differ from "
                       f"checkpoints[0]'s (every checkpoint must be the same model).")
  if projection_dim is not None:
    if not _checks.is_int(projection_dim) or projection_dim <= 0:
      raise ValueError(f"projection_dim must be a positive integer, got "
                       f"{_checks.short_repr(projection_dim)}.")
    if rng is None:
      raise ValueError("rng is required when projection_dim is set (it seeds the "
                       "projection).")
    _closures.check_rng(rng, "seed the projection")
  keys = [None if rng is None else jax.random.fold_in(rng, k)
          for k in range(len(checkpoints))]
  return checkpoints, learning_rates, keys


def _prepare(task, checkpoints, train_batches, chunk_size, mesh, query_batch=None):
  chunk_size = _common.check_chunk_size(chunk_size)
  mesh = _common.resolve_mesh(mesh)
  batches = _common.as_batch_list(train_batches, "train_batches")
  named = [(batches, "train_batches")] + (
      [] if query_batch is None else [([query_batch], "query_batch")])
  _tasks.validate(task, checkpoints[0], named)  # and its params
  return batches, chunk_size, mesh


def tracin_scores(task, checkpoints: Sequence, learning_rates, query_batch,
                  train_batches, projection_dim: Optional[int] = None,
                  rng: Optional[jax.Array] = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """TracIn-CP scores of every train example on every query.

  Args:
    task: a `Task`: `measurement` for queries, `loss` for train examples.
    checkpoints: K parameter pytrees (each what the task's apply_fn takes; boxed
      parameters are unboxed, an NNX task takes `nnx.state(module, nnx.Param)`).
    learning_rates: K step sizes η_k (sequence or float[K]).
    query_batch: one batch of Q ≥ 1 queries.
    train_batches: iterable of train batches (or one batch), N examples in all;
      read once, in chunks of `chunk_size` (memory bounded by the chunk, not N).
    projection_dim: project per-example gradients to this many dimensions.
    rng: PRNG key seeding the projections; required with `projection_dim`.
    chunk_size: train examples per jitted step (an integer ≥ 1).
    mesh: split each chunk of train examples over this mesh's `data` axis
      (`sharding.make_mesh`; it may span processes); None = default device.

  Returns:
    float32[Q, N].

  Raises:
    ValueError: mismatched `checkpoints` / `learning_rates`, bad `projection_dim`,
      `projection_dim` without `rng`, bad `chunk_size`, empty batches, labels
      out of range, negative integer inputs, a linen variables dict with
      collections besides "params", NNX checkpoints sharing variables (or the
      task's module after its non-parameter state changed), or a loss whose
      examples interact in the batch (`_tasks.validate`).
  """
  checkpoints, learning_rates, keys = _validate(task, checkpoints, learning_rates,
                                                projection_dim, rng)
  batches, chunk_size, mesh = _prepare(task, checkpoints, train_batches, chunk_size,
                                       mesh, query_batch)
  size = sharding_lib.data_size(mesh)
  query_batch = sharding_lib.to_host(query_batch)
  checkpoints = _common.put_params(checkpoints, mesh)
  query_batch, rates = _common.put_replicated(
      (query_batch, [np.float32(lr) for lr in learning_rates]), mesh)
  if projection_dim is None:
    plan = _cached_plan(task, checkpoints[0], query_batch, batches[0],
                        _common.num_examples(query_batch))
    queries = [_query_kernel(task, plan)(params, query_batch)
               for params in checkpoints]
    kernel = _chunk_kernel(task, plan, mesh)
    score = lambda params, query, rate, key, chunk: kernel(params, query, rate, chunk)
  else:
    keys = _common.put_replicated(keys, mesh)
    queries = [_projected_query_kernel(task, projection_dim)(params, query_batch, key)
               for params, key in zip(checkpoints, keys)]
    kernel = _projected_kernel(task, projection_dim, mesh)
    score = lambda params, query, rate, key, chunk: kernel(params, query, rate, chunk,
                                                           key)
  pieces = []
  progress = _common.Progress("tracin_scores",
                              _common.num_padded_chunks(batches, chunk_size, size))
  for chunk, valid, first in _common.iterate_padded_chunks(batches, chunk_size,
                                                           size):
    chunk = _common.put_sharded(chunk, mesh)
    # Summed on the host ([Q, chunk] each; a device add would compile a program),
    # after every checkpoint's kernel is queued: one transfer per chunk.
    per_checkpoint = sharding_lib.to_host([
        score(params, query, rate, key, chunk)
        for params, query, rate, key in zip(checkpoints, queries, rates, keys)])
    pieces.append(functools.reduce(np.add, per_checkpoint)[:, :valid])
    _common.check_finite_scores("tracin_scores", pieces[-1], first)
    progress.update(len(pieces))
  return jnp.asarray(np.concatenate(pieces, axis=1))


def tracin_self_influence(task, checkpoints: Sequence, learning_rates,
                          train_batches, projection_dim: Optional[int] = None,
                          rng: Optional[jax.Array] = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE,
                          mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """float32[N] `Σ_k η_k ‖∇ℓ_i(θ_k)‖²` (train loss; the diagonal of train-vs-train)."""
  checkpoints, learning_rates, keys = _validate(task, checkpoints, learning_rates,
                                                projection_dim, rng)
  batches, chunk_size, mesh = _prepare(task, checkpoints, train_batches, chunk_size,
                                       mesh)
  size = sharding_lib.data_size(mesh)
  checkpoints = _common.put_params(checkpoints, mesh)
  rates = _common.put_replicated([np.float32(lr) for lr in learning_rates], mesh)
  if projection_dim is None:
    plan = _cached_plan(task, checkpoints[0], batches[0], batches[0], 1)
    kernel = _self_kernel(task, plan, mesh)
    score = lambda params, rate, key, chunk: kernel(params, rate, chunk)
  else:
    keys = _common.put_replicated(keys, mesh)
    kernel = _projected_self_kernel(task, projection_dim, mesh)
    score = lambda params, rate, key, chunk: kernel(params, rate, chunk, key)
  pieces = []
  progress = _common.Progress("tracin_self_influence",
                              _common.num_padded_chunks(batches, chunk_size, size))
  for chunk, valid, first in _common.iterate_padded_chunks(batches, chunk_size,
                                                           size):
    chunk = _common.put_sharded(chunk, mesh)
    per_checkpoint = sharding_lib.to_host([
        score(params, rate, key, chunk)
        for params, rate, key in zip(checkpoints, rates, keys)])
    pieces.append(functools.reduce(np.add, per_checkpoint)[:valid])
    _common.check_finite_scores("tracin_self_influence", pieces[-1], first)
    progress.update(len(pieces))
  return jnp.asarray(np.concatenate(pieces))
