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


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example.

  Args:
    logits: float[B, C].
    labels: int[B].

  Returns:
    float32[B].
  """
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
  """
  token_losses = _cross_entropy(logits.astype(jnp.float32), targets)
  return jnp.sum(token_losses * mask.astype(jnp.float32), axis=-1)
