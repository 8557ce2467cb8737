"""Batch iteration helpers shared by the scoring kernels."""

import collections.abc
import logging
import time
from typing import Any, Iterable, Iterator, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

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


def iterate_chunks(batches: Iterable[Any], chunk_size: int
                   ) -> Iterator[Tuple[Any, int]]:
  """Fixed-size chunks of examples across batches, the last one padded.

  Every chunk has the same length (min(chunk_size, size of the first batch)) so
  that the jitted kernel compiles once; padding repeats the chunk's first example
  and must be sliced off by the caller.

  Yields:
    (chunk batch with leading axis of the chunk length, number of real examples).
  """
  length = None
  for batch in batches:
    size = num_examples(batch)
    if length is None:
      length = min(chunk_size, size)
    for start in range(0, size, length):
      stop = min(start + length, size)
      chunk = jax.tree_util.tree_map(lambda x: x[start:stop], batch)
      valid = stop - start
      if valid < length:
        chunk = jax.tree_util.tree_map(
            lambda x: jnp.concatenate(
                [jnp.asarray(x), jnp.repeat(jnp.asarray(x)[:1], length - valid, 0)]),
            chunk)
      yield chunk, valid


def pad_to_multiple(chunk, multiple: int):
  """Pads a chunk's leading axis to a multiple of `multiple` with copies of row 0."""
  length = num_examples(chunk)
  extra = -length % multiple
  if not extra:
    return chunk
  return jax.tree_util.tree_map(
      lambda x: jnp.concatenate([jnp.asarray(x), jnp.repeat(jnp.asarray(x)[:1], extra,
                                                            0)]), chunk)


def check_mesh(mesh) -> None:
  """Raises ValueError unless `mesh` is None or a Mesh with a `data` axis."""
  # pylint: disable=g-import-not-at-top
  from simfluence_jax import sharding
  if mesh is not None and (not isinstance(mesh, jax.sharding.Mesh)
                           or sharding.DATA_AXIS not in mesh.axis_names):
    raise ValueError(f"mesh must be a jax.sharding.Mesh with a {sharding.DATA_AXIS!r} "
                     f"axis (sharding.make_mesh), got {mesh!r}.")


def num_chunks(batches: List[Any], chunk_size: int) -> int:
  """How many chunks `iterate_chunks(batches, chunk_size)` yields."""
  length = min(chunk_size, num_examples(batches[0]))
  return sum(-(-num_examples(b) // length) for b in batches)


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
