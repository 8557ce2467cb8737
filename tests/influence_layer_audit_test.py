"""Layer discovery keeps only layers whose captured tokens are the exact per-example
gradient of their kernel and bias; every other model still gets exact TracIn.

A layer's tokens (Σ g aᵀ, examples on the leading axis) are its leaves' gradient
only when its input's leading axis is the example axis and nothing but its own
calls, at the top level of the traced function, uses those leaves. Each model below
breaks one of these in a way production code does. TracIn must equal explicit
per-example `jax.grad` loops on every one (its discovery leaves the layer to plain
per-example gradients); EK-FAC must refuse the layer by name and reason, never fit
it. Before this check, TracIn was 10–70% off on each of them, the project's own
TransformerLM (its position embedding reads a table shared by every example)
included.
"""

import re

import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import data
from simfluence_jax import influence
from simfluence_jax import models

NUM_CLASSES = 3


def _classification_data(n, seed, length=4, dim=3):
  rng = np.random.default_rng(seed)
  return {"inputs": rng.standard_normal((n, length, dim)).astype(np.float32),
          "labels": (np.arange(n) % NUM_CLASSES).astype(np.int32)}


class TimeMajor(nn.Module):
  """Dense on [L, B, D] (time-major code): the leading axis is time."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(jnp.swapaxes(x, 0, 1)))
    return nn.Dense(NUM_CLASSES)(nn.LayerNorm()(h.mean(0)))


class Flattened(nn.Module):
  """Dense on [B·L, D]."""

  @nn.compact
  def __call__(self, x):
    b, length, d = x.shape
    h = nn.tanh(nn.Dense(5)(x.reshape(b * length, d))).reshape(b, length, 5)
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class PairConcat(nn.Module):
  """A Siamese encoder run on both halves concatenated along the batch axis."""

  @nn.compact
  def __call__(self, x):
    b, length = x.shape[:2]
    both = jnp.concatenate([x[:, :length // 2], x[:, length // 2:]], axis=0)
    enc = nn.tanh(nn.Dense(5, name="enc")(both)).mean(1)
    return nn.Dense(NUM_CLASSES)(jnp.concatenate([enc[:b], enc[b:]], axis=-1))


class SharedTable(nn.Module):
  """A Dense on a [1, L, 2] coordinate table broadcast onto every example."""

  @nn.compact
  def __call__(self, x):
    coords = jnp.linspace(-1, 1, x.shape[1])[None, :, None] * jnp.ones((1, 1, 2))
    h = nn.tanh(x + nn.Dense(x.shape[-1], name="pos_mlp")(coords))
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class WeightNormed(nn.Module):
  """The Dense sees g·V/‖V‖, not the stored leaf V."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.WeightNorm(nn.Dense(5))(x))
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class Rematerialised(nn.Module):
  """Dense layers inside nn.remat: their values live in a nested trace."""

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4)(x)
    h = h + nn.remat(nn.Dense)(4)(nn.tanh(h))
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class Recurrent(nn.Module):
  """An LSTM's gates (Dense layers) inside nn.RNN's scan."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(nn.RNN(nn.LSTMCell(4))(x)[:, -1])


class FineTuned(nn.Module):
  """Fine-tuning one block: a frozen root `Dense_0` is named like the block's."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(3)(x))
    h = h + _Block()(h)
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class _Block(nn.Module):

  @nn.compact
  def __call__(self, h):
    return nn.Dense(3)(nn.tanh(nn.Dense(3)(h)))


def _doubled_kernel(inputs, kernel, dimensions, precision=None,
                    preferred_element_type=None):
  del precision, preferred_element_type
  return jax.lax.dot_general(inputs, 2.0 * kernel, dimensions)


class ScaledDotGeneral(nn.Module):
  """A custom dot_general computing x @ (2·W): the tokens' Σ g aᵀ is the gradient
  with respect to 2·W."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5, dot_general=_doubled_kernel)(x))
    return nn.Dense(NUM_CLASSES)(h.mean(1))


class _Small(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(NUM_CLASSES)(nn.tanh(nn.Dense(5)(x)).mean(1))


def _reference_kl():
  """Cross-entropy plus a KL penalty to a frozen reference copy of the same model
  (RLHF-style): the reference's calls are calls of the same layers, reading weights
  that are not in params."""
  model, batch = _Small(), _classification_data(7, 0)
  params = model.init(jax.random.key(1), batch["inputs"][:1])
  reference = model.init(jax.random.key(2), batch["inputs"][:1])

  def apply(p, x):
    log_p = jax.nn.log_softmax(model.apply(p, x))
    log_r = jax.nn.log_softmax(model.apply(reference, x))
    return log_p - 0.5 * jnp.sum(jnp.exp(log_p) * (log_p - log_r), -1,
                                 keepdims=True)
  return (influence.ClassificationTask(apply), params, batch, "Dense_0",
          "1 of its 2 calls do not read its weights from params")


class TiedLinen(nn.Module):
  """Tied input/output embedding read directly (`h @ embedding.T`)."""

  def setup(self):
    self.emb = nn.Embed(11, 4)
    self.hidden = nn.Dense(4)

  def __call__(self, ids):
    return nn.tanh(self.hidden(self.emb(ids))) @ self.emb.embedding.T


class TiedNNX(nnx.Module):

  def __init__(self, rngs):
    self.emb = nnx.Embed(11, 4, rngs=rngs)
    self.hidden = nnx.Linear(4, 4, rngs=rngs)

  def __call__(self, ids):
    return nnx.tanh(self.hidden(self.emb(ids))) @ self.emb.embedding[...].T


def _lm_data(n, seed, vocab=11, length=5):
  tokens = np.random.default_rng(seed).integers(0, vocab, (n, length + 1))
  mask = np.ones((n, length), np.float32)
  mask[0, 3:] = 0
  return {"inputs": tokens[:, :-1].astype(np.int32),
          "targets": tokens[:, 1:].astype(np.int32), "mask": mask}


def _transformer_lm():
  module = models.TransformerLM(vocab_size=data.BYTE_VOCAB_SIZE, d_model=8,
                                num_heads=2, num_layers=1, d_ff=16, max_len=6)
  batch = _lm_data(7, 0, vocab=data.BYTE_VOCAB_SIZE, length=6)
  params = models.init_variables(module, batch["inputs"][:1], seed=0)["params"]
  task = influence.LanguageModelingTask(
      lambda p, b: module.apply({"params": p}, b))
  return task, params, batch, "position_embedding", "leading axis"


def _linen(cls, reason, layer):
  def make():
    model, batch = cls(), _classification_data(7, 0)
    params = model.init(jax.random.key(1), batch["inputs"][:1])
    return influence.ClassificationTask(model.apply), params, batch, layer, reason
  return make


def _fine_tuned():
  model, batch = FineTuned(), _classification_data(7, 0, dim=3)
  frozen = model.init(jax.random.key(1), batch["inputs"][:1])["params"]
  apply = lambda p, x: model.apply({"params": {**frozen, "_Block_0": p}}, x)
  return (influence.ClassificationTask(apply), frozen["_Block_0"], batch, None,
          None)


def _tied(kind):
  def make():
    batch = _lm_data(7, 0)
    if kind == "nnx":
      module = TiedNNX(nnx.Rngs(0))
      return (influence.LanguageModelingTask(module), nnx.state(module, nnx.Param),
              batch, "emb", "used outside its calls, by `transpose`")
    module = TiedLinen()
    params = module.init(jax.random.key(0), batch["inputs"][:1])
    return (influence.LanguageModelingTask(module.apply), params, batch, "emb",
            "used outside its calls, by `transpose`")
  return make


MODELS = {
    "transformer_lm_position_table": _transformer_lm,
    "time_major": _linen(TimeMajor, "leading axis", "Dense_0"),
    "flattened": _linen(Flattened, "leading axis", "Dense_0"),
    "pair_concat": _linen(PairConcat, "leading axis", "enc"),
    "shared_table": _linen(SharedTable, "leading axis", "pos_mlp"),
    "weight_norm": _linen(WeightNormed, "used outside its calls, by `mul`",
                          "Dense_0"),
    "remat": _linen(Rematerialised, "nested transform", "CheckpointDense_0"),
    "lstm": _linen(Recurrent, "nested transform", "LSTMCell_0/"),
    "fine_tuned_block": _fine_tuned,
    "scaled_dot_general": _linen(ScaledDotGeneral, "transformed by `mul` inside its "
                                 "call", "Dense_0"),
    "reference_copy_kl": _reference_kl,
    "tied_embedding_linen": _tied("linen"),
    "tied_embedding_nnx": _tied("nnx"),
}


def _split(batch, *sizes):
  out, start = [], 0
  for size in sizes:
    out.append(jax.tree_util.tree_map(lambda x, s=start, e=start + size: x[s:e],
                                      batch))
    start += size
  return out


def _per_example_grads(fn, params, batch):
  grad = jax.jit(jax.grad(lambda p, b: fn(p, b)[0]))
  rows = []
  for i in range(len(jax.tree_util.tree_leaves(batch)[0])):
    g = grad(params, jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], batch))
    rows.append(np.concatenate([np.ravel(np.asarray(x, np.float64))
                                for x in jax.tree_util.tree_leaves(g)]))
  return np.stack(rows)


def _assert_ekfac_is_scaled_dot_products(task, params, batch, atol):
  """EK-FAC with a damping far above every eigenvalue is (1/λ) × the gradient dot
  products (every leaf here is covered)."""
  query, train = _split(batch, 2, 5)
  factors = influence.fit_ekfac(task, params, [train])
  damping = 1e6
  scores = influence.ekfac_scores(task, params, factors, query, [train],
                                  damping=damping)
  expected = (_per_example_grads(task.measurement, params, query)
              @ _per_example_grads(task.loss, params, train).T) / damping
  np.testing.assert_allclose(np.asarray(scores) / np.abs(expected).max(),
                             expected / np.abs(expected).max(), atol=atol, rtol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_tracin_equals_explicit_loops_and_ekfac_refuses_the_layer(name):
  task, params, batch, layer, reason = MODELS[name]()
  query, train = _split(batch, 2, 5)
  expected = (_per_example_grads(task.measurement, params, query)
              @ _per_example_grads(task.loss, params, train).T)
  scale = np.abs(expected).max()
  for chunk_size in (2, 5):  # a shared table's error changed with the chunk
    scores = influence.tracin_scores(task, [params], [1.0], query, [train],
                                     chunk_size=chunk_size)
    assert scores.shape == (2, 5)
    np.testing.assert_allclose(np.asarray(scores) / scale, expected / scale,
                               atol=2e-6, rtol=0)
  self_influence = influence.tracin_self_influence(task, [params], [1.0], [train])
  diagonal = np.einsum("ip,ip->i", *[_per_example_grads(task.loss, params, train)] * 2)
  np.testing.assert_allclose(np.asarray(self_influence) / diagonal.max(),
                             diagonal / diagonal.max(), atol=2e-6, rtol=0)
  if reason is None:
    return
  kinds = "all" if "embed" in name or "position" in name else None
  with pytest.raises(ValueError, match=f"'{layer}.*{reason}"):
    influence.find_layers(task.loss, params, train, kinds=kinds)


def test_layers_refused_for_one_reason_share_the_sentence():
  # The LSTM's gate layers all sit inside nn.RNN's scan: one reason, every name.
  task, params, batch, _, _ = MODELS["lstm"]()
  with pytest.raises(ValueError) as error:
    influence.find_layers(task.loss, params, batch)
  message = str(error.value)
  assert message.count("nested transform") == 1, message
  names = re.findall(r"'([^']+)' \(Dense\)", message)
  assert len(names) >= 4 and all(n.startswith("LSTMCell_0/") for n in names), message


def test_fine_tuned_block_is_covered_by_its_own_leaves_and_the_frozen_layers_skipped():
  """Leaves are matched to layers by which calls use them, not by path suffix:
  the frozen root `Dense_0` (not in params) is left out without an error, and the
  block's two layers get their own leaves; EK-FAC with a large damping is then
  (1/λ) × the gradient dot products."""
  task, params, batch, _, _ = _fine_tuned()
  with pytest.warns(UserWarning, match=r"not in params \(frozen\): \['Dense_0', "
                    r"'Dense_1'\]"):
    layers = influence.find_layers(task.loss, params, batch, warn=True)
  assert sorted((s.name, s.kernel_path, s.bias_path) for s in layers) == [
      ("_Block_0/Dense_0", ("Dense_0", "kernel"), ("Dense_0", "bias")),
      ("_Block_0/Dense_1", ("Dense_1", "kernel"), ("Dense_1", "bias"))]
  _assert_ekfac_is_scaled_dot_products(task, params, batch, atol=1e-4)


class BatchMajor(TimeMajor):
  """TimeMajor's layers and parameters, applied batch-major."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(x))
    return nn.Dense(NUM_CLASSES)(nn.LayerNorm()(h.mean(1)))


def test_explicit_layers_with_a_time_major_call_are_refused_at_capture():
  """`layers=` skips discovery; the capture still checks every call's leading axis
  against the examples of the chunk (here 3: the time-major input is [4, 3, 3])."""
  batch = _classification_data(6, 0)  # L = 4
  params = TimeMajor().init(jax.random.key(1), batch["inputs"][:1])
  layers = influence.find_layers(
      influence.ClassificationTask(BatchMajor().apply).loss, params, batch,
      warn=False)
  assert [spec.name for spec in layers] == ["Dense_0", "Dense_1"]
  task = influence.ClassificationTask(TimeMajor().apply)
  with pytest.raises(ValueError, match="capture: layer 'Dense_0': for a batch of 3 "
                     r"examples its input has shape \(4, 3, 3\)"):
    influence.fit_ekfac(task, params, [batch], layers=layers, chunk_size=3)


def test_params_cast_by_a_jitted_helper_keep_their_layers():
  """A jit equation that only casts the params passes them on (it counted as a use
  outside the layers, and EK-FAC refused every layer); the bfloat16 scores then
  equal the float32 dot products to bfloat16 rounding."""
  model, batch = _Small(), _classification_data(7, 0)
  params = model.init(jax.random.key(1), batch["inputs"][:1])
  cast = jax.jit(lambda p: jax.tree_util.tree_map(
      lambda x: x.astype(jnp.bfloat16), p))
  task = influence.ClassificationTask(lambda p, x: model.apply(cast(p), x).astype(
      jnp.float32))
  layers = influence.find_layers(task.loss, params, batch)
  assert sorted(spec.name for spec in layers) == ["Dense_0", "Dense_1"]
  _assert_ekfac_is_scaled_dot_products(task, params, batch, atol=2e-2)


class _UnusedHead(nn.Module):
  """A pooler-like Dense whose output the loss never reads (BERT's pooler under a
  masked-LM loss, an auxiliary head)."""

  @nn.compact
  def __call__(self, x):
    h = nn.tanh(nn.Dense(5)(x)).mean(1)
    nn.Dense(4, name="pooler")(h)
    return nn.Dense(NUM_CLASSES)(h)


def test_a_layer_the_loss_does_not_depend_on_is_left_out():
  """Its factors were zero, so EK-FAC's default damping (0.1 × mean Λ per layer)
  refused the whole model; its gradients are zero for every example, so leaving it
  out changes no score."""
  model, batch = _UnusedHead(), _classification_data(7, 0)
  params = model.init(jax.random.key(1), batch["inputs"][:1])
  task = influence.ClassificationTask(model.apply)
  with pytest.warns(UserWarning, match=r"do not depend on \(zero gradients\): "
                    r"\['pooler'\]"):
    layers = influence.find_layers(task.loss, params, batch, warn=True)
  assert sorted(spec.name for spec in layers) == ["Dense_0", "Dense_1"]
  query, train = _split(batch, 2, 5)
  factors = influence.fit_ekfac(task, params, [train])
  scores = influence.ekfac_scores(task, params, factors, query, [train])
  assert np.all(np.isfinite(np.asarray(scores)))
  _assert_ekfac_is_scaled_dot_products(task, params, batch, atol=1e-4)
