"""Per-example losses shared by training and the influence tasks.

Both return one loss per example so that the same numbers are trained on, recorded
in traces, and differentiated by the attribution kernels.
"""

from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`optax.softmax_cross_entropy_with_integer_labels`, op for op (the same numbers).

  Written out so that the kernels do not import optax (0.13-0.2 s of a process that
  only scores; tests/losses_test.py checks it against optax).
  """
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - label_logits


def misread_class_ids(ids, num_classes: int, counts: Optional[np.ndarray] = None
                      ) -> Tuple[np.ndarray, np.ndarray]:
  """Where `_cross_entropy`'s gather would read host class ids wrongly: (bad ids
  that count, bad ids that do not), two bool arrays shaped like `ids`.

  An id that counts (where `counts`, e.g. an LM target under mask > 0; every id
  without `counts`) must be in [0, C): the gather wraps a negative one to class
  C + id (a silent wrong loss) and reads NaN for one ≥ C. One that does not count
  (padding under mask 0) may hold any id in [-C, C): outside, the gather reads NaN,
  and NaN × 0 is NaN.
  """
  ids = np.asarray(ids)
  counts = np.ones(ids.shape, bool) if counts is None else np.asarray(counts, bool)
  outside = (ids < -num_classes) | (ids >= num_classes)
  return counts & (outside | (ids < 0)), ~counts & outside


def _check_shape(name: str, array, expected: Tuple[int, ...], of: str) -> None:
  """Static (trace-time) shape check: a mismatch would broadcast into a wrong loss."""
  if tuple(np.shape(array)) != tuple(expected):
    raise ValueError(f"{name}: expected shape {tuple(expected)} ({of}), got "
                     f"{tuple(np.shape(array))}.")


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example.

  Args:
    logits: float[B, C].
    labels: int[B].

  Returns:
    float32[B].

  Raises:
    ValueError: labels.shape is not logits.shape[:-1] (checked at trace time).
  """
  _check_shape("labels", labels, np.shape(logits)[:-1], "logits.shape[:-1]")
  return _cross_entropy(logits.astype(jnp.float32), labels)


def language_modeling_loss(logits: jax.Array, targets: jax.Array,
                           mask: jax.Array) -> jax.Array:
  """Next-token cross-entropy summed over the masked target tokens of each sequence.

  Args:
    logits: float[B, L, V].
    targets: int[B, L].
    mask: float[B, L], 1 where the token counts.

  Returns:
    float32[B].

  Raises:
    ValueError: targets.shape is not logits.shape[:-1], or mask.shape is not
      targets.shape (checked at trace time).
  """
  _check_shape("targets", targets, np.shape(logits)[:-1], "logits.shape[:-1]")
  _check_shape("mask", mask, np.shape(targets), "targets.shape")
  token_losses = _cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.sum(token_losses * mask.astype(jnp.float32), axis=-1)
