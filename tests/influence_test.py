"""Public API of simfluence_jax.influence: breakdowns, query batching, self-influence."""

import functools

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
import _influence_fixtures as fixtures


class _LM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(9, 8)(tokens)
    x = x + nn.MultiHeadDotProductAttention(num_heads=2)(
        x, mask=nn.make_causal_mask(tokens))
    return nn.Dense(9)(nn.relu(nn.Dense(12)(x)))


@functools.lru_cache(maxsize=None)
def _setup():
  """Task, params, batch and fitted factors, shared (read only) by the tests."""
  model = _LM()
  tokens = fixtures.randint(0, (8, 6), 9)  # data and params drawn on the host
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((8, 5), np.float32)}
  params = fixtures.host_init(model, batch["inputs"][:1], seed=1)
  task = influence.LanguageModelingTask(model.apply)
  return task, params, batch, influence.fit_ekfac(task, params, [batch])


class InfluenceApiTest(absltest.TestCase):

  def test_task_protocol(self):
    task, _, _, _ = _setup()
    self.assertIsInstance(task, influence.Task)

  def test_breakdowns_sum_to_scores(self):
    task, params, batch, factors = _setup()
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    scores = influence.ekfac_scores(task, params, factors, query, [batch], chunk_size=3)
    by_layer = influence.ekfac_layer_scores(task, params, factors, query, [batch])
    by_token = influence.ekfac_token_scores(task, params, factors, query, [batch])
    self.assertEqual(by_layer.shape, (len(factors.layers), 3, 8))
    self.assertEqual(by_token.shape, (3, 8, 5))
    tolerance = 1e-4 * float(jnp.abs(scores).max())
    np.testing.assert_allclose(by_layer.sum(0), scores, atol=tolerance)
    np.testing.assert_allclose(by_token.sum(-1), scores, atol=tolerance)

  def test_query_batching_full_rank_equals_unbatched(self):
    task, params, batch, factors = _setup()
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    # Chunks of 3 (a padded remainder), like the breakdowns' scores.
    exact = influence.ekfac_scores(task, params, factors, query, [batch], chunk_size=3)
    full = influence.ekfac_scores(task, params, factors, query, [batch], query_rank=64,
                                  chunk_size=3)
    np.testing.assert_allclose(full, exact, atol=1e-4 * float(jnp.abs(exact).max()))
    low = influence.ekfac_scores(task, params, factors, query, [batch], query_rank=2,
                                 chunk_size=3)
    self.assertGreater(np.corrcoef(np.ravel(low), np.ravel(exact))[0, 1], 0.5)

  def test_self_influence_is_diagonal_of_pairwise(self):
    task, params, batch, factors = _setup()
    pairwise = influence.ekfac_scores(task, params, factors, batch, [batch])
    self_scores = influence.ekfac_self_influence(task, params, factors, [batch],
                                                 chunk_size=3)
    np.testing.assert_allclose(self_scores, np.diag(pairwise), rtol=1e-3,
                               atol=1e-5 * float(jnp.abs(pairwise).max()))
    self.assertTrue((np.asarray(self_scores) > 0).all())


if __name__ == "__main__":
  absltest.main()
