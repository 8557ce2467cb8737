"""EK-FAC influence functions (Grosse et al., 2023) on automatically found layers.

Per layer with inputs `a` (a ones column appended for the bias) and output gradients
`g`: `A = E_tokens[a aᵀ]`, `S = E_tokens[g gᵀ]`, eigenbases `Q_A`, `Q_S`; corrected
eigenvalues `Λ = E_examples[(Q_Sᵀ G Q_A)²]` over per-example gradients
`G = Σ_tokens g aᵀ` (float32[O, I]); the damped inverse Fisher applied to a gradient
is `Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ`. Scores are `⟨∇ℓ_q, (G+λI)^{-1} ∇ℓ_i⟩`:
positive = a gradient step on train example i lowers the query's measurement.
What `a`, `g` and `G` are for a layer kind (Dense, Conv patches, Embed ids) is its
`CurvatureBlock`'s business (`_blocks`).

Every statistic is a sum with a count, computed chunk by chunk by pure jittable
functions (`covariance_statistics`, `eigenvalue_statistics`) that `psum` over
`axis_name` when one is given, so data-parallel fitting is one `shard_map` away.
The drivers (`fit_ekfac`, `ekfac_scores`, ...) always run on a mesh (the caller's,
or one device): chunks of train examples are split over its `data` axis, padding
examples carry weight 0, and each kernel compiles once per chunk shape.

Factors carry a fingerprint of what they were fitted on (every layer's name, kind,
dims, kernel shape and dtype, a hash of the paths, shapes and dtypes of all
parameter leaves, a checksum of their values and of an NNX task's non-parameter
state, and a digest of the task's traced loss). Scoring with factors of another
model is refused with a message naming the layer that differs; with factors fitted
on other values of the same model (another seed or checkpoint, other batch
statistics) unless the caller asks for it (`EKFACFactors.for_other_params()`); and
with factors fitted for another loss function (another apply_fn on the same
parameters) unless asked for (`EKFACFactors.for_other_loss()`).
"""

import dataclasses
import functools
import hashlib
import re
import weakref
from typing import Dict, Iterable, NamedTuple, Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _closures
from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _blocks
from simfluence_jax.influence import _common
from simfluence_jax.influence import _layers
from simfluence_jax.influence import _tasks
from simfluence_jax.influence._nnx import nnx  # flax.nnx once the user imports it

_FISHERS = ("empirical", "true")
DEFAULT_DAMPING_SCALE = 0.1
DEFAULT_CHUNK_SIZE = 256


class CovarianceStatistics(NamedTuple):
  """Kronecker-factor sums of some batches.

  Attributes:
    activation_sums: by layer, float32[I, I] = Σ_tokens w a aᵀ (a diagonal
      factor, e.g. Embed's, as float32[I]).
    gradient_sums: by layer, float32[O, O] = Σ_tokens w g gᵀ.
    token_counts: by layer, float32[] = Σ_tokens w.
    num_examples: float32[] examples seen: Σ w over examples with some token of
      weight > 0 (`_counted_examples`; a row whose mask is all 0 is padding).
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
    activation_eigenvectors: float32[I, I], Q_A (columns); float32[0, 0] for a
      diagonal factor (Embed), whose eigenbasis is the identity.
    gradient_eigenvectors: float32[O, O], Q_S (columns).
    eigenvalues: float32[O, I], Λ (corrected, or K-FAC products).
  """

  activation_eigenvectors: jax.Array
  gradient_eigenvectors: jax.Array
  eigenvalues: jax.Array


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["factors"],
                   meta_fields=["layers", "fingerprint", "values_checksum",
                                "loss_fingerprint", "loss_example"])
@dataclasses.dataclass(frozen=True)
class EKFACFactors:
  """Fitted EK-FAC factors: a pytree of arrays with the layer specs as metadata.

  Attributes:
    layers: the discovered layers (static).
    factors: by layer name, `LayerFactors`.
    fingerprint: `param_fingerprint` of the parameters they were fitted on (paths,
      shapes, dtypes of every leaf; not values); None = unknown (only the layers'
      own leaves are checked).
    values_checksum: `values_checksum(task, params)`: `param_values_checksum` of
      those parameters' values, followed, for a task with non-parameter state (an
      NNX module's batch statistics), by `"+state:"` and `task_state_checksum`:
      scoring with other values (another seed, another checkpoint, other batch
      statistics) is refused; None = not checked (factors saved before it, or
      `for_other_params()`).
    loss_fingerprint: `loss_fingerprint` of the task's loss: a digest of its jaxpr
      at `loss_example`'s shapes, prefixed with the JAX version that printed it.
      Scoring with a task whose loss traces to other operations (another apply_fn,
      activation, mode) is refused; None = not checked (factors saved before it,
      a batch of other containers than dicts with string keys, tuples and lists,
      or `for_other_loss()`); a fingerprint printed by another JAX version is not
      compared (jaxprs may print otherwise).
    loss_example: the one-example batch shapes the loss was traced at, per leaf
      (path, shape, dtype); a path holds a string per dict key and an int per
      tuple or list position (`()`: the batch is one array); None with
      `loss_fingerprint` None.
  """

  layers: Tuple[_layers.LayerSpec, ...]
  factors: Dict[str, LayerFactors]
  fingerprint: Optional[str] = None
  values_checksum: Optional[str] = None
  loss_fingerprint: Optional[str] = None
  loss_example: Optional[Tuple[Tuple[Tuple[Union[str, int], ...], Tuple[int, ...],
                                     str], ...]] = None

  def for_other_params(self) -> "EKFACFactors":
    """These factors, to score with other values of the same model's parameters
    (e.g. factors fitted once at the final checkpoint, applied at earlier ones) or
    of an NNX module's batch statistics: an approximation you choose, so it is
    never the default. The model's layout is still checked."""
    return dataclasses.replace(self, values_checksum=None)

  def for_other_loss(self) -> "EKFACFactors":
    """These factors, to score with a task whose loss is another function of the
    same parameters (e.g. fitted with a train-mode apply, applied with an
    eval-mode one): an approximation you choose, so it is never the default."""
    return dataclasses.replace(self, loss_fingerprint=None, loss_example=None)


_STATE_SEPARATOR = "+state:"


def task_state_checksum(task) -> str:
  """`param_values_checksum` of the non-parameter state `task` applies its model
  with: an NNX task's snapshot of the module's other variables (`rest`: batch
  statistics, ...), RNG keys and counters left out (they do not change what a
  deterministic model computes). "" for a task without such state (linen tasks,
  custom tasks), so their checksums are those of their parameters alone."""
  arrays = _task_state_arrays(task)
  return _layers.param_values_checksum(arrays) if arrays else ""


def _describe_state_change(task, fitted: str, state: str) -> str:
  if not fitted or not state:
    return (f"the factors were fitted {'with' if fitted else 'without'} such state, "
            f"the task has {'some' if state else 'none'}")
  return _layers.describe_checksum_change(_task_state_arrays(task), fitted, state,
                                          here="the task")


def _task_state_arrays(task) -> dict:
  """name -> array of the state `task_state_checksum` covers ({} without)."""
  rest = getattr(getattr(task, "_nnx_apply", None), "rest", None)
  if rest is None:
    return {}
  flat, _ = jax.tree_util.tree_flatten_with_path(
      rest, is_leaf=lambda x: isinstance(x, nnx.Variable))
  arrays = {}
  for path, leaf in flat:
    if isinstance(leaf, nnx.RngState):
      continue
    for inner, x in jax.tree_util.tree_flatten_with_path(leaf)[0]:
      x = jnp.asarray(x)
      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        continue
      arrays["/".join(_layers._path_names(path + inner))] = x  # pylint: disable=protected-access
  return arrays


_CLOSED_SEPARATOR = "+closed:"


def values_checksum(task, params, example_spec=None) -> str:
  """The `values_checksum` of factors fitted with `task` on `params`: the params',
  then the NNX state's (`"+state:"`), then, for other tasks with an `example_spec`,
  a summary of the arrays the loss closes over (`"+closed:"`, `closed_summary`;
  left out when there are none: then, as for factors saved before it, not
  compared)."""
  state = task_state_checksum(task)
  closed = closed_summary(task, params, example_spec)
  return (_layers.param_values_checksum(params)
          + (_STATE_SEPARATOR + state if state else "")
          + (_CLOSED_SEPARATOR + closed if closed else ""))


def _split_checksum(checksum: str):
  """(params, NNX state, closed-over values or None where not recorded) parts of a
  `values_checksum`."""
  checksum, separator, closed = checksum.partition(_CLOSED_SEPARATOR)
  fitted, _, state = checksum.partition(_STATE_SEPARATOR)
  return fitted, state, closed if separator else None


def closed_summary(task, params, example_spec) -> Optional[str]:
  """`_closures.constants_summary` of the task's loss, traced anew at
  `example_spec`'s shapes: the arrays it reads from outside its arguments (a linen
  model's batch_stats closed over in apply_fn, frozen weights), which factors
  fitted under other values must not be applied with (review h38: accepted, 281%
  off), compared to a tolerance (tables a model builds with numpy differ by an ulp
  on another CPU: review h40). None without an `example_spec`, and for an NNX task,
  whose state `task_state_checksum` covers (RNG counters left out)."""
  if example_spec is None or getattr(task, "_nnx_apply", None) is not None:
    return None
  shapes, example = _closures.abstract(params), _example_batch(example_spec)
  return _closures.memoized(
      task, ("closed_summary", _checks.tree_signature((shapes, example))), task.loss,
      lambda: _closures.constants_summary(_closures.trace(task.loss, shapes, example)))


def _path_key(key):
  """A path element of `_example_spec`: the dict key (a string) or the tuple or
  list position (an int); None for anything else."""
  if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
    return key.key
  if isinstance(key, jax.tree_util.SequenceKey):
    return int(key.idx)
  return None


def _example_spec(batch):
  """Per leaf (path, one-example shape, dtype) of a batch of nested dicts (string
  keys), tuples and lists, or of one array (path `()`); None for any other pytree
  (a dataclass, a namedtuple, None leaves: its loss is then not fingerprinted)."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(batch)
  if not flat:
    return None
  if treedef.num_nodes == 1:  # the batch is one array
    path_keys = [()]
  else:
    path_keys = [tuple(_path_key(k) for k in path) for path, _ in flat]
    if any(None in keys for keys in path_keys):
      return None
  spec = tuple((keys, (1,) + tuple(np.shape(leaf)[1:]), str(np.dtype(leaf.dtype)))
               for keys, (_, leaf) in zip(path_keys, flat))
  # What `_example_batch` rebuilds must be the batch's structure (lists as tuples:
  # they trace alike), or the fingerprint would be of another batch.
  if (jax.tree_util.tree_structure(_example_batch(spec))
      != jax.tree_util.tree_structure(_lists_as_tuples(batch))):
    return None
  return spec


def _lists_as_tuples(tree):
  if isinstance(tree, dict):
    return {key: _lists_as_tuples(value) for key, value in tree.items()}
  if type(tree) in (list, tuple):  # pylint: disable=unidiomatic-typecheck
    return tuple(_lists_as_tuples(value) for value in tree)
  return tree


def _example_batch(spec):
  """The batch of `jax.ShapeDtypeStruct`s an `_example_spec` describes: dicts for
  string keys, tuples for positions."""
  if len(spec) == 1 and not spec[0][0]:
    return jax.ShapeDtypeStruct(tuple(spec[0][1]), jnp.dtype(spec[0][2]))
  root = {}
  for keys, shape, dtype in spec:
    node = root
    for key in keys[:-1]:
      node = node.setdefault(key, {})
    node[keys[-1]] = jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))

  def build(node):
    if not isinstance(node, dict):
      return node
    if node and all(isinstance(key, int) for key in node):
      return tuple(build(node[i]) for i in range(len(node)))
    return {key: build(value) for key, value in node.items()}
  return build(root)


# task -> {(params signature, example spec): digest}; weakly keyed, so the cache
# never keeps a task (and the model it holds) alive.
_LOSS_FINGERPRINTS = weakref.WeakKeyDictionary()


def loss_fingerprint(task, params, example_spec) -> str:
  """`"jax-<version>:<hex>"`: a digest of the jaxpr of `task.loss(params, batch)`
  for the one-example batch `example_spec` describes (`EKFACFactors.loss_example`),
  traced only. The text is the same for the same operations on the same shapes in
  every process (addresses of callables dropped, as `pipeline.fingerprint` does);
  parameter and state values are arguments or constants, not part of it. Cached
  per task, parameter layout and example shapes (one trace)."""
  key = (_checks.tree_signature(params), example_spec)
  try:
    known = _LOSS_FINGERPRINTS.setdefault(task, {})
  except TypeError:  # a task without weak references or hash: traced every time
    known = {}
  cached = known.get(key)
  if cached is None:
    closed = jax.make_jaxpr(task.loss)(params, _example_batch(example_spec))
    text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed))
    cached = (f"jax-{jax.__version__}:"
              + hashlib.sha256(text.encode()).hexdigest()[:16])
    known[key] = cached
  return cached


@jax.jit
def add_statistics(left, right):
  """Sum of two `CovarianceStatistics` (or two `EigenvalueStatistics`).

  Jitted, like the EK-FAC steps between the statistics passes (`eigendecompose`
  per layer shape, the default damping, the eigenvalue normalisation): run
  eagerly, each of their ops compiled a program of its own — about 40 compilations;
  jitted, a 3-layer MLP's first `fit_ekfac` + `ekfac_scores` call went from 5.06 s
  to 4.17 s (docs/experiments.md).
  """
  return jax.tree_util.tree_map(jnp.add, left, right)


def _psum(tree, axis_name):
  return tree if axis_name is None else jax.lax.psum(tree, axis_name)


def _check_fisher(fisher, rng):
  if fisher not in _FISHERS:
    raise ValueError(f"fisher must be one of {_FISHERS}, got "
                     f"{_checks.short_repr(fisher)}.")
  if fisher == "true" and rng is None:
    raise ValueError("rng is required with fisher='true' (targets are sampled).")
  _closures.check_rng(rng, "sample the targets")


class _SampleTargets:
  """`(params, batch, key) -> task.sample_targets(...)`, hashable by its task."""

  def __init__(self, task):
    self.task = task

  def __call__(self, params, batch, key):
    return self.task.sample_targets(params, batch, key)

  def __eq__(self, other):
    return isinstance(other, _SampleTargets) and other.task == self.task

  def __hash__(self):
    return hash(("sample_targets", self.task))


def _fisher_capture(task, params, batch, layers, fisher, rng, example_indices):
  """Per-example capture of `task.loss`, targets sampled for the true Fisher.

  The true Fisher samples each example's targets with `fold_in(rng, index)`, its
  index in the stream of examples: the samples do not depend on chunking or on
  how a chunk is split over devices.
  """
  transform = keys = None
  if fisher == "true":
    if example_indices is None:
      example_indices = jnp.arange(_layers._num_examples(batch), dtype=jnp.int32)  # pylint: disable=protected-access
    keys = jax.vmap(lambda index: jax.random.fold_in(rng, index))(example_indices)
    transform = _SampleTargets(task)
  activations, values, _ = _layers.capture_per_example(
      task.loss, params, batch, layers, _tasks.token_mask(task, batch),
      transform_example=transform, example_args=keys)
  return activations, values


def _example_weights(example_weights, num):
  if example_weights is None:
    return jnp.ones((num,), jnp.float32)
  return jnp.asarray(example_weights, jnp.float32)


def _counted_examples(task, batch, weights):
  """Σ of the example weights over the examples that count: with a token mask,
  those with some token weight > 0. A row whose mask is all 0 (padding to a fixed
  batch size) adds no token to A or S and a zero gradient to Λ's sums; counted as
  an example it would dilute Λ (and K-FAC's tokens per example)."""
  mask = _tasks.token_mask(task, batch)
  if mask is None:
    return jnp.sum(weights)
  mask = jnp.reshape(jnp.asarray(mask, jnp.float32), (weights.shape[0], -1))
  return jnp.sum(weights * (jnp.sum(mask, axis=1) > 0))


def covariance_statistics(task, params, batch, layers, fisher: str = "empirical",
                          rng: Optional[jax.Array] = None,
                          axis_name: Optional[str] = None,
                          example_weights: Optional[jax.Array] = None,
                          example_indices: Optional[jax.Array] = None
                          ) -> CovarianceStatistics:
  """Kronecker-factor sums of one batch (pure, jittable).

  Args:
    task: a `Task`.
    params: parameters (see `Task`; unboxed).
    batch: one batch, leading axis B.
    layers: from `find_layers`.
    fisher: "empirical" (batch labels) or "true" (labels sampled with `rng`).
    rng: PRNG key, required for the true Fisher.
    axis_name: if set, sums are `psum`-ed over this mapped axis.
    example_weights: optional float32[B] (0 = a padding example), default ones.
    example_indices: optional int32[B] stream indices seeding the true Fisher's
      samples (default 0..B-1).

  Returns:
    `CovarianceStatistics` of the batch.
  """
  _check_fisher(fisher, rng)
  activations, values = _fisher_capture(task, params, batch, layers, fisher, rng,
                                        example_indices)
  weights = _example_weights(example_weights, values.shape[0])
  activation_sums, gradient_sums, token_counts = {}, {}, {}
  for spec in layers:
    act = activations[spec.name]
    act = act._replace(token_weights=act.token_weights * weights[:, None])
    block = _blocks.block(spec)
    activation_sums[spec.name] = block.activation_sum(act)
    gradient_sums[spec.name] = block.gradient_sum(act)
    token_counts[spec.name] = jnp.sum(act.token_weights)
  stats = CovarianceStatistics(activation_sums, gradient_sums, token_counts,
                               _counted_examples(task, batch, weights))
  return _psum(stats, axis_name)


def covariances(stats: CovarianceStatistics) -> Tuple[Dict[str, jax.Array],
                                                      Dict[str, jax.Array]]:
  """(A, S) by layer: the sums divided by the token counts."""
  counts = stats.token_counts
  return ({n: _per_token(s, counts[n]) for n, s in stats.activation_sums.items()},
          {n: _per_token(s, counts[n]) for n, s in stats.gradient_sums.items()})


def _per_token(total, token_count):
  # A count in (0, 1) (small fractional token weights) is a count like any other;
  # 0 (no token seen) is refused by `fit_ekfac`, and gives 0 here, not NaN.
  return total / jnp.where(token_count > 0, token_count, 1.0)


def eigendecompose(stats: CovarianceStatistics
                   ) -> Dict[str, Tuple[jax.Array, jax.Array, jax.Array, jax.Array]]:
  """By layer: (eigenvalues of A, Q_A, eigenvalues of S, Q_S), via `eigh`.

  A diagonal A (float32[I]) is its own eigenvalues with the identity basis, which
  is returned as the float32[0, 0] placeholder. One jitted program per layer shape
  (`_eigh_layer`): layers of one shape share it, and no program holds every
  layer's eigh (XLA:TPU's eigh compile time grows steeply with n).
  """
  return {name: _eigh_layer(stats.activation_sums[name], stats.gradient_sums[name],
                            stats.token_counts[name])
          for name in stats.activation_sums}


@jax.jit
def _eigh_layer(activation_sum, gradient_sum, token_count):
  """One layer's covariances (sums / tokens) -> (λ_A, Q_A, λ_S, Q_S)."""
  a, s = _per_token(activation_sum, token_count), _per_token(gradient_sum, token_count)
  if a.ndim == 1:
    a_values = a
    a_vectors = jnp.zeros(_blocks.IDENTITY_BASIS_SHAPE, jnp.float32)
  else:
    # Symmetrised: float32 sums are not exactly symmetric and eigh reads one half.
    a_values, a_vectors = jnp.linalg.eigh(0.5 * (a + a.T))
  s_values, s_vectors = jnp.linalg.eigh(0.5 * (s + s.T))
  return a_values, a_vectors, s_values, s_vectors


def eigenvalue_statistics(task, params, batch, layers,
                          eigenvectors: Dict[str, Tuple[jax.Array, jax.Array]],
                          fisher: str = "empirical", rng: Optional[jax.Array] = None,
                          axis_name: Optional[str] = None,
                          example_weights: Optional[jax.Array] = None,
                          example_indices: Optional[jax.Array] = None
                          ) -> EigenvalueStatistics:
  """Σ_examples (Q_Sᵀ G Q_A)² of one batch (pure, jittable).

  Args:
    task, params, batch, layers, fisher, rng, axis_name, example_weights,
      example_indices: as `covariance_statistics`.
    eigenvectors: by layer, (Q_A float32[I, I], Q_S float32[O, O]).

  Returns:
    `EigenvalueStatistics` of the batch.
  """
  _check_fisher(fisher, rng)
  activations, values = _fisher_capture(task, params, batch, layers, fisher, rng,
                                        example_indices)
  weights = _example_weights(example_weights, values.shape[0])
  sums = {}
  for spec in layers:
    q_a, q_s = eigenvectors[spec.name]
    sums[spec.name] = _blocks.block(spec).rotated_square_sum(
        activations[spec.name], q_a, q_s, weights)
  stats = EigenvalueStatistics(sums, _counted_examples(task, batch, weights))
  return _psum(stats, axis_name)


# --- sharded drivers -----------------------------------------------------------------


def _per_shard(stats):
  return jax.tree_util.tree_map(lambda x: x[None], stats)


def _covariance_shard(task, layers, fisher, params, extra, chunk, weights, indices,
                      rng):
  del extra
  return _per_shard(covariance_statistics(
      task, params, chunk, layers, fisher, rng, example_weights=weights,
      example_indices=indices))


def _eigenvalue_shard(task, layers, fisher, params, eigenvectors, chunk, weights,
                      indices, rng):
  return _per_shard(eigenvalue_statistics(
      task, params, chunk, layers, eigenvectors, fisher, rng,
      example_weights=weights, example_indices=indices))


_STATISTICS = {"covariance": _covariance_shard, "eigenvalues": _eigenvalue_shard}


@functools.lru_cache(maxsize=64)
def _statistics_kernel(which, task, layers, fisher, mesh):
  """Per-shard statistics of a chunk split over `data`: leaves [D, ...]."""
  return _common.data_parallel(
      functools.partial(_STATISTICS[which], task, layers, fisher), mesh,
      in_specs=(None, None, 0, 0, 0, None), out_specs=0, params_out=True)


def _accumulate(task, params, batches, layers, fisher, rng, mesh, chunk_size,
                which, extra, label):
  """Per-shard sums over all chunks, then reduced (see `_sum_shards`)."""
  kernel = _statistics_kernel(which, task, layers, fisher, mesh)
  size = sharding_lib.data_size(mesh)
  total = None
  progress = _common.Progress(label, _common.num_padded_chunks(batches, chunk_size,
                                                               size))
  for done, (chunk, valid, start) in enumerate(
      _common.iterate_padded_chunks(batches, chunk_size, size), 1):
    weights, indices = _common.chunk_extras(_common.num_examples(chunk), valid, start)
    stats = kernel(params, extra, *_common.put_sharded((chunk, weights, indices), mesh),
                   rng)
    total = stats if total is None else add_statistics(total, stats)
    progress.update(done, total)
  return _sum_shards(total, mesh)


def _sum_shards(per_shard, mesh):
  """Per-shard statistics (leading axis D) -> their sum, placed like the params.

  On accelerators the shards are summed on device (one all-reduce per pass). On CPU
  they are gathered and summed on the host in shard order: gloo (multi-process) and
  XLA's in-process all-reduce add in different orders, and this keeps a 2-process
  job bit-identical to one process with the same devices.
  """
  if jax.default_backend() != "cpu":
    return _device_sum(mesh)(per_shard)
  per_shard = sharding_lib.to_host(per_shard)
  total = jax.tree_util.tree_map(lambda x: functools.reduce(np.add, list(x)),
                                 per_shard)
  return _common.put_params(total, mesh)


@functools.lru_cache(maxsize=16)
def _device_sum(mesh):
  """jit: per-shard statistics (leading `data` axis) -> their sum, split over
  `model` like the params (`sharding.param_spec`)."""
  return jax.jit(lambda per_shard: _common.constrain_params(
      jax.tree_util.tree_map(lambda x: jnp.sum(x, 0), per_shard), mesh))


def _prepare(task, params, batches, argument, chunk_size, mesh, query_batch=None):
  """Checked, unboxed inputs of a driver: (params, batches, chunk_size, mesh); with
  `query_batch`, checked with the batches (`_tasks.validate`)."""
  if isinstance(params, EKFACFactors):  # review h38: a TypeError from the model
    raise ValueError("params: got EKFACFactors; the arguments are (task, params, "
                     "factors, ...).")
  chunk_size = _common.check_chunk_size(chunk_size)
  mesh = _common.resolve_mesh(mesh)
  batches = _common.as_batch_list(batches, argument)
  _tasks.check_params(task, params)  # before unboxing (an NNX module's own state)
  params = _layers.unbox(params)
  _tasks.validate(task, params, [(batches, argument)] + (
      [] if query_batch is None else [([query_batch], "query_batch")]))
  return params, batches, chunk_size, mesh


def fit_ekfac(task, params, batches: Iterable, fisher: str = "empirical",
              rng: Optional[jax.Array] = None, kfac: bool = False,
              layers: Optional[Tuple[_layers.LayerSpec, ...]] = None,
              mesh: Optional[jax.sharding.Mesh] = None,
              chunk_size: int = DEFAULT_CHUNK_SIZE) -> EKFACFactors:
  """Fits EK-FAC (or K-FAC) factors of every covered layer.

  Under a task's token mask (a language model's loss mask), the tokens the mask
  zeroes count where they carry gradient in any layer of a registered kind, given
  in `layers` or not; fitting some layers therefore still runs the whole backward
  pass.

  Args:
    task: a `Task` (its `loss` defines the Fisher).
    params: parameters (see `Task`; boxed parameters are unboxed, an NNX task takes
      `nnx.state(module, nnx.Param)`).
    batches: iterable of batches, read twice (a one-shot iterator is materialised).
    fisher: "empirical" (dataset labels) or "true" (labels sampled from the model
      with `rng`, per example via `fold_in(rng, example index)`).
    rng: PRNG key; required for fisher="true".
    kfac: use the K-FAC eigenvalues `λ_S λ_Aᵀ × tokens per example` instead of the
      corrected ones (one pass over the data instead of two).
    layers: layers to cover; None = `find_layers` on the first batch (Dense,
      DenseGeneral and Conv; `find_layers(..., kinds="all")` adds Embed).
    mesh: split every chunk over this mesh's `data` axis and sum the statistics
      (`sharding.make_mesh`; it may span processes); None = default device.
    chunk_size: examples per jitted step (bounds memory).

  Returns:
    `EKFACFactors`.

  Raises:
    ValueError: bad `fisher`, fisher="true" without `rng`, bad `chunk_size`,
      empty batches, labels out of range, no usable layer, a layer that saw no
      token with mask > 0, or NaN/inf factors.
  """
  _check_fisher(fisher, rng)
  params, batches, chunk_size, mesh = _prepare(task, params, batches, "batches",
                                               chunk_size, mesh)
  example_spec = _example_spec(batches[0])
  loss_digest = (None if example_spec is None
                 else loss_fingerprint(task, params, example_spec))
  if layers is None:
    layers = _layers.find_layers(task.loss, params, batches[0])
  elif isinstance(layers, str) or not all(
      isinstance(spec, _layers.LayerSpec) for spec in layers):
    raise ValueError(f"layers: expected LayerSpecs from find_layers (e.g. "
                     f"find_layers(task.loss, params, batch, kinds='all')), got "
                     f"{layers!r:.60}.")
  else:
    _layers.check_layers_match(tuple(layers), params, "layers")
  layers = tuple(layers)
  # Of the params as given, like `check_factors` in the scoring calls: placed ones
  # would compile the checksum's program a second time (0.14-0.28 s on 2 CPU cores).
  fingerprint = _layers.param_fingerprint(params)
  checksum = values_checksum(task, params, example_spec)
  if rng is None:  # only with the empirical Fisher, which never reads it: a key
    # wrapped from zeros (`jax.random.key(0)` compiles a program of its own)
    rng = jax.random.wrap_key_data(np.zeros(
        jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape,
        np.uint32))
  params, rng = _common.put_params(params, mesh), _common.put_replicated(rng, mesh)
  stats = _accumulate(task, params, batches, layers, fisher, rng, mesh, chunk_size,
                      "covariance", None, "fit_ekfac: covariances")
  for name, count in sharding_lib.to_host(stats.token_counts).items():
    if not count > 0:
      raise ValueError(f"batches: layer {name!r} saw no token with weight > 0 (every "
                       f"mask is 0?), so its factors would be zero.")
  if not float(sharding_lib.to_host(stats.num_examples)) > 0:
    raise ValueError("batches: no example has a token with mask > 0, so there are "
                     "no examples to average the eigenvalues over.")
  decomposed = eigendecompose(stats)
  identity = (fingerprint, checksum, loss_digest, example_spec)
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
    return _check_fitted(EKFACFactors(layers, _common.put_params(factors, mesh),
                                      *identity))

  # Eigenbases keep the params' `model` split (eigh runs replicated; its outputs
  # are placed once, for the second pass and for the factors).
  eigenvectors = _common.put_params(
      {name: (value[1], value[3]) for name, value in decomposed.items()}, mesh)
  eigen_stats = _accumulate(task, params, batches, layers, fisher, rng, mesh,
                            chunk_size, "eigenvalues", eigenvectors,
                            "fit_ekfac: eigenvalues")
  eigenvalues = _mean_eigenvalues(eigen_stats)
  return _check_fitted(EKFACFactors(layers, {
      spec.name: LayerFactors(*eigenvectors[spec.name], eigenvalues[spec.name])
      for spec in layers}, *identity))


def _check_fitted(factors: EKFACFactors) -> EKFACFactors:
  """`factors`, unless a layer's eigenvalues are NaN or inf (refused, naming the
  layer; their mean is the default damping's program, reused when scoring)."""
  for name, default in sharding_lib.to_host(
      _default_damping(factors.factors)).items():
    if not np.isfinite(default):
      raise ValueError(f"fit_ekfac: layer {name!r} has NaN or inf factors (NaN/inf "
                       f"in the params or batches).")
  return factors


@jax.jit
def _mean_eigenvalues(eigen_stats: EigenvalueStatistics) -> Dict[str, jax.Array]:
  """By layer: the corrected eigenvalues, sums / examples (the eigenbases stay
  outside the program: a jitted pass-through would copy them)."""
  return {name: total / eigen_stats.num_examples
          for name, total in eigen_stats.sums.items()}


def layer_damping(factors: EKFACFactors, damping: Optional[float] = None
                  ) -> Dict[str, np.float32]:
  """By layer: λ (absolute), default `0.1 × mean(Λ)` of the layer; host float32
  scalars.

  Raises:
    ValueError: `damping` is not None and not a finite number > 0; or, for the
      default, a layer's mean eigenvalue is NaN or inf (non-finite factors) or 0
      (its gradients were zero on the data `fit_ekfac` saw, and 1/(Λ + 0) would
      make every score NaN). With a given damping, non-finite factors show as
      non-finite scores, which the score kernels refuse.
  """
  damping = _common.check_damping(damping)
  if damping is not None:
    return {name: np.float32(damping) for name in factors.factors}
  defaults = sharding_lib.to_host(_default_damping(factors.factors))
  for name, default in defaults.items():
    if not np.isfinite(default):
      raise ValueError(f"factors: layer {name!r} has NaN or inf eigenvalues (NaN/inf "
                       f"in the params or batches fit_ekfac saw).")
    if not default > 0:
      raise ValueError(f"damping: the default {DEFAULT_DAMPING_SCALE} × mean(Λ) is "
                       f"{float(default)} for layer {name!r} (its gradients were zero "
                       f"on the data fit_ekfac saw); pass damping > 0.")
  return {name: np.float32(default) for name, default in defaults.items()}


@jax.jit
def _default_damping(layer_factors: Dict[str, LayerFactors]) -> Dict[str, jax.Array]:
  """By layer: `0.1 × mean(Λ)`; non-finite iff some Λ is (Λ ≥ 0: no cancellation),
  so it is also the factors' finiteness check (one small program for both)."""
  return {name: DEFAULT_DAMPING_SCALE * jnp.mean(f.eigenvalues)
          for name, f in layer_factors.items()}


def _precondition(layers, factors, layer_grads, lambdas):
  specs = {spec.name: spec for spec in layers}
  return {name: _blocks.block(specs[name]).precondition(factors[name], grad,
                                                        lambdas[name])
          for name, grad in layer_grads.items()}


def precondition(factors: EKFACFactors, layer_grads: Dict[str, jax.Array],
                 damping: Optional[float] = None) -> Dict[str, jax.Array]:
  """(G + λI)^{-1} applied to gradients, layer by layer (pure, jittable).

  Args:
    factors: from `fit_ekfac`.
    layer_grads: by layer name, float32[..., O, I].
    damping: absolute λ, or None for `0.1 × mean(Λ)` per layer.

  Returns:
    By layer name, float32[..., O, I] preconditioned gradients.

  Raises:
    ValueError: factors not `EKFACFactors` (e.g. the arguments swapped), a layer
      name the factors lack, or a gradient whose last two axes are not the layer's
      [O, I] (a flax kernel's [I, O] layout; a square layer without a bias cannot be
      told apart, and is taken as [O, I]).
  """
  _check_layer_grads(factors, layer_grads)
  return _precondition(factors.layers, factors.factors, layer_grads,
                       layer_damping(factors, damping))


def _check_layer_grads(factors, layer_grads) -> None:
  """`precondition`'s arguments (review h38: each was a raw traceback)."""
  if not isinstance(factors, EKFACFactors):
    raise ValueError(
        f"factors: expected EKFACFactors (from fit_ekfac), got "
        f"{type(factors).__name__}" + (
            "; the arguments are swapped: precondition(factors, layer_grads)"
            if isinstance(layer_grads, EKFACFactors) else "") + ".")
  if not isinstance(layer_grads, dict):
    raise ValueError(f"layer_grads: expected a dict of layer name -> float32[..., O, "
                     f"I] (layer_grads_from_param_grads), got "
                     f"{type(layer_grads).__name__}.")
  unknown = sorted(set(layer_grads) - set(factors.factors), key=str)
  if unknown:
    raise ValueError(f"layer_grads: no factors for layer(s) {unknown}; the factors' "
                     f"layers are {sorted(factors.factors)}.")
  for name, grad in layer_grads.items():
    want = tuple(np.shape(factors.factors[name].eigenvalues))
    got = tuple(np.shape(grad))
    if got[-2:] != want:
      raise ValueError(
          f"layer_grads[{name!r}]: expected float32[..., O, I] = [..., {want[0]}, "
          f"{want[1]}] (the kernel transposed, the bias as its last column: "
          f"layer_grads_from_param_grads), got shape {got}" + (
              " (a flax kernel's [I, O] layout)" if got[-2:] == want[::-1] else "")
          + ".")


def layer_gradients(fn, params, batch, layers, token_mask=None
                    ) -> Dict[str, jax.Array]:
  """By layer: float32[B, O, I] per-example gradients of `fn(params, batch)`."""
  activations, _ = _layers.capture(fn, params, batch, layers, token_mask)
  return {spec.name: _blocks.block(spec).per_example_grads(activations[spec.name])
          for spec in layers}


def _low_rank(preconditioned: Dict[str, jax.Array], rank: int):
  """Per query and layer, the best rank-`rank` factors (U·s, V) of P = U s Vᵀ."""
  out = {}
  for name, matrix in preconditioned.items():
    u, s, vt = jnp.linalg.svd(matrix, full_matrices=False)
    r = min(rank, s.shape[-1])
    out[name] = (u[..., :r] * s[..., None, :r], jnp.swapaxes(vt[..., :r, :], -1, -2))
  return out


def _query_captures(task, layers, mesh, params, query_batch):
  # Per layer the queries' inputs [Q, T, I] and output gradients [Q, T, O], split
  # over `model` like params (after the query axis): tokens, not [Q, O, I] gradients.
  activations, _ = _layers.capture(task.measurement, params, query_batch, layers)
  return _common.constrain_params(activations, mesh, leading=(None,))


@functools.lru_cache(maxsize=64)
def _query_captures_kernel(task, layers, mesh):
  """jit: (params, query_batch) -> by layer, the queries' `LayerActivations`."""
  return jax.jit(functools.partial(_query_captures, task, layers, mesh))


def _shape_key(spec: _layers.LayerSpec) -> _layers.LayerSpec:
  """`spec` without what names one layer: layers of one kind and shape share it."""
  return dataclasses.replace(spec, name="", kernel_path=(), bias_path=None)


def _precondition_one(spec, query_rank, mesh, factors, activations, damping):
  block = _blocks.block(spec)
  grads = block.per_example_grads(activations)  # [Q, O, I]
  preconditioned = {spec.name: block.precondition(factors, grads, damping)}
  if query_rank is not None:
    preconditioned = _low_rank(preconditioned, query_rank)
  return _common.constrain_params(preconditioned, mesh, leading=(None,))[spec.name]


def _precondition_kernel(spec, query_rank, mesh):
  """jit: (one layer's factors, its queries' `LayerActivations`, λ) -> its
  preconditioned query gradients (float32[Q, O, I], or (U·s, V) with `query_rank`).
  Layers of one kind and shape share the program (`_shape_key`): a few small
  programs, not one forming and preconditioning every layer's gradients (at 8B,
  193 layers: that program took 233 s of XLA:TPU compile)."""
  return _precondition_program(_shape_key(spec), query_rank, mesh)


@functools.lru_cache(maxsize=64)
def _precondition_program(key, query_rank, mesh):
  return jax.jit(functools.partial(_precondition_one, key, query_rank, mesh))


def _preconditioned_queries(task, layers, query_rank, mesh, params, factors,
                            query_batch, lambdas):
  """By layer: the preconditioned query gradients (`_precondition_kernel`)."""
  captures = _query_captures_kernel(task, layers, mesh)(params, query_batch)
  return {spec.name: _precondition_kernel(spec, query_rank, mesh)(
      factors[spec.name], captures.pop(spec.name), lambdas[spec.name])
          for spec in layers}  # pop: each layer's tokens are freed once used


def _train_scores(task, layers, mode, params, query, chunk):
  """Scores of one train chunk against the (preconditioned) queries.

  Returns:
    mode "total": float32[Q, n]; "layer": float32[L, Q, n]; "token": float32[Q, n, T].
  """
  activations, _ = _layers.capture(task.loss, params, chunk, layers)
  if mode == "token":
    tokens = {spec.name: activations[spec.name].output_grads.shape[1]
              for spec in layers}
    if len(set(tokens.values())) > 1:
      raise ValueError(f"ekfac_token_scores: every layer must have the same number "
                       f"of tokens per example, got {tokens}.")
  per_layer = []
  for spec in layers:
    act, q, block = activations[spec.name], query[spec.name], _blocks.block(spec)
    if isinstance(q, tuple):
      # Low-rank queries P = U Vᵀ: ⟨P, g aᵀ⟩ = Σ_r (u_rᵀ g)(v_rᵀ a), no [O, I] per example.
      by_token = block.low_rank_token_dot(q[0], q[1], act)
      per_layer.append(by_token if mode == "token" else jnp.sum(by_token, -1))
    elif mode == "token":
      per_layer.append(block.token_dot(q, act))
    else:
      per_layer.append(block.dot(q, act))
  if mode == "layer":
    return jnp.stack(per_layer)
  return functools.reduce(jnp.add, per_layer)


_EXAMPLE_AXIS = {"total": 1, "layer": 2, "token": 1}


@functools.lru_cache(maxsize=64)
def _score_kernel(task, layers, mode, mesh):
  return _common.data_parallel(
      functools.partial(_train_scores, task, layers, mode), mesh,
      in_specs=(None, None, 0), out_specs=_EXAMPLE_AXIS[mode])


def check_factors(factors, params, argument: str = "factors", task=None) -> None:
  """Raises ValueError unless `factors` were fitted on a model shaped like `params`
  and, where they carry a `values_checksum`, on these very values; with `task`,
  also under its non-parameter state and (where they carry a `loss_fingerprint`)
  for a loss that traces to the same operations."""
  if not isinstance(factors, EKFACFactors):
    raise ValueError(f"{argument}: expected EKFACFactors (from fit_ekfac), got "
                     f"{type(factors).__name__}.")
  _layers.check_layers_match(factors.layers, params, argument, factors.fingerprint)
  if factors.values_checksum is not None:
    fitted, fitted_state, fitted_closed = _split_checksum(factors.values_checksum)
    checksum = _layers.param_values_checksum(params)
    if checksum != fitted:
      raise ValueError(
          f"{argument}: fitted on other values of this model's parameters ("
          f"{_layers.describe_checksum_change(params, fitted, checksum)}): refit "
          "them on these params, or pass "
          f"{argument}.for_other_params() to apply them here on purpose.")
    state = None if task is None else task_state_checksum(task)
    if state is not None and state != fitted_state:
      raise ValueError(
          f"{argument}: fitted under other values of the task's non-parameter state "
          f"(the NNX module's batch statistics or other non-Param variables; "
          f"{_describe_state_change(task, fitted_state, state)}): refit them "
          "under this state, or "
          f"pass {argument}.for_other_params() to apply them here on purpose.")
    closed = (None if task is None or fitted_closed is None
              else closed_summary(task, params, factors.loss_example))
    if closed is not None and not _closures.same_summary(closed, fitted_closed):
      count = lambda summary: len(summary.split(";")) if summary else 0
      raise ValueError(
          f"{argument}: fitted under other values of the arrays the task's loss "
          f"reads from outside its params (e.g. the batch_stats its apply_fn "
          f"closes over; {count(fitted_closed)} arrays in the factors, "
          f"{count(closed)} for the task): refit them under these values, or "
          f"pass {argument}.for_other_params() to apply them here on purpose.")
  if (task is not None and factors.loss_fingerprint is not None
      and factors.loss_example is not None
      and factors.loss_fingerprint.split(":")[0] == f"jax-{jax.__version__}"):
    try:
      digest = loss_fingerprint(task, params, factors.loss_example)
    except Exception as error:  # pylint: disable=broad-except
      raise ValueError(
          f"{argument}: fitted for another loss function: the task's loss cannot be "
          f"traced at the fit's example shapes ({type(error).__name__}: {error}): "
          f"refit them with this task, or pass {argument}.for_other_loss() to apply "
          "them here on purpose.") from error
    if digest != factors.loss_fingerprint:
      raise ValueError(
          f"{argument}: fitted for another loss function: the task's loss traces to "
          f"other operations at the fit's example shapes (loss_fingerprint "
          f"{factors.loss_fingerprint.split(':')[-1]} in the factors, "
          f"{digest.split(':')[-1]} for the task; another apply_fn, activation or "
          f"mode?): refit them with this task, or pass {argument}.for_other_loss() "
          "to apply them here on purpose.")
  for spec in factors.layers:
    f = factors.factors.get(spec.name)
    expected = (spec.output_dim, spec.augmented_input_dim)
    if f is None or tuple(f.eigenvalues.shape) != expected:
      raise ValueError(f"{argument}: layer {spec.name!r} needs eigenvalues of shape "
                       f"{expected}, got "
                       f"{None if f is None else tuple(f.eigenvalues.shape)}.")


def _scores(task, params, factors, query_batch, train_batches, damping, chunk_size,
            query_rank, mode, mesh=None):
  if query_rank is not None and (not _checks.is_int(query_rank) or query_rank < 1):
    raise ValueError(f"query_rank must be a positive integer, got "
                     f"{_checks.short_repr(query_rank)}.")
  query_rank = None if query_rank is None else int(query_rank)
  lambdas = layer_damping(factors, damping) if isinstance(
      factors, EKFACFactors) else None
  params, batches, chunk_size, mesh = _prepare(task, params, train_batches,
                                               "train_batches", chunk_size, mesh,
                                               query_batch)
  check_factors(factors, params, task=task)
  example_axis = _EXAMPLE_AXIS[mode]
  size = sharding_lib.data_size(mesh)
  progress = _common.Progress(f"ekfac_scores ({mode})",
                              _common.num_padded_chunks(batches, chunk_size, size))
  # Params and factors split over `model` (replicated without one), query examples
  # replicated; train examples split over the data axis.
  params, layer_factors = _common.put_params((params, factors.factors), mesh)
  query_batch, lambdas = _common.put_replicated(
      (sharding_lib.to_host(query_batch), lambdas), mesh)
  query = _preconditioned_queries(task, factors.layers, query_rank, mesh, params,
                                  layer_factors, query_batch, lambdas)
  kernel = _score_kernel(task, factors.layers, mode, mesh)
  pieces = []
  for chunk, valid, first in _common.iterate_padded_chunks(batches, chunk_size,
                                                           size):
    scores = sharding_lib.to_host(kernel(params, query,
                                         _common.put_sharded(chunk, mesh)))
    pieces.append(np.take(scores, np.arange(valid), axis=example_axis))
    _common.check_finite_scores(f"ekfac_scores ({mode})", pieces[-1], first,
                                example_axis)
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
    factors: from `fit_ekfac` on the same model (checked: see the module doc).
    query_batch: one batch of Q ≥ 1 queries.
    train_batches: iterable of train batches (or one batch), N examples in all.
    damping: absolute λ > 0; None = `0.1 × mean(Λ)` per layer.
    chunk_size: train examples per jitted step (an integer ≥ 1).
    query_rank: store each preconditioned query gradient as a rank-`query_rank`
      SVD per layer (query batching of Grosse et al.; None = exact).
    mesh: split each chunk of train examples over this mesh's `data` axis
      (`sharding.make_mesh`; it may span processes); None = default device.

  Returns:
    float32[Q, N]; positive = a gradient step on the train example lowers the
    query's measurement.

  Raises:
    ValueError: bad `damping`, `chunk_size` or `query_rank`, empty batches, labels
      out of range, or factors fitted on a different model.
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


def _self_scores(task, layers, params, factors, lambdas, chunk):
  activations, _ = _layers.capture(task.loss, params, chunk, layers)
  total = 0.0
  for spec in layers:
    total = total + _blocks.block(spec).self_preconditioned(
        factors[spec.name], activations[spec.name], lambdas[spec.name])
  return total


@functools.lru_cache(maxsize=64)
def _self_kernel(task, layers, mesh):
  return _common.data_parallel(functools.partial(_self_scores, task, layers), mesh,
                               in_specs=(None, None, None, 0), out_specs=0)


def ekfac_self_influence(task, params, factors: EKFACFactors, train_batches,
                         damping: Optional[float] = None,
                         chunk_size: int = DEFAULT_CHUNK_SIZE,
                         mesh: Optional[jax.sharding.Mesh] = None) -> jax.Array:
  """float32[N] `⟨∇ℓ_i, (G+λI)^{-1} ∇ℓ_i⟩` (train loss on both sides)."""
  lambdas = layer_damping(factors, damping) if isinstance(
      factors, EKFACFactors) else None
  params, batches, chunk_size, mesh = _prepare(task, params, train_batches,
                                               "train_batches", chunk_size, mesh)
  check_factors(factors, params, task=task)
  size = sharding_lib.data_size(mesh)
  params, layer_factors = _common.put_params((params, factors.factors), mesh)
  lambdas = _common.put_replicated(lambdas, mesh)
  kernel = _self_kernel(task, factors.layers, mesh)
  pieces = []
  progress = _common.Progress("ekfac_self_influence",
                              _common.num_padded_chunks(batches, chunk_size, size))
  for chunk, valid, first in _common.iterate_padded_chunks(batches, chunk_size,
                                                           size):
    scores = sharding_lib.to_host(kernel(params, layer_factors, lambdas,
                                         _common.put_sharded(chunk, mesh)))
    pieces.append(scores[:valid])
    _common.check_finite_scores("ekfac_self_influence", pieces[-1], first)
    progress.update(len(pieces))
  return jnp.asarray(np.concatenate(pieces))
