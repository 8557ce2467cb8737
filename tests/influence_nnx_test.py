"""NNX models are first-class: the same scores as the identical linen model.

One small sequence model exists twice, in linen and in NNX, with the same weights:
Embed -> a nested mixer of LinearGeneral / DenseGeneral (to (2, 3) features and back
over axis=(-2, -1)) -> causal 1D Conv -> LayerNorm -> Linear head. Every kernel
(`fit_ekfac`, `ekfac_scores`, `ekfac_layer_scores`, `ekfac_token_scores`,
`tracin_scores`, self-influence) must agree to 1e-4.
"""

import functools

from absl.testing import absltest
import flax.linen as nn
from flax import nnx
import jax
import numpy as np

from simfluence_jax import influence
import _influence_fixtures as fixtures

VOCAB = 9


class _LinenMixer(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.DenseGeneral((2, 3), name="proj")(x))
    return nn.DenseGeneral(4, axis=(-2, -1), name="merge")(x)


class _LinenNet(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, 4, name="embed")(tokens)
    x = x + _LinenMixer(name="mixer")(x)
    x = nn.Conv(4, (3,), padding="CAUSAL", name="conv")(x)
    return nn.Dense(VOCAB, name="head")(nn.LayerNorm(name="norm")(x))


class _NNXMixer(nnx.Module):

  def __init__(self, rngs):
    self.proj = nnx.LinearGeneral(4, (2, 3), rngs=rngs)
    self.merge = nnx.LinearGeneral((2, 3), 4, axis=(-2, -1), rngs=rngs)

  def __call__(self, x):
    return self.merge(nnx.tanh(self.proj(x)))


class _NNXNet(nnx.Module):

  def __init__(self, rngs):
    self.embed = nnx.Embed(VOCAB, 4, rngs=rngs)
    self.mixer = _NNXMixer(rngs)
    self.conv = nnx.Conv(4, 4, (3,), padding="CAUSAL", rngs=rngs)
    self.norm = nnx.LayerNorm(4, rngs=rngs)
    self.head = nnx.Linear(4, VOCAB, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    x = x + self.mixer(x)
    return self.head(self.norm(self.conv(x)))


@functools.lru_cache(maxsize=None)
def _setup():
  tokens = fixtures.randint(0, (8, 6), VOCAB)  # data and weights drawn on the host
  mask = np.ones((8, 5), np.float32)
  mask[0, -2:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  linen = _LinenNet()
  params = fixtures.host_init(linen, batch["inputs"][:1], seed=1)
  # Built abstractly (nothing drawn), then every weight set from the linen
  # weights, leaf by leaf (same names, same shapes).
  module = nnx.eval_shape(lambda: _NNXNet(nnx.Rngs(2)))
  flat = {tuple(k.key for k in path): leaf for path, leaf in
          jax.tree_util.tree_flatten_with_path(params["params"])[0]}
  for path, value in flat.items():
    owner = module
    for name in path[:-1]:
      owner = getattr(owner, name)
    getattr(owner, path[-1]).set_value(value)
  assert all(isinstance(x, jax.Array) for x in jax.tree_util.tree_leaves(
      nnx.state(module)))  # every variable was set
  return (influence.LanguageModelingTask(linen.apply), params,
          influence.LanguageModelingTask(module), nnx.state(module, nnx.Param),
          module, batch)


def _close(got, expected):
  np.testing.assert_allclose(got, expected, rtol=1e-4,
                             atol=1e-4 * float(np.abs(expected).max()))


class NNXTest(absltest.TestCase):

  def test_same_losses_and_layers(self):
    linen_task, params, nnx_task, state, _, batch = _setup()
    np.testing.assert_allclose(nnx_task.loss(state, batch), linen_task.loss(params, batch),
                               rtol=1e-6)
    linen_layers = influence.find_layers(linen_task.loss, params, batch, kinds="all")
    nnx_layers = influence.find_layers(nnx_task.loss, state, batch, kinds="all")
    self.assertEqual([s.name for s in nnx_layers], [s.name for s in linen_layers])
    self.assertEqual([s.kind for s in nnx_layers],
                     ["nnx.Embed", "nnx.LinearGeneral", "nnx.LinearGeneral", "nnx.Conv",
                      "nnx.Linear"])
    self.assertEqual([(s.input_dim, s.output_dim, s.in_axes) for s in nnx_layers],
                     [(s.input_dim, s.output_dim, s.in_axes) for s in linen_layers])

  def test_ekfac_scores_equal_linen(self):
    linen_task, params, nnx_task, state, _, batch = _setup()
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    for kinds in ("all",):
      linen_layers = influence.find_layers(linen_task.loss, params, batch,
                                           kinds=kinds, warn=False)
      nnx_layers = influence.find_layers(nnx_task.loss, state, batch, kinds=kinds,
                                         warn=False)
      linen_factors = influence.fit_ekfac(linen_task, params, [batch],
                                          layers=linen_layers)
      nnx_factors = influence.fit_ekfac(nnx_task, state, [batch], layers=nnx_layers)
      for name, f in linen_factors.factors.items():
        _close(nnx_factors.factors[name].eigenvalues, f.eigenvalues)
      for scores in (influence.ekfac_scores, influence.ekfac_layer_scores,
                     influence.ekfac_token_scores):
        _close(scores(nnx_task, state, nnx_factors, query, [batch], chunk_size=3),
               scores(linen_task, params, linen_factors, query, [batch], chunk_size=3))
    _close(influence.ekfac_self_influence(nnx_task, state, nnx_factors, [batch]),
           influence.ekfac_self_influence(linen_task, params, linen_factors, [batch]))

  def test_tracin_equals_linen_and_the_module_stands_for_its_state(self):
    linen_task, params, nnx_task, state, module, batch = _setup()
    query = jax.tree_util.tree_map(lambda x: x[:3], batch)
    other = jax.tree_util.tree_map(lambda x: 0.5 * x, state)
    linen_other = jax.tree_util.tree_map(lambda x: 0.5 * x, params)
    expected = influence.tracin_scores(linen_task, [params, linen_other], [1.0, 0.5],
                                       query, [batch], chunk_size=3)
    _close(influence.tracin_scores(nnx_task, [state, other], [1.0, 0.5], query,
                                   [batch], chunk_size=3), expected)
    # Chunks of 3 as above: the module is scored by the same programs as its state.
    _close(influence.tracin_scores(nnx_task, [module], [1.0], query, [batch],
                                   chunk_size=3),
           influence.tracin_scores(linen_task, [params], [1.0], query, [batch],
                                   chunk_size=3))
    _close(influence.tracin_self_influence(nnx_task, [state], [1.0], [batch]),
           influence.tracin_self_influence(linen_task, [params], [1.0], [batch]))

  def test_nnx_task_refuses_the_full_state_and_compares_by_identity(self):
    _, _, nnx_task, _, module, batch = _setup()
    with self.assertRaisesRegex(ValueError, "params: an NNX task takes "
                                "nnx.state\\(module, nnx.Param\\)"):
      influence.fit_ekfac(nnx_task, nnx.state(module, nnx.RngState), [batch])
    with self.assertRaisesRegex(ValueError, "params: an NNX task takes"):
      influence.tracin_scores(nnx_task, [nnx.to_pure_dict(nnx.state(module, nnx.Param))],
                              [1.0], batch, batch)
    self.assertEqual(nnx_task, nnx_task)
    self.assertNotEqual(influence.LanguageModelingTask(module), nnx_task)


if __name__ == "__main__":
  absltest.main()
