"""What `train_runs` and `pretrain_base` refuse beyond their input arrays' shapes.

* `train_runs(max_steps=k)` on a workdir already holding a later step: refused
  (resuming returned every stored step, not k).
* `pretrain_base` checks its arrays as `train_runs` does (a label -1 pre-trained as
  class C-1, bit for bit), and a batch size < 1.
"""

import jax
import ml_collections
import numpy as np
import pytest

from simfluence_jax import losses
from simfluence_jax import models
from simfluence_jax import training

N, M, D, C = 10, 3, 4, 3


def _setup():
  rng = np.random.default_rng(0)
  make = lambda n: {"inputs": rng.normal(size=(n, D)).astype(np.float32),
                    "labels": rng.integers(0, C, n).astype(np.int32)}
  train, test = make(N), make(M)
  model = models.MLPClassifier(hidden_sizes=(4,), num_classes=C)
  params0 = models.init_variables(model, train["inputs"])
  ids = rng.integers(0, N, (2, 4, 3)).astype(np.int32)
  return training.make_loss_fn(model, "classification"), params0, train, test, ids


def test_max_steps_below_the_workdirs_step_is_refused(tmp_path):
  loss_fn, params0, train, test, ids = _setup()
  kwargs = dict(loss_fn=loss_fn, train_arrays=train, test_arrays=test,
                config=ml_collections.ConfigDict(dict(optimizer="sgd",
                                                      learning_rate=0.1)),
                progress=False, workdir=str(tmp_path / "job"))
  full = training.train_runs(params0, ids, **kwargs)
  with pytest.raises(ValueError, match=(
      r"^train_runs: max_steps=2, but .* already holds step 4 of these runs; use "
      r"another workdir, or max_steps >= 4\.$")):
    training.train_runs(params0, ids, max_steps=2, **kwargs)
  # At or past the stored step it resumes to the same result.
  again = training.train_runs(params0, ids, max_steps=4, **kwargs)
  np.testing.assert_array_equal(again.trace.losses, full.trace.losses)


def test_pretrain_base_checks_its_arrays_like_train_runs():
  loss_fn, params0, train, _, _ = _setup()
  bad = {**train, "labels": np.full(N, -1, np.int32)}
  with pytest.raises(ValueError, match=(
      r'^pretrain_base: train_arrays\["labels"\] must be in \[0, 3\)')):
    training.pretrain_base(params0, loss_fn, bad, num_steps=2, batch_size=4)
  short = {**train, "labels": train["labels"][:-1]}
  with pytest.raises(ValueError, match=r"^pretrain_base: "):
    training.pretrain_base(params0, loss_fn, short, num_steps=2, batch_size=4)
  with pytest.raises(ValueError, match=(
      r"^pretrain_base: batch_size must be a positive integer, got 0\.$")):
    training.pretrain_base(params0, loss_fn, train, num_steps=2, batch_size=0)
  # Valid arrays pre-train as before: finite, and params move.
  params = training.pretrain_base(params0, loss_fn, train, num_steps=2, batch_size=4)
  diffs = [float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in zip(
      jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params0))]
  assert max(diffs) > 0 and all(np.isfinite(diffs))


def test_first_order_losses_of_the_reference_itself_with_dropout_are_the_reference():
  """A stochastic loss: the curriculum's slots take the keys `train_runs` gives it as
  run 0, so predicting the reference curriculum gives the reference run (its own
  slots used to take other keys and predicted changes up to 0.59), and a one-slot
  removal agrees with the metagradient to first order."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class DropMLP(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
      h = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
      return nn.Dense(C)(h)

  _, _, train, test, ids = _setup()
  model = DropMLP()
  params0 = models.init_variables(model, train["inputs"])
  loss_fn = training.make_loss_fn(model, "classification", train_kwargs={"train": True})
  config = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=0.2))
  kwargs = dict(loss_fn=loss_fn, config=config, train_arrays=train, test_arrays=test,
                seed=3)
  reference = ids[0]
  same = training.first_order_losses(params0, reference, reference[None], **kwargs)
  np.testing.assert_allclose(same.losses[0], same.reference_losses, atol=1e-5)
  trained = training.train_runs(params0, reference[None], progress=False, **kwargs)
  np.testing.assert_allclose(same.reference_losses, trained.trace.losses[0],
                             rtol=1e-5, atol=1e-6)
  removal = np.ones((1,) + reference.shape, np.float32)
  removal[0, 1, 0] = 0.0
  predicted = training.first_order_losses(params0, reference, reference[None],
                                          curricula_weights=removal, **kwargs)
  grads = training.metagradients(params0, reference[None], **kwargs)
  np.testing.assert_allclose(predicted.losses[0, -1] - same.reference_losses[-1],
                             -grads[0, 1, 0], rtol=1e-3, atol=1e-5)


def test_a_custom_loss_of_other_constants_does_not_resume_the_workdir(tmp_path):
  """Two closures of one factory share a name; their computation differs (another
  temperature): refused, naming loss_computation. The same closure resumes, and a
  job file written before the field existed still resumes."""
  import json  # pylint: disable=g-import-not-at-top
  _, params0, train, test, ids = _setup()
  model = models.MLPClassifier(hidden_sizes=(4,), num_classes=C)

  def make_loss(temperature):
    def loss(params, batch):
      return losses.classification_loss(
          model.apply(params, batch["inputs"]) / temperature, batch["labels"])
    return loss

  workdir = str(tmp_path / "job")
  kwargs = dict(train_arrays=train, test_arrays=test, progress=False, workdir=workdir,
                config=ml_collections.ConfigDict(dict(optimizer="sgd",
                                                      learning_rate=0.1)))
  training.train_runs(params0, ids, loss_fn=make_loss(1.0), max_steps=2, **kwargs)
  with pytest.raises(ValueError, match=r"holds checkpoints of a different job.*"
                                       r"loss_computation: '"):
    training.train_runs(params0, ids, loss_fn=make_loss(5.0), **kwargs)
  # An old job file and checkpoints without the field: resumed, as before.
  job_path = tmp_path / "job" / training.runs.JOB_FILE
  stored = json.loads(job_path.read_text())
  del stored[training.runs.LOSS_COMPUTATION]
  job_path.write_text(json.dumps(stored))
  resumed = training.train_runs(params0, ids, loss_fn=make_loss(1.0), **kwargs)
  fresh = training.train_runs(params0, ids, loss_fn=make_loss(1.0),
                              **{**kwargs, "workdir": None})
  np.testing.assert_allclose(resumed.trace.losses, fresh.trace.losses, rtol=1e-6)
