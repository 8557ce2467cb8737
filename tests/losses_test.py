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


def test_misread_class_ids_is_what_the_gather_does():
  """Against the loss itself: an id outside [-C, C) makes the loss NaN (masked or
  not: NaN × 0 is NaN); one in [-C, 0) reads class C + id; [0, C) reads itself."""
  num_classes = 5
  ids = np.arange(-12, 12).astype(np.int32)
  logits = np.random.default_rng(0).normal(size=(len(ids), num_classes)).astype(
      np.float32)
  loss = np.asarray(losses.classification_loss(logits, ids))
  wrapped = np.asarray(losses.classification_loss(logits, ids % num_classes))
  inside = (ids >= -num_classes) & (ids < num_classes)
  np.testing.assert_array_equal(np.isnan(loss), ~inside)
  np.testing.assert_array_equal(loss[inside], wrapped[inside])
  counted_bad, padding_bad = losses.misread_class_ids(ids, num_classes)
  np.testing.assert_array_equal(counted_bad, (ids < 0) | (ids >= num_classes))
  assert not padding_bad.any()
  # The same ids as masked LM targets: only the NaN ones change the loss.
  masked = np.asarray(losses.language_modeling_loss(
      logits[None], ids[None], np.zeros((1, len(ids)), np.float32)))
  assert np.isnan(masked[0])
  counted_bad, padding_bad = losses.misread_class_ids(ids, num_classes,
                                                      np.zeros(ids.shape, bool))
  assert not counted_bad.any()
  np.testing.assert_array_equal(padding_bad, ~inside)
  fine = ids[inside]
  assert np.asarray(losses.language_modeling_loss(
      logits[None, inside], fine[None], np.zeros((1, len(fine)), np.float32)))[0] == 0
