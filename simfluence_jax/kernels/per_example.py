"""Per-example gradients: `vmap(grad)` over examples, in chunks to bound memory."""

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from simfluence_jax import _checks

# loss_fn(params, batch) -> float[n]: one loss per example of `batch`.
PerExampleLossFn = Callable[..., jax.Array]


def _num_examples(batch) -> int:
  leaves = jax.tree_util.tree_leaves(batch)
  if not leaves:
    raise ValueError("per_example_grads: batch has no arrays.")
  return leaves[0].shape[0]


def per_example_grads(loss_fn: PerExampleLossFn, params, batch,
                      chunk_size: Optional[int] = None):
  """Gradient of every example's loss with respect to `params`.

  Args:
    loss_fn: `(params, batch) -> float[n]` per-example losses.
    params: parameter pytree.
    batch: pytree of arrays with a leading example axis of size n.
    chunk_size: examples differentiated at once (`lax.map` over chunks); None = all.
      n must be divisible by chunk_size.

  Returns:
    Pytree like `params` with leaves float[n, *leaf.shape].
  """
  def single(example):
    expand = lambda x: x[None]
    return jax.grad(lambda p: loss_fn(p, jax.tree_util.tree_map(expand, example))[0])(
        params)

  n = _num_examples(batch)
  if chunk_size is not None and (not _checks.is_int(chunk_size) or chunk_size < 1):
    raise ValueError(f"per_example_grads: chunk_size={chunk_size!r} must be a "
                     "positive integer (or None: all examples at once).")
  if chunk_size is None or chunk_size >= n:
    return jax.vmap(single)(batch)
  if n % chunk_size:
    raise ValueError(f"per_example_grads: number of examples {n} is not divisible by "
                     f"chunk_size={chunk_size}.")
  chunked = jax.tree_util.tree_map(
      lambda x: jnp.reshape(x, (n // chunk_size, chunk_size) + x.shape[1:]), batch)
  grads = jax.lax.map(jax.vmap(single), chunked)
  return jax.tree_util.tree_map(lambda g: jnp.reshape(g, (n,) + g.shape[2:]), grads)
