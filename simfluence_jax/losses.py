"""Per-example losses shared by training and the influence tasks.

Both return one loss per example so that the same numbers are trained on, recorded
in traces, and differentiated by the attribution kernels.
"""

import jax
import jax.numpy as jnp
import optax


def classification_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy per example.

  Args:
    logits: float[B, C].
    labels: int[B].

  Returns:
    float32[B].
  """
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), labels)


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
  token_losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)
  return jnp.sum(token_losses * mask.astype(jnp.float32), axis=-1)
