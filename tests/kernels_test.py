"""Tests for kernels/: per-example gradients and seeded projections."""

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import kernels
from simfluence_jax import losses


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def _setup(num_examples=12):
  model = _MLP()
  inputs = jax.random.normal(jax.random.key(0), (num_examples, 4))
  labels = jnp.arange(num_examples) % 3
  params = model.init(jax.random.key(1), inputs)["params"]
  loss_fn = lambda p, b: losses.classification_loss(
      model.apply({"params": p}, b["inputs"]), b["labels"])
  return loss_fn, params, {"inputs": inputs, "labels": labels}


class PerExampleGradsTest(absltest.TestCase):

  def test_equals_python_loop_of_grad(self):
    loss_fn, params, batch = _setup()
    grads = kernels.per_example_grads(loss_fn, params, batch)
    for i in range(batch["labels"].shape[0]):
      single = jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)
      expected = jax.grad(lambda p: loss_fn(p, single)[0])(params)
      got = jax.tree_util.tree_map(lambda g: g[i], grads)
      jax.tree_util.tree_map(
          lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
          got, expected)

  def test_chunked_equals_unchunked(self):
    loss_fn, params, batch = _setup()
    full = kernels.flatten_per_example(kernels.per_example_grads(loss_fn, params, batch))
    chunked = kernels.flatten_per_example(
        kernels.per_example_grads(loss_fn, params, batch, chunk_size=4))
    np.testing.assert_allclose(chunked, full, rtol=1e-5, atol=1e-6)
    with self.assertRaisesRegex(ValueError, "chunk_size"):
      kernels.per_example_grads(loss_fn, params, batch, chunk_size=5)
    for bad in (0, -2, 2.0):  # ZeroDivisionError / reshape TypeError before
      with self.assertRaisesRegex(ValueError, rf"^per_example_grads: chunk_size="
                                  rf"{bad!r} must be a positive integer"):
        kernels.per_example_grads(loss_fn, params, batch, chunk_size=bad)


class ProjectionTest(absltest.TestCase):

  def test_same_key_is_one_linear_map(self):
    vectors = jax.random.normal(jax.random.key(2), (5, 50))
    key = jax.random.key(3)
    # Projecting the identity materialises the matrix the key defines.
    matrix = kernels.project(jnp.eye(50), key, 16, block_size=7)
    np.testing.assert_allclose(kernels.project(vectors, key, 16, block_size=7),
                               vectors @ matrix, rtol=1e-5, atol=1e-5)
    # Projections of different sets with the same key are comparable.
    dots = kernels.project(vectors[:2], key, 16, block_size=7) @ kernels.project(
        vectors[2:], key, 16, block_size=7).T
    np.testing.assert_allclose(dots, (vectors[:2] @ matrix) @ (vectors[2:] @ matrix).T,
                               rtol=1e-4, atol=1e-4)

  def test_preserves_dot_products_in_expectation(self):
    vectors = jax.random.normal(jax.random.key(4), (3, 40))
    exact = vectors @ vectors.T
    for kind in ("rademacher", "gaussian"):
      def estimate(key, kind=kind):
        projected = kernels.project(vectors, key, 32, kind=kind)
        return projected @ projected.T
      estimates = jax.jit(jax.vmap(estimate))(
          jax.random.split(jax.random.key(0), 60))
      # Standard error of the mean of 60 estimates with variance ~ 2|x|²|y|²/32.
      np.testing.assert_allclose(jnp.mean(estimates, 0), exact, atol=12.0)
      self.assertGreater(np.corrcoef(np.ravel(jnp.mean(estimates, 0)),
                                     np.ravel(exact))[0, 1], 0.95)

  def test_project_pytree_flattens_leaves_in_order(self):
    tree = {"a": jnp.ones((2, 3)), "b": jnp.arange(8.0).reshape(2, 2, 2)}
    flat = kernels.flatten_per_example(tree)
    self.assertEqual(flat.shape, (2, 7))
    key = jax.random.key(5)
    np.testing.assert_allclose(kernels.project_pytree(tree, key, 4),
                               kernels.project(flat, key, 4), rtol=1e-6)

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "kind"):
      kernels.project(jnp.ones((2, 3)), jax.random.key(0), 2, kind="sparse")
    with self.assertRaisesRegex(ValueError, "dim"):
      kernels.project(jnp.ones((2, 3)), jax.random.key(0), 0)


if __name__ == "__main__":
  absltest.main()
