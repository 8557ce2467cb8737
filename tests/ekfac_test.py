"""EK-FAC against brute force: factor definitions, exact inverses, dense Fisher."""

import functools

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
from simfluence_jax.influence import _ekfac
import _influence_fixtures as fixtures


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(6)(x)))


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
    x = x + nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=8)(
        nn.LayerNorm()(x), mask=mask)
    return x + nn.Dense(8)(nn.gelu(nn.Dense(16)(nn.LayerNorm()(x))))


class _LM(nn.Module):
  vocab: int = 11

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(self.vocab, 8)(tokens)
    for _ in range(2):
      x = _Block()(x)
    return nn.Dense(self.vocab)(nn.LayerNorm()(x))


_MLP_MODEL = _MLP()
_MLP_TASK = influence.ClassificationTask(_MLP_MODEL.apply)


# Setups are shared (read only) by the tests: one task and one set of parameters
# per model, whatever the batch size, so the kernels' programs are reused. Data and
# parameters are drawn on the host (no program per random shape).
@functools.lru_cache(maxsize=None)
def _mlp_params():
  return fixtures.host_init(_MLP_MODEL, np.zeros((1, 4), np.float32), seed=1)


@functools.lru_cache(maxsize=None)
def _mlp_setup(num_examples=24):
  batch = {"inputs": fixtures.normal(0, (num_examples, 4)),
           "labels": np.arange(num_examples, dtype=np.int32) % 3}
  return _MLP_TASK, _mlp_params(), batch


@functools.lru_cache(maxsize=None)
def _mlp_factors():
  """Empirical-Fisher factors of `_mlp_setup()`."""
  task, params, batch = _mlp_setup()
  return influence.fit_ekfac(task, params, [batch])


@functools.lru_cache(maxsize=None)
def _lm_setup(num_examples=6, length=7):
  model = _LM()
  tokens = fixtures.randint(2, (num_examples, length + 1), 11)
  mask = np.ones((num_examples, length), np.float32)
  mask[0, -2:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  return influence.LanguageModelingTask(model.apply), fixtures.host_init(
      model, batch["inputs"][:1], seed=3), batch


def _slice(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)


def _brute_layer_grads(task, params, batch, layers, fn="loss"):
  """By layer [B, O, I]: explicit jax.grad of each one-example batch (vmapped)."""
  return fixtures.per_example_layer_grads(getattr(task, fn), params, batch, layers)


def _flat(layer_grads, layers):
  return np.concatenate([np.reshape(layer_grads[s.name], (
      layer_grads[s.name].shape[0], -1)) for s in layers], axis=1)


class LayerDiscoveryTest(absltest.TestCase):

  def test_mlp_and_transformer_layers_found(self):
    task, params, batch = _mlp_setup()
    self.assertLen(influence.find_layers(task.loss, params, batch), 2)
    task, params, batch = _lm_setup()
    layers = influence.find_layers(task.loss, params, batch)
    # Per block: query, key, value, out (DenseGeneral) and two Dense; plus the head.
    self.assertLen(layers, 13)
    self.assertEqual(sorted({s.kind for s in layers}), ["Dense", "DenseGeneral"])
    out = [s for s in layers if s.name.endswith("out")][0]
    self.assertEqual((out.input_dim, out.output_dim, out.in_axes), (8, 8, (-2, -1)))

  def test_captured_gradients_equal_jax_grad(self):
    for task, params, batch in (_mlp_setup(), _lm_setup()):
      layers = influence.find_layers(task.loss, params, batch)
      got = influence.layer_gradients(task.loss, params, batch, layers)
      expected = _brute_layer_grads(task, params, batch, layers)
      for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6)


class FactorTest(absltest.TestCase):

  def test_kronecker_factors_equal_definitions(self):
    task, variables, batch = _mlp_setup()
    p = jax.tree_util.tree_map(lambda v: np.asarray(v, np.float64),
                               variables["params"])
    layers = influence.find_layers(task.loss, variables, batch)
    stats = influence.covariance_statistics(task, variables, batch, layers)
    a_cov, s_cov = influence.covariances(stats)
    x = np.asarray(batch["inputs"], np.float64)
    # Dense(3) is constructed first in the compact MLP, so it is "Dense_0".
    pre_hidden = x @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    hidden = np.tanh(pre_hidden)

    def loss_of_logits(logits):
      return jnp.sum(influence.ClassificationTask(lambda _, z: z).loss(
          None, {"inputs": logits, "labels": batch["labels"]}))

    logits = hidden @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    g_logits = np.asarray(jax.jit(jax.grad(loss_of_logits))(
        logits.astype(np.float32)), np.float64)
    g_hidden = (g_logits @ p["Dense_0"]["kernel"].T) * (1 - hidden ** 2)
    ones = np.ones((x.shape[0], 1))
    n = x.shape[0]
    for name, a, g in (("Dense_1", x, g_hidden), ("Dense_0", hidden, g_logits)):
      a = np.concatenate([a, ones], axis=1)
      np.testing.assert_allclose(a_cov[name], a.T @ a / n, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s_cov[name], g.T @ g / n, rtol=1e-4, atol=1e-7)

  def test_token_mask_and_counts_for_sequences(self):
    task, params, batch = _lm_setup()
    layers = influence.find_layers(task.loss, params, batch)
    stats = influence.covariance_statistics(task, params, batch, layers)
    head = layers[-1].name
    self.assertEqual(float(stats.token_counts[head]), float(np.sum(batch["mask"])))
    self.assertEqual(float(stats.num_examples), 6.0)

  def test_psum_over_shards_equals_full_batch(self):
    task, params, batch = _mlp_setup()
    layers = influence.find_layers(task.loss, params, batch)
    full = influence.covariance_statistics(task, params, batch, layers)
    shards = jax.tree_util.tree_map(lambda x: x.reshape((2, -1) + x.shape[1:]), batch)
    # Jitted: vmapped eagerly, every op compiled a program of its own.
    sharded = jax.jit(jax.vmap(lambda b: influence.covariance_statistics(
        task, params, b, layers, axis_name="data"), axis_name="data"))(shards)
    jax.tree_util.tree_map(
        lambda s, f: np.testing.assert_allclose(s[0], f, rtol=1e-5, atol=1e-6),
        sharded, full)

  def test_true_fisher_validation_and_determinism(self):
    task, params, batch = _mlp_setup()
    with self.assertRaisesRegex(ValueError, "rng"):
      influence.fit_ekfac(task, params, [batch], fisher="true")
    with self.assertRaisesRegex(ValueError, "fisher"):
      influence.fit_ekfac(task, params, [batch], fisher="exact")
    first = influence.fit_ekfac(task, params, [batch], fisher="true",
                                rng=jax.random.key(0))
    second = influence.fit_ekfac(task, params, [batch], fisher="true",
                                 rng=jax.random.key(0))
    empirical = _mlp_factors()
    name = first.layers[-1].name
    np.testing.assert_array_equal(first.factors[name].eigenvalues,
                                  second.factors[name].eigenvalues)
    self.assertFalse(np.allclose(first.factors[name].eigenvalues,
                                 empirical.factors[name].eigenvalues))


class InverseTest(absltest.TestCase):

  def test_exact_when_fisher_is_kronecker(self):
    # Same input, different labels: every G = g aᵀ shares a, so the Fisher is
    # exactly a aᵀ ⊗ E[g gᵀ] and EK-FAC (and K-FAC) invert it exactly.
    model = nn.Dense(4)
    inputs = np.tile(fixtures.normal(4, (1, 3)), (8, 1))
    batch = {"inputs": inputs, "labels": np.arange(8, dtype=np.int32) % 4}
    params = fixtures.host_init(model, inputs[:1], seed=5)
    task = influence.ClassificationTask(model.apply)
    layers = influence.find_layers(task.loss, params, batch)
    grads = _flat(_brute_layer_grads(task, params, batch, layers), layers)
    fisher = grads.T @ grads / 8
    vector = fixtures.normal(6, (2, 4, 4))
    damping = 1e-2
    exact = np.linalg.solve(fisher + damping * np.eye(16),
                            np.reshape(vector, (2, 16)).T).T
    for kfac in (False, True):
      factors = influence.fit_ekfac(task, params, [batch], kfac=kfac)
      got = influence.precondition(factors, {layers[0].name: vector}, damping)[layers[0].name]
      np.testing.assert_allclose(np.reshape(got, (2, 16)), exact, rtol=2e-3,
                                 atol=2e-3 * np.abs(exact).max())

  def test_scores_close_to_dense_damped_fisher_inverse(self):
    task, params, batch = _mlp_setup(64)
    layers = influence.find_layers(task.loss, params, batch)
    factors = influence.fit_ekfac(task, params, [batch])
    train = _flat(_brute_layer_grads(task, params, batch, layers), layers)
    fisher = train.T @ train / 64
    damping = float(np.mean([influence.layer_damping(factors)[s.name]
                             for s in layers]))
    query = train[:8]
    dense = np.linalg.solve(fisher + damping * np.eye(len(fisher)), query.T).T @ train.T
    ours = influence.ekfac_scores(task, params, factors,
                                  jax.tree_util.tree_map(lambda x: x[:8], batch),
                                  [batch], damping=damping, chunk_size=16)
    correlation = np.corrcoef(np.ravel(ours), np.ravel(dense))[0, 1]
    # EK-FAC is block-diagonal over layers: against the exact per-layer blocks it is
    # much closer than against the full Fisher with its cross-layer terms.
    block = np.zeros_like(fisher)
    start = 0
    for spec in layers:
      size = spec.output_dim * spec.augmented_input_dim
      block[start:start + size, start:start + size] = fisher[start:start + size,
                                                             start:start + size]
      start += size
    blockwise = np.linalg.solve(block + damping * np.eye(len(block)),
                                query.T).T @ train.T
    block_correlation = np.corrcoef(np.ravel(ours), np.ravel(blockwise))[0, 1]
    print(f"EK-FAC vs damped Fisher inverse: Pearson {correlation:.4f} (full), "
          f"{block_correlation:.4f} (layer blocks)")
    self.assertGreater(block_correlation, 0.95)
    self.assertGreater(correlation, 0.8)

  def _assert_scores_equal_preconditioned_brute_force(self, task, params, batch,
                                                      factors, queries, chunk_size=4):
    """ekfac_scores == Σ_layers ⟨precondition(query grads), train grads⟩; chunks of
    `chunk_size` train examples, the last one padded."""
    layers = factors.layers
    train = _brute_layer_grads(task, params, batch, layers)
    query = _brute_layer_grads(task, params, queries, layers, "measurement")
    # Queries and train examples preconditioned in one call (one shape to compile).
    both = influence.precondition(
        factors, {n: np.concatenate([query[n], train[n]]) for n in train})
    num_queries = len(jax.tree_util.tree_leaves(queries)[0])
    preconditioned = {n: np.asarray(g[:num_queries]) for n, g in both.items()}
    own = {n: np.asarray(g[num_queries:]) for n, g in both.items()}
    expected = sum(np.einsum("qoi,noi->qn", preconditioned[n], train[n])
                   for n in train)
    got = influence.ekfac_scores(task, params, factors, queries, [batch],
                                 chunk_size=chunk_size)
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    self.assertTrue(np.isfinite(np.asarray(got)).all())
    # Self-influence (train loss on both sides) against the same gradients.
    expected_self = sum(np.einsum("noi,noi->n", own[n], train[n]) for n in train)
    got_self = influence.ekfac_self_influence(task, params, factors, [batch],
                                              chunk_size=chunk_size)
    np.testing.assert_allclose(got_self, expected_self, rtol=1e-3,
                               atol=1e-4 * np.abs(expected_self).max())

  def test_scores_equal_preconditioned_jax_grads_on_mlp(self):
    # One token per example: scores take `DenseBlock.dot`'s g_iᵀ P_q a_i form.
    task, params, batch = _mlp_setup()
    self._assert_scores_equal_preconditioned_brute_force(
        task, params, batch, _mlp_factors(),
        jax.tree_util.tree_map(lambda x: x[:3], batch), chunk_size=5)

  def test_scores_equal_preconditioned_jax_grads_on_transformer(self):
    task, params, batch = _lm_setup()
    factors = influence.fit_ekfac(task, params, [batch])
    layers = factors.layers
    # Factors keep the layers' call order (saved factors are numbered by it).
    self.assertEqual(list(factors.factors), [spec.name for spec in layers])
    self.assertNotEqual(sorted(factors.factors), list(factors.factors))
    self._assert_scores_equal_preconditioned_brute_force(task, params, batch,
                                                         factors, _slice(batch, 1))
    # The run preconditioned its queries with one program per layer kind and
    # shape, which the layers of one kind and shape (the two blocks', q/k/v) share.
    _ekfac._precondition_program.cache_clear()
    influence.ekfac_scores(task, params, factors, _slice(batch, 1), [batch],
                           chunk_size=4)
    kinds = {(s.kind, s.in_axes, s.kernel_shape, s.has_bias) for s in layers}
    self.assertEqual(_ekfac._precondition_program.cache_info().currsize, len(kinds))
    self.assertLess(len(kinds), len(layers) / 2)


if __name__ == "__main__":
  absltest.main()
