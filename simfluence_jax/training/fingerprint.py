"""What a training job was computed from: the resume fingerprint of `train_runs`.

A workdir's checkpoints may only be resumed by a call that would train exactly the
same runs, so the fingerprint covers everything that shapes them: the optimizer and
every hyperparameter it reads, the loss (model), digests of the base params, the
data, the curricula and their weights, and the recording settings. Digests are of
values, computed on the host, identical on every process.
"""

import hashlib
import re
from typing import Any, Dict, List, Tuple

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


def traced_computation(fn: Any, *args: Any) -> Tuple[str, List[np.ndarray], Any]:
  """(jaxpr text, closed-over constant arrays, output shapes) of `fn(*args)`, traced
  only: what a function computes, whatever its name or where its code lives.

  `args` may be `jax.ShapeDtypeStruct`s. Addresses of callables in parameters
  (custom_jvp / custom_vjp rules print as `<function f at 0x...>`) are dropped, so
  the text is the same in every process. It can change with the JAX version.
  """
  closed, out = jax.make_jaxpr(fn, return_shape=True)(*args)
  text = re.sub(r" at 0x[0-9a-fA-F]+", "", str(closed))
  return text, [np.asarray(c) for c in closed.consts if hasattr(c, "shape")], out


def loss_computation(loss_fn: Any, params: Any, batch: Any,
                     stochastic: bool = False) -> str:
  """`digest` of what a loss computes on `params` and one example of `batch`
  (`traced_computation`): two losses with one name (closures of one factory), or
  one module whose code changed (its repr shows only its fields), differ where
  their constants or operations do. `stochastic`: the training path
  `loss_fn(params, batch, rng=key)` too, with a fixed key."""
  spec = lambda shape, x: jax.ShapeDtypeStruct(shape, np.result_type(x))
  one = jax.tree_util.tree_map(lambda x: spec((1,) + np.shape(x)[1:], x), batch)
  shapes = jax.tree_util.tree_map(lambda x: spec(np.shape(x), x), params)
  paths = [loss_fn]
  if stochastic:
    key = jax.random.PRNGKey(0)
    paths.append(lambda p, b: loss_fn(p, b, rng=key))
  parts = []
  for path in paths:
    text, consts, _ = traced_computation(path, shapes, one)
    parts += [np.frombuffer(text.encode(), np.uint8)] + consts
  return digest(parts)


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
