"""A multi-layer perceptron classifier."""

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp


class MLPClassifier(nn.Module):
  """ReLU MLP: `Dense -> relu` per hidden size, then a `Dense` to the class logits.

  Attributes:
    hidden_sizes: widths of the hidden layers (empty = logistic regression).
    num_classes: C, number of output logits.
  """

  hidden_sizes: Sequence[int] = (64,)
  num_classes: int = 10

  @nn.compact
  def __call__(self, x):
    """Class logits.

    Args:
      x: float32[B, D] (trailing feature axes are flattened).

    Returns:
      float32[B, C].
    """
    x = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
    for index, width in enumerate(self.hidden_sizes):
      x = nn.relu(nn.Dense(width, name=f"hidden_{index}")(x))
    return nn.Dense(self.num_classes, name="logits")(x)
