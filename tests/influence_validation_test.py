"""Bad inputs to the influence kernels: a ValueError naming the field, never a number."""

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


if __name__ == "__main__":
  absltest.main()
