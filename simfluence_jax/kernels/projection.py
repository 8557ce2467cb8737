"""Seeded random projections of (per-example) gradients.

The projection matrix `R: [P, K]` (entries ±1/√K or N(0, 1/K), so that
E[⟨R^T g, R^T h⟩] = ⟨g, h⟩) is never materialised: it is generated block by block
from `fold_in(key, block_index)` inside a `lax.scan`, so memory is O(block_size · K)
whatever the number of parameters P. The matrix is a function of (key, block_size,
K) (and `kind`): the same key with the same `block_size` and K always gives the same
matrix, so projections taken at different times (train and test gradients,
different steps) are comparable; a different `block_size` gives an unrelated matrix
(block sizes at or above P are all one block, the same matrix), so never compare
projections taken with different block sizes. Every caller in this package uses the
default block size (2**14).
"""

import math

import jax
import jax.numpy as jnp

from simfluence_jax import _checks

_KINDS = ("rademacher", "gaussian")


def flatten_per_example(tree) -> jax.Array:
  """Concatenates the leaves of a pytree with a leading example axis.

  Args:
    tree: pytree whose leaves are float[n, ...].

  Returns:
    float32[n, P], leaves in `jax.tree_util` order.

  Raises:
    ValueError: no leaves, or a leaf whose leading axis is not the first leaf's n
      (or a 0-d leaf).
  """
  leaves = jax.tree_util.tree_leaves(tree)
  if not leaves:
    raise ValueError("flatten_per_example: the pytree has no leaves.")
  n = jnp.shape(leaves[0])[0] if jnp.ndim(leaves[0]) else None
  for leaf in leaves:
    # Reshaping [m, ...] to (n, -1) would silently regroup another example count's
    # entries into n rows (a 0-d leaf has no example axis at all).
    if n is None or not jnp.ndim(leaf) or jnp.shape(leaf)[0] != n:
      raise ValueError(f"flatten_per_example: every leaf needs the leading example "
                       f"axis {n}, got shape {tuple(jnp.shape(leaf))}.")
  return jnp.concatenate(
      [jnp.reshape(leaf, (n, -1)).astype(jnp.float32) for leaf in leaves], axis=1)


def project(vectors: jax.Array, key: jax.Array, dim: int,
            kind: str = "rademacher", block_size: int = 1 << 14) -> jax.Array:
  """Projects the rows of `vectors` with a seeded random matrix.

  Args:
    vectors: float[n, P] (e.g. flattened per-example gradients).
    key: PRNG key defining the matrix, together with `block_size`, `dim` and
      `kind`: the matrix is a function of all four, so projections are comparable
      only when taken with the same ones.
    dim: K, the projection dimension.
    kind: "rademacher" or "gaussian".
    block_size: rows of the projection matrix generated at a time (each block from
      `fold_in(key, block_index)`); changing it changes the matrix.

  Returns:
    float32[n, K].
  """
  if kind not in _KINDS:
    raise ValueError(f"project: kind must be one of {_KINDS}, got {kind!r}.")
  for name, value in (("dim", dim), ("block_size", block_size)):
    if not _checks.is_int(value) or value < 1:
      raise ValueError(f"project: {name} must be a positive integer, got "
                       f"{_checks.short_repr(value)}.")
  dim, block_size = int(dim), int(block_size)
  if jnp.ndim(vectors) != 2:
    raise ValueError(f"project: vectors must be float[n, P], got shape "
                     f"{tuple(jnp.shape(vectors))}.")
  vectors = jnp.asarray(vectors, jnp.float32)
  n, num_params = vectors.shape
  block_size = min(block_size, num_params)
  num_blocks = math.ceil(num_params / block_size)
  padded = jnp.pad(vectors, ((0, 0), (0, num_blocks * block_size - num_params)))
  blocks = jnp.transpose(jnp.reshape(padded, (n, num_blocks, block_size)), (1, 0, 2))
  scale = 1.0 / math.sqrt(dim)

  def body(acc, inputs):
    index, block = inputs
    block_key = jax.random.fold_in(key, index)
    if kind == "rademacher":
      matrix = jax.random.rademacher(block_key, (block_size, dim), jnp.float32)
    else:
      matrix = jax.random.normal(block_key, (block_size, dim), jnp.float32)
    return acc + block @ (matrix * scale), None

  out, _ = jax.lax.scan(body, jnp.zeros((n, dim), jnp.float32),
                        (jnp.arange(num_blocks), blocks))
  return out


def project_pytree(tree, key: jax.Array, dim: int, kind: str = "rademacher",
                   block_size: int = 1 << 14) -> jax.Array:
  """`project(flatten_per_example(tree), ...)`: float[n, ...] leaves -> float32[n, K].

  The same (key, block_size, K, kind) gives the same matrix (see `project`)."""
  return project(flatten_per_example(tree), key, dim, kind, block_size)
