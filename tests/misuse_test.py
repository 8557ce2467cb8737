"""Plausible misuses of the public API are one line naming the argument (review h38:
each was a TypeError, AttributeError or Flax error from deep inside)."""

import functools
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
    # A query batch passed where a number goes: named by its keys, not printed whole.
    (lambda: influence.tracin_self_influence(TASK, [PARAMS], [0.1], BATCH, [BATCH]),
     "projection_dim must be a positive integer, got a list of 1 item (dict)."),
    (lambda: influence.ekfac_self_influence(TASK, PARAMS, _fitted()[0], BATCH,
                                            [BATCH]),
     "damping must be a finite number > 0 (absolute λ) or None for the default 0.1 × "
     "mean(Λ), got a list of 1 item (dict)."),
    (lambda: influence.tracin_scores(TASK, [PARAMS], [0.1], BATCH, [BATCH],
                                     chunk_size=X),
     "chunk_size must be an integer >= 1, got an array of shape (6, 5) (float32)."),
])
def test_influence_misuse_is_one_line(call, message):
  with pytest.raises(ValueError, match="^" + re.escape(message) + "$"):
    call()


LAYER = "Dense"  # find_layers' name for MODEL: Dense(3) on 5 features, [O, I] = [3, 6]


@functools.cache
def _fitted():
  """(factors, layer grads) of MODEL, made when a test first needs them: not while
  both xdist workers collect the module."""
  factors = influence.fit_ekfac(TASK, PARAMS, [BATCH])
  return factors, influence.layer_grads_from_param_grads(
      factors.layers, jax.grad(lambda p: TASK.loss(p, BATCH).sum())(PARAMS))


@pytest.mark.parametrize("call, message", [
    (lambda: influence.precondition(_fitted()[1], _fitted()[0]),
     "factors: expected EKFACFactors (from fit_ekfac), got dict; the arguments are "
     "swapped: precondition(factors, layer_grads)."),
    (lambda: influence.precondition(_fitted()[0], {"nope": _fitted()[1][LAYER]}),
     f"layer_grads: no factors for layer(s) ['nope']; the factors' layers are "
     f"['{LAYER}']."),
    (lambda: influence.precondition(_fitted()[0], {LAYER: PARAMS["params"]["kernel"]}),
     f"layer_grads['{LAYER}']: expected float32[..., O, I] = [..., 3, 6] (the kernel "
     "transposed, the bias as its last column: layer_grads_from_param_grads), got "
     "shape (5, 3)."),
    (lambda: influence.precondition(_fitted()[0], {LAYER: _fitted()[1][LAYER][:, :5].T}),
     f"layer_grads['{LAYER}']: expected float32[..., O, I] = [..., 3, 6] (the kernel "
     "transposed, the bias as its last column: layer_grads_from_param_grads), got "
     "shape (5, 3)."),
    (lambda: influence.layer_grads_from_param_grads(_fitted()[0].layers, PARAMS["params"]),
     f"grads: no leaf params/kernel (layer '{LAYER}'); pass gradients shaped like the "
     "params find_layers saw (paths e.g. ['bias', 'kernel'])."),
    (lambda: influence.layer_grads_from_param_grads(
        _fitted()[0].layers, jax.tree_util.tree_map(lambda x: np.stack([x] * 4), PARAMS)),
     "grads: leaf params/kernel has shape (4, 5, 3), the layer's kernel is (5, 3); "
     "per-example gradients need batched=True."),
    (lambda: influence.find_layers(TASK, PARAMS, BATCH),
     "fn: expected a function (params, batch) -> float[B], e.g. task.loss, got "
     "ClassificationTask."),
    (lambda: influence.find_layers(TASK.loss, BATCH, PARAMS),
     "find_layers: fn(params, batch) fails when traced (KeyError: 'inputs'); the "
     "arguments are (fn, params, batch)."),
    (lambda: influence.tracin_scores(TASK, [PARAMS], [0.1], BATCH, [
        {"inputs": X.tolist(), "labels": BATCH["labels"].tolist()}]),
     "train_batches: ['inputs'] is a Python list; pass arrays (np.asarray) whose "
     "leading axis is the examples."),
    (lambda: influence.fit_ekfac(TASK, [BATCH], PARAMS),
     "batches: every array needs the same leading example axis, got leading sizes "
     "[3, 5] (a params tree: the arguments are (task, params, batches))."),
    (lambda: influence.filter_batch(np.array([0, 1]), BATCH),
     "filter_batch: indices is a dict; the arguments are (batch, indices)."),
    (lambda: influence.tracin_scores(TASK, [PARAMS], "0.1", BATCH, [BATCH]),
     "learning_rates must be float[K] (one step size per checkpoint), got str."),
    (lambda: influence.fit_ekfac(TASK, PARAMS, [BATCH, {
        "inputs": fixtures.normal(1, (6, 4)), "labels": BATCH["labels"]}]),
     "batches[1]: the task's loss fails on its first example "
     "(ScopeParamShapeError: "),
])
def test_layer_level_misuse_is_one_line(call, message):
  if message.endswith(": "):  # a flax error's text follows
    with pytest.raises(ValueError, match="^" + re.escape(message)):
      call()
    return
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


@pytest.mark.parametrize("fn", [training.predict_from_table, training.table_simulator])
@pytest.mark.parametrize("num_train", ["12", 12.5, 0, True])
def test_table_functions_take_an_integer_number_of_examples(fn, num_train):
  table, ref = np.zeros((2, 4, 3), np.float32), np.zeros((2, 4), np.int32)
  rest = ({"batch_size": 2} if fn is training.table_simulator else {})
  with pytest.raises(ValueError, match=re.escape(
      f"{fn.__name__}: num_train_examples must be a positive integer (N), got "
      f"{num_train!r}.")):
    fn(table, ref, np.zeros(3), np.zeros((1, 2, 2), np.int32) if fn is
       training.predict_from_table else np.zeros(3), num_train_examples=num_train,
       **rest)


@pytest.mark.parametrize("value, text", [
    ({"inputs": X, "labels": X}, "a dict with keys ['inputs', 'labels']"),
    (dict.fromkeys("abcdefgh", 1), "a dict with keys ['a', 'b', 'c', 'd', 'e', 'f', "
                                   "...]"),
    (X, "an array of shape (6, 5) (float32)"),
    ([BATCH, 2], "a list of 2 items (dict, int)"),
    (tuple(range(6)), "a tuple of 6 items (int)"),
    ([1, 2.5], "[1, 2.5]"), (0, "0"), (-3.5, "-3.5"), (None, "None"),
    ("x" * 100, "'" + "x" * 76 + "..."),
])
def test_a_scalar_arguments_wrong_value_is_named_in_short(value, text):
  from simfluence_jax import _checks  # pylint: disable=g-import-not-at-top
  assert _checks.short_repr(value) == text
