"""`config.model.dropout` > 0 trains the main job's runs with dropout (it was ignored).

The base model's loss takes the per-slot key `train_runs` passes and applies dropout
with it; without a key it is the deterministic loss. Workdirs recorded when the
setting was ignored are refused, not reused (`base_model`'s fingerprint changes).
"""

import json
import os

import jax
import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import pipeline
from simfluence_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(REPO, "configs", "default.py:tiny")


def _model(tmp_path, dropout):
  config = config_lib.load_config(TINY)
  with config.unlocked():
    config.model.dropout = dropout
  wd = pipeline.Workdir(str(tmp_path / f"job_{dropout}"), config)
  dataset = pipeline.stages.load_data(wd, config)
  return config, wd, dataset, pipeline.stages.base_model(wd, config, dataset)


def _train(config, dataset, model):
  curricula = pipeline.stages.make_curricula(config)
  return np.asarray(training.train_runs(
      model.params, curricula.fit[:2], loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test, progress=False,
      seed=config.seed).trace.losses)


def test_dropout_in_the_config_trains_with_dropout(tmp_path):
  config, wd, dataset, model = _model(tmp_path, 0.3)
  _, _, _, plain = _model(tmp_path, 0.0)
  batch = {k: v[:4] for k, v in dataset.train.items()}
  # Same base params (dropout has none); without a key the loss is deterministic.
  for a, b in zip(jax.tree_util.tree_leaves(model.params),
                  jax.tree_util.tree_leaves(plain.params)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(model.loss_fn(model.params, batch),
                                plain.loss_fn(plain.params, batch))
  with_key = model.loss_fn(model.params, batch, rng=jax.random.PRNGKey(1))
  assert np.max(np.abs(with_key - plain.loss_fn(plain.params, batch))) > 1e-3
  # The runs: other losses than without dropout from step 1 on, the same at step 0
  # (the base model's test losses, deterministic), reproducible.
  dropped, deterministic = _train(config, dataset, model), _train(config, dataset, plain)
  np.testing.assert_array_equal(dropped[:, 0], deterministic[:, 0])
  assert np.max(np.abs(dropped[:, 1:] - deterministic[:, 1:])) > 1e-4
  np.testing.assert_array_equal(dropped, _train(config, dataset, model))
  # Recorded, so a workdir whose runs ignored the setting is not reused.
  with open(wd.path("stages", "base_model.json")) as f:
    assert json.load(f)["extra"] == {"model.dropout": "applied in training"}


def test_a_workdir_that_ignored_dropout_is_refused(tmp_path):
  config, _, _, _ = _model(tmp_path, 0.3)
  record = tmp_path / "job_0.3" / "stages" / "base_model.json"
  old = json.loads(record.read_text())
  old["extra"] = {}  # what the job recorded while it ignored the setting
  old["fingerprint"] = pipeline.fingerprint.Inputs(
      fields=old["fields"], upstream=old["upstream"], version=old["version"],
      extra={}).fingerprint
  record.write_text(json.dumps(old))
  wd = pipeline.Workdir(str(tmp_path / "job_0.3"), config)
  with pytest.raises(pipeline.StaleWorkdirError, match="base_model"):
    pipeline.stages.base_model(wd, config, pipeline.stages.load_data(wd, config))
