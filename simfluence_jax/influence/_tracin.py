"""TracIn-CP (Pruthi et al., 2020): learning-rate weighted gradient dot products.

`score[q, i] = Σ_k η_k ⟨∇m_q(θ_k), ∇ℓ_i(θ_k)⟩` over checkpoints θ_k; positive = a
gradient step on train example i lowers the query's measurement. Gradients are taken
with respect to every leaf of the checkpoint pytrees. With `projection_dim`, both
sides are projected by the same seeded matrix (`kernels.projection`, a fresh one per
checkpoint via `fold_in(rng, k)`) so the dot products are unbiased estimates.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import kernels
from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _common

DEFAULT_CHUNK_SIZE = 256


def _flat_grads(fn, params, batch, projection_dim, key):
  grads = kernels.per_example_grads(fn, params, batch)
  if projection_dim is None:
    return jax.tree_util.tree_map(
        lambda g: jnp.reshape(g, (g.shape[0], -1)).astype(jnp.float32), grads)
  return kernels.project_pytree(grads, key, projection_dim)


def _dot(query, train):
  """Σ over leaves of query[Q, P_leaf] @ train[n, P_leaf]ᵀ, without concatenating."""
  products = jax.tree_util.tree_map(lambda q, t: q @ t.T, query, train)
  return functools.reduce(jnp.add, jax.tree_util.tree_leaves(products))


def _query_grads(task, projection_dim, params, batch, key):
  return _flat_grads(task.measurement, params, batch, projection_dim, key)


def _chunk_scores(task, projection_dim, params, query, learning_rate, chunk, key):
  train = _flat_grads(task.loss, params, chunk, projection_dim, key)
  return learning_rate * _dot(query, train)


def _chunk_self(task, projection_dim, params, learning_rate, chunk, key):
  train = _flat_grads(task.loss, params, chunk, projection_dim, key)
  squares = jax.tree_util.tree_map(lambda t: jnp.sum(t * t, axis=1), train)
  return learning_rate * functools.reduce(jnp.add, jax.tree_util.tree_leaves(squares))


_jit_query_grads = jax.jit(_query_grads, static_argnames=("task", "projection_dim"))
_jit_chunk_scores = jax.jit(_chunk_scores, static_argnames=("task", "projection_dim"))
_jit_chunk_self = jax.jit(_chunk_self, static_argnames=("task", "projection_dim"))


def _validate(checkpoints, learning_rates, projection_dim, rng):
  checkpoints = list(checkpoints)
  learning_rates = [float(lr) for lr in jnp.ravel(jnp.asarray(learning_rates))]
  if not checkpoints:
    raise ValueError("checkpoints is empty.")
  if len(checkpoints) != len(learning_rates):
    raise ValueError(f"learning_rates has {len(learning_rates)} entries but there are "
                     f"{len(checkpoints)} checkpoints.")
  if projection_dim is not None:
    if not isinstance(projection_dim, int) or projection_dim <= 0:
      raise ValueError(f"projection_dim must be a positive integer, got "
                       f"{projection_dim!r}.")
    if rng is None:
      raise ValueError("rng is required when projection_dim is set (it seeds the "
                       "projection).")
  keys = [None if rng is None else jax.random.fold_in(rng, k)
          for k in range(len(checkpoints))]
  return checkpoints, learning_rates, keys


def tracin_scores(task, checkpoints: Sequence, learning_rates, query_batch,
                  train_batches, projection_dim: Optional[int] = None,
                  rng: Optional[jax.Array] = None,
                  chunk_size: int = DEFAULT_CHUNK_SIZE,
                  mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """TracIn-CP scores of every train example on every query.

  Args:
    task: a `Task`: `measurement` for queries, `loss` for train examples.
    checkpoints: K parameter pytrees (each what the task's apply_fn takes).
    learning_rates: K step sizes η_k (sequence or float[K]).
    query_batch: one batch of Q queries.
    train_batches: iterable of train batches (or one batch), N examples in all;
      read once, in chunks of `chunk_size` (memory bounded by the chunk, not N).
    projection_dim: project per-example gradients to this many dimensions.
    rng: PRNG key seeding the projections; required with `projection_dim`.
    chunk_size: train examples per jitted step.
    mesh: split each chunk of train examples over this mesh's `data` axis
      (`sharding.make_mesh`; it may span processes); None = default device.

  Returns:
    float32[Q, N].

  Raises:
    ValueError: mismatched `checkpoints` / `learning_rates`, bad `projection_dim`,
      or `projection_dim` without `rng`.
  """
  checkpoints, learning_rates, keys = _validate(checkpoints, learning_rates,
                                                projection_dim, rng)
  _common.check_mesh(mesh)
  if mesh is not None:
    return _sharded_tracin_scores(task, checkpoints, learning_rates, keys,
                                  query_batch, train_batches, projection_dim,
                                  chunk_size, mesh)
  queries = [_jit_query_grads(task, projection_dim, params, query_batch, key)
             for params, key in zip(checkpoints, keys)]
  pieces, batches = [], _common.as_batch_list(train_batches, "train_batches")
  progress = _common.Progress("tracin_scores", _common.num_chunks(batches, chunk_size))
  for chunk, valid in _common.iterate_chunks(batches, chunk_size):
    total = None
    for params, query, lr, key in zip(checkpoints, queries, learning_rates, keys):
      scores = _jit_chunk_scores(task, projection_dim, params, query,
                                 jnp.float32(lr), chunk, key)
      total = scores if total is None else total + scores
    pieces.append(total[:, :valid])
    progress.update(len(pieces), pieces[-1])
  return jnp.concatenate(pieces, axis=1)


def _sharded_tracin_scores(task, checkpoints, learning_rates, keys, query_batch,
                           train_batches, projection_dim, chunk_size, mesh):
  """`tracin_scores` with each train chunk split over the mesh's `data` axis."""
  replicated = sharding_lib.replicated(mesh)
  checkpoints, keys, query_batch = sharding_lib.put(
      (checkpoints, keys, query_batch), replicated)
  queries = [_jit_query_grads(task, projection_dim, params, query_batch, key)
             for params, key in zip(checkpoints, keys)]
  kernel = sharding_lib.data_parallel(
      lambda params, query, lr, chunk, key: _chunk_scores(
          task, projection_dim, params, query, lr, chunk, key),
      mesh, sharded_args=(3,), out_example_axis=1)
  pieces, batches = [], _common.as_batch_list(train_batches, "train_batches")
  progress = _common.Progress("tracin_scores", _common.num_chunks(batches, chunk_size))
  for chunk, valid in _common.iterate_chunks(batches, chunk_size):
    chunk = sharding_lib.put(
        _common.pad_to_multiple(sharding_lib.to_host(chunk),
                                sharding_lib.data_size(mesh)),
        sharding_lib.data_sharded(mesh))
    total = None
    for params, query, lr, key in zip(checkpoints, queries, learning_rates, keys):
      scores = kernel(params, query, sharding_lib.put(np.float32(lr), replicated),
                      chunk, key)
      total = scores if total is None else total + scores
    pieces.append(sharding_lib.to_host(total)[:, :valid])
    progress.update(len(pieces))
  return jnp.asarray(np.concatenate(pieces, axis=1))


def tracin_self_influence(task, checkpoints: Sequence, learning_rates,
                          train_batches, projection_dim: Optional[int] = None,
                          rng: Optional[jax.Array] = None,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """float32[N] `Σ_k η_k ‖∇ℓ_i(θ_k)‖²` (train loss; the diagonal of train-vs-train)."""
  checkpoints, learning_rates, keys = _validate(checkpoints, learning_rates,
                                                projection_dim, rng)
  pieces, batches = [], _common.as_batch_list(train_batches, "train_batches")
  progress = _common.Progress("tracin_self_influence", _common.num_chunks(batches, chunk_size))
  for chunk, valid in _common.iterate_chunks(batches, chunk_size):
    total = None
    for params, lr, key in zip(checkpoints, learning_rates, keys):
      scores = _jit_chunk_self(task, projection_dim, params, jnp.float32(lr), chunk,
                               key)
      total = scores if total is None else total + scores
    pieces.append(total[:valid])
    progress.update(len(pieces), pieces[-1])
  return jnp.concatenate(pieces)
