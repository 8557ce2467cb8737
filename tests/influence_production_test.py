"""Influence kernels on a production-style Flax model: boxed params, DenseGeneral attention.

The model is a small decoder-only Transformer LM written in the style of flax's lm1b
example and T5X: every kernel is `nn.with_logical_partitioning`-boxed, attention
projects with `DenseGeneral` (q/k/v to `(heads, head_dim)`, the output contracting
`axis=(-2, -1)`), and the parameters go to the kernels straight from `model.init`.
References are brute force: explicit per-example `jax.grad`s (vmapped over the
examples), preconditioned with the same factors, and per-example gradients of every
leaf for TracIn.
"""

import functools

from absl.testing import absltest
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence
import _influence_fixtures as fixtures

VOCAB, LENGTH, DIM, HEADS, HEAD_DIM, MLP_DIM = 13, 6, 8, 2, 4, 16

_kernel_init = nn.initializers.normal(0.3)


def _partitioned(names):
  return nn.with_logical_partitioning(_kernel_init, names)


class _Attention(nn.Module):
  """Causal self-attention with DenseGeneral projections (lm1b / T5X layout)."""

  @nn.compact
  def __call__(self, x):
    project = functools.partial(
        nn.DenseGeneral, features=(HEADS, HEAD_DIM), axis=-1,
        kernel_init=_partitioned(("embed", "heads", "kv")), use_bias=False)
    query, key, value = (project(name=n)(x) for n in ("query", "key", "value"))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / np.sqrt(HEAD_DIM)
    causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
    weights = jax.nn.softmax(jnp.where(causal, logits, -1e9), axis=-1)
    mixed = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.DenseGeneral(DIM, axis=(-2, -1), name="out",
                           kernel_init=_partitioned(("heads", "kv", "embed")))(mixed)


class _DecoderBlock(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = x + _Attention(name="attention")(nn.LayerNorm(name="pre_attention_norm")(x))
    y = nn.LayerNorm(name="pre_mlp_norm")(x)
    y = nn.Dense(MLP_DIM, name="wi", kernel_init=_partitioned(("embed", "mlp")))(y)
    y = nn.Dense(DIM, name="wo", kernel_init=_partitioned(("mlp", "embed")))(
        nn.gelu(y))
    return x + y


class TransformerLM(nn.Module):
  """Token + position embeddings, 2 decoder blocks, final norm, logits head."""

  @nn.compact
  def __call__(self, tokens):
    embed = nn.Embed(VOCAB, DIM, name="token_embed", embedding_init=nn.with_logical_partitioning(
        nn.initializers.normal(1.0), ("vocab", "embed")))
    positions = self.param("position_embed", nn.with_logical_partitioning(
        nn.initializers.normal(0.1), ("length", "embed")), (LENGTH, DIM))
    x = embed(tokens) + positions[None, :tokens.shape[1]]
    for i in range(2):
      x = _DecoderBlock(name=f"block_{i}")(x)
    x = nn.LayerNorm(name="final_norm")(x)
    return nn.Dense(VOCAB, name="logits",
                    kernel_init=_partitioned(("embed", "vocab")))(x)


@functools.lru_cache(maxsize=None)
def _setup():
  model = TransformerLM()
  tokens = fixtures.randint(1, (10, LENGTH + 1), VOCAB)  # drawn on the host
  mask = np.ones((10, LENGTH), np.float32)
  mask[0, -2:] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  boxed = fixtures.init(model, jax.random.key(1), batch["inputs"])
  return influence.LanguageModelingTask(model.apply), boxed, batch


@functools.lru_cache(maxsize=None)
def _factors():
  """`fit_ekfac` on the boxed params of `_setup()` (read only by the tests)."""
  task, boxed, batch = _setup()
  return influence.fit_ekfac(task, boxed, [batch])


def _flat_grads(fn, params, batch):
  """[B, P]: explicit per-example jax.grad of every (unboxed) leaf, flattened."""
  grads = fixtures.per_example_param_grads(fn, params, batch)
  return np.concatenate([np.asarray(g).reshape(g.shape[0], -1)
                         for g in jax.tree_util.tree_leaves(grads)], axis=1)


class BoxedTransformerTest(absltest.TestCase):

  def test_params_from_init_are_boxed_and_layers_found(self):
    task, boxed, batch = _setup()
    self.assertTrue(influence.find_layers.__module__)  # public name
    leaves = jax.tree_util.tree_flatten_with_path(boxed)[0]
    self.assertTrue(any(str(path[-1]) == ".value" for path, _ in leaves))
    layers = influence.find_layers(task.loss, boxed, batch, warn=False)
    # Per block: query, key, value, out (DenseGeneral), wi, wo (Dense); the head.
    self.assertLen(layers, 13)
    out = [s for s in layers if s.name == "block_0/attention/out"][0]
    self.assertEqual((out.kind, out.in_axes, out.input_dim, out.output_dim),
                     ("DenseGeneral", (-2, -1), HEADS * HEAD_DIM, DIM))
    query = [s for s in layers if s.name == "block_1/attention/query"][0]
    self.assertEqual((query.input_dim, query.output_dim, query.has_bias),
                     (DIM, HEADS * HEAD_DIM, False))

  def test_ekfac_on_boxed_params_equals_preconditioned_jax_grads(self):
    task, boxed, batch = _setup()
    params = nn.meta.unbox(boxed)
    factors = _factors()
    layers = factors.layers
    # Every example is a query (the masked example 0 too): all-pairs scores, the
    # programs the dense-Fisher test below reuses.
    query = batch
    train = fixtures.per_example_layer_grads(task.loss, params, batch, layers)
    queries = fixtures.per_example_layer_grads(task.measurement, params, query, layers)
    damping = 1e-3
    preconditioned = fixtures.precondition(factors, queries, damping)
    expected = sum(np.einsum("qoi,noi->qn", np.asarray(preconditioned[n], np.float64),
                             np.asarray(train[n], np.float64)) for n in train)
    got = influence.ekfac_scores(task, boxed, factors, query, [batch], damping=damping,
                                 chunk_size=4)
    np.testing.assert_allclose(got, expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    by_token = influence.ekfac_token_scores(task, boxed, factors, query, [batch],
                                            damping=damping)
    self.assertEqual(by_token.shape, (10, 10, LENGTH))
    np.testing.assert_allclose(by_token.sum(-1), expected, rtol=1e-3,
                               atol=1e-4 * np.abs(expected).max())
    # The masked-out target positions of example 0 contribute nothing.
    np.testing.assert_allclose(by_token[:, 0, -2:], 0.0, atol=1e-6)
    unboxed = influence.ekfac_scores(task, params, influence.fit_ekfac(
        task, params, [batch]), query, [batch], damping=damping, chunk_size=4)
    np.testing.assert_allclose(got, unboxed, rtol=1e-5, atol=1e-6)

  def test_ekfac_on_tiny_model_close_to_dense_layer_block_fisher(self):
    # With one batch, the layer-block Fisher is exact to compute: EK-FAC is its
    # eigenvalue-corrected Kronecker approximation, so scores correlate strongly.
    task, boxed, batch = _setup()
    params = nn.meta.unbox(boxed)
    factors = _factors()
    layers = factors.layers
    grads = fixtures.per_example_layer_grads(task.loss, params, batch, layers)
    damping = 1e-2
    scores = np.zeros((10, 10))
    for spec in layers:
      g = np.reshape(grads[spec.name], (10, -1)).astype(np.float64)
      fisher = g.T @ g / len(g)
      scores += g @ np.linalg.solve(fisher + damping * np.eye(len(fisher)), g.T)
    got = influence.ekfac_scores(task, boxed, factors, batch, [batch], damping=damping,
                                 chunk_size=4)
    correlation = np.corrcoef(np.ravel(got), np.ravel(scores))[0, 1]
    self.assertGreater(correlation, 0.9)

  def test_tracin_on_boxed_params_equals_per_example_grads_of_all_leaves(self):
    task, boxed, batch = _setup()
    params = nn.meta.unbox(boxed)
    other = jax.jit(functools.partial(jax.tree_util.tree_map, lambda x: 0.8 * x))(
        boxed)  # one program, not one per leaf shape
    query = batch  # every example (the programs of the EK-FAC test's references)
    got = influence.tracin_scores(task, [boxed, other], [0.5, 0.25], query, [batch],
                                  chunk_size=4)
    expected = np.zeros((10, 10))
    for checkpoint, rate in ((params, 0.5), (nn.meta.unbox(other), 0.25)):
      train = _flat_grads(task.loss, checkpoint, batch)
      queries = _flat_grads(task.measurement, checkpoint, query)
      expected += rate * queries @ train.T
    np.testing.assert_allclose(got, expected, rtol=1e-4,
                               atol=1e-5 * np.abs(expected).max())


class _NoLayers(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.LayerNorm()(x) * self.param("scale", nn.initializers.ones, (3,))


class _Scanned(nn.Module):
  """A Dense inside nn.scan: its kernel is stacked, [steps, in, out]."""

  @nn.compact
  def __call__(self, x):
    body = nn.scan(lambda module, carry, _: (nn.Dense(3)(carry), None),
                   variable_axes={"params": 0}, split_rngs={"params": True},
                   length=2)
    x, _ = body(self, x, None)
    return x


class DiagnosticsTest(absltest.TestCase):

  def _batch(self):
    x = fixtures.normal(0, (4, 3))
    return {"inputs": x, "labels": np.arange(4, dtype=np.int32) % 3}

  def test_jitted_apply_is_named_as_the_cause(self):
    model = nn.Dense(3)
    batch = self._batch()
    params = fixtures.host_init(model, batch["inputs"][:1])
    apply = jax.jit(model.apply)
    apply(params, batch["inputs"])  # traced once: later traces replay the cache
    task = influence.ClassificationTask(apply)
    with self.assertRaisesRegex(ValueError, "pre-jitted apply"):
      influence.fit_ekfac(task, params, [batch])

  def test_no_supported_layer_names_the_modules_called(self):
    model = _NoLayers()
    batch = self._batch()
    params = fixtures.host_init(model, batch["inputs"][:1])
    with self.assertRaisesRegex(ValueError, "LayerNorm.*register_layer_kind"):
      influence.fit_ekfac(influence.ClassificationTask(model.apply), params, [batch])

  def test_unusable_layers_are_named_with_the_reason(self):
    model = _Scanned()
    batch = self._batch()
    params = fixtures.host_init(model, batch["inputs"][:1])
    with self.assertRaisesRegex(ValueError, "Dense_0.*nested transform.*nn.scan"):
      influence.find_layers(influence.ClassificationTask(model.apply).loss, params,
                            batch)

  def test_boxed_params_are_not_the_cause_any_more(self):
    task, boxed, batch = _setup()
    self.assertLen(influence.find_layers(task.loss, boxed, batch, warn=False), 13)


if __name__ == "__main__":
  absltest.main()
