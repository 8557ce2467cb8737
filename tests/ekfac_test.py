"""EK-FAC against brute force: factor definitions, exact inverses, dense Fisher."""

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
from simfluence_jax.influence import _ekfac


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


def _mlp_setup(num_examples=24):
  model = _MLP()
  inputs = jax.random.normal(jax.random.key(0), (num_examples, 4))
  batch = {"inputs": inputs, "labels": jnp.arange(num_examples) % 3}
  return influence.ClassificationTask(model.apply), model.init(
      jax.random.key(1), inputs), batch


def _lm_setup(num_examples=6, length=7):
  model = _LM()
  tokens = jax.random.randint(jax.random.key(2), (num_examples, length + 1), 0, 11)
  mask = jnp.ones((num_examples, length)).at[0, -2:].set(0.0)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  return influence.LanguageModelingTask(model.apply), model.init(
      jax.random.key(3), batch["inputs"]), batch


def _slice(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)


def _loop_layer_grads(task, params, batch, layers, fn="loss"):
  """By layer [B, O, I] from an explicit Python loop of jax.grad."""
  grad = jax.jit(jax.grad(lambda p, example: getattr(task, fn)(p, example)[0]))
  per_example = []
  for i in range(batch["inputs"].shape[0]):
    grads = grad(params, _slice(batch, i))
    per_example.append(influence.layer_grads_from_param_grads(layers, grads))
  return {name: np.stack([g[name] for g in per_example]) for name in per_example[0]}


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
    for task, params, batch in (_mlp_setup(6), _lm_setup()):
      layers = influence.find_layers(task.loss, params, batch)
      got = influence.layer_gradients(task.loss, params, batch, layers)
      expected = _loop_layer_grads(task, params, batch, layers)
      for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6)


class FactorTest(absltest.TestCase):

  def test_kronecker_factors_equal_definitions(self):
    task, variables, batch = _mlp_setup()
    p = variables["params"]
    layers = influence.find_layers(task.loss, variables, batch)
    stats = influence.covariance_statistics(task, variables, batch, layers)
    a_cov, s_cov = influence.covariances(stats)
    x = batch["inputs"]
    # Dense(3) is constructed first in the compact MLP, so it is "Dense_0".
    pre_hidden = x @ p["Dense_1"]["kernel"] + p["Dense_1"]["bias"]
    hidden = jnp.tanh(pre_hidden)

    def loss_of_outputs(pre_hidden, logits):
      del pre_hidden
      return jnp.sum(influence.ClassificationTask(lambda _, z: z).loss(
          None, {"inputs": logits, "labels": batch["labels"]}))

    logits = hidden @ p["Dense_0"]["kernel"] + p["Dense_0"]["bias"]
    g_logits = jax.grad(loss_of_outputs, argnums=1)(pre_hidden, logits)
    g_hidden = (g_logits @ p["Dense_0"]["kernel"].T) * (1 - hidden ** 2)
    ones = jnp.ones((x.shape[0], 1))
    n = x.shape[0]
    for name, a, g in (("Dense_1", x, g_hidden), ("Dense_0", hidden, g_logits)):
      a = jnp.concatenate([a, ones], axis=1)
      np.testing.assert_allclose(a_cov[name], a.T @ a / n, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(s_cov[name], g.T @ g / n, rtol=1e-4, atol=1e-7)

  def test_token_mask_and_counts_for_sequences(self):
    task, params, batch = _lm_setup()
    layers = influence.find_layers(task.loss, params, batch)
    stats = influence.covariance_statistics(task, params, batch, layers)
    head = layers[-1].name
    self.assertEqual(float(stats.token_counts[head]), float(jnp.sum(batch["mask"])))
    self.assertEqual(float(stats.num_examples), 6.0)

  def test_psum_over_shards_equals_full_batch(self):
    task, params, batch = _mlp_setup()
    layers = influence.find_layers(task.loss, params, batch)
    full = influence.covariance_statistics(task, params, batch, layers)
    shards = jax.tree_util.tree_map(lambda x: x.reshape((2, -1) + x.shape[1:]), batch)
    sharded = jax.vmap(lambda b: influence.covariance_statistics(
        task, params, b, layers, axis_name="data"), axis_name="data")(shards)
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
    empirical = influence.fit_ekfac(task, params, [batch])
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
    inputs = jnp.tile(jax.random.normal(jax.random.key(4), (1, 3)), (8, 1))
    batch = {"inputs": inputs, "labels": jnp.arange(8) % 4}
    params = model.init(jax.random.key(5), inputs)
    task = influence.ClassificationTask(model.apply)
    layers = influence.find_layers(task.loss, params, batch)
    grads = _flat(_loop_layer_grads(task, params, batch, layers), layers)
    fisher = grads.T @ grads / 8
    vector = jax.random.normal(jax.random.key(6), (2, 4, 4))
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
    train = _flat(_loop_layer_grads(task, params, batch, layers), layers)
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

  def _assert_scores_equal_preconditioned_loop(self, task, params, batch, factors,
                                               queries):
    """ekfac_scores == Σ_layers ⟨precondition(query grads), train grads⟩ (loops)."""
    layers = factors.layers
    train = _loop_layer_grads(task, params, batch, layers)
    query = _loop_layer_grads(task, params, queries, layers, "measurement")
    preconditioned = influence.precondition(factors, query)
    expected = sum(np.einsum("qoi,noi->qn", preconditioned[n], train[n])
                   for n in train)
    got = influence.ekfac_scores(task, params, factors, queries, [batch],
                                 chunk_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    self.assertTrue(np.isfinite(np.asarray(got)).all())
    # Self-influence (train loss on both sides) against the same loops.
    own = influence.precondition(factors, train)
    expected_self = sum(np.einsum("noi,noi->n", own[n], train[n]) for n in train)
    got_self = influence.ekfac_self_influence(task, params, factors, [batch],
                                              chunk_size=4)
    np.testing.assert_allclose(got_self, expected_self, rtol=1e-3,
                               atol=1e-4 * np.abs(expected_self).max())

  def test_scores_equal_preconditioned_jax_grads_on_mlp(self):
    # One token per example: scores take `DenseBlock.dot`'s g_iᵀ P_q a_i form.
    task, params, batch = _mlp_setup(10)
    factors = influence.fit_ekfac(task, params, [batch])
    self._assert_scores_equal_preconditioned_loop(
        task, params, batch, factors, jax.tree_util.tree_map(lambda x: x[:3], batch))

  def test_scores_equal_preconditioned_jax_grads_on_transformer(self):
    task, params, batch = _lm_setup()
    factors = influence.fit_ekfac(task, params, [batch])
    layers = factors.layers
    # Factors keep the layers' call order (saved factors are numbered by it).
    self.assertEqual(list(factors.factors), [spec.name for spec in layers])
    self.assertNotEqual(sorted(factors.factors), list(factors.factors))
    self._assert_scores_equal_preconditioned_loop(task, params, batch, factors,
                                                  _slice(batch, 1))
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
