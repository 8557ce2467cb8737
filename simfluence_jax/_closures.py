"""What a function computes, read from a fresh trace: refusing a function whose
closed-over values changed under JAX's trace cache.

JAX caches a function's trace by the function object and its arguments' shapes:
values the function reads from outside (a closure over a linen model's
`batch_stats`, a global temperature, frozen weights) are baked into the first trace
as constants and literals, and every later call with the same shapes reuses them.
A task or loss function reused after such a value changed computed with the old one,
silently (review h38: TracIn 84% off, EK-FAC 88%, metagradients 11×). `check_unchanged`
traces the function anew (a fresh wrapper, which JAX has never seen, so the Python
code runs and reads the current values) and compares a digest of the trace's
operations, literals and constants with the one its owner's first call recorded.
"""

import hashlib
import re
import weakref
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks


@jax.jit
def checksums(leaves):
  """uint32[2 · len(leaves)]: two wrapping sums per leaf, Σ_k bits_k·w_k over odd
  weights w_k of the element's position, computed where the leaves are (no copy to
  the host). Integer sums do not depend on the reduction order, so the value is the
  same on any mesh and device count, and a change of any one element changes it."""
  sums = []
  for leaf in leaves:
    x = jnp.asarray(leaf)
    width = x.dtype.itemsize
    if width == 8:  # two uint32 words per element
      bits = jax.lax.bitcast_convert_type(x, jnp.uint32).reshape(-1)
    else:
      unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[width]
      bits = (x if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(
          x, unsigned)).astype(jnp.uint32).reshape(-1)
    k = jnp.arange(bits.size, dtype=jnp.uint32)
    sums.append(jnp.sum(bits * (k * jnp.uint32(2654435761) + jnp.uint32(1) | 1)))
    sums.append(jnp.sum(bits * ((k ^ jnp.uint32(0x9E3779B9)) * jnp.uint32(40503) | 1)))
  return jnp.stack(sums) if sums else jnp.zeros((0,), jnp.uint32)


def hex_checksum(leaves: Sequence[Any]) -> str:
  """`checksums` of `leaves` as hex (16 digits per leaf; "" for none)."""
  return "".join(f"{int(v):08x}" for v in np.asarray(checksums(tuple(leaves)))
                 ) if leaves else ""


def _array_consts(consts) -> list:
  """The constants of a trace as checksummable arrays: typed PRNG keys as their key
  data; anything that is not an array is left out."""
  arrays = []
  for c in consts:
    dtype = getattr(c, "dtype", None)
    if dtype is None:
      continue
    if jnp.issubdtype(dtype, jax.dtypes.prng_key):
      c = jax.random.key_data(c)
    arrays.append(c)
  return arrays


def trace(fn: Callable, *args, **kwargs):
  """`jax.make_jaxpr` of `fn(*args, **kwargs)` through a wrapper made for this call:
  JAX has no trace of it cached, so `fn`'s Python code runs and reads the values it
  closes over now."""
  return jax.make_jaxpr(lambda *a: fn(*a, **kwargs))(*args)


def one_example(batch):
  """The shapes and dtypes of one example of `batch` (leading axis 1), to trace
  with: no slice of the data (which may be split over processes) is taken."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((1,) + tuple(np.shape(x))[1:],
                                     jnp.result_type(x)), batch)


def operations_text(closed) -> str:
  """The printed jaxpr without object addresses (equal in every process for the same
  operations, literals and shapes)."""
  return re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed.jaxpr))


def constants_checksum(closed) -> str:
  """`hex_checksum` of a trace's array constants: the values it closed over."""
  return hex_checksum(_array_consts(closed.consts))


def digest(closed) -> str:
  """A digest of a trace's operations, literals and closed-over values."""
  return hashlib.sha256((operations_text(closed) + "|" + constants_checksum(closed)
                         ).encode()).hexdigest()[:16]


# owner -> {signature of the traced arguments: digest at the owner's first check}.
# Weakly keyed: never keeps a task or a loss function (and its model) alive.
_FIRST = weakref.WeakKeyDictionary()


def check_unchanged(owner: Any, closed, arguments: Any, message: str) -> None:
  """Raises ValueError(`message`) if `closed` (`trace` of a function on
  `arguments`) has other operations or closed-over values than the trace `owner`'s
  first check recorded for arguments of the same shapes (`owner`: the object JAX's
  and this package's caches hold, e.g. a task or a loss function). Owners without
  weak references are not checked."""
  try:
    first = _FIRST.setdefault(owner, {})
  except TypeError:
    return
  now = digest(closed)
  if first.setdefault(_checks.tree_signature(arguments), now) != now:
    raise ValueError(message)
