"""Small host-side checks shared by the kernels, training and simulators.

Each public function that refuses a non-finite value, or a pytree that is not the
one it expects, locates it here, so every message names the first bad index the
same way.
"""

from typing import Any, Optional, Tuple

import numpy as np


def first_nonfinite(values: Any) -> Optional[Tuple[int, ...]]:
  """The index (a tuple, one int per axis) of the first NaN/inf of `values` in C
  order, or None when all are finite. `values` is read on the host (numpy)."""
  bad = ~np.isfinite(np.asarray(values))
  if not bad.any():
    return None
  return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), bad.shape))


def tree_signature(tree: Any) -> tuple:
  """A pytree's structure and every leaf's shape and dtype (None for a leaf
  without a dtype, e.g. an NNX module passed whole): equal signatures mean the same
  model layout, whatever the values."""
  import jax  # pylint: disable=g-import-not-at-top
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  return treedef, tuple((tuple(np.shape(x)), str(getattr(x, "dtype", None)))
                        for x in leaves)
