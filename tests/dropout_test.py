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


def test_dropout_in_the_config_trains_with_dropout(tmp_path):
  _, wd, dataset, model = _model(tmp_path, 0.3)
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
  # A loss that takes a key is what `train_runs` trains with dropout: it passes each
  # slot its own key (training_test checks those keys and the runs they give).
  assert training.step.takes_rng(model.loss_fn) and not training.step.takes_rng(
      plain.loss_fn)
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


def test_dropout_is_refused_with_the_metagradient_and_the_removal_benchmark():
  """Each run's dropout keys follow its index, so a copy of the reference run
  differs from it, and the first-order expansion gives a curriculum's own slots
  other keys than the reference's: refused, not computed from key noise."""
  config = config_lib.load_config(TINY)
  with config.unlocked():
    config.model.dropout = 0.1
  with pytest.raises(ValueError, match=(
      r"^config.model.dropout=0.1: the metagradient method and the removal "
      r"benchmark need runs that differ only in their weights")):
    pipeline.validate.validate_config(config)
  config.methods = tuple(m for m in config.methods
                         if m not in ("metagradient", "simfluence_hybrid"))
  config.counterfactual.methods = tuple(m for m in config.counterfactual.methods
                                        if m != "metagradient")
  with pytest.raises(ValueError, match=r"^config.model.dropout=0.1: "):
    pipeline.validate.validate_config(config)
  config.removal.enabled = False
  pipeline.validate.validate_config(config)  # the rest runs with dropout
