"""EK-FAC influence functions (Grosse et al., 2023) on automatically found dense layers.

Per layer with inputs `a` (a ones column appended for the bias) and output gradients
`g`: `A = E_tokens[a aᵀ]`, `S = E_tokens[g gᵀ]`, eigenbases `Q_A`, `Q_S`; corrected
eigenvalues `Λ = E_examples[(Q_Sᵀ G Q_A)²]` over per-example gradients
`G = Σ_tokens g aᵀ` (float32[O, I]); the damped inverse Fisher applied to a gradient
is `Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ`. Scores are `⟨∇ℓ_q, (G+λI)^{-1} ∇ℓ_i⟩`:
positive = a gradient step on train example i lowers the query's measurement.

Every statistic is a sum with a count, computed batch by batch by pure jittable
functions (`covariance_statistics`, `eigenvalue_statistics`) that `psum` over
`axis_name` when one is given, so data-parallel fitting is one `shard_map` away.
"""

import dataclasses
import functools
from typing import Dict, Iterable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _common
from simfluence_jax.influence import _layers
from simfluence_jax.influence import _tasks

_FISHERS = ("empirical", "true")
DEFAULT_DAMPING_SCALE = 0.1
DEFAULT_CHUNK_SIZE = 256


class CovarianceStatistics(NamedTuple):
  """Kronecker-factor sums of some batches.

  Attributes:
    activation_sums: by layer, float32[I, I] = Σ_tokens w a aᵀ.
    gradient_sums: by layer, float32[O, O] = Σ_tokens w g gᵀ.
    token_counts: by layer, float32[] = Σ_tokens w.
    num_examples: float32[] examples seen.
  """

  activation_sums: Dict[str, jax.Array]
  gradient_sums: Dict[str, jax.Array]
  token_counts: Dict[str, jax.Array]
  num_examples: jax.Array


class EigenvalueStatistics(NamedTuple):
  """Corrected-eigenvalue sums: by layer float32[O, I] = Σ_examples (Q_Sᵀ G Q_A)²."""

  sums: Dict[str, jax.Array]
  num_examples: jax.Array


class LayerFactors(NamedTuple):
  """EK-FAC factors of one layer.

  Attributes:
    activation_eigenvectors: float32[I, I], Q_A (columns).
    gradient_eigenvectors: float32[O, O], Q_S (columns).
    eigenvalues: float32[O, I], Λ (corrected, or K-FAC products).
  """

  activation_eigenvectors: jax.Array
  gradient_eigenvectors: jax.Array
  eigenvalues: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["factors"], meta_fields=["layers"])
@dataclasses.dataclass(frozen=True)
class EKFACFactors:
  """Fitted EK-FAC factors: a pytree of arrays with the layer specs as metadata.

  Attributes:
    layers: the discovered layers (static).
    factors: by layer name, `LayerFactors`.
  """

  layers: Tuple[_layers.LayerSpec, ...]
  factors: Dict[str, LayerFactors]


def add_statistics(left, right):
  """Sum of two `CovarianceStatistics` (or two `EigenvalueStatistics`)."""
  return jax.tree_util.tree_map(jnp.add, left, right)


def _psum(tree, axis_name):
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _fisher_batch(task, params, batch, fisher, rng):
  if fisher == "true":
    return task.sample_targets(params, batch, rng)
  return batch


def _check_fisher(fisher, rng):
  if fisher not in _FISHERS:
    raise ValueError(f"fisher must be one of {_FISHERS}, got {fisher!r}.")
  if fisher == "true" and rng is None:
    raise ValueError("rng is required with fisher='true' (targets are sampled).")


def covariance_statistics(task, params, batch, layers, fisher: str = "empirical",
                          rng: Optional[jax.Array] = None,
                          axis_name: Optional[str] = None) -> CovarianceStatistics:
  """Kronecker-factor sums of one batch (pure, jittable).

  Args:
    task: a `Task`.
    params: parameters (see `Task`).
    batch: one batch, leading axis B.
    layers: from `find_layers`.
    fisher: "empirical" (batch labels) or "true" (labels sampled with `rng`).
    rng: PRNG key, required for the true Fisher.
    axis_name: if set, sums are `psum`-ed over this mapped axis.

  Returns:
    `CovarianceStatistics` of the batch.
  """
  _check_fisher(fisher, rng)
  batch = _fisher_batch(task, params, batch, fisher, rng)
  activations, values = _layers.capture(task.loss, params, batch, layers,
                                        _tasks.token_mask(task, batch))
  stats = CovarianceStatistics(
      activation_sums={name: jnp.einsum("bt,bti,btj->ij", act.token_weights,
                                        act.inputs, act.inputs)
                       for name, act in activations.items()},
      gradient_sums={name: jnp.einsum("bt,bto,btp->op", act.token_weights,
                                      act.output_grads, act.output_grads)
                     for name, act in activations.items()},
      token_counts={name: jnp.sum(act.token_weights)
                    for name, act in activations.items()},
      num_examples=jnp.asarray(values.shape[0], jnp.float32))
  return _psum(stats, axis_name)


def covariances(stats: CovarianceStatistics) -> Tuple[Dict[str, jax.Array],
                                                      Dict[str, jax.Array]]:
  """(A, S) by layer: the sums divided by the token counts."""
  counts = {name: jnp.maximum(c, 1.0) for name, c in stats.token_counts.items()}
  return ({n: s / counts[n] for n, s in stats.activation_sums.items()},
          {n: s / counts[n] for n, s in stats.gradient_sums.items()})


def eigendecompose(stats: CovarianceStatistics
                   ) -> Dict[str, Tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
  """By layer: (eigenvalues of A, Q_A, eigenvalues of S, Q_S), via `eigh`."""
  activation_cov, gradient_cov = covariances(stats)
  out = {}
  for name in activation_cov:
    # Symmetrised: float32 sums are not exactly symmetric and eigh reads one half.
    a = 0.5 * (activation_cov[name] + activation_cov[name].T)
    s = 0.5 * (gradient_cov[name] + gradient_cov[name].T)
    a_values, a_vectors = jnp.linalg.eigh(a)
    s_values, s_vectors = jnp.linalg.eigh(s)
    out[name] = (a_values, a_vectors, s_values, s_vectors)
  return out


def eigenvalue_statistics(task, params, batch, layers,
                          eigenvectors: Dict[str, Tuple[jax.Array, jax.Array]],
                          fisher: str = "empirical", rng: Optional[jax.Array] = None,
                          axis_name: Optional[str] = None) -> EigenvalueStatistics:
  """Σ_examples (Q_Sᵀ G Q_A)² of one batch (pure, jittable).

  Args:
    task, params, batch, layers, fisher, rng, axis_name: as `covariance_statistics`.
    eigenvectors: by layer, (Q_A float32[I, I], Q_S float32[O, O]).

  Returns:
    `EigenvalueStatistics` of the batch.
  """
  _check_fisher(fisher, rng)
  batch = _fisher_batch(task, params, batch, fisher, rng)
  activations, values = _layers.capture(task.loss, params, batch, layers,
                                        _tasks.token_mask(task, batch))
  sums = {}
  for name, act in activations.items():
    q_a, q_s = eigenvectors[name]
    rotated_inputs = act.inputs @ q_a
    rotated_grads = act.output_grads @ q_s
    if act.inputs.shape[1] == 1:
      # One token: the rotated gradient is an outer product, square it factor-wise.
      sums[name] = jnp.einsum("bo,bi->oi", rotated_grads[:, 0] ** 2,
                              rotated_inputs[:, 0] ** 2)
    else:
      rotated = jnp.einsum("bto,bti->boi", rotated_grads, rotated_inputs)
      sums[name] = jnp.sum(rotated ** 2, axis=0)
  stats = EigenvalueStatistics(sums, jnp.asarray(values.shape[0], jnp.float32))
  return _psum(stats, axis_name)


_jit_covariance = jax.jit(covariance_statistics,
                          static_argnames=("task", "layers", "fisher", "axis_name"))
_jit_eigenvalues = jax.jit(eigenvalue_statistics,
                           static_argnames=("task", "layers", "fisher", "axis_name"))


def fit_ekfac(task, params, batches: Iterable, fisher: str = "empirical",
              rng: Optional[jax.Array] = None, kfac: bool = False,
              layers: Optional[Tuple[_layers.LayerSpec, ...]] = None,
              mesh: Optional[jax.sharding.Mesh] = None) -> EKFACFactors:
  """Fits EK-FAC (or K-FAC) factors of every dense layer.

  Args:
    task: a `Task` (its `loss` defines the Fisher).
    params: parameters (see `Task`).
    batches: iterable of batches, read twice (a one-shot iterator is materialised).
    fisher: "empirical" (dataset labels) or "true" (labels sampled from the model
      with `rng`, a fresh key per batch via `fold_in`).
    rng: PRNG key; required for fisher="true".
    kfac: use the K-FAC eigenvalues `λ_S λ_Aᵀ × tokens per example` instead of the
      corrected ones (one pass over the data instead of two).
    layers: layers to cover; None = `find_layers` on the first batch.
    mesh: split every batch over this mesh's `data` axis and `psum` the statistics
      (`sharding.make_mesh`; it may span processes); None = default device. A
      remainder of a batch that does not split evenly is computed replicated.

  Returns:
    `EKFACFactors`.

  Raises:
    ValueError: bad `fisher`, or fisher="true" without `rng`.
  """
  _check_fisher(fisher, rng)
  batches = _common.as_batch_list(batches, "batches")
  if layers is None:
    layers = _layers.find_layers(task.loss, params, batches[0])
  batch_rng = lambda i: None if rng is None else jax.random.fold_in(rng, i)
  _common.check_mesh(mesh)
  if mesh is not None:
    params = sharding_lib.put(params, sharding_lib.replicated(mesh))
    sharded_covariance = _sharded_statistics(
        mesh, lambda p, _, b, r, axis_name: covariance_statistics(
            task, p, b, layers, fisher, r, axis_name=axis_name))
    sharded_eigenvalues = _sharded_statistics(
        mesh, lambda p, vectors, b, r, axis_name: eigenvalue_statistics(
            task, p, b, layers, vectors, fisher, r, axis_name=axis_name))

  stats = None
  progress = _common.Progress("fit_ekfac: covariances", len(batches))
  for index, batch in enumerate(batches):
    if mesh is None:
      batch_stats = _jit_covariance(task, params, batch, layers, fisher,
                                    batch_rng(index))
    else:
      batch_stats = sharded_covariance(params, None, batch, batch_rng(index))
    add = add_statistics if mesh is None else _add_optional
    stats = batch_stats if stats is None else add(stats, batch_stats)
    progress.update(index + 1, stats)
  if mesh is not None:
    stats = _sum_shards(stats, mesh)
  decomposed = eigendecompose(stats)
  factors = {}
  if kfac:
    for spec in layers:
      a_values, a_vectors, s_values, s_vectors = decomposed[spec.name]
      # K-FAC treats the tokens of an example as independent: E[vec G vec Gᵀ] ≈
      # (tokens per example) · A ⊗ S.
      tokens_per_example = stats.token_counts[spec.name] / stats.num_examples
      eigenvalues = (jnp.maximum(s_values, 0.0)[:, None]
                     * jnp.maximum(a_values, 0.0)[None, :] * tokens_per_example)
      factors[spec.name] = LayerFactors(a_vectors, s_vectors, eigenvalues)
    return EKFACFactors(layers, factors)

  eigenvectors = {name: (value[1], value[3]) for name, value in decomposed.items()}
  eigen_stats = None
  progress = _common.Progress("fit_ekfac: eigenvalues", len(batches))
  for index, batch in enumerate(batches):
    if mesh is None:
      batch_stats = _jit_eigenvalues(task, params, batch, layers, eigenvectors, fisher,
                                     batch_rng(index))
    else:
      batch_stats = sharded_eigenvalues(params, eigenvectors, batch,
                                        batch_rng(index))
    add = add_statistics if mesh is None else _add_optional
    eigen_stats = (batch_stats if eigen_stats is None
                   else add(eigen_stats, batch_stats))
    progress.update(index + 1, eigen_stats)
  if mesh is not None:
    eigen_stats = _sum_shards(eigen_stats, mesh)
  for spec in layers:
    a_vectors, s_vectors = eigenvectors[spec.name]
    factors[spec.name] = LayerFactors(
        a_vectors, s_vectors, eigen_stats.sums[spec.name] / eigen_stats.num_examples)
  return EKFACFactors(layers, factors)


def _sharded_statistics(mesh, statistics_fn):
  """Returns `f(params, extra, batch, rng)`: `statistics_fn` split over `data`.

  `statistics_fn(params, extra, batch, rng, axis_name)`. The first n − n mod D
  examples of a batch are split over the D shards of the mesh's `data` axis (each
  shard folds its index into `rng`) and each shard keeps its own sums: `f` returns
  (per-shard statistics with a leading axis D, sharded over `data`; statistics of
  the remainder, computed replicated), either None when empty. Batches accumulate
  with `_add_optional` without any communication; `_sum_shards` reduces once at the
  end, in a fixed order, so the result does not depend on how the collectives of
  the platform (XLA, gloo) order a psum.
  """
  size = sharding_lib.data_size(mesh)
  replicated = sharding_lib.replicated(mesh)

  def shard_fn(params, extra, batch, rng):
    if rng is not None:
      rng = jax.random.fold_in(rng, jax.lax.axis_index(sharding_lib.DATA_AXIS))
    stats = statistics_fn(params, extra, batch, rng, None)
    return jax.tree_util.tree_map(lambda x: x[None], stats)

  sharded = sharding_lib.data_parallel(shard_fn, mesh, sharded_args=(2,),
                                       out_example_axis=0)
  whole = jax.jit(lambda p, e, b, r: statistics_fn(p, e, b, r, None))

  def apply(params, extra, batch, rng):
    batch = sharding_lib.to_host(batch)
    extra = None if extra is None else sharding_lib.put(extra, replicated)
    num = _common.num_examples(batch)
    head = num - num % size
    per_shard = rest = None
    if head:
      part = jax.tree_util.tree_map(lambda x: x[:head], batch)
      per_shard = sharded(params, extra,
                          sharding_lib.put(part, sharding_lib.data_sharded(mesh)),
                          None if rng is None else sharding_lib.put(rng, replicated))
    if head < num:
      tail = jax.tree_util.tree_map(lambda x: x[head:], batch)
      tail_rng = None if rng is None else jax.random.fold_in(rng, size)
      rest = whole(params, extra, sharding_lib.put(tail, replicated),
                   None if rng is None else sharding_lib.put(tail_rng, replicated))
    return per_shard, rest

  return apply


def _add_optional(left, right):
  """Adds (per-shard, rest) pairs of `_sharded_statistics`; None = nothing yet."""
  return tuple(b if a is None else a if b is None else add_statistics(a, b)
               for a, b in zip(left, right))


def _sum_shards(pair, mesh):
  """(per-shard, rest) -> statistics replicated over `mesh`.

  On accelerators the shards are summed on device (one all-reduce per pass). On CPU
  they are gathered and summed on the host in shard order: gloo (multi-process) and
  XLA's in-process all-reduce add in different orders, and this keeps a 2-process
  job bit-identical to one process with the same devices.
  """
  if jax.default_backend() != "cpu":
    per_shard, rest = pair
    total = None
    if per_shard is not None:
      total = jax.jit(lambda t: jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), t),
                      out_shardings=sharding_lib.replicated(mesh))(per_shard)
    if rest is not None:
      total = rest if total is None else add_statistics(total, rest)
    return total
  per_shard, rest = sharding_lib.to_host(pair)
  total = None
  if per_shard is not None:
    total = jax.tree_util.tree_map(
        lambda x: functools.reduce(np.add, list(x)), per_shard)
  if rest is not None:
    total = rest if total is None else jax.tree_util.tree_map(np.add, total, rest)
  return sharding_lib.put(total, sharding_lib.replicated(mesh))


def layer_damping(factors: EKFACFactors, damping: Optional[float] = None
                  ) -> Dict[str, jax.Array]:
  """By layer: λ (absolute), default `0.1 × mean(Λ)` of the layer."""
  if damping is None:
    return {name: DEFAULT_DAMPING_SCALE * jnp.mean(f.eigenvalues)
            for name, f in factors.factors.items()}
  return {name: jnp.asarray(damping, jnp.float32) for name in factors.factors}


def precondition(factors: EKFACFactors, layer_grads: Dict[str, jax.Array],
                 damping: Optional[float] = None) -> Dict[str, jax.Array]:
  """(G + λI)^{-1} applied to gradients, layer by layer (pure, jittable).

  Args:
    factors: from `fit_ekfac`.
    layer_grads: by layer name, float32[..., O, I].
    damping: absolute λ, or None for `0.1 × mean(Λ)` per layer.

  Returns:
    By layer name, float32[..., O, I] preconditioned gradients.
  """
  lambdas = layer_damping(factors, damping)
  out = {}
  for name, grad in layer_grads.items():
    f = factors.factors[name]
    rotated = jnp.swapaxes(f.gradient_eigenvectors, 0, 1) @ grad @ f.activation_eigenvectors
    rotated = rotated / (f.eigenvalues + lambdas[name])
    out[name] = f.gradient_eigenvectors @ rotated @ jnp.swapaxes(
        f.activation_eigenvectors, 0, 1)
  return out


def layer_gradients(fn, params, batch, layers, token_mask=None
                    ) -> Dict[str, jax.Array]:
  """By layer: float32[B, O, I] per-example gradients of `fn(params, batch)`."""
  activations, _ = _layers.capture(fn, params, batch, layers, token_mask)
  return {name: _layers.per_example_layer_grads(act)
          for name, act in activations.items()}


def _low_rank(preconditioned: Dict[str, jax.Array], rank: int):
  """Per query and layer, the best rank-`rank` factors (U·s, V) of P = U s Vᵀ."""
  out = {}
  for name, matrix in preconditioned.items():
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[-1])
    out[name] = (u[..., :r] * s[..., None, :r], jnp.swapaxes(vt[..., :r, :], -1, -2))
  return out


def _query_side(task, params, factors, query_batch, damping, query_rank):
  grads = layer_gradients(task.measurement, params, query_batch, factors.layers)
  preconditioned = precondition(factors, grads, damping)
  if query_rank is not None:
    return _low_rank(preconditioned, query_rank)
  return preconditioned


def _train_scores(task, layers, mode, params, query, chunk):
  """Scores of one train chunk against the (preconditioned) queries.

  Returns:
    mode "total": float32[Q, n]; "layer": float32[L, Q, n]; "token": float32[Q, n, T].
  """
  activations, _ = _layers.capture(task.loss, params, chunk, layers)
  per_layer = []
  for spec in layers:
    act = activations[spec.name]
    q = query[spec.name]
    if isinstance(q, tuple):
      # Low-rank queries P = U Vᵀ: ⟨P, g aᵀ⟩ = Σ_r (u_rᵀ g)(v_rᵀ a), no [O, I] per example.
      u, v = q
      by_token = jnp.einsum("qor,nto,qir,nti->qnt", u, act.output_grads, v,
                            act.inputs)
      per_layer.append(by_token if mode == "token" else jnp.sum(by_token, -1))
    elif mode == "token":
      per_layer.append(jnp.einsum("qoi,nto,nti->qnt", q, act.output_grads,
                                  act.inputs))
    else:
      grads = _layers.per_example_layer_grads(act)
      per_layer.append(jnp.reshape(q, (q.shape[0], -1))
                       @ jnp.reshape(grads, (grads.shape[0], -1)).T)
  if mode == "layer":
    return jnp.stack(per_layer)
  return functools.reduce(jnp.add, per_layer)


_jit_query_side = jax.jit(_query_side, static_argnames=("task", "query_rank"))
_jit_train_scores = jax.jit(_train_scores, static_argnames=("task", "layers", "mode"))


def _scores(task, params, factors, query_batch, train_batches, damping, chunk_size,
            query_rank, mode, mesh=None):
  if query_rank is not None and (not isinstance(query_rank, int) or query_rank < 1):
    raise ValueError(f"query_rank must be a positive integer, got {query_rank!r}.")
  _common.check_mesh(mesh)
  example_axis = {"total": 1, "layer": 2, "token": 1}[mode]
  batches = _common.as_batch_list(train_batches, "train_batches")
  progress = _common.Progress(f"ekfac_scores ({mode})",
                              _common.num_chunks(batches, chunk_size))
  if mesh is None:
    query = _jit_query_side(task, params, factors, query_batch, damping, query_rank)
    pieces = []
    for chunk, valid in _common.iterate_chunks(batches, chunk_size):
      scores = _jit_train_scores(task, factors.layers, mode, params, query, chunk)
      pieces.append(jax.lax.slice_in_dim(scores, 0, valid, axis=example_axis))
      progress.update(len(pieces), pieces[-1])
    return jnp.concatenate(pieces, axis=example_axis)
  # Train examples split over the mesh's data axis; queries and factors replicated.
  replicated = sharding_lib.replicated(mesh)
  params, factors, query_batch = sharding_lib.put((params, factors, query_batch),
                                                  replicated)
  query = _jit_query_side(task, params, factors, query_batch, damping, query_rank)
  kernel = sharding_lib.data_parallel(
      functools.partial(_train_scores, task, factors.layers, mode), mesh,
      sharded_args=(2,), out_example_axis=example_axis)
  pieces = []
  for chunk, valid in _common.iterate_chunks(batches, chunk_size):
    chunk = sharding_lib.put(
        _common.pad_to_multiple(sharding_lib.to_host(chunk),
                                sharding_lib.data_size(mesh)),
        sharding_lib.data_sharded(mesh))
    scores = sharding_lib.to_host(kernel(params, query, chunk))
    pieces.append(np.take(scores, np.arange(valid), axis=example_axis))
    progress.update(len(pieces))
  return jnp.asarray(np.concatenate(pieces, axis=example_axis))


def ekfac_scores(task, params, factors: EKFACFactors, query_batch, train_batches,
                 damping: Optional[float] = None,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 query_rank: Optional[int] = None,
                 mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """EK-FAC influence `⟨∇m_q, (G+λI)^{-1} ∇ℓ_i⟩` of every train example on every query.

  Query gradients are preconditioned once; train per-example gradients are formed
  chunk by chunk (memory O(chunk_size · Σ_layers O·I), not O(N)).

  Args:
    task: a `Task`: `measurement` for queries, `loss` for train examples.
    params: parameters (see `Task`).
    factors: from `fit_ekfac`.
    query_batch: one batch of Q queries.
    train_batches: iterable of train batches (or one batch), N examples in all.
    damping: absolute λ; None = `0.1 × mean(Λ)` per layer.
    chunk_size: train examples per jitted step.
    query_rank: store each preconditioned query gradient as a rank-`query_rank`
      SVD per layer (query batching of Grosse et al.; None = exact).
    mesh: split each chunk of train examples over this mesh's `data` axis
      (`sharding.make_mesh`; it may span processes); None = default device.

  Returns:
    float32[Q, N]; positive = a gradient step on the train example lowers the
    query's measurement.
  """
  return _scores(task, params, factors, query_batch, train_batches, damping,
                 chunk_size, query_rank, "total", mesh)


def ekfac_layer_scores(task, params, factors, query_batch, train_batches,
                       damping=None, chunk_size=DEFAULT_CHUNK_SIZE, query_rank=None,
                       mesh=None):
  """Per-layer breakdown: float32[L, Q, N] (order of `factors.layers`), sums to scores."""
  return _scores(task, params, factors, query_batch, train_batches, damping,
                 chunk_size, query_rank, "layer", mesh)


def ekfac_token_scores(task, params, factors, query_batch, train_batches,
                       damping=None, chunk_size=DEFAULT_CHUNK_SIZE, query_rank=None,
                       mesh=None):
  """Per-train-token breakdown: float32[Q, N, T], summing over T to the scores.

  Token t's share is `⟨P_q, Σ_layers g_t a_tᵀ⟩` (T = token positions of the
  layers; all layers must have the same number of tokens, e.g. a Transformer LM).
  """
  return _scores(task, params, factors, query_batch, train_batches, damping,
                 chunk_size, query_rank, "token", mesh)


def _self_scores(task, layers, params, factors, damping, chunk):
  grads = layer_gradients(task.loss, params, chunk, layers)
  preconditioned = precondition(factors, grads, damping)
  return functools.reduce(jnp.add, [
      jnp.sum(preconditioned[n] * grads[n], axis=(1, 2)) for n in grads])


_jit_self_scores = jax.jit(_self_scores, static_argnames=("task", "layers"))


def ekfac_self_influence(task, params, factors: EKFACFactors, train_batches,
                         damping: Optional[float] = None,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> jax.Array:
  """float32[N] `⟨∇ℓ_i, (G+λI)^{-1} ∇ℓ_i⟩` (train loss on both sides)."""
  pieces, batches = [], _common.as_batch_list(train_batches, "train_batches")
  progress = _common.Progress("ekfac_self_influence",
                              _common.num_chunks(batches, chunk_size))
  for chunk, valid in _common.iterate_chunks(batches, chunk_size):
    pieces.append(_jit_self_scores(task, factors.layers, params, factors, damping,
                                   chunk)[:valid])
    progress.update(len(pieces), pieces[-1])
  return jnp.concatenate(pieces)
