"""Plausible misuses of the public API are one line naming the argument (review h38:
each was a TypeError, AttributeError or Flax error from deep inside)."""

import re

import flax.linen as nn
import jax
import numpy as np
import pytest

from simfluence_jax import influence
from simfluence_jax import losses
from simfluence_jax import training
import _influence_fixtures as fixtures

MODEL = nn.Dense(3)
X = fixtures.normal(0, (6, 5))
BATCH = {"inputs": X, "labels": (np.arange(6) % 3).astype(np.int32)}
PARAMS = fixtures.host_init(MODEL, X[:1])
TASK = influence.ClassificationTask(MODEL.apply)


@pytest.mark.parametrize("call, message", [
    (lambda: influence.fit_ekfac(PARAMS, TASK, [BATCH]),
     "task: expected a Task (e.g. ClassificationTask(model.apply)) as the first "
     "argument, got dict."),
    (lambda: influence.tracin_scores(TASK, [0.1], [PARAMS], BATCH, [BATCH]),
     "learning_rates must be float[K] (one step size per checkpoint), got list."),
    (lambda: influence.tracin_scores(TASK, [PARAMS], None, BATCH, [BATCH]),
     "learning_rates must be float[K] (one step size per checkpoint), got NoneType."),
    (lambda: influence.tracin_scores(TASK, [PARAMS], [0.1], BATCH, [BATCH],
                                     projection_dim=4, rng=0),
     "rng: expected a JAX random key (jax.random.key(0)) to seed the projection, "
     "got int."),
    (lambda: influence.fit_ekfac(TASK, PARAMS, [BATCH], fisher="true", rng=0),
     "rng: expected a JAX random key (jax.random.key(0)) to sample the targets, got "
     "int."),
    (lambda: influence.fit_ekfac(TASK, PARAMS, [BATCH], layers="all"),
     "layers: expected LayerSpecs from find_layers (e.g. find_layers(task.loss, "
     "params, batch, kinds='all')), got 'all'."),
    (lambda: influence.ClassificationTask(MODEL),
     "apply_fn: a linen Dense module; pass its apply (model.apply; an NNX module is "
     "taken whole)."),
    (lambda: influence.ClassificationTask(None),
     "apply_fn: expected a function (model.apply) or an NNX module, got NoneType."),
])
def test_influence_misuse_is_one_line(call, message):
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    call()


@pytest.mark.parametrize("kwargs, message", [
    ({"checkpoint_every": 2.5},
     "train_runs: checkpoint_every must be a positive integer, got 2.5."),
    ({"steps_per_segment": 0.5},
     "train_runs: steps_per_segment must be a positive integer, got 0.5."),
])
def test_training_misuse_is_one_line(kwargs, message):
  loss_fn = lambda p, b: losses.classification_loss(MODEL.apply(p, b["inputs"]),
                                                    b["labels"])
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    training.train_runs(PARAMS, np.zeros((1, 2, 2), np.int32), loss_fn=loss_fn,
                        config={"optimizer": "sgd", "learning_rate": 0.1},
                        train_arrays=BATCH, test_arrays=BATCH, progress=False,
                        **kwargs)


def test_keys_are_accepted_typed_and_raw():
  for rng in (jax.random.key(0), jax.random.PRNGKey(0)):
    scores = influence.tracin_scores(TASK, [PARAMS], [0.1], BATCH, [BATCH],
                                     projection_dim=4, rng=rng)
    assert np.all(np.isfinite(scores))
