"""The resume fingerprint of `train_runs`: a workdir is only resumed by the same job.

Every setting that shapes a run (optimizer and hyperparameters, base params, data,
curricula, weights, recording, seed) and the checkpoint spacing are compared; a mismatch raises one ValueError
line naming each changed field with old → new values, and the workdir's checkpoints
are left untouched.
"""

import json
import logging
import os

import jax
import ml_collections
import numpy as np
import pytest

from simfluence_jax import models
from simfluence_jax import training

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 10, 3, 4, 3


@pytest.fixture(scope="module", autouse=True)
def _quiet_orbax():
  logging.getLogger("absl").setLevel(logging.WARNING)


def _job():
  rng = np.random.default_rng(0)
  make = lambda n: {"inputs": rng.normal(size=(n, DIM)).astype(np.float32),
                    "labels": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
  train, test = make(NUM_TRAIN), make(NUM_TEST)
  model = models.MLPClassifier(hidden_sizes=(4,), num_classes=NUM_CLASSES)
  params0 = models.init_variables(model, train["inputs"])
  batch_ids = rng.integers(0, NUM_TRAIN, (2, 4, 3)).astype(np.int32)
  config = ml_collections.ConfigDict(dict(optimizer="momentum", learning_rate=0.1,
                                          momentum=0.9, lr_schedule="constant"))
  return dict(params0=params0, batch_ids=batch_ids,
              loss_fn=training.make_loss_fn(model, "classification"), config=config,
              train_arrays=train, test_arrays=test, checkpoint_every=2,
              progress=False)


def _train(**job):
  return training.train_runs(job.pop("params0"), job.pop("batch_ids"), **job)


def _listing(workdir):
  return sorted(os.path.relpath(os.path.join(root, name), workdir)
                for root, dirs, files in os.walk(workdir) for name in dirs + files)


@pytest.fixture(scope="module")
def partial_workdir(tmp_path_factory):
  """A workdir holding the first 2 of 4 steps of the job."""
  workdir = str(tmp_path_factory.mktemp("resume") / "job")
  _train(**_job(), workdir=workdir, max_steps=2)
  return workdir


def _changed(name):
  job = _job()
  if name == "learning_rate":
    job["config"] = ml_collections.ConfigDict(dict(job["config"], learning_rate=0.003))
  elif name == "optimizer":
    job["config"] = ml_collections.ConfigDict(dict(optimizer="adam",
                                                   learning_rate=0.1))
  elif name == "momentum":
    job["config"] = ml_collections.ConfigDict(dict(job["config"], momentum=0.5))
  elif name == "lr_schedule":
    job["config"] = ml_collections.ConfigDict(dict(job["config"],
                                                   lr_schedule="linear"))
  elif name == "params0":
    job["params0"] = jax.tree_util.tree_map(lambda x: np.array(x), job["params0"])
    job["params0"]["params"]["logits"]["bias"][0] += 1e-3
  elif name == "train_arrays":
    job["train_arrays"]["inputs"][3, 1] += 1e-3
  elif name == "test_arrays":
    job["test_arrays"]["labels"][0] = (job["test_arrays"]["labels"][0] + 1) % 3
  elif name == "weights":
    job["weights"] = np.ones(job["batch_ids"].shape, np.float32)
    job["weights"][1, 0, 2] = 0.0
  elif name == "batch_ids":
    job["batch_ids"] = job["batch_ids"][:, ::-1].copy()
  elif name == "record_grads":
    job["record_grads"] = True
  elif name == "seed":
    job["seed"] = 1
  elif name == "checkpoint_every":
    job["checkpoint_every"] = 4
  elif name == "no_checkpoint_every":  # None: checkpoints at T only
    job["checkpoint_every"] = None
  return job


# (changed setting, text the message must contain)
CASES = [
    ("learning_rate", "learning_rate: 0.1 → 0.003"),
    ("optimizer", "optimizer: 'momentum' → 'adam'"),
    ("momentum", "momentum: 0.9 → 0.5"),
    ("lr_schedule", "lr_schedule: 'constant' → 'linear'"),
    ("params0", "params0: '"),
    ("train_arrays", "train_arrays: '"),
    ("test_arrays", "test_arrays: '"),
    ("weights", "weights: '"),
    ("batch_ids", "batch_ids: '"),
    ("record_grads", "record_grads: False → True"),
    ("seed", "seed: 0 → 1"),
    ("checkpoint_every", "checkpoint_every: 2 → 4"),
    ("no_checkpoint_every", "checkpoint_every: 2 → 4"),
]


@pytest.mark.parametrize("name,text", CASES, ids=[name for name, _ in CASES])
def test_a_changed_setting_is_refused_naming_it(partial_workdir, name, text):
  before = _listing(partial_workdir)
  with pytest.raises(ValueError) as error:
    _train(**_changed(name), workdir=partial_workdir)
  message = str(error.value)
  assert "\n" not in message
  assert "holds checkpoints of a different job" in message
  assert text in message, message
  if name == "optimizer":  # every differing field is named
    assert "b1: '<absent>' → 0.9" in message and "momentum: 0.9 → '<absent>'" in message
  elif name == "lr_schedule":
    assert "end_learning_rate: '<absent>' → 0.0" in message
  else:
    assert message.count("→") == 1, message
  assert _listing(partial_workdir) == before  # the other job's files are kept


def test_the_same_job_resumes_to_the_uninterrupted_numbers(partial_workdir):
  one_go = _train(**_job())
  resumed = _train(**_job(), workdir=partial_workdir)
  np.testing.assert_array_equal(resumed.trace.losses, one_go.trace.losses)
  # What the main job scales a resumed stage's time by (steps trained = 4 − 2).
  assert (one_go.resumed_step, resumed.resumed_step) == (0, 2)


def test_a_diverged_run_is_kept_but_not_resumed_with_another_learning_rate(tmp_path):
  workdir = str(tmp_path / "job")
  diverging = _job()
  # Overflows in the first step: no resumable checkpoint, only the TracIn params of
  # step 0, which the job file (not a checkpoint's meta) protects.
  diverging["config"] = ml_collections.ConfigDict(dict(diverging["config"],
                                                       learning_rate=1e30))
  with pytest.raises(FloatingPointError, match="non-finite"):
    _train(**diverging, workdir=workdir)
  before = _listing(workdir)
  assert "tracin_ckpt/0" in before
  assert not any(name.startswith("runs_ckpt/") for name in before)
  with pytest.raises(ValueError, match="learning_rate: 1e[+]30 → 0.1"):
    _train(**_job(), workdir=workdir)
  assert _listing(workdir) == before


def test_a_job_file_written_before_checkpoint_every_was_recorded_resumes(tmp_path):
  workdir = str(tmp_path / "job")
  _train(**_job(), workdir=workdir, max_steps=2)
  job_path = os.path.join(workdir, training.runs.JOB_FILE)
  with open(job_path) as f:
    stored = json.load(f)
  assert stored["checkpoint_every"] == 2
  del stored["checkpoint_every"]
  with open(job_path, "w") as f:
    json.dump(stored, f)
  resumed = _train(**_job(), workdir=workdir)
  assert resumed.resumed_step == 2 and resumed.checkpoint_steps == [0, 2, 4]
  np.testing.assert_array_equal(resumed.trace.losses, _train(**_job()).trace.losses)
