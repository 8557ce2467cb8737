"""Per-example losses shared by training and the influence tasks.

Both return one loss per example so that the same numbers are trained on, recorded
in traces, and differentiated by the attribution kernels.
"""

import jax
import jax.numpy as jnp


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """`optax.softmax_cross_entropy_with_integer_labels`, op for op (the same numbers).

  Written out so that the kernels do not import optax (0.13-0.2 s of a process that
  only scores; tests/losses_test.py checks it against optax).
  """
  label_logits = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return jax.nn.logsumexp(logits, axis=-1) - label_logits


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
