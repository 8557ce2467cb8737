"""Curvature blocks (Dense, Conv, Embed, registered kinds) against brute force."""

import functools
import math
import os
import shutil
import tempfile
import warnings

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
import _influence_fixtures as fixtures


def _slice(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)


def _layer_grads(fn, params, batch, layers):
  """By layer, numpy [B, O, I]: explicit per-example jax.grad of `fn` (vmapped)."""
  return fixtures.per_example_layer_grads(fn, params, batch, layers)


class _ConvNet(nn.Module):
  conv: dict
  spatial: tuple = (7, 6)

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(nn.Conv(**self.conv, name="conv")(x))
    x = jnp.reshape(x, (x.shape[0], -1))
    return nn.Dense(3, name="head")(x)


_CONV_CASES = [
    ("same", dict(features=3, kernel_size=(3, 3)), (7, 6)),
    ("valid_stride", dict(features=2, kernel_size=(3, 2), strides=2,
                          padding="VALID"), (7, 6)),
    ("explicit_padding", dict(features=2, kernel_size=(2, 3),
                              padding=((1, 2), (0, 1))), (7, 6)),
    ("kernel_dilation", dict(features=2, kernel_size=(2, 2), kernel_dilation=2),
     (7, 6)),
    ("input_dilation", dict(features=2, kernel_size=(3, 3), input_dilation=2,
                            padding=((1, 1), (2, 0))), (5, 4)),
    ("circular", dict(features=2, kernel_size=(3, 3), padding="CIRCULAR"), (5, 4)),
    ("no_bias", dict(features=2, kernel_size=(3, 3), use_bias=False), (5, 4)),
    ("causal_1d", dict(features=3, kernel_size=(3,), padding="CAUSAL"), (6,)),
    ("conv_3d", dict(features=2, kernel_size=(2, 2, 2), padding="VALID"), (3, 3, 3)),
]


def _conv_setup(conv, spatial, num_examples=4, channels=2):
  model = _ConvNet(conv, spatial)
  # Data and parameters drawn on the host (no program per random shape).
  inputs = fixtures.normal(0, (num_examples,) + spatial + (channels,))
  batch = {"inputs": inputs, "labels": np.arange(num_examples, dtype=np.int32) % 3}
  params = fixtures.host_init(model, inputs[:1], seed=1)
  return influence.ClassificationTask(model.apply), params, batch


def _im2col(x, kernel_size):
  """Explicit patches of a stride-1 SAME 2D convolution: [B, H·W, C·kh·kw]."""
  x = np.asarray(x)
  num, height, width, channels = x.shape
  kh, kw = kernel_size
  padded = np.pad(x, ((0, 0), ((kh - 1) // 2, kh // 2), ((kw - 1) // 2, kw // 2),
                      (0, 0)))
  patches = np.zeros((num, height * width, channels * kh * kw))
  for b in range(num):
    for i in range(height):
      for j in range(width):
        window = padded[b, i:i + kh, j:j + kw, :]  # [kh, kw, C]
        patches[b, i * width + j] = np.transpose(window, (2, 0, 1)).ravel()
  return patches


class ConvBlockTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CONV_CASES)
  def test_layer_gradients_equal_jax_grad(self, conv, spatial):
    task, params, batch = _conv_setup(conv, spatial)
    layers = influence.find_layers(task.loss, params, batch)
    self.assertEqual([s.kind for s in layers], ["Conv", "Dense"])
    got = influence.layer_gradients(task.loss, params, batch, layers)

    @jax.jit
    def brute_force(params, batch):
      # Per example: jax.grad of its loss, laid out as [O, I], and back to leaves.
      grads = fixtures.per_example_param_grads(task.loss, params, batch)
      expected = influence.layer_grads_from_param_grads(layers, grads, batched=True)
      back = jax.vmap(functools.partial(influence.param_grads_from_layer_grads,
                                        layers))(expected)
      return grads, expected, back

    grads, expected, back = brute_force(params, batch)
    for name in expected:
      np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-5,
                                 err_msg=name)
    # [O, I] back to the leaves: the kernel and bias of the module exactly.
    leaves = {tuple(k.key for k in path): leaf for path, leaf in
              jax.tree_util.tree_flatten_with_path(grads)[0]}
    self.assertLen(back, 4 if conv.get("use_bias", True) else 3)
    for path, value in back.items():
      np.testing.assert_array_equal(value, leaves[path], err_msg=str(path))

  def test_covariances_equal_explicit_im2col(self):
    task, params, batch = _conv_setup(dict(features=3, kernel_size=(3, 3)), (5, 4))
    layers = influence.find_layers(task.loss, params, batch)
    stats = influence.covariance_statistics(task, params, batch, layers)
    activation_cov, gradient_cov = influence.covariances(stats)
    patches = _im2col(batch["inputs"], (3, 3))
    patches = np.concatenate([patches, np.ones(patches.shape[:2] + (1,))], -1)
    tokens = patches.reshape(-1, patches.shape[-1])
    np.testing.assert_allclose(activation_cov["conv"], tokens.T @ tokens / len(tokens),
                               rtol=1e-4, atol=1e-5)
    self.assertEqual(float(stats.token_counts["conv"]), 4 * 5 * 4)
    # S from the output gradient at every position: explicit jax.grad wrt outputs.
    kernel = params["params"]["conv"]["kernel"]
    flat = jnp.transpose(kernel, (2, 0, 1, 3)).reshape(-1, 3)
    outputs = (jnp.asarray(patches[..., :-1]) @ flat
               + params["params"]["conv"]["bias"]).reshape(4, 5, 4, 3)

    def loss_of_outputs(out):
      hidden = jnp.tanh(out).reshape(4, -1)
      logits = hidden @ params["params"]["head"]["kernel"] + params["params"]["head"]["bias"]
      return jnp.sum(influence.ClassificationTask(lambda _, z: z).loss(
          None, {"inputs": logits, "labels": batch["labels"]}))

    g = np.asarray(jax.jit(jax.grad(loss_of_outputs))(outputs)).reshape(-1, 3)
    np.testing.assert_allclose(gradient_cov["conv"], g.T @ g / len(g), rtol=1e-4,
                               atol=1e-7)

  def test_cnn_eigenvalues_and_scores_equal_brute_force(self):
    task, params, batch = _conv_setup(dict(features=3, kernel_size=(3, 3),
                                           strides=2), (5, 4), num_examples=6)
    factors = influence.fit_ekfac(task, params, [batch])
    layers = factors.layers
    grads = _layer_grads(task.loss, params, batch, layers)
    for spec in layers:
      f = factors.factors[spec.name]
      rotated = np.einsum("so,nsi,ij->noj", np.asarray(f.gradient_eigenvectors),
                          grads[spec.name], np.asarray(f.activation_eigenvectors))
      np.testing.assert_allclose(f.eigenvalues, np.mean(np.square(rotated), 0),
                                 rtol=1e-3, atol=1e-7)
    damping = 1e-3
    # Every example's gradient preconditioned (one call), dotted with every other's.
    preconditioned = fixtures.precondition(factors, grads, damping)
    expected = sum(np.einsum("qoi,noi->qn", np.asarray(preconditioned[n], np.float64),
                             np.asarray(grads[n], np.float64)) for n in grads)
    got = influence.ekfac_scores(task, params, factors, batch, [batch], damping=damping,
                                 chunk_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())

  def test_grouped_convolution_is_refused_naming_the_layer(self):
    task, params, batch = _conv_setup(dict(features=4, kernel_size=(3, 3),
                                           feature_group_count=2), (5, 4))
    with self.assertRaisesRegex(ValueError, "'conv' \\(Conv\\): feature_group_count=2"):
      influence.fit_ekfac(task, params, [batch])
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      layers = influence.find_layers(task.loss, params, batch, strict=False)
    self.assertEqual([s.name for s in layers], ["head"])
    self.assertTrue(any("feature_group_count" in str(w.message) for w in caught))


class _EmbedLM(nn.Module):
  vocab: int = 7
  tied: bool = False

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(self.vocab, 4, name="embed")
    x = nn.tanh(nn.Dense(4, name="mix")(embed(tokens)))
    if self.tied:
      return embed.attend(x)
    return nn.Dense(self.vocab, name="head")(x)


@functools.lru_cache(maxsize=None)
def _embed_setup(tied=False):
  model = _EmbedLM(tied=tied)
  tokens = fixtures.randint(2, (6, 6), 7)
  mask = np.ones((6, 5), np.float32)
  mask[0, -2:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  params = fixtures.host_init(model, batch["inputs"][:1], seed=3)
  return influence.LanguageModelingTask(model.apply), params, batch


class EmbedBlockTest(absltest.TestCase):

  def test_off_by_default_and_found_with_kinds(self):
    task, params, batch = _embed_setup()
    self.assertNotIn("embed", [s.name for s in influence.find_layers(
        task.loss, params, batch, warn=False)])
    layers = influence.find_layers(task.loss, params, batch, kinds="all")
    embed = [s for s in layers if s.name == "embed"][0]
    self.assertEqual((embed.kind, embed.block, embed.input_dim, embed.output_dim,
                      embed.has_bias), ("Embed", "embed", 7, 4, False))

  def test_diagonal_covariance_eigenvalues_and_scores_equal_dense_one_hot(self):
    task, params, batch = _embed_setup()
    layers = influence.find_layers(task.loss, params, batch, kinds="all")
    stats = influence.covariance_statistics(task, params, batch, layers)
    counts = np.zeros(7)
    for ids, weights in zip(np.asarray(batch["inputs"]), np.asarray(batch["mask"])):
      np.add.at(counts, ids, weights)
    self.assertEqual(stats.activation_sums["embed"].shape, (7,))  # never [V, V]
    np.testing.assert_allclose(stats.activation_sums["embed"], counts, rtol=1e-6)
    factors = influence.fit_ekfac(task, params, [batch], layers=layers)
    grads = _layer_grads(task.loss, params, batch, layers)
    f = factors.factors["embed"]
    self.assertEqual(f.activation_eigenvectors.shape, (0, 0))  # identity basis
    q_s = np.asarray(f.gradient_eigenvectors)
    rotated = np.einsum("so,nsi->noi", q_s, grads["embed"])
    np.testing.assert_allclose(f.eigenvalues, np.mean(np.square(rotated), 0),
                               rtol=1e-3, atol=1e-8)
    query = _slice(batch, 2)
    query_grads = _layer_grads(task.measurement, params, query, layers)
    preconditioned = {n: g[0] for n, g in fixtures.precondition(
        factors, query_grads, 1e-3).items()}
    # The embedding block against a dense one-hot K-FAC basis: identity Q_A.
    dense_embed = q_s @ ((q_s.T @ query_grads["embed"][0]) / (f.eigenvalues + 1e-3))
    np.testing.assert_allclose(preconditioned["embed"], dense_embed, rtol=1e-5,
                               atol=1e-7)
    by_name = {n: np.einsum("oi,noi->n", np.asarray(preconditioned[n], np.float64),
                            np.asarray(g, np.float64)) for n, g in grads.items()}
    expected = sum(by_name.values())
    got = influence.ekfac_scores(task, params, factors, query, [batch], damping=1e-3)
    np.testing.assert_allclose(got[0], expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    by_layer = influence.ekfac_layer_scores(task, params, factors, query, [batch],
                                            damping=1e-3)
    embed_index = [s.name for s in layers].index("embed")
    expected_embed = by_name["embed"]
    np.testing.assert_allclose(by_layer[embed_index, 0], expected_embed, rtol=1e-3,
                               atol=1e-4 * np.abs(expected_embed).max())
    low_rank = influence.ekfac_scores(task, params, factors, query, [batch],
                                      damping=1e-3, query_rank=7)
    np.testing.assert_allclose(low_rank, got, rtol=1e-3, atol=1e-4 * np.abs(got).max())

  def test_embed_factors_round_trip_through_save_and_load(self):
    task, params, batch = _embed_setup()
    layers = influence.find_layers(task.loss, params, batch, kinds="all")
    factors = influence.fit_ekfac(task, params, [batch], layers=layers)
    path = os.path.join(tempfile.mkdtemp(), "factors")
    self.addCleanup(shutil.rmtree, os.path.dirname(path), ignore_errors=True)
    influence.save_factors(path, factors)  # orbax refuses the [0, 0] placeholder
    loaded = influence.load_factors(path)
    self.assertEqual(loaded.layers, factors.layers)
    for name, f in factors.factors.items():
      for got, expected in zip(loaded.factors[name], f):
        self.assertEqual(got.shape, expected.shape)
        np.testing.assert_array_equal(got, expected)

  def test_tied_embedding_is_excluded_with_the_reason(self):
    task, params, batch = _embed_setup(tied=True)
    with self.assertRaisesRegex(ValueError, "'embed' \\(Embed\\): its weights are also "
                                "read by \\['attend'\\]"):
      influence.find_layers(task.loss, params, batch, kinds="all")
    layers = influence.find_layers(task.loss, params, batch, kinds="all", strict=False,
                                   warn=False)
    self.assertEqual([s.name for s in layers], ["mix"])


class _Affine(nn.Module):
  """A custom layer interception cannot know: y = x @ w + b with its own names."""
  features: int

  @nn.compact
  def __call__(self, x):
    w = self.param("w", nn.initializers.normal(1.0), (x.shape[-1], self.features))
    b = self.param("b", nn.initializers.normal(1.0), (self.features,))
    return x @ w + b


class _AffineBlock(influence.DenseBlock):
  name = "test_affine"
  kernel_name = "w"
  bias_name = "b"

  @classmethod
  def describe(cls, module, inputs, outputs):
    return dict(in_axes=(-1,), num_feature_axes=1, input_dim=inputs.shape[-1],
                output_dim=module.features, has_bias=True,
                kernel_shape=(inputs.shape[-1], module.features), config=())


class _AffineNet(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Affine(3, name="custom")(nn.tanh(nn.Dense(5, name="dense")(x)))


class RegistrationTest(absltest.TestCase):

  def test_registered_kind_is_found_and_exact(self):
    model = _AffineNet()
    inputs = fixtures.normal(0, (5, 4))
    batch = {"inputs": inputs, "labels": np.arange(5, dtype=np.int32) % 3}
    params = fixtures.host_init(model, inputs[:1], seed=1)
    task = influence.ClassificationTask(model.apply)
    self.assertEqual([s.name for s in influence.find_layers(
        task.loss, params, batch, warn=False)], ["dense"])
    influence.register_layer_kind(_Affine, _AffineBlock)
    with self.assertRaisesRegex(ValueError, "already registered"):
      influence.register_layer_kind(_Affine, type("Other", (influence.DenseBlock,),
                                                  {"name": "test_affine"}))
    layers = influence.find_layers(task.loss, params, batch, kinds="all")
    self.assertEqual([(s.name, s.block) for s in layers],
                     [("dense", "dense"), ("custom", "test_affine")])
    got = influence.layer_gradients(task.loss, params, batch, layers)
    expected = _layer_grads(task.loss, params, batch, layers)
    np.testing.assert_allclose(got["custom"], expected["custom"], rtol=1e-5, atol=1e-6)
    self.assertEqual(got["custom"].shape, (5, 3, 6))
    self.assertTrue(math.isfinite(float(jnp.sum(influence.ekfac_scores(
        task, params, influence.fit_ekfac(task, params, [batch], layers=layers),
        batch, [batch])))))


class _NoBiasDense(nn.Dense):  # a subclass changing a field default only
  use_bias: bool = False


class _NoBiasConv(nn.Conv):
  use_bias: bool = False


class _ScaledDense(nn.Dense):  # its own __call__: the kernel meets 2x, not x

  def __call__(self, x):
    return super().__call__(2.0 * x)


class _SubclassNet(nn.Module):
  head: type = _NoBiasDense

  @nn.compact
  def __call__(self, x):
    x = nn.tanh(_NoBiasConv(2, (3, 3), name="conv")(x))
    return self.head(3, name="head")(jnp.reshape(x, (x.shape[0], -1)))


class SubclassTest(absltest.TestCase):

  def test_subclasses_changing_defaults_are_covered_and_exact(self):
    # Review h33: a subclass of nn.Dense / nn.Conv that only changes a default was
    # left out of EK-FAC with only a warning.
    model = _SubclassNet()
    inputs = fixtures.normal(0, (4, 5, 4, 2))
    batch = {"inputs": inputs, "labels": np.arange(4, dtype=np.int32) % 3}
    params = fixtures.host_init(model, inputs[:1], seed=1)
    task = influence.ClassificationTask(model.apply)
    layers = influence.find_layers(task.loss, params, batch)
    self.assertEqual([(s.name, s.block) for s in layers],
                     [("conv", "conv"), ("head", "dense")])
    got = influence.layer_gradients(task.loss, params, batch, layers)
    expected = _layer_grads(task.loss, params, batch, layers)
    for name in ("conv", "head"):
      np.testing.assert_allclose(got[name], expected[name], rtol=1e-4, atol=1e-6,
                                 err_msg=name)

  def test_a_subclass_with_its_own_call_is_not_covered(self):
    model = _SubclassNet(head=_ScaledDense)
    inputs = fixtures.normal(0, (4, 5, 4, 2))
    batch = {"inputs": inputs, "labels": np.arange(4, dtype=np.int32) % 3}
    params = fixtures.host_init(model, inputs[:1], seed=1)
    task = influence.ClassificationTask(model.apply)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      layers = influence.find_layers(task.loss, params, batch)
    self.assertEqual([s.name for s in layers], ["conv"])


if __name__ == "__main__":
  absltest.main()
