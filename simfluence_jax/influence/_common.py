"""Batch iteration helpers shared by the scoring kernels."""

import collections.abc
from typing import Any, Iterable, Iterator, List, Tuple

import jax
import jax.numpy as jnp
import numpy as np


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
