"""Review fixes of EK-FAC and layer discovery, each against a brute-force reference.

* Padding rows (mask all 0) change nothing: Λ is an average over the examples
  that have a counted token.
* A total token weight below 1 is a count like any other (no clamp to 1).
* NNX modules sharing a kernel but with their own biases are not one layer: TracIn
  gives them plain per-example gradients, EK-FAC leaves them out (or refuses).
* Factors record an NNX task's non-parameter state and the task's traced loss:
  factors fitted under other batch statistics, or for another apply_fn, are
  refused, naming the field.
"""

import collections
import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any

from absl.testing import absltest
import flax.linen as nn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _closures
from simfluence_jax import influence
from simfluence_jax.influence import _ekfac
import _influence_fixtures as fixtures
import nnx_models

VOCAB = 7


class _LM(nn.Module):

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, 4)(tokens)
    return nn.Dense(VOCAB)(nn.tanh(nn.Dense(5)(x)))


_LM_MODEL = _LM()
_LM_TASK = influence.LanguageModelingTask(_LM_MODEL.apply)


@functools.lru_cache(maxsize=None)
def _lm_params():
  # A draw whose factors have well-separated eigenvalues (the padding test compares
  # eigenvectors up to sign; some draws, of flax's init too, have a near-tie).
  return fixtures.host_init(_LM_MODEL, np.zeros((1, 4), np.int32), seed=2)


@functools.lru_cache(maxsize=None)
def _lm(rows=8, length=4, seed=0):
  """One model, task and parameters for every batch shape (shared programs); data
  and parameters drawn on the host (no program per random shape)."""
  tokens = fixtures.randint(seed, (rows, length + 1), VOCAB)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((rows, length), np.float32)}
  return _LM_MODEL, _LM_TASK, _lm_params(), batch


def _padded():
  """`_lm()`'s 8 rows followed by 8 padding rows (all-0 mask)."""
  _, _, _, real = _lm()
  return jax.tree_util.tree_map(lambda a: np.concatenate([a, np.zeros_like(a)]), real)


@functools.lru_cache(maxsize=None)
def _factors(padded: bool, kfac: bool = False):
  """Factors of `_lm()` (fitted alone, or with padding rows in chunks of 5: a chunk
  of real and padding rows, one of padding rows only, a padded remainder)."""
  _, task, params, real = _lm()
  if padded:
    return influence.fit_ekfac(task, params, [_padded()], kfac=kfac, chunk_size=5)
  return influence.fit_ekfac(task, params, [real], kfac=kfac)


def _slice(batch, i):
  return jax.tree_util.tree_map(lambda x: x[i:i + 1], batch)


def _brute_layer_grads(task, params, batch, layers):
  """By layer [B, O, I]: explicit per-example jax.grad of the loss (vmapped)."""
  return fixtures.per_example_layer_grads(task.loss, params, batch, layers)


def _brute_ekfac_scores(query_grads, train_grads, q_a, q_s, eigenvalues, damping):
  """⟨G_q, Q_S ((Q_Sᵀ G_i Q_A) / (Λ + λ)) Q_Aᵀ⟩ with explicit matrices."""
  rotated = np.einsum("so,nsi,ij->noj", q_s, train_grads, q_a) / (eigenvalues + damping)
  preconditioned = np.einsum("so,noi,ji->nsj", q_s, rotated, q_a)
  return np.einsum("qoi,noi->qn", query_grads, preconditioned)


class PaddingRowsTest(absltest.TestCase):
  """Rows whose mask is all 0 (a fixed batch size) are not examples."""

  def test_padding_rows_change_nothing_and_eigenvalues_equal_brute_force(self):
    _, task, params, real = _lm()
    padded = _padded()
    layers = influence.find_layers(task.loss, params, real)
    stats = influence.covariance_statistics(task, params, padded, layers)
    self.assertEqual(float(stats.num_examples), 8.0)
    grads = _brute_layer_grads(task, params, real, layers)
    query = _slice(real, 0)
    for kfac in (False, True):
      alone = _factors(padded=False, kfac=kfac)
      with_padding = _factors(padded=True, kfac=kfac)
      for spec in layers:
        f, g = alone.factors[spec.name], with_padding.factors[spec.name]
        scale = float(np.max(f.eigenvalues))  # (a 2x dilution is far outside)
        np.testing.assert_allclose(g.eigenvalues, f.eigenvalues, rtol=1e-3,
                                   atol=1e-5 * scale)
        for q_f, q_g in ((f.activation_eigenvectors, g.activation_eigenvectors),
                         (f.gradient_eigenvectors, g.gradient_eigenvectors)):
          # Up to signs of eigenvectors: the projectors agree.
          np.testing.assert_allclose(np.abs(np.asarray(q_g)), np.abs(np.asarray(q_f)),
                                     atol=1e-5)
        if not kfac:
          # Λ = mean over the 8 real examples of (Q_Sᵀ G Q_A)².
          q_a = np.asarray(g.activation_eigenvectors)
          q_s = np.asarray(g.gradient_eigenvectors)
          rotated = np.einsum("so,nsi,ij->noj", q_s, grads[spec.name], q_a)
          np.testing.assert_allclose(g.eigenvalues, np.mean(rotated ** 2, 0),
                                     rtol=1e-3, atol=1e-5 * scale)
      for damping in (None, 1e-3):
        want = influence.ekfac_scores(task, params, alone, query, [real],
                                      damping=damping)
        got = influence.ekfac_scores(task, params, with_padding, query, [padded],
                                     damping=damping)
        np.testing.assert_allclose(np.asarray(got)[:, :8], want, rtol=1e-4,
                                   atol=1e-6)
        np.testing.assert_array_equal(np.asarray(got)[:, 8:], 0.0)

  def test_corrected_eigenvalues_equal_brute_force_with_padding(self):
    # The dense EK-FAC of the real rows alone, built by hand, gives the scores of
    # factors fitted with padding rows.
    _, task, params, real = _lm()
    factors = _factors(padded=True)
    layers = factors.layers
    self.assertEqual(layers, tuple(influence.find_layers(task.loss, params, real)))
    grads = _brute_layer_grads(task, params, real, layers)
    damping = 1e-3
    want = 0.0
    for spec in layers:
      f = factors.factors[spec.name]
      q_a = np.asarray(f.activation_eigenvectors)
      q_s = np.asarray(f.gradient_eigenvectors)
      eigenvalues = np.mean(np.einsum("so,nsi,ij->noj", q_s, grads[spec.name],
                                      q_a) ** 2, 0)
      want = want + _brute_ekfac_scores(grads[spec.name][:2], grads[spec.name], q_a,
                                        q_s, eigenvalues, damping)
    got = influence.ekfac_scores(task, params, factors,
                                 jax.tree_util.tree_map(lambda x: x[:2], real),
                                 [real], damping=damping)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4 * np.abs(want).max())

  def test_only_padding_rows_are_refused(self):
    _, task, params, real = _lm()
    layers = influence.find_layers(task.loss, params, real)
    zero = {**real, "mask": np.zeros_like(real["mask"])}
    with self.assertRaisesRegex(ValueError, "saw no token with weight > 0"):
      influence.fit_ekfac(task, params, [zero], layers=layers)


class FractionalTokenWeightTest(absltest.TestCase):
  """A = Σ w a aᵀ / Σ w for any total weight > 0, also below 1."""

  def test_small_uniform_mask_gives_the_unweighted_covariances(self):
    _, task, params, batch = _lm()
    layers = influence.find_layers(task.loss, params, batch)
    inner = [s for s in layers if s.input_dim == 4][0]  # Dense(5) on the embeddings
    embeddings = np.asarray(params["params"]["Embed_0"]["embedding"])[
        np.asarray(batch["inputs"])]
    a = np.concatenate([embeddings, np.ones(embeddings.shape[:2] + (1,))], -1)
    brute = np.einsum("bti,btj->ij", a, a) / (a.shape[0] * a.shape[1])
    _, s_full = influence.covariances(
        influence.covariance_statistics(task, params, batch, layers))
    for weight in (0.01, 0.04, 1.0):
      weighted = {**batch, "mask": np.full(batch["mask"].shape, weight, np.float32)}
      stats = influence.covariance_statistics(task, params, weighted, layers)
      np.testing.assert_allclose(float(stats.token_counts[inner.name]), 32 * weight,
                                 rtol=1e-6)
      a_cov, s_cov = influence.covariances(stats)
      np.testing.assert_allclose(a_cov[inner.name], brute, rtol=1e-5, atol=1e-7)
      # The loss scales by w, so g does: S = w² S(w=1).
      for spec in layers:
        np.testing.assert_allclose(s_cov[spec.name],
                                   weight ** 2 * np.asarray(s_full[spec.name]),
                                   rtol=1e-4, atol=1e-12)
      # The eigendecomposition divides the same way.
      a_values, a_vectors, _, _ = _ekfac.eigendecompose(stats)[inner.name]
      np.testing.assert_allclose(
          np.asarray(a_vectors) * np.asarray(a_values) @ np.asarray(a_vectors).T,
          brute, rtol=1e-4, atol=1e-6)


def _assert_each_layer_alone_is_its_share(task, params, batch, query, layers=None):
  """EK-FAC fitted on each layer alone scores `query` as that layer's share of the
  fit of every layer (`ekfac_layer_scores`)."""
  factors = influence.fit_ekfac(task, params, [batch], layers=layers)
  shares = influence.ekfac_layer_scores(task, params, factors, query, [batch])
  for k, spec in enumerate(factors.layers):
    alone = influence.ekfac_scores(task, params, influence.fit_ekfac(
        task, params, [batch], layers=(spec,)), query, [batch])
    np.testing.assert_allclose(alone, shares[k], rtol=1e-4,
                               atol=1e-5 * np.abs(shares[k]).max(), err_msg=spec.name)


class PromptTokensTest(absltest.TestCase):
  """A token the loss mask zeroes but later positions read (a prompt token) is part
  of the example's gradient Σ g aᵀ, so it counts in A and S; trailing padding
  carries no gradient in a causal model and does not. Left out, the gradient had
  mass in the null space of A and S, where eigh's basis is arbitrary: scores moved
  with chunk size by 5e-3 (review h17)."""

  def test_prompt_tokens_count_padding_does_not_and_chunks_agree(self):
    model = fixtures.CausalLM(VOCAB)
    task = influence.LanguageModelingTask(model.apply)
    params = fixtures.host_init(model, np.zeros((1, 6), np.int32), seed=0)
    tokens = fixtures.randint(3, (6, 7), VOCAB)
    mask = np.zeros((6, 6), np.float32)
    mask[:, 3:] = 1.0  # a 3-token prompt
    mask[5, 4:] = 0.0  # the last row: 1 answer token, then 2 padding tokens
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
    layers = influence.find_layers(task.loss, params, batch, kinds="all")
    inner = [s for s in layers if s.input_dim == 4][0]  # Dense(5) on the embeddings
    embeddings = np.asarray(params["params"]["Embed_0"]["embedding"])[
        np.asarray(batch["inputs"])]
    a = np.concatenate([embeddings, np.ones(embeddings.shape[:2] + (1,))], -1)
    counted = np.ones((6, 6))
    counted[5, 4:] = 0.0  # every token but the padding
    brute = np.einsum("bt,bti,btj->ij", counted, a, a) / counted.sum()
    stats = influence.covariance_statistics(task, params, batch, layers)
    self.assertAlmostEqual(float(stats.token_counts[inner.name]), counted.sum(),
                           places=4)
    a_cov, _ = influence.covariances(stats)
    np.testing.assert_allclose(a_cov[inner.name], brute, rtol=1e-5, atol=1e-7)
    query = _slice(batch, 0)
    want = influence.ekfac_scores(task, params, influence.fit_ekfac(
        task, params, [batch], layers=layers), query, [batch])
    got = influence.ekfac_scores(task, params, influence.fit_ekfac(
        task, params, [batch], layers=layers, chunk_size=1), query, [batch])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # Scaling the mask scales the loss, its gradients, Λ and the default damping
    # alike and every token's weight (the prompt's too), so the scores stay (a
    # fixed weight of 1 for the prompt moved them by 2.4%, review h19).
    half = {**batch, "mask": 0.5 * mask}
    got = influence.ekfac_scores(task, params, influence.fit_ekfac(
        task, params, [half], layers=layers), _slice(half, 0), [half])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    # Which tokens are real does not depend on which layers are fitted: the head
    # alone (no gradient at the prompt's positions) scores as its share of the
    # fit of every layer (it saw no prompt token: 28-72% off; review h34).
    _assert_each_layer_alone_is_its_share(task, params, batch, query, layers)


class _AttentionLM(nn.Module):
  """No Embed module; q/k/v are DenseGeneral layers with [B, L, H, D] outputs."""

  @nn.compact
  def __call__(self, ids):
    table = self.param("table", nn.initializers.normal(1.0), (VOCAB, 4))
    h = table[ids]
    h = h + nn.MultiHeadDotProductAttention(num_heads=2, name="attn")(
        h, mask=nn.make_causal_mask(ids))
    return nn.Dense(VOCAB, name="head")(jnp.tanh(h))


def test_each_layer_alone_scores_as_its_share_with_a_prompt_mask():
  # The tokens the prompt's loss mask zeroes are found by the layers left out of
  # a fit too, 4-D DenseGeneral outputs included (left out of the first fix,
  # each layer alone was 6-23% off its share; review h37).
  model = _AttentionLM()
  task = influence.LanguageModelingTask(model.apply)
  tokens = fixtures.randint(5, (6, 7), VOCAB)
  mask = np.ones((6, 6), np.float32)
  mask[:, :3] = 0.0
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  params = fixtures.host_init(model, batch["inputs"][:1], seed=2)
  _assert_each_layer_alone_is_its_share(task, params, batch, _slice(batch, 0))


class _SharedKernelNet(nnx.Module):
  """a and b share one kernel Variable; c is an ordinary layer."""

  def __init__(self, rngs, share_bias=False, b_bias=True):
    self.a = nnx.Linear(3, 3, rngs=rngs)
    self.b = nnx.Linear(3, 3, use_bias=b_bias, rngs=rngs)
    self.c = nnx.Linear(3, 3, rngs=rngs)
    self.b.kernel = self.a.kernel
    if share_bias:
      self.b.bias = self.a.bias
    elif b_bias:
      self.b.bias[...] = jnp.array([0.3, -0.2, 0.1])

  def __call__(self, x):
    return self.c(nnx.tanh(self.b(nnx.tanh(self.a(x)))))


@functools.lru_cache(maxsize=None)
def _shared_setup(**kwargs):
  """(net, task, params, batch), shared (read only) by the tests of a variant."""
  net = _SharedKernelNet(nnx.Rngs(0), **kwargs)
  x = fixtures.normal(1, (6, 3))
  batch = {"inputs": x, "labels": np.array([0, 1, 2, 0, 1, 2], np.int32)}
  return net, influence.ClassificationTask(net), nnx.state(net, nnx.Param), batch


def _brute_grads(net, batch, select=lambda grads: grads):
  """`select` of the per-example gradients of every parameter: jax.grad of each
  example's cross-entropy through the merged module (vmapped over examples)."""
  graphdef, params, rest = nnx.split(net, nnx.Param, ...)

  def loss(p, x, label):
    logits = nnx.merge(graphdef, p, rest)(x[None])
    return -jax.nn.log_softmax(logits)[0, label]

  return jax.jit(jax.vmap(lambda p, x, label: select(jax.grad(loss)(p, x, label)),
                          in_axes=(None, 0, 0)))(params, batch["inputs"],
                                                 batch["labels"])


def _brute_param_grads(net, batch):
  """[N, P] per-example gradients of every parameter (leaves flattened)."""
  grads = _brute_grads(net, batch)
  return np.concatenate([np.asarray(g).reshape(len(batch["labels"]), -1)
                         for g in jax.tree_util.tree_leaves(grads)], axis=1)


class SharedKernelTest(absltest.TestCase):

  def test_separate_biases_are_not_one_layer(self):
    _, task, state, batch = _shared_setup()
    with self.assertRaisesRegex(
        ValueError, r"^find_layers: layers that cannot be used .*'a' \(nnx.Linear\): "
        r"modules sharing its kernel have different biases \(a/bias vs b/bias\)"):
      influence.find_layers(task.loss, state, batch, warn=False)
    layers = influence.find_layers(task.loss, state, batch, warn=False, strict=False)
    self.assertEqual([(s.name, s.num_calls) for s in layers], [("c", 1)])
    _, task, state, batch = _shared_setup(b_bias=False)
    with self.assertRaisesRegex(ValueError, r"different biases \(a/bias vs no bias\)"):
      influence.find_layers(task.loss, state, batch, warn=False)

  def test_tracin_equals_brute_force(self):
    for kwargs in ({}, {"b_bias": False}, {"share_bias": True}):
      net, task, state, batch = _shared_setup(**kwargs)
      grads = _brute_param_grads(net, batch)
      want = grads @ grads.T
      got = influence.tracin_scores(task, [state], [1.0], batch, batch)
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * np.abs(want).max(),
                                 err_msg=str(kwargs))
      np.testing.assert_allclose(
          influence.tracin_self_influence(task, [state], [1.0], batch), np.diag(want),
          rtol=1e-4, err_msg=str(kwargs))

  def test_shared_kernel_and_bias_is_one_layer_called_twice(self):
    _, task, state, batch = _shared_setup(share_bias=True)
    layers = influence.find_layers(task.loss, state, batch, warn=False)
    self.assertEqual([(s.name, s.num_calls, s.bias_path) for s in layers],
                     [("a", 2, ("a", "bias")), ("c", 1, ("c", "bias"))])

  def test_ekfac_without_the_shared_layer_equals_brute_force(self):
    net, task, state, batch = _shared_setup()
    with self.assertRaisesRegex(ValueError, "different biases"):
      influence.fit_ekfac(task, state, [batch])
    layers = influence.find_layers(task.loss, state, batch, warn=False, strict=False)
    factors = influence.fit_ekfac(task, state, [batch], layers=layers)
    self.assertEqual([s.name for s in factors.layers], ["c"])
    # Layer c by hand: a = [h, 1] (its input), g = ∂ℓ/∂ outputs = ∂ℓ/∂ bias.
    x = batch["inputs"]
    h = np.asarray(jnp.tanh(net.b(jnp.tanh(net.a(x)))))
    a = np.concatenate([h, np.ones((len(h), 1))], 1)
    g = np.asarray(_brute_grads(net, batch, lambda grads: grads["c"]["bias"][...]))
    grads = np.einsum("no,ni->noi", g, a)
    _, q_a = np.linalg.eigh(a.T @ a / 6)
    _, q_s = np.linalg.eigh(g.T @ g / 6)
    eigenvalues = np.mean(np.einsum("so,nsi,ij->noj", q_s, grads, q_a) ** 2, 0)
    damping = 1e-3
    want = _brute_ekfac_scores(grads, grads, q_a, q_s, eigenvalues, damping)
    got = influence.ekfac_scores(task, state, factors, batch, [batch],
                                 damping=damping)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4 * np.abs(want).max())




class NonParameterStateTest(absltest.TestCase):

  def test_factors_fitted_under_other_batch_statistics_are_refused(self):
    net = nnx_models.BatchNormNet(nnx.Rngs(0))
    net.eval()
    x = fixtures.normal(1, (6, 3))
    batch = {"inputs": x, "labels": np.array([0, 1, 0, 1, 1, 0], np.int32)}
    before = influence.ClassificationTask(net)
    factors = influence.fit_ekfac(before, nnx.state(net, nnx.Param), [batch])
    # Same task, same state: accepted (the check is stable across calls).
    influence.ekfac_scores(before, nnx.state(net, nnx.Param), factors, batch, [batch])
    # Batch statistics recalibrated; parameters unchanged.
    net.train()
    net(3.0 * x + 2.0)
    net.eval()
    after = influence.ClassificationTask(net)
    params = nnx.state(net, nnx.Param)
    message = (r"^factors: fitted under other values of the task's non-parameter "
               r"state \(the NNX module's batch statistics or other non-Param "
               r"variables; 2 of 2 arrays differ, first '.*mean': checksum "
               r"([0-9a-f]{16}) in the factors, (?!\1)[0-9a-f]{16} for the "
               r"task\): refit them under this state, or pass "
               r"factors.for_other_params\(\)")
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_scores(after, params, factors, batch, [batch])
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_self_influence(after, params, factors, [batch])
    # Asked for, it is applied; refitted under the new state, accepted.
    influence.ekfac_scores(after, params, factors.for_other_params(), batch, [batch])
    refitted = influence.fit_ekfac(after, params, [batch])
    influence.ekfac_scores(after, params, refitted, batch, [batch])
    self.assertEqual(refitted.values_checksum.split("+state:")[0],
                     factors.values_checksum.split("+state:")[0])
    self.assertNotEqual(refitted.values_checksum, factors.values_checksum)
    self.assertIn("+state:", factors.values_checksum)

  def test_tasks_without_state_keep_the_parameter_checksum(self):
    _, task, params, _ = _lm()
    self.assertEqual(_ekfac.values_checksum(task, params),
                     influence.param_values_checksum(params))
    # RNG keys and counters alone are no state (they do not change an eval model).
    net = nnx_models.DropoutNet(nnx.Rngs(0))
    net.eval()
    state = nnx.state(net, nnx.Param)
    self.assertEqual(_ekfac.values_checksum(influence.ClassificationTask(net), state),
                     influence.param_values_checksum(state))

  def test_fit_and_scores_checksum_the_same_arrays(self):
    # Host params: the fit and the scores checksum the arrays as given, one
    # compiled checksum program (the fit's placed copy compiled a second one).
    model = nn.Dense(3)
    x = np.asarray(fixtures.normal(0, (6, 5)))
    batch = {"inputs": x, "labels": np.arange(6) % 3}
    params = jax.tree_util.tree_map(np.asarray, model.init(jax.random.key(0), x))
    task = influence.ClassificationTask(model.apply)
    checksums = _closures.checksums
    checksums.clear_cache()
    factors = influence.fit_ekfac(task, params, [batch])
    self.assertEqual(factors.values_checksum,
                     influence.param_values_checksum(params))
    influence.ekfac_scores(task, params, factors, batch, [batch])
    self.assertEqual(checksums._cache_size(), 1)  # pylint: disable=protected-access
    changed = jax.tree_util.tree_map(lambda a: a.copy(), params)
    changed["params"]["bias"][1] += 1e-7
    with self.assertRaisesRegex(ValueError, "1 of 2 arrays differ, first 'params/bias'"):
      influence.ekfac_scores(task, changed, factors, batch, [batch])


class _MLP(nn.Module):
  act: str = "relu"

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(getattr(nn, self.act)(nn.Dense(4)(x)))


@dataclasses.dataclass(frozen=True)
class _PairTask:
  """Classification on `(inputs, labels)` (tuple, list or a dict's "pair"), or on
  inputs alone (`one_array`: the label is 1 where the first input is positive)."""
  apply_fn: Any
  one_array: bool = False

  def _split(self, batch):
    if self.one_array:
      return batch, (batch[:, 0] > 0).astype(jnp.int32)
    if isinstance(batch, dict):
      batch = batch["pair"]
    return batch[0], batch[1]

  def loss(self, params, batch):
    inputs, labels = self._split(batch)
    logits = self.apply_fn(params, inputs)
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)[:, 0]

  def measurement(self, params, batch):
    return self.loss(params, batch)

  def sample_targets(self, params, batch, rng):
    raise NotImplementedError


class LossFingerprintTest(absltest.TestCase):

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_factors_of_another_apply_fn_are_refused(self):
    x = fixtures.normal(0, (8, 2))
    batch = {"inputs": x, "labels": np.arange(8, dtype=np.int32) % 3}
    relu, tanh = _MLP("relu"), _MLP("tanh")
    params = fixtures.host_init(relu, x[:1], seed=1)
    t_relu = influence.ClassificationTask(relu.apply)
    t_tanh = influence.ClassificationTask(tanh.apply)
    f_relu = influence.fit_ekfac(t_relu, params, [batch])
    message = (r"^factors: fitted for another loss function: the task's loss traces "
               r"to other operations at the fit's example shapes \(loss_fingerprint "
               r"[0-9a-f]{16} in the factors, [0-9a-f]{16} for the task; another "
               r"apply_fn, activation or mode\?\): refit them with this task, or "
               r"pass factors.for_other_loss\(\)")
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_scores(t_tanh, params, f_relu, batch, [batch], damping=1e-3)
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_self_influence(t_tanh, params, f_relu, [batch])
    # The same function in another task object (another module instance) and
    # other batch sizes are accepted, and score like the factors fitted with it.
    same = influence.ClassificationTask(_MLP("relu").apply)
    small = jax.tree_util.tree_map(lambda v: v[:3], batch)
    np.testing.assert_allclose(
        influence.ekfac_scores(same, params, f_relu, small, [batch, small],
                               damping=1e-3),
        influence.ekfac_scores(t_relu, params, f_relu, small, [batch, small],
                               damping=1e-3), rtol=1e-6)
    # Asked for, it is applied.
    influence.ekfac_scores(t_tanh, params, f_relu.for_other_loss(), batch, [batch],
                           damping=1e-3)
    # The fingerprint survives save and load; files without it load unchecked.
    path = os.path.join(self._tempdir(), "factors")
    influence.save_factors(path, f_relu)
    loaded = influence.load_factors(path)
    self.assertEqual((loaded.loss_fingerprint, loaded.loss_example),
                     (f_relu.loss_fingerprint, f_relu.loss_example))
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_scores(t_tanh, params, loaded, batch, [batch], damping=1e-3)
    metadata = os.path.join(path, "factors.json")
    with open(metadata) as f:
      content = json.load(f)
    for key in ("loss_fingerprint", "loss_example"):
      del content[key]
    with open(metadata, "w") as f:
      json.dump(content, f)
    old = influence.load_factors(path)
    self.assertIsNone(old.loss_fingerprint)
    influence.ekfac_scores(t_tanh, params, old, batch, [batch], damping=1e-3)
    content["loss_fingerprint"], content["loss_example"] = "x", [[["inputs"], "?", 1]]
    with open(metadata, "w") as f:
      json.dump(content, f)
    with self.assertRaisesRegex(ValueError, "corrupt factors.json.*'loss_fingerprint'"):
      influence.load_factors(path)

  def test_tuple_and_one_array_batches_are_fingerprinted_too(self):
    # Users' own tasks often take (inputs, labels) tuples, or one array: their
    # factors carry a fingerprint as dict batches' do, and keep it through a file.
    x = fixtures.normal(0, (8, 2))
    labels = np.arange(8, dtype=np.int32) % 3
    params = fixtures.host_init(_MLP("relu"), x[:1], seed=1)
    for batch, fields in (((x, labels), ((0,), (1,))), ([x, labels], ((0,), (1,))),
                          ({"pair": (x, labels)}, (("pair", 0), ("pair", 1))),
                          (x, ((),))):
      t_relu, t_tanh = (_PairTask(_MLP(act).apply, isinstance(batch, np.ndarray))
                        for act in ("relu", "tanh"))
      factors = influence.fit_ekfac(t_relu, params, [batch])
      self.assertEqual(tuple(keys for keys, _, _ in factors.loss_example), fields)
      self.assertEqual(factors.loss_example[0][1], (1, 2))
      path = os.path.join(self._tempdir(), "factors")
      influence.save_factors(path, factors)
      loaded = influence.load_factors(path)
      self.assertEqual(loaded.loss_example, factors.loss_example)
      for f in (factors, loaded):
        with self.assertRaisesRegex(ValueError, "^factors: fitted for another loss "
                                    "function: the task's loss traces to other"):
          influence.ekfac_scores(t_tanh, params, f, batch, [batch], damping=1e-3)
        np.testing.assert_allclose(
            influence.ekfac_scores(t_relu, params, f, batch, [batch], damping=1e-3),
            influence.ekfac_scores(t_relu, params, factors.for_other_loss(), batch,
                                   [batch], damping=1e-3), rtol=1e-6)
    # Containers the spec cannot rebuild (a namedtuple) stay unchecked, not wrong.
    pair = collections.namedtuple("Pair", "inputs labels")(x, labels)
    factors = influence.fit_ekfac(_PairTask(_MLP("relu").apply, False), params, [pair])
    self.assertIsNone(factors.loss_fingerprint)
    self.assertIsNone(factors.loss_example)

  def test_sequence_lengths_other_than_the_fits_are_accepted(self):
    # Fitted on sequences of 4 tokens; scored on 3 and 6.
    _, task, params, _ = _lm()
    factors = _factors(padded=False)
    _, _, _, longer = _lm(length=6)
    _, _, _, shorter = _lm(rows=5, length=3, seed=4)
    influence.ekfac_scores(task, params, factors, shorter, [shorter, longer])
    other = influence.LanguageModelingTask(_LM().apply)
    influence.ekfac_scores(other, params, factors, shorter, [shorter])


if __name__ == "__main__":
  absltest.main()
