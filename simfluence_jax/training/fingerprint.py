"""What a training job was computed from: the resume fingerprint of `train_runs`.

A workdir's checkpoints may only be resumed by a call that would train exactly the
same runs, so the fingerprint covers everything that shapes them: the optimizer and
every hyperparameter it reads, the loss (model), digests of the base params, the
data, the curricula and their weights, and the recording settings. Digests are of
values, computed on the host, identical on every process.
"""

import hashlib
from typing import Any, Dict, List

import jax
import numpy as np

from simfluence_jax.training import optim

def digest(tree: Any) -> str:
  """sha256 (16 hex digits) of a pytree's structure, dtypes, shapes and values."""
  hasher = hashlib.sha256()
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  hasher.update(str(treedef).encode())
  for leaf in leaves:
    array = np.ascontiguousarray(np.asarray(leaf))
    hasher.update(f"{array.dtype}{array.shape}".encode())
    hasher.update(array.tobytes())
  return hasher.hexdigest()[:16]


def optimizer_fields(config: Any, num_steps: int) -> Dict[str, Any]:
  """The optimizer settings a run is trained with (`optim.optimizer_settings`)."""
  return optim.optimizer_settings(config, num_steps)


def loss_description(loss_fn: Any) -> str:
  """`make_loss_fn`'s description of the loss (model and modes), else its name."""
  return str(getattr(loss_fn, "description", None) or
             getattr(loss_fn, "__qualname__", type(loss_fn).__name__))


def differences(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
  """'field: old → new' for every field whose values differ."""
  lines = []
  for name in sorted(set(old) | set(new)):
    before, after = old.get(name, "<absent>"), new.get(name, "<absent>")
    if before != after:
      lines.append(f"{name}: {before!r} → {after!r}")
  return lines
