"""Small host-side checks shared by the kernels, training and simulators.

Each public function that refuses a non-finite value, or a pytree that is not the
one it expects, locates it here, so every message names the first bad index the
same way.
"""

import numbers
from typing import Any, Optional, Tuple

import numpy as np


def is_int(value: Any) -> bool:
  """An integer, Python's or NumPy's, and not a bool (True is no size)."""
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


# Elements per block of `first_nonfinite` (its mask: one byte each).
_BLOCK_ELEMENTS = 1 << 24


def first_nonfinite(values: Any) -> Optional[Tuple[int, ...]]:
  """The index (a tuple, one int per axis) of the first NaN/inf of `values` in C
  order, or None when all are finite. `values` is read on the host (numpy)."""
  values = np.asarray(values)
  if values.ndim == 0:
    return None if np.isfinite(values) else ()
  # In blocks along the first axis: a memory-mapped trace larger than RAM is
  # checked with one block's mask in memory at a time, not a byte per element.
  row = max(1, values[:1].size)
  rows = max(1, _BLOCK_ELEMENTS // row)
  for start in range(0, len(values), rows):
    bad = ~np.isfinite(values[start:start + rows])
    if bad.any():
      index = np.unravel_index(int(np.argmax(bad)), bad.shape)
      return (start + int(index[0]),) + tuple(int(i) for i in index[1:])
  return None


def short_repr(value: Any, limit: int = 80) -> str:
  """`value` for a one-line message about a scalar argument: an array, a dict or a
  sequence (a batch or a pytree passed in the wrong place) by its type and shape
  or keys, anything else by its repr cut to `limit` characters (review h38: a query
  batch passed as `damping` printed the whole batch)."""
  shape = getattr(value, "shape", None)
  if shape is not None and hasattr(value, "dtype") and tuple(shape):
    return f"an array of shape {tuple(shape)} ({value.dtype})"
  if isinstance(value, dict):
    keys = ", ".join(repr(k) for k in list(value)[:6])
    more = ", ..." if len(value) > 6 else ""
    return f"a dict with keys [{keys}{more}]"
  if isinstance(value, (list, tuple)) and (len(value) > 4 or not all(
      v is None or isinstance(v, (numbers.Number, str)) for v in value)):
    kinds = ", ".join(sorted({type(v).__name__ for v in value}))
    return (f"a {type(value).__name__} of {len(value)} "
            f"item{'' if len(value) == 1 else 's'} ({kinds})")
  text = repr(value)
  return text if len(text) <= limit else text[:limit - 3] + "..."


def tree_signature(tree: Any) -> tuple:
  """A pytree's structure and every leaf's shape and dtype (None for a leaf
  without a dtype, e.g. an NNX module passed whole): equal signatures mean the same
  model layout, whatever the values."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", None)))
                        for x in leaves)
