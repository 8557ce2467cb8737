"""Bad inputs to the influence kernels: a ValueError naming the field, never a number.

Inputs only the computation shows to be bad (NaN params or examples) raise
FloatingPointError naming the first train example whose scores are NaN or inf.
"""

import dataclasses
import functools
import json
import os
import shutil
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import influence


class _MLP(nn.Module):
  hidden: int = 4

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(self.hidden)(x)))


@functools.lru_cache(maxsize=None)
def _setup(hidden=4):
  model = _MLP(hidden)
  inputs = jax.random.normal(jax.random.key(0), (6, 2))
  batch = {"inputs": inputs, "labels": jnp.arange(6) % 3}
  params = model.init(jax.random.key(1), inputs)
  task = influence.ClassificationTask(model.apply)
  return task, params, batch, influence.fit_ekfac(task, params, [batch])


def _bad_labels():
  _, _, batch, _ = _setup()
  return {**batch, "labels": jnp.arange(6)}  # 3, 4, 5 are not classes of 3 logits


def _scores(**kwargs):
  task, params, batch, factors = _setup()
  arguments = dict(task=task, params=params, factors=factors, query_batch=batch,
                   train_batches=[batch])
  arguments.update(kwargs)
  return influence.ekfac_scores(**arguments)


def _tracin(**kwargs):
  task, params, batch, _ = _setup()
  arguments = dict(task=task, checkpoints=[params], learning_rates=[0.1],
                   query_batch=batch, train_batches=[batch])
  arguments.update(kwargs)
  return influence.tracin_scores(**arguments)


def _empty():
  _, _, batch, _ = _setup()
  return jax.tree_util.tree_map(lambda x: x[:0], batch)


class ValidationTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("fit_labels", lambda: influence.fit_ekfac(
          _setup()[0], _setup()[1], [_setup()[2], _bad_labels()]),
       r"labels: values must be in \[0, 3\).*got values in \[0, 5\] in batches\[1\]"),
      ("scores_train_labels", lambda: _scores(train_batches=[_bad_labels()]),
       r"labels: values must be in \[0, 3\)"),
      ("scores_query_labels", lambda: _scores(query_batch=_bad_labels()),
       r"labels: .* in query_batch"),
      ("tracin_labels", lambda: _tracin(train_batches=_bad_labels()),
       r"labels: values must be in \[0, 3\)"),
      ("tracin_query_labels", lambda: _tracin(query_batch=_bad_labels()),
       r"labels: .* in query_batch"),
      ("float_labels", lambda: _tracin(
          train_batches={**_setup()[2], "labels": jnp.zeros(6)}),
       "labels: expected integer ids"),
      ("damping_zero", lambda: _scores(damping=0.0), "damping must be .*> 0.*got 0.0"),
      ("damping_negative", lambda: _scores(damping=-1e-3), "damping.*got -0.001"),
      ("damping_nan", lambda: _scores(damping=float("nan")), "damping.*got nan"),
      ("damping_inf", lambda: _scores(damping=float("inf")), "damping.*got inf"),
      ("damping_string", lambda: _scores(damping="small"), "damping.*got 'small'"),
      ("damping_precondition", lambda: influence.precondition(
          _setup()[3], {}, damping=-1.0), "damping"),
      ("damping_self", lambda: influence.ekfac_self_influence(
          _setup()[0], _setup()[1], _setup()[3], [_setup()[2]], damping=0),
       "damping"),
      ("chunk_zero", lambda: _scores(chunk_size=0), "chunk_size must be .*got 0"),
      ("chunk_float", lambda: _scores(chunk_size=2.5), "chunk_size.*got 2.5"),
      ("chunk_bool", lambda: _scores(chunk_size=True), "chunk_size.*got True"),
      ("chunk_tracin", lambda: _tracin(chunk_size=0), "chunk_size.*got 0"),
      ("chunk_fit", lambda: influence.fit_ekfac(_setup()[0], _setup()[1],
                                                [_setup()[2]], chunk_size=-1),
       "chunk_size.*got -1"),
      ("empty_query", lambda: _scores(query_batch=_empty()),
       r"query_batch: the batch is empty \(0 examples\)"),
      ("empty_query_tracin", lambda: _tracin(query_batch=_empty()),
       "query_batch: the batch is empty"),
      ("empty_train", lambda: _scores(train_batches=[_setup()[2], _empty()]),
       r"train_batches\[1\]: the batch is empty"),
      ("empty_train_list", lambda: _tracin(train_batches=[]), "train_batches is empty"),
      ("ragged_batch", lambda: _tracin(
          train_batches={**_setup()[2], "labels": jnp.zeros(5, jnp.int32)}),
       "same leading example axis"),
      ("query_rank", lambda: _scores(query_rank=0), "query_rank"),
      ("lr_nan", lambda: _tracin(learning_rates=[float("nan")]), "learning_rates"),
  )
  def test_raises_naming_the_field(self, call, pattern):
    with self.assertRaisesRegex(ValueError, pattern):
      call()

  def test_language_model_targets_and_mask(self):
    model = nn.Sequential([nn.Embed(5, 4), nn.Dense(5)])
    tokens = jnp.zeros((3, 4), jnp.int32)
    params = model.init(jax.random.key(0), tokens)
    task = influence.LanguageModelingTask(model.apply)
    batch = {"inputs": tokens, "targets": tokens.at[0, 0].set(5),
             "mask": jnp.ones((3, 4))}
    with self.assertRaisesRegex(ValueError, r"targets: values must be in \[0, 5\)"):
      influence.tracin_scores(task, [params], [1.0], batch, batch)
    batch = {"inputs": tokens, "targets": tokens, "mask": jnp.ones((3, 3))}
    with self.assertRaisesRegex(ValueError, r"mask: expected the shape of targets"):
      influence.fit_ekfac(task, params, [batch])

  def test_chunk_size_one_and_uneven_batches_are_fine(self):
    task, params, batch, factors = _setup()
    whole = _scores()
    np.testing.assert_allclose(_scores(chunk_size=1), whole, rtol=1e-5, atol=1e-6)
    split = [jax.tree_util.tree_map(lambda x: x[:4], batch),
             jax.tree_util.tree_map(lambda x: x[4:], batch)]
    np.testing.assert_allclose(influence.ekfac_scores(
        task, params, factors, batch, split, chunk_size=3), whole, rtol=1e-5,
                               atol=1e-6)


class FingerprintTest(absltest.TestCase):

  def _tempdir(self):
    path = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, path, ignore_errors=True)
    return path

  def test_factors_of_another_model_are_refused_naming_the_layer(self):
    _, _, batch, factors = _setup()
    task, params, _, _ = _setup(hidden=5)
    with self.assertRaisesRegex(
        ValueError, r"factors: fitted on a different model: layer 'Dense_1' \(Dense\): "
        r"kernel shape \(2, 4\) in the factors, \(2, 5\) in params"):
      influence.ekfac_scores(task, params, factors, batch, [batch])
    with self.assertRaisesRegex(ValueError, "factors: fitted on a different model"):
      influence.ekfac_self_influence(task, params, factors, [batch])
    with self.assertRaisesRegex(ValueError, "factors: fitted on a different model"):
      influence.ekfac_layer_scores(task, params, factors, batch, [batch])

  def test_other_leaves_differing_are_caught_by_the_fingerprint(self):
    task, params, batch, factors = _setup()
    extra = {"params": {**params["params"], "unused": jnp.zeros(2)}}
    with self.assertRaisesRegex(ValueError, "layers match but other parameters differ"):
      influence.ekfac_scores(task, extra, factors, batch, [batch])
    # A different dtype of a layer's kernel names that layer.
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    with self.assertRaisesRegex(ValueError, "layer 'Dense_1' .*dtype float32 in the "
                                "factors, bfloat16 in params"):
      influence.ekfac_scores(task, half, factors, batch, [batch])

  def test_fingerprint_survives_save_and_load(self):
    task, params, batch, factors = _setup()
    self.assertEqual(factors.fingerprint, influence.param_fingerprint(params))
    path = os.path.join(self._tempdir(), "factors")
    influence.save_factors(path, factors)
    loaded = influence.load_factors(path)
    self.assertEqual(loaded.fingerprint, factors.fingerprint)
    self.assertEqual(loaded.layers, factors.layers)
    other_task, other_params, _, _ = _setup(hidden=5)
    with self.assertRaisesRegex(ValueError, "layer 'Dense_1'"):
      influence.ekfac_scores(other_task, other_params, loaded, batch, [batch])
    # A tampered fingerprint is caught as a different model.
    with open(os.path.join(path, "factors.json")) as f:
      content = json.load(f)
    content["fingerprint"] = "0" * 16
    with open(os.path.join(path, "factors.json"), "w") as f:
      json.dump(content, f)
    with self.assertRaisesRegex(ValueError, "fingerprint 0000000000000000 in the factors"):
      influence.ekfac_scores(task, params, influence.load_factors(path), batch, [batch])

  def test_factors_of_other_parameter_values_are_refused_unless_asked(self):
    task, params, batch, factors = _setup()
    # The smallest change there is: one float32 ulp of one element.
    kernel = params["params"]["Dense_0"]["kernel"]
    nudged = jax.tree_util.tree_map(lambda x: x, params)
    nudged["params"]["Dense_0"]["kernel"] = kernel.at[1, 2].set(
        jnp.nextafter(kernel[1, 2], jnp.inf))
    message = (r"^factors: fitted on other values of this model's parameters "
               r"\(1 of \d+ arrays differ, first 'params/Dense_0/kernel': "
               r"checksum ([0-9a-f]{16}) in the factors, (?!\1)[0-9a-f]{16} for "
               r"params\): "
               r"refit them on these params, or pass factors.for_other_params\(\)")
    for call in (lambda f, p: influence.ekfac_scores(task, p, f, batch, [batch]),
                 lambda f, p: influence.ekfac_layer_scores(task, p, f, batch, [batch]),
                 lambda f, p: influence.ekfac_self_influence(task, p, f, [batch])):
      with self.assertRaisesRegex(ValueError, message):
        call(factors, nudged)
      # Asked for: scored at the new values; at the fitted values the check changes
      # no number.
      self.assertTrue(np.isfinite(np.asarray(call(factors.for_other_params(),
                                                  nudged))).all())
      np.testing.assert_array_equal(np.asarray(call(factors.for_other_params(), params)),
                                    np.asarray(call(factors, params)))
    # The checksum survives save and load; factors saved without one load unchecked.
    path = os.path.join(self._tempdir(), "factors")
    influence.save_factors(path, factors)
    loaded = influence.load_factors(path)
    self.assertEqual(loaded.values_checksum, factors.values_checksum)
    with self.assertRaisesRegex(ValueError, message):
      influence.ekfac_scores(task, nudged, loaded, batch, [batch])
    with open(os.path.join(path, "factors.json")) as f:
      content = json.load(f)
    del content["values_checksum"]
    with open(os.path.join(path, "factors.json"), "w") as f:
      json.dump(content, f)
    old = influence.load_factors(path)
    self.assertIsNone(old.values_checksum)
    influence.ekfac_scores(task, nudged, old, batch, [batch])


def test_param_values_checksum_equals_a_numpy_reference():
  rng = np.random.default_rng(0)
  params = {"b": {"w": rng.normal(size=(3, 5)).astype(np.float32)},
            "a": rng.normal(size=7).astype(jnp.bfloat16),
            "c": rng.integers(-9, 9, 4).astype(np.int32)}

  def reference(x):
    unsigned = {1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize]
    bits = x.view(unsigned).astype(np.uint64).ravel()
    k = np.arange(bits.size, dtype=np.uint64)
    mod = np.uint64(2**32)
    w1 = ((k * np.uint64(2654435761) + np.uint64(1)) % mod) | np.uint64(1)
    w2 = (((k ^ np.uint64(0x9E3779B9)) * np.uint64(40503)) % mod) | np.uint64(1)
    return [int(np.sum(bits * w % mod) % mod) for w in (w1, w2)]

  expected = "".join(f"{v:08x}" for name in ("a", "b", "c")  # sorted paths
                     for v in reference(params[name]["w"] if name == "b"
                                        else params[name]))
  assert influence.param_values_checksum(
      jax.tree_util.tree_map(jnp.asarray, params)) == expected
  # Any one element changed, by one bit, changes it.
  flipped = dict(params, c=params["c"] ^ np.int32(1 << 30))
  assert influence.param_values_checksum(flipped) != expected


# --- Refused because the answer would be NaN (pytest style) ---


class _MaybeDeadMLP(nn.Module):
  dead: bool = False

  @nn.compact
  def __call__(self, x):
    hidden = nn.tanh(nn.Dense(4)(x))
    out = nn.Dense(3)(hidden)
    if self.dead:  # a third layer whose output never reaches the loss
      out = out + 0.0 * nn.Dense(3)(hidden)
    return out


def _plain_setup(dead=False, num=6):
  model = _MaybeDeadMLP(dead)
  inputs = np.asarray(jax.random.normal(jax.random.key(0), (num, 2)))
  batch = {"inputs": inputs, "labels": np.arange(num, dtype=np.int32) % 3}
  params = model.init(jax.random.key(1), inputs)
  return influence.ClassificationTask(model.apply), params, batch


def test_zero_curvature_layer_refuses_the_default_damping_and_scores_with_one_given():
  task, params, batch = _plain_setup(dead=True)
  factors = influence.fit_ekfac(task, params, [batch])
  with pytest.raises(ValueError, match=r"damping: the default .* is 0.0 for layer "
                                       r"'Dense_2'"):
    influence.ekfac_scores(task, params, factors, batch, [batch])
  with pytest.raises(ValueError, match="layer 'Dense_2'"):
    influence.ekfac_self_influence(task, params, factors, [batch])
  # Given a damping, the dead layer contributes exactly 0 and the total is the sum
  # of the live layers' scores.
  layers = np.asarray(influence.ekfac_layer_scores(task, params, factors, batch,
                                                   [batch], damping=1e-3))
  names = [spec.name for spec in factors.layers]
  total = influence.ekfac_scores(task, params, factors, batch, [batch], damping=1e-3)
  np.testing.assert_array_equal(layers[names.index("Dense_2")], 0.0)
  np.testing.assert_allclose(np.asarray(total),
                             layers[names.index("Dense_0")]
                             + layers[names.index("Dense_1")], rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(total)))


def test_default_damping_is_a_tenth_of_each_layers_mean_eigenvalue():
  task, params, batch = _plain_setup()
  factors = influence.fit_ekfac(task, params, [batch])
  damping = influence.layer_damping(factors)
  for name, f in factors.factors.items():
    assert damping[name] == pytest.approx(0.1 * float(np.mean(f.eigenvalues)),
                                          rel=1e-6)
  assert influence.layer_damping(factors, 0.5) == {name: 0.5 for name in damping}


def test_nan_in_params_or_an_input_is_refused_naming_the_layer_or_example():
  task, params, batch = _plain_setup()
  bad_params = jax.tree_util.tree_map(lambda x: x.at[0].set(jnp.nan), params)
  with pytest.raises(ValueError, match=r"fit_ekfac: layer 'Dense_\d' has NaN or inf"):
    influence.fit_ekfac(task, bad_params, [batch])
  factors = influence.fit_ekfac(task, params, [batch])
  nan_batch = {**batch, "inputs": batch["inputs"].copy()}
  nan_batch["inputs"][3, 1] = np.nan
  # Chunks of 2: example 3 is in the chunk [2, 4), one query row each.
  with pytest.raises(FloatingPointError, match=r"ekfac_scores \(total\): 6 of 12 "
                     r"scores of train examples \[2, 4\) .* train example 3"):
    influence.ekfac_scores(task, params, factors, batch, [nan_batch], chunk_size=2)
  with pytest.raises(FloatingPointError, match=r"tracin_scores: .* train example 3"):
    influence.tracin_scores(task, [params], [0.1], batch, [nan_batch], chunk_size=2)
  with pytest.raises(FloatingPointError, match=r"tracin_self_influence: 1 of 2 .*"
                                               r"train example 3"):
    influence.tracin_self_influence(task, [params], [0.1], [nan_batch], chunk_size=2)
  with pytest.raises(FloatingPointError, match=r"ekfac_self_influence: .* train "
                                               r"example 3"):
    influence.ekfac_self_influence(task, params, factors, [nan_batch], chunk_size=2)


def test_non_finite_factors_are_refused_with_either_damping():
  """Default damping: its mean eigenvalue is the check (naming the layer). A given
  damping reads no factor before scoring: the NaN scores are refused instead."""
  task, params, batch = _plain_setup()
  factors = influence.fit_ekfac(task, params, [batch])
  layer = factors.factors["Dense_1"]
  bad = dataclasses.replace(factors, factors={
      **factors.factors,
      "Dense_1": layer._replace(eigenvalues=layer.eigenvalues.at[0, 0].set(jnp.nan))})
  with pytest.raises(ValueError, match="factors: layer 'Dense_1' has NaN or inf"):
    influence.ekfac_scores(task, params, bad, batch, [batch])
  with pytest.raises(ValueError, match="factors: layer 'Dense_1' has NaN or inf"):
    influence.layer_damping(bad)
  with pytest.raises(FloatingPointError, match=r"ekfac_scores \(total\): .* NaN or "
                                               r"inf"):
    influence.ekfac_scores(task, params, bad, batch, [batch], damping=0.1)


def test_language_model_masks_and_ids_are_checked():
  class LM(nn.Module):
    @nn.compact
    def __call__(self, x):
      return nn.Dense(5)(nn.tanh(nn.Embed(5, 4)(x)))

  tokens = np.asarray(jax.random.randint(jax.random.key(2), (3, 5), 0, 5), np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((3, 4), np.float32)}
  model = LM()
  params = model.init(jax.random.key(0), batch["inputs"])
  task = influence.LanguageModelingTask(model.apply)
  with pytest.raises(ValueError, match=r"batches: layer 'Dense_0' saw no token"):
    influence.fit_ekfac(task, params, [{**batch, "mask": np.zeros((3, 4))}])
  with pytest.raises(ValueError, match=r"mask: values must be ≥ 0 .* train_batches"):
    influence.tracin_scores(task, [params], [1.0], batch,
                            [{**batch, "mask": -np.ones((3, 4))}])
  with pytest.raises(ValueError, match=r"mask: values must be finite .* query_batch"):
    influence.tracin_scores(task, [params], [1.0],
                            {**batch, "mask": np.full((3, 4), np.nan)}, [batch])
  negative = batch["inputs"].copy()
  negative[1, 2] = -1
  with pytest.raises(ValueError, match=r"inputs: token ids must be ≥ 0 in "
                                       r"train_batches, got -1"):
    influence.tracin_scores(task, [params], [1.0], batch,
                            [{**batch, "inputs": negative}])
  # Padding under mask 0 may hold any id the gather reads (here -1 and -5 of V = 5):
  # the scores equal those of padding with 0; an id outside [-5, 5) reads NaN even
  # there, and is refused.
  mask = np.ones((3, 4), np.float32)
  mask[:, 3] = 0.0
  zero_padded = {**batch, "targets": np.where(mask > 0, batch["targets"], 0),
                 "mask": mask}
  for pad in (-1, -5):
    padded = {**zero_padded, "targets": np.where(mask > 0, batch["targets"], pad)}
    np.testing.assert_array_equal(
        np.asarray(influence.tracin_scores(task, [params], [1.0], batch, [padded])),
        np.asarray(influence.tracin_scores(task, [params], [1.0], batch,
                                           [zero_padded])))
  with pytest.raises(ValueError, match=r"targets: values must be in \[-5, 5\) even "
                                       r"where the mask is 0"):
    influence.tracin_scores(task, [params], [1.0], batch, [
        {**zero_padded, "targets": np.where(mask > 0, batch["targets"], -100)}])
  with pytest.raises(ValueError, match=r"targets: values must be in \[0, 5\) \(the "
                                       r"logits' last dimension\) where the mask is > 0"):
    influence.tracin_scores(task, [params], [1.0], batch, [
        {**zero_padded, "targets": np.where(mask > 0, -1, 0)}])
  # A fractional mask is a token weight: the score is that weight's share of the
  # unit mask's (the train loss is linear in each token's weight).
  half = {**batch, "mask": np.full((3, 4), 0.5, np.float32)}
  np.testing.assert_allclose(
      np.asarray(influence.tracin_scores(task, [params], [1.0], batch, [half])),
      0.5 * np.asarray(influence.tracin_scores(task, [params], [1.0], batch,
                                               [batch])), rtol=1e-5, atol=1e-6)


def test_layers_found_on_another_model_are_refused_by_fit_ekfac():
  task, params, batch = _plain_setup()
  wider = _MaybeDeadMLP().init(jax.random.key(1), np.zeros((1, 3), np.float32))
  layers = influence.find_layers(task.loss, wider, {
      "inputs": np.zeros((2, 3), np.float32), "labels": np.zeros(2, np.int32)})
  with pytest.raises(ValueError, match=r"layers: found on a different model: layer "
                     r"'Dense_0' \(Dense\): kernel shape \(3, 4\) in the layers, "
                     r"\(2, 4\) in params"):
    influence.fit_ekfac(task, params, [batch], layers=layers)
  # This model's own layers, given, fit the same factors as found ones.
  own = influence.find_layers(task.loss, params, batch)
  np.testing.assert_array_equal(
      np.asarray(influence.fit_ekfac(task, params, [batch], layers=own)
                 .factors["Dense_1"].eigenvalues),
      np.asarray(influence.fit_ekfac(task, params, [batch])
                 .factors["Dense_1"].eigenvalues))


def test_tracin_checkpoints_and_learning_rates_must_match():
  task, params, batch = _plain_setup()
  other = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
  with pytest.raises(ValueError, match=r"checkpoints\[1\]: its tree, shapes or "
                                       r"dtypes differ"):
    influence.tracin_scores(task, [params, other], [0.1, 0.1], batch, [batch])
  wider = _MaybeDeadMLP().init(jax.random.key(1), np.zeros((1, 3), np.float32))
  with pytest.raises(ValueError, match=r"checkpoints\[2\]"):
    influence.tracin_self_influence(task, [params, params, wider], [0.1] * 3,
                                    [batch])
  with pytest.raises(ValueError, match=r"learning_rates must be float\[K\]"):
    influence.tracin_scores(task, [params] * 4, [[0.1, 0.1], [0.1, 0.1]], batch,
                            [batch])
  with pytest.raises(ValueError, match=r"learning_rates must be finite and ≥ 0"):
    influence.tracin_scores(task, [params], [-0.1], batch, [batch])
  # Checkpoints of one model with rates (0.3, 0): the sum is the first one's alone,
  # and a zero rate (the end of a decay to 0) is accepted.
  np.testing.assert_allclose(
      np.asarray(influence.tracin_scores(task, [params, params], [0.3, 0.0], batch,
                                         [batch])),
      np.asarray(influence.tracin_scores(task, [params], [0.3], batch, [batch])),
      rtol=1e-6)


if __name__ == "__main__":
  absltest.main()
