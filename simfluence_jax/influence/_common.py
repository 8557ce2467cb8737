"""Batch iteration, argument checks and the one sharded code path of the kernels.

Every kernel runs on a mesh with a `data` axis: the caller's, or by default a
one-device mesh on this process's default device. Train examples come in chunks
of one fixed length (a multiple of the `data` size; the last chunk padded and its
padding masked or sliced off), so each kernel compiles once per chunk shape.
"""

import collections.abc
import functools
import logging
import math
import numbers
import time
from typing import Any, Iterator, List, Optional, Tuple

import jax
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import sharding as sharding_lib

_logger = logging.getLogger("simfluence_jax.influence")


def num_examples(batch) -> int:
  """Leading-axis size of a batch pytree."""
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("batch has no arrays.")
  return int(np.shape(leaves[0])[0])


def as_batch_list(batches, argument: str) -> List[Any]:
  """A re-iterable list of batches; a single batch (a Mapping) becomes [batch]."""
  if isinstance(batches, collections.abc.Mapping):
    return [batches]
  batches = list(batches)
  if not batches:
    raise ValueError(f"{argument} is empty.")
  return batches


def check_mesh(mesh) -> None:
  """Raises ValueError unless `mesh` is None or a Mesh with a `data` axis."""
  if mesh is not None and (not isinstance(mesh, jax.sharding.Mesh)
                           or sharding_lib.DATA_AXIS not in mesh.axis_names):
    raise ValueError(f"mesh must be a jax.sharding.Mesh with a "
                     f"{sharding_lib.DATA_AXIS!r} axis (sharding.make_mesh), got "
                     f"{mesh!r}.")


def resolve_mesh(mesh) -> jax.sharding.Mesh:
  """`mesh`, or for None a one-device mesh on this process's default device."""
  check_mesh(mesh)
  if mesh is not None:
    return mesh
  device = jax.config.jax_default_device
  if device is None or isinstance(device, str):
    device = jax.local_devices()[0]
  return _one_device_mesh(device)


@functools.lru_cache(maxsize=None)
def _one_device_mesh(device) -> jax.sharding.Mesh:
  return sharding_lib.make_mesh(runs=1, data=1, devices=[device])


def check_chunk_size(chunk_size) -> int:
  """chunk_size must be an integer >= 1."""
  if (isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral)
      or chunk_size < 1):
    raise ValueError(f"chunk_size must be an integer >= 1, got "
                     f"{_checks.short_repr(chunk_size)}.")
  return int(chunk_size)


def check_damping(damping) -> Optional[float]:
  """damping must be None (the default heuristic) or a finite number > 0."""
  if damping is None:
    return None
  value = None
  if not isinstance(damping, (bool, str)):
    try:
      value = float(damping)
    except (TypeError, ValueError):
      value = None
  if value is None or not math.isfinite(value) or value <= 0:
    raise ValueError(f"damping must be a finite number > 0 (absolute λ) or None for "
                     f"the default 0.1 × mean(Λ), got {_checks.short_repr(damping)}.")
  return value


def chunk_length(batches: List[Any], chunk_size: int, multiple: int) -> int:
  """min(chunk_size, first batch), rounded up to a multiple of `multiple`."""
  length = min(chunk_size, num_examples(batches[0]))
  return -(-length // multiple) * multiple


def iterate_padded_chunks(batches: List[Any], chunk_size: int, multiple: int = 1
                          ) -> Iterator[Tuple[Any, int, int]]:
  """Fixed-length host chunks of examples, batch by batch, the last ones padded.

  Yields:
    (chunk: numpy pytree with leading axis `chunk_length(...)`, number of real
    examples (the first ones), index of its first example in the whole stream).
    Padding repeats the chunk's first example.
  """
  length = chunk_length(batches, chunk_size, multiple)
  step = min(chunk_size, length)
  offset = 0
  for batch in batches:
    batch = sharding_lib.to_host(batch)
    size = num_examples(batch)
    for start in range(0, size, step):
      stop = min(start + step, size)
      valid = stop - start
      chunk = jax.tree_util.tree_map(
          lambda x: np.concatenate([x[start:stop], np.repeat(x[start:start + 1],
                                                             length - valid, 0)]),
          batch)
      yield chunk, valid, offset + start
    offset += size


def check_finite_scores(kernel: str, scores: np.ndarray, first: int,
                        example_axis: int = -1) -> None:
  """Raises FloatingPointError if a chunk's host scores hold NaN or inf.

  `scores` has the chunk's train examples (the first `first` + 0, 1, ...) on
  `example_axis`; the message names the first bad one and how many are bad.
  """
  where = _checks.first_nonfinite(scores)
  if where is None:
    return
  index = first + where[example_axis]
  count = int(np.sum(~np.isfinite(scores)))
  raise FloatingPointError(
      f"{kernel}: {count} of {scores.size} scores of train examples "
      f"[{first}, {first + scores.shape[example_axis]}) are NaN or inf (the first at "
      f"train example {index}): NaN/inf in the params, checkpoints, factors, "
      f"query_batch or train_batches.")


def num_padded_chunks(batches: List[Any], chunk_size: int, multiple: int = 1) -> int:
  """How many chunks `iterate_padded_chunks` yields."""
  step = min(chunk_size, chunk_length(batches, chunk_size, multiple))
  return sum(-(-num_examples(b) // step) for b in batches)


def chunk_extras(length: int, valid: int, start: int):
  """(example weights float32[length]: 1 real / 0 padding, indices int32[length])."""
  weights = (np.arange(length) < valid).astype(np.float32)
  return weights, (start + np.arange(length)).astype(np.int32)


def data_parallel(fn, mesh, in_specs, out_specs, params_out: bool = False):
  """`jax.jit(shard_map(fn))` over `mesh`; specs use "data" or None per argument.

  `in_specs` / `out_specs`: a tuple with, per argument / output, either None
  (replicated) or the axis (int) split over `data`. Built once per distinct
  (fn, mesh, specs): callers cache `fn` (a module-level function or a cached
  partial), so repeated calls reuse one compiled kernel per shape. `params_out`:
  the outputs (per-shard statistics, leading `data` axis) are params-like and keep
  the `model` split of `sharding.param_spec` (a layer's factor is never whole on
  one device when the mesh has a `model` axis).
  """
  spec = jax.sharding.PartitionSpec

  def to_spec(axis):
    return spec() if axis is None else spec(*([None] * axis + [sharding_lib.DATA_AXIS]))

  def wrapped(*args):
    ins = tuple(jax.tree_util.tree_map(lambda _, a=axis: to_spec(a), arg)
                for axis, arg in zip(in_specs, args))
    outs = jax.tree_util.tree_map(to_spec, out_specs)
    out = jax.shard_map(fn, mesh=mesh, in_specs=ins, out_specs=outs,
                        axis_names=sharding_lib.manual_axes(mesh),
                        check_vma=False)(*args)
    if params_out:
      out = constrain_params(out, mesh, leading=(sharding_lib.DATA_AXIS,))
    return out

  return jax.jit(wrapped)


def constrain_params(tree, mesh, leading=()):
  """`tree` (traced) constrained to `sharding.param_shardings`: split over the
  mesh's `model` axis; unchanged without one (or with no mesh)."""
  if mesh is None or sharding_lib.model_size(mesh) == 1:
    return tree
  return jax.lax.with_sharding_constraint(
      tree, sharding_lib.param_shardings(tree, mesh, leading))


def put_replicated(tree, mesh):
  return sharding_lib.put(tree, sharding_lib.replicated(mesh))


def put_params(tree, mesh):
  """Params-like arrays (params, factors, queries) split over the mesh's `model`
  axis by `sharding.param_spec`, replicated over the other axes."""
  return sharding_lib.put(tree, sharding_lib.param_shardings(tree, mesh))


def put_sharded(tree, mesh):
  return sharding_lib.put(tree, sharding_lib.data_sharded(mesh))


def num_chunks(batches: List[Any], chunk_size: int) -> int:
  """How many chunks of at most `chunk_size` the kernels make of `batches`."""
  return num_padded_chunks(batches, chunk_size, 1)


class Progress:
  """Logs `label: chunk i/n, elapsed, ETA` lines for a loop of `total` items.

  Logs (INFO, logger "simfluence_jax.influence") after the first item, the last
  one, and otherwise at most every `interval` seconds; before logging it waits for
  `value` (the loop's latest output), so the times are of finished work, not of
  asynchronously dispatched work. Costs nothing when INFO is off.
  """

  def __init__(self, label: str, total: int, interval: float = 10.0):
    self.label, self.total, self.interval = label, total, interval
    self.start = self.last = time.perf_counter()

  def update(self, done: int, value: Any = None) -> None:
    """Marks `done` of `total` items finished."""
    if not _logger.isEnabledFor(logging.INFO):
      return
    now = time.perf_counter()
    if done not in (1, self.total) and now - self.last < self.interval:
      return
    if value is not None:
      jax.block_until_ready(value)
      now = time.perf_counter()
    self.last = now
    elapsed = now - self.start
    eta = elapsed / max(done, 1) * (self.total - done)
    _logger.info("%s: chunk %d/%d  elapsed %.1fs  ETA %.1fs", self.label, done,
                 self.total, elapsed, eta)
