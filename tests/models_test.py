"""Tests of the linen models and `models.get_model`."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simfluence_jax import models

VOCAB = 259


def _tiny_lm(**kwargs):
  defaults = dict(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                  max_len=8)
  defaults.update(kwargs)
  return models.TransformerLM(**defaults)


# One tiny model and its jitted apply for the tests that only read them (eagerly,
# every op of an apply compiled a program of its own).
_TINY = _tiny_lm()
_tiny_apply = jax.jit(_TINY.apply)


@functools.lru_cache(maxsize=None)
def _tiny_shapes():
  """The tiny model's variables as shapes and dtypes: nothing compiled."""
  return jax.eval_shape(
      lambda: models.init_variables(_TINY, jnp.zeros((1, 8), jnp.int32)))


def test_transformer_output_shape_and_dtype():
  model = _TINY
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 8)), jnp.int32)
  variables = models.init_variables(model, tokens)
  logits = _tiny_apply(variables, tokens)
  assert logits.shape == (3, 8, VOCAB)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  # Shorter sequences than max_len are fine; longer ones are refused.
  assert _tiny_apply(variables, tokens[:, :5]).shape == (3, 5, VOCAB)
  with pytest.raises(ValueError, match="max_len"):
    _tiny_apply(variables, jnp.zeros((1, 9), jnp.int32))


def test_transformer_is_causal():
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, VOCAB, (3, 8)).astype(np.int32)
  variables = models.init_variables(_TINY, tokens, seed=3)
  changed = tokens.copy()
  changed[:, 5] = (changed[:, 5] + 7) % VOCAB
  before = np.asarray(_tiny_apply(variables, tokens))
  after = np.asarray(_tiny_apply(variables, changed))
  np.testing.assert_array_equal(before[:, :5], after[:, :5])
  assert np.abs(before[:, 5:] - after[:, 5:]).max() > 1e-4


def test_reference_transformer_param_count():
  model = models.TransformerLM(vocab_size=VOCAB)
  variables = jax.eval_shape(
      lambda: models.init_variables(model, jnp.zeros((1, 32), jnp.int32)))
  assert models.num_params(variables) == 135_555  # ≈ 136k, as README's model table says


def test_transformer_without_biases_has_square_ekfac_a_factors():
  """use_bias=False drops exactly the 7 Dense biases of a 1-block model; EK-FAC's
  A factors are then I x I (no bias row), which a model axis dividing the width can
  split. (One block: every kind of layer, half the programs to compile.)"""
  from simfluence_jax import influence  # pylint: disable=g-import-not-at-top
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, VOCAB, (4, 8)), jnp.int32)
  with_bias = jax.eval_shape(lambda: models.init_variables(
      _tiny_lm(num_layers=1), tokens))
  model = _tiny_lm(use_bias=False, num_layers=1)
  variables = models.init_variables(model, tokens)
  biases = 4 * 16 + 32 + 16 + VOCAB  # q/k/v/out, mlp_in, mlp_out; head
  assert models.num_params(with_bias) - models.num_params(variables) == biases
  assert not [p for p, _ in jax.tree_util.tree_leaves_with_path(variables["params"])
              if p[-1].key == "bias" and "ln" not in str(p)]
  task = influence.LanguageModelingTask(model.apply)
  batch = {"inputs": tokens, "targets": jnp.roll(tokens, -1, axis=1),
           "mask": jnp.ones(tokens.shape, jnp.float32)}
  factors = influence.fit_ekfac(task, variables, [batch])
  assert len(factors.factors) == 7
  sizes = {"query": 16, "key": 16, "value": 16, "out": 16, "mlp_in": 16,
           "mlp_out": 32, "head": 16}
  for name, layer in factors.factors.items():
    fan_in = sizes[name.split("/")[-1]]
    shape = layer.activation_eigenvectors.shape
    assert shape == (fan_in, fan_in), (name, shape)


def test_every_linear_map_is_a_dense_layer():
  model = _TINY
  tokens = jnp.zeros((1, 8), jnp.int32)
  variables = _tiny_shapes()
  dense_calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Dense) and context.method_name == "__call__":
      dense_calls.append(context.module.path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    # Traced only, by a new function (no cached trace skips the interception).
    jax.eval_shape(lambda v, t: model.apply(v, t), variables, tokens)
  # 4 attention projections + 2 MLP layers per block, plus the output head.
  assert len(dense_calls) == 2 * 6 + 1
  kernels = [path for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
             if path[-1].key == "kernel"]
  assert len(kernels) == len(dense_calls)


def test_dropout_needs_rng_only_when_not_deterministic():
  model = _tiny_lm(dropout=0.5)
  tokens = jnp.zeros((2, 8), jnp.int32)
  variables = models.init_variables(model, tokens)
  apply = jax.jit(model.apply, static_argnames="deterministic")
  np.testing.assert_array_equal(apply(variables, tokens), apply(variables, tokens))
  noisy = apply(variables, tokens, deterministic=False,
                rngs={"dropout": jax.random.PRNGKey(0)})
  assert noisy.shape == (2, 8, VOCAB)


def test_mlp_classifier():
  model = models.MLPClassifier(hidden_sizes=(8, 4), num_classes=3)
  # [5, 2, 3]: trailing feature axes are flattened to 6.
  x = np.random.default_rng(0).normal(size=(5, 2, 3)).astype(np.float32)
  variables = models.init_variables(model, x)
  logits = np.asarray(jax.jit(model.apply)(variables, x))
  assert logits.shape == (5, 3)
  assert models.num_params(variables) == (6 * 8 + 8) + (8 * 4 + 4) + (4 * 3 + 3)
  # The forward pass in numpy: relu(x W + b) per hidden layer, then x W + b.
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  h = x.reshape(5, 6)
  for name in ("hidden_0", "hidden_1"):
    h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
  expected = h @ p["logits"]["kernel"] + p["logits"]["bias"]
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_get_model_from_config():
  config = ml_collections.ConfigDict(dict(name="transformer", d_model=32, num_layers=1,
                                          num_heads=2, d_ff=64, max_len=16))
  model = models.get_model(config, vocab_size=VOCAB, max_len=12)
  assert isinstance(model, models.TransformerLM)
  assert (model.vocab_size, model.d_model, model.num_layers, model.max_len) == (
      VOCAB, 32, 1, 12)
  mlp = models.get_model({"name": "mlp", "hidden_sizes": [16]}, num_classes=4)
  assert isinstance(mlp, models.MLPClassifier)
  assert mlp.hidden_sizes == (16,) and mlp.num_classes == 4
  with pytest.raises(ValueError, match="config.model.name"):
    models.get_model({"name": "resnet"})
  with pytest.raises(ValueError, match="vocab_size"):
    models.get_model({"name": "transformer"})
