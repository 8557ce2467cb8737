"""Factored per-example inner products against materialised per-example gradients.

For a layer with tokens, `⟨G_q, G_i⟩ = Σ_{s,t} (g_qs·g_it)(a_qs·a_it)`: TracIn and
self-influence use it where it is cheaper, materialised gradients elsewhere, and
plain per-example gradients for leaves no block covers (LayerNorm, free params).
References: `kernels.per_example_grads` of every leaf, flattened and multiplied.
"""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
from simfluence_jax import kernels
from simfluence_jax.influence import _blocks
from simfluence_jax.influence import _tracin
import _influence_fixtures as fixtures


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.relu(nn.Dense(16)(x)))


class _LM(nn.Module):
  """Embedding, causal attention (DenseGeneral), LayerNorm, MLP, free position bias."""

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(11, 8)(tokens) + self.param("bias", nn.initializers.normal(0.1),
                                             (tokens.shape[1], 8))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(
        nn.LayerNorm()(x), mask=nn.make_causal_mask(tokens))
    return nn.Dense(11)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))


class _CNN(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(4, (3, 3))(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(6, (3, 3), strides=2)(x))
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(3)(nn.relu(nn.Dense(8)(x)))


@functools.lru_cache(maxsize=None)
def _setup(kind):
  # Data and the two checkpoints drawn on the host (no program per random shape).
  if kind == "mlp":
    model, inputs = _MLP(), fixtures.normal(0, (12, 5))
  elif kind == "cnn":
    model, inputs = _CNN(), fixtures.normal(0, (12, 8, 8, 2))
  else:
    model = _LM()
    tokens = fixtures.randint(0, (12, 7), 11)
    mask = np.ones((12, 6), np.float32)
    mask[0, -1] = 0.0
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    checkpoints = [fixtures.host_init(model, batch["inputs"][:1], seed=k)
                   for k in (1, 2)]
    return influence.LanguageModelingTask(model.apply), checkpoints, batch
  batch = {"inputs": inputs, "labels": np.arange(12, dtype=np.int32) % 3}
  checkpoints = [fixtures.host_init(model, inputs[:1], seed=k) for k in (1, 2)]
  return influence.ClassificationTask(model.apply), checkpoints, batch


@functools.lru_cache(maxsize=None)
def _materialised_program(fn):
  return jax.jit(lambda p, b: kernels.flatten_per_example(
      kernels.per_example_grads(fn, p, b)))


def _materialised(task, params, batch, fn="loss"):
  # One program per function and shapes, shared by the two checkpoints.
  grads = _materialised_program(getattr(task, fn))(params, batch)
  return np.asarray(grads, np.float64)


class FactoredTracInTest(parameterized.TestCase):

  @parameterized.parameters("mlp", "lm", "cnn")
  def test_scores_and_self_influence_equal_materialised_gradients(self, kind):
    task, checkpoints, batch = _setup(kind)
    rates = [0.3, 0.1]
    query = jax.tree_util.tree_map(lambda x: x[:4], batch)
    expected, expected_self = 0.0, 0.0
    for params, rate in zip(checkpoints, rates):
      train = _materialised(task, params, batch)
      expected = expected + rate * _materialised(task, params, query,
                                                 "measurement") @ train.T
      expected_self = expected_self + rate * np.sum(train ** 2, axis=1)
    got = influence.tracin_scores(task, checkpoints, rates, query, [batch],
                                  chunk_size=5)
    np.testing.assert_allclose(got, expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())
    got_self = influence.tracin_self_influence(task, checkpoints, rates, [batch],
                                               chunk_size=5)
    np.testing.assert_allclose(got_self, expected_self, rtol=1e-4,
                               atol=1e-5 * np.abs(expected_self).max())

  def test_the_form_is_chosen_per_layer_from_the_shapes(self):
    for kind, want in (("mlp", {True}), ("cnn", {False, True})):
      task, checkpoints, batch = _setup(kind)
      plan = _tracin._make_plan(task, checkpoints[0], batch, batch, 12)
      self.assertEqual(set(plan.factored.values()), want, kind)
      if kind == "cnn":
        # 16 positions of a 3x3x2 patch: materialising is cheaper for the first conv.
        self.assertFalse(plan.factored["Conv_0"])
        self.assertTrue(plan.factored["Dense_1"])
    task, checkpoints, batch = _setup("lm")
    plan = _tracin._make_plan(task, checkpoints[0], batch, batch, 12)
    # LayerNorms, the free position bias: plain per-example gradients.
    self.assertIn(("params", "bias"), plan.other_paths)
    self.assertIn(("params", "LayerNorm_0", "scale"), plan.other_paths)
    self.assertNotIn(("params", "Dense_0", "kernel"), plan.other_paths)


class BlockInnerProductTest(parameterized.TestCase):

  @parameterized.parameters((1, 1), (3, 5))
  def test_factored_equals_materialised_for_sequences(self, query_tokens,
                                                      train_tokens):
    spec = influence.LayerSpec(name="d", kind="Dense", in_axes=(-1,),
                               num_feature_axes=1, input_dim=6, output_dim=4,
                               has_bias=True, kernel_path=("k",), bias_path=("b",))
    block = _blocks.DenseBlock(spec)
    rng = np.random.default_rng(3)  # host data: no program per random shape
    act = lambda n, t: influence.LayerActivations(
        rng.normal(size=(n, t, 7)).astype(np.float32),
        rng.normal(size=(n, t, 4)).astype(np.float32), np.ones((n, t), np.float32))
    query, train = act(2, query_tokens), act(3, train_tokens)

    @jax.jit  # one program (eagerly, each op compiled a program of its own)
    def products(query, train):
      grads = block.per_example_grads(train)
      return (block.dot(block.per_example_grads(query), train),
              block.factored_products(query, train), block.inner_products(query, train),
              block.self_inner_products(train), jnp.sum(grads ** 2, axis=(1, 2)))

    dense, factored, inner, self_products, squares = products(query, train)
    np.testing.assert_allclose(factored, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(inner, dense, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(self_products, squares, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
