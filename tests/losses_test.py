"""The per-example losses equal optax's cross-entropy bit for bit (values and grads)."""

import jax
import numpy as np
import optax
import pytest

from simfluence_jax import losses


@pytest.mark.parametrize("shape", [(13, 10), (5, 7, 11)])
def test_cross_entropy_is_optax_bit_for_bit(shape):
  rng = np.random.default_rng(0)
  logits = (5 * rng.normal(size=shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[:-1]).astype(np.int32)
  ours = lambda x: losses._cross_entropy(x, labels)  # pylint: disable=protected-access
  theirs = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, labels)
  for transform in (lambda f: f, jax.jit, lambda f: jax.grad(lambda x: f(x).sum()),
                    lambda f: jax.jit(jax.grad(lambda x: f(x).sum()))):
    np.testing.assert_array_equal(transform(ours)(logits), transform(theirs)(logits))


def test_losses_per_example():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 3, 6)).astype(np.float32)
  targets = rng.integers(0, 6, (4, 3)).astype(np.int32)
  mask = np.array([[1, 1, 0]] * 4, np.float32)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  token = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(losses.language_modeling_loss(logits, targets, mask),
                             (token * mask).sum(-1), rtol=1e-5)
  np.testing.assert_allclose(losses.classification_loss(logits[:, 0], targets[:, 0]),
                             token[:, 0], rtol=1e-5)
