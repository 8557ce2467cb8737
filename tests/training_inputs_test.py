"""What `train_runs`, `metagradients`, `first_order_losses` and the table predictors
refuse (never a silent wrong answer), and that valid inputs give the same numbers.

Refused: labels / targets outside the loss's classes (a negative label trains as
class C−1, one ≥ C gives NaN), arrays whose leading sizes differ (rows of one array
would pair with rows of another), a learning rate that is not a finite positive
number, non-finite metagradients / predictions, and non-finite metagradient tables.
"""

import functools
import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from simfluence_jax import models
from simfluence_jax import training
from simfluence_jax.training import optim

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("training_inputs_test")

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 12, 4, 5, 3
NUM_RUNS, NUM_STEPS, BATCH = 2, 3, 3

metagradients_lib = importlib.import_module("simfluence_jax.training.metagradients")
runs_lib = importlib.import_module("simfluence_jax.training.runs")

_MODEL = models.MLPClassifier(hidden_sizes=(4,), num_classes=NUM_CLASSES)
# One loss function for every test: the compiled programs are cached per loss.
_LOSS_FN = training.make_loss_fn(_MODEL, "classification")


def _config(**changes):
  return ml_collections.ConfigDict({**dict(optimizer="sgd", learning_rate=0.1,
                                           lr_schedule="constant"), **changes})


def _setup():
  """params0, train, test, batch_ids: fresh copies of the arrays (tests edit them)
  around one initialisation (compiled once, not once per test)."""
  params0, train, test, batch_ids = _setup_once()
  copy = lambda arrays: {k: v.copy() for k, v in arrays.items()}
  return params0, copy(train), copy(test), batch_ids.copy()


@functools.lru_cache(maxsize=None)
def _setup_once():
  rng = np.random.default_rng(0)
  make = lambda n: {
      "inputs": rng.normal(size=(n, DIM)).astype(np.float32),
      # Both ends of the valid range [0, C) occur.
      "labels": (np.arange(n) % NUM_CLASSES).astype(np.int32)}
  train, test = make(NUM_TRAIN), make(NUM_TEST)
  params0 = models.init_variables(_MODEL, train["inputs"], seed=0)
  batch_ids = np.stack([rng.permutation(NUM_TRAIN)[:NUM_STEPS * BATCH].reshape(
      NUM_STEPS, BATCH) for _ in range(NUM_RUNS)]).astype(np.int32)
  batch_ids[0, -1, -1] = -1  # a padding slot
  return params0, train, test, batch_ids


def _reference_and_curricula(batch_ids):
  """A full-batch reference [T, N] and the curricula `batch_ids` [R, T, B]."""
  return np.tile(np.arange(NUM_TRAIN, dtype=np.int32), (NUM_STEPS, 1)), batch_ids


# Each entry: (function name, call(params0, batch_ids, train, test, config)).
_CALLS = {
    "train_runs": lambda p, ids, train, test, config: training.train_runs(
        p, ids, loss_fn=_LOSS_FN, optimizer_config=config, train_arrays=train,
        test_arrays=test, progress=False),
    "metagradients": lambda p, ids, train, test, config: training.metagradients(
        p, ids, loss_fn=_LOSS_FN, config=config, train_arrays=train,
        test_arrays=test, return_final_losses=True),
    "first_order_losses": lambda p, ids, train, test, config:
        training.first_order_losses(
            p, *_reference_and_curricula(ids), loss_fn=_LOSS_FN, config=config,
            train_arrays=train, test_arrays=test),
    "first_order_final_losses": lambda p, ids, train, test, config:
        training.first_order_final_losses(
            p, *_reference_and_curricula(ids), loss_fn=_LOSS_FN, config=config,
            train_arrays=train, test_arrays=test, route="jvp"),
}


@pytest.mark.parametrize("who", sorted(_CALLS))
@pytest.mark.parametrize("argument,row,value", [("train_arrays", 5, -1),
                                                ("test_arrays", 3, NUM_CLASSES),
                                                ("train_arrays", 0, 1000)])
def test_labels_outside_the_classes_are_refused(who, argument, row, value):
  params0, train, test, batch_ids = _setup()
  arrays = {"train_arrays": train, "test_arrays": test}[argument]
  arrays["labels"][row] = value
  with pytest.raises(ValueError, match=(
      rf'^{who}: {argument}\["labels"\] must be in \[0, {NUM_CLASSES}\), got '
      rf"{value} at row {row}\.$")):
    _CALLS[who](params0, batch_ids, train, test, _config())


@functools.lru_cache(maxsize=None)
def _tiny_lm():
  """tokens int32[4, 7], and a Transformer LM of vocabulary 53 (initialised once for
  both language-model tests): (tokens, params0, loss_fn)."""
  tokens = np.random.default_rng(0).integers(0, 50, (4, 7)).astype(np.int32)
  model = models.TransformerLM(vocab_size=53, d_model=8, num_layers=1, num_heads=2,
                               d_ff=16, max_len=6)
  params0 = models.init_variables(model, tokens[:, :-1])
  return tokens, params0, training.make_loss_fn(model, "lm")


def test_language_model_targets_outside_the_vocabulary_are_refused():
  """C is the vocabulary (the logits' last dimension) for "targets" [N, L]."""
  tokens, params0, loss_fn = _tiny_lm()
  arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].copy(),
            "mask": np.ones((4, 6), np.float32)}
  assert loss_fn.class_ids_key == "targets"
  assert loss_fn.num_classes(params0, arrays["inputs"]) == 53
  bad = {**arrays, "targets": arrays["targets"].copy()}
  bad["targets"][2, 4] = 53
  with pytest.raises(ValueError, match=(r'^train_runs: test_arrays\["targets"\] must '
                                        r"be in \[0, 53\), got 53 at row 2 \(index "
                                        r"\[2, 4\]\)\.$")):
    training.train_runs(params0, np.zeros((1, 1, 2), np.int32), loss_fn=loss_fn,
                        config=_config(), train_arrays=arrays, test_arrays=bad,
                        progress=False)


def test_a_custom_loss_is_given_its_labels_as_they_are():
  """A custom loss declares no classes (`make_loss_fn`'s losses do): its labels
  are its own business, e.g. -100 that it masks (Hugging Face's ignore index)."""
  def loss_fn(params, batch):
    labels = batch["labels"]
    return jnp.where(labels >= 0, (params["params"]["w"]
                                   - labels.astype(jnp.float32)) ** 2, 0.0)

  params0 = {"params": {"w": jnp.float32(0.5)}}
  arrays = {"labels": np.array([0, -100, 2, 40], np.int32)}
  assert not hasattr(loss_fn, "num_classes")
  result = training.train_runs(params0, np.array([[[0, 1], [2, 3]]], np.int32),
                               loss_fn=loss_fn, config=_config(), train_arrays=arrays,
                               test_arrays=arrays, progress=False)
  # Plain SGD by hand: step 1 on examples 0 and -100 (masked: contributes 0),
  # step 2 on 2 and 40; the test loss of the masked example stays 0.
  w = 0.5
  for labels in ((0.0,), (2.0, 40.0)):
    w -= 0.1 * sum(2 * (w - y) for y in labels) / 2
  np.testing.assert_allclose(result.trace.losses[0, -1],
                             [(w - 0) ** 2, 0.0, (w - 2) ** 2, (w - 40) ** 2],
                             rtol=1e-5)


def test_language_model_padding_under_mask_zero_may_hold_any_id():
  """Targets count where the mask is > 0: -1 padding under mask 0 trains exactly
  as 0 padding does; the same -1 where the mask is 1 is refused."""
  tokens, params0, loss_fn = _tiny_lm()
  mask = np.ones((4, 6), np.float32)
  mask[:, 4:] = 0.0
  arrays = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:].copy(), "mask": mask}
  arrays["targets"][:, 4:] = 0
  padded = {**arrays, "targets": np.where(mask > 0, arrays["targets"], -1)}
  run = lambda train: training.train_runs(
      params0, np.array([[[0, 1], [2, 3]]], np.int32), loss_fn=loss_fn,
      config=_config(), train_arrays=train, test_arrays=arrays,
      progress=False).trace.losses
  np.testing.assert_array_equal(run(padded), run(arrays))
  outside = {**arrays, "targets": np.where(mask > 0, arrays["targets"], -100)}
  with pytest.raises(ValueError, match=(r'^train_runs: train_arrays\["targets"\] must '
                                        r"be in \[-53, 53\) even where the mask is 0 "
                                        r"\(outside, the loss reads NaN\), got -100 at "
                                        r"row 0 \(index \[0, 4\]\)\.$")):
    run(outside)
  counted = {**arrays, "targets": arrays["targets"].copy()}
  counted["targets"][1, 2] = -1
  with pytest.raises(ValueError, match=(r'^train_runs: train_arrays\["targets"\] must '
                                        r"be in \[0, 53\) where the mask is > 0, got "
                                        r"-1 at row 1 \(index \[1, 2\]\)\.$")):
    run(counted)


@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 3), (2, 3, 0)])
def test_train_runs_refuses_an_empty_axis_of_batch_ids(shape):
  params0, train, test, _ = _setup()
  with pytest.raises(ValueError, match=r"^train_runs: batch_ids must be int\[R, T, B\] "
                                       r"with R, T, B ≥ 1, got int32\["):
    _CALLS["train_runs"](params0, np.zeros(shape, np.int32), train, test, _config())


@pytest.mark.parametrize("who", sorted(_CALLS))
def test_arrays_whose_leading_sizes_differ_are_refused(who):
  params0, train, test, batch_ids = _setup()
  short = {**train, "labels": train["labels"][:10]}
  with pytest.raises(ValueError, match=(
      rf"^{who}: train_arrays: every array needs the same leading axis N, got "
      rf"inputs {NUM_TRAIN}, labels 10\.$")):
    _CALLS[who](params0, batch_ids, short, test, _config())
  longer = {**test, "extra": np.zeros(7, np.float32)}
  with pytest.raises(ValueError, match=(
      rf"^{who}: test_arrays: every array needs the same leading axis M, got "
      rf"extra 7, inputs {NUM_TEST}, labels {NUM_TEST}\.$")):
    _CALLS[who](params0, batch_ids, train, longer, _config())


@pytest.mark.parametrize("who", sorted(_CALLS))
@pytest.mark.parametrize("rate", [0.0, -0.1, float("nan"), float("inf")])
def test_a_learning_rate_that_is_not_finite_and_positive_is_refused(who, rate):
  params0, train, test, batch_ids = _setup()
  with pytest.raises(ValueError, match=(rf"^{who}: config\.learning_rate={rate!r}: "
                                        r"must be a finite positive number\.$")):
    _CALLS[who](params0, batch_ids, train, test, _config(learning_rate=rate))


def test_a_negative_end_learning_rate_is_refused():
  params0, train, test, batch_ids = _setup()
  config = _config(lr_schedule="linear", end_learning_rate=-0.01)
  with pytest.raises(ValueError, match=r"^train_runs: config\.end_learning_rate="
                                       r"-0\.01: must be a finite non-negative"):
    _CALLS["train_runs"](params0, batch_ids, train, test, config)


@pytest.mark.parametrize("who", sorted(_CALLS))
@pytest.mark.parametrize("changes,message", [
    (dict(optimizer="momentum", momentum=1.0), r"config\.momentum=1\.0: must be in \[0, 1\)"),
    (dict(optimizer="momentum", momentum=-0.5), r"config\.momentum=-0\.5: must be in"),
    (dict(optimizer="adam", b1=1.0), r"config\.b1=1\.0: must be in \[0, 1\)"),
    (dict(optimizer="adam", b2=float("nan")), r"config\.b2=nan: must be in"),
    (dict(optimizer="adam", eps=0.0), r"config\.eps=0\.0: must be a finite positive"),
    (dict(warmup_steps=-2), r"config\.warmup_steps=-2: must be a non-negative integer"),
    (dict(warmup_steps=1.5), r"config\.warmup_steps=1\.5: must be a non-negative"),
])
def test_optimizer_numbers_out_of_range_are_refused(who, changes, message):
  params0, train, test, batch_ids = _setup()
  with pytest.raises(ValueError, match=rf"^{who}: {message}"):
    _CALLS[who](params0, batch_ids, train, test, _config(**changes))


@pytest.mark.parametrize("who", sorted(_CALLS))
@pytest.mark.parametrize("changes,message", [
    (dict(weight_decay=0.01), r"config\.weight_decay: not an optimizer setting"),
    (dict(optimizer="momentum", nesterov=True), r"config\.nesterov: not an optimizer"),
    (dict(optimizer="adam", grad_clip=1.0), r"config\.grad_clip: not an optimizer"),
])
def test_a_dict_config_setting_no_optimizer_reads_is_refused(who, changes, message):
  """Review h20: `weight_decay`, `grad_clip` or `nesterov` in a dict config trained
  plain SGD, bit-identical, with no error. (Another optimizer's fields, such as
  `momentum` with "sgd", are left unused, as in the job's ConfigDict.)"""
  params0, train, test, batch_ids = _setup()
  with pytest.raises(ValueError, match=rf"^{who}: {message}"):
    _CALLS[who](params0, batch_ids, train, test, _config(**changes).to_dict())


def test_optimizer_numbers_at_the_ends_of_their_ranges_train():
  """momentum 0 (plain SGD), b1 0 and warm-up 0 are valid: the same steps as
  optax's own optimizers."""
  params0, train, test, batch_ids = _setup()
  for changes, tx in [(dict(optimizer="momentum", momentum=0.0), optax.sgd(0.1)),
                      (dict(optimizer="adam", b1=0.0, warmup_steps=0),
                       optax.adam(0.1, b1=0.0))]:
    got = _CALLS["train_runs"](params0, batch_ids[:1], train, test,
                               _config(**changes)).trace.losses[0]
    batches = [{k: v[ids[ids >= 0]] for k, v in train.items()} for ids in batch_ids[0]]
    np.testing.assert_allclose(got, _optax_losses(tx, params0, batches, test),
                               rtol=2e-5, atol=2e-6)


def _optax_losses(tx, params0, batches, test):
  """Test losses [T+1, M] of optax's `tx` stepping on the mean loss of each batch
  (a Python loop, unrolled in one jitted program rather than run op by op)."""
  def losses(params, batches):
    state, out = tx.init(params), [_LOSS_FN(params, test)]
    for batch in batches:
      grads = jax.grad(lambda p, b=batch: _LOSS_FN(p, b).mean())(params)
      updates, state = tx.update(grads, state, params)
      params = optax.apply_updates(params, updates)
      out.append(_LOSS_FN(params, test))
    return jnp.stack(out)
  return np.asarray(jax.jit(losses)(params0, batches))


def _overflowing_derivatives():
  """A run that stays finite (weights 0: θ never moves, every loss is 0) but whose
  derivatives overflow float32: ℓ(θ; y) = y·θ with y = 1e30 for train and test, so
  ∂L_T/∂w_b = −η·y_test·y_b/num_valid ≈ −5e59."""
  loss_fn = lambda params, batch: batch["y"] * params["params"]["theta"]
  arrays = lambda n: {"y": np.full(n, 1e30, np.float32)}
  batch_ids = np.array([[[0, 1], [2, 3]]], np.int32)
  return dict(loss_fn=loss_fn, config=_config(learning_rate=1.0),
              train_arrays=arrays(4), test_arrays=arrays(2)), (
                  {"params": {"theta": jnp.float32(0.0)}}, batch_ids,
                  np.zeros(batch_ids.shape, np.float32))


def test_non_finite_metagradients_are_refused():
  params0, train, test, batch_ids = _setup()
  nan_input = {**train, "inputs": train["inputs"].copy()}
  nan_input["inputs"][batch_ids[0, 0, 0]] = np.nan
  with pytest.raises(FloatingPointError, match=r"^metagradients: non-finite final "
                                               r"test loss \(run 0, test example 0: "
                                               r"nan\); the run diverged"):
    _CALLS["metagradients"](params0, batch_ids, nan_input, test, _config())
  kwargs, (params0, batch_ids, weights) = _overflowing_derivatives()
  with pytest.raises(FloatingPointError, match=r"^metagradients: non-finite "
                                               r"metagradient \(run 0, step 0, "
                                               r"batch_ids\[0, 0, 0\], test example 0: "
                                               r"-inf\); the reverse pass overflowed"):
    training.metagradients(params0, batch_ids, weights=weights, **kwargs)
  with pytest.raises(FloatingPointError, match=r"^metagradients: non-finite "
                                               r"metagradient \(step 0, batch_ids\[0, "
                                               r"0\], test example 0: -inf\)"):
    training.metagradients(params0, batch_ids[0], weights=weights[0], **kwargs)


def test_non_finite_first_order_losses_are_refused():
  params0, train, test, batch_ids = _setup()
  nan_input = {**train, "inputs": train["inputs"].copy()}
  nan_input["inputs"][3] = np.nan
  with pytest.raises(FloatingPointError, match=r"^first_order_losses: non-finite "
                                               r"reference test loss \(step 1, test "
                                               r"example 0\); the reference run"):
    _CALLS["first_order_losses"](params0, batch_ids, nan_input, test, _config())
  kwargs, (params0, batch_ids, weights) = _overflowing_derivatives()
  reference = np.tile(np.arange(4, dtype=np.int32), (2, 1))
  with pytest.raises(FloatingPointError, match=r"^first_order_losses: non-finite "
                                               r"predicted test loss \(curriculum 0, "
                                               r"step 1, test example 0\); the "
                                               r"tangents overflowed"):
    training.first_order_losses(params0, reference, batch_ids,
                                reference_weights=np.zeros(reference.shape), **kwargs)


def _table_inputs():
  rng = np.random.default_rng(0)
  reference = np.tile(np.arange(4, dtype=np.int32), (3, 1))
  table = rng.normal(size=(3, 4, 2)).astype(np.float32) * 0.01
  curricula = rng.integers(0, 4, (2, 3, 2)).astype(np.int32)
  return table, reference, np.array([1.0, 2.0]), curricula


@pytest.mark.parametrize("name", ["table", "reference_final"])
def test_non_finite_tables_are_refused(name):
  table, reference, final, curricula = _table_inputs()
  inputs = {"table": table.copy(), "reference_final": final.copy()}
  inputs[name].flat[1] = np.nan
  where = "[0, 0, 1]" if name == "table" else "[1]"
  match = rf"must be finite, got nan at {name}\{where[:-1]}\]\.$"
  with pytest.raises(ValueError, match=rf"^predict_from_table: {name} {match}"):
    training.predict_from_table(inputs["table"], reference, inputs["reference_final"],
                                curricula, num_train_examples=4)
  with pytest.raises(ValueError, match=rf"^table_simulator: {name} {match}"):
    training.table_simulator(inputs["table"], reference, inputs["reference_final"],
                             np.array([1.5, 2.5]), num_train_examples=4, batch_size=2)


def test_valid_tables_predict_as_before():
  """The first-order formula of `predict_from_table`, written out (full-batch
  reference of weight 1, curricula without padding)."""
  table, reference, final, curricula = _table_inputs()
  predicted = training.predict_from_table(table, reference, final, curricula,
                                          num_train_examples=4)
  # slot of example i in every reference step is i; num_valid = 4 and B = 2.
  expected = final - table.sum((0, 1)) + np.stack([
      sum(4 * table[t, curricula[r, t, b]] / 2 for t in range(3) for b in range(2))
      for r in range(2)])
  np.testing.assert_allclose(predicted, expected, rtol=1e-5)


def test_valid_runs_give_the_same_numbers_as_a_hand_written_sgd_loop():
  """train_runs with labels 0 and C−1 (device arrays for train) against plain SGD
  on the step objective Σ valid·ℓ / num_valid."""
  params0, train, test, batch_ids = _setup()
  lr = 0.3
  result = _CALLS["train_runs"](params0, batch_ids,
                                jax.tree_util.tree_map(jnp.asarray, train), test,
                                _config(learning_rate=lr))
  @jax.jit  # the loop below unrolled in one program (compiled once for both runs)
  def sgd_losses(params, train, ids):
    expected = [_LOSS_FN(params, test)]
    for t in range(NUM_STEPS):
      valid = (ids[t] >= 0).astype(jnp.float32)
      batch = jax.tree_util.tree_map(lambda x, t=t: x[jnp.maximum(ids[t], 0)], train)
      grads = jax.grad(lambda p, b=batch, v=valid: jnp.sum(_LOSS_FN(p, b) * v)
                       / v.sum())(params)
      params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
      expected.append(_LOSS_FN(params, test))
    return jnp.stack(expected)

  for run in range(NUM_RUNS):
    np.testing.assert_allclose(result.trace.losses[run],
                               sgd_losses(params0, train, batch_ids[run]),
                               rtol=2e-5, atol=1e-6)


def test_valid_metagradients_and_first_order_losses_equal_their_unchecked_programs():
  """The checks change no number: the public functions return exactly what their
  compiled programs (called here without any check) return."""
  params0, train, test, batch_ids = _setup()
  config = _config()
  grads, final = _CALLS["metagradients"](params0, batch_ids, train, test, config)
  structure, hyperparameters = optim.split_settings(config, NUM_STEPS)
  run_sharding, _ = runs_lib.runs_shardings(NUM_RUNS)
  compiled = metagradients_lib._metagradients_fn(  # pylint: disable=protected-access
      _LOSS_FN, structure, None, 1, 0, run_sharding)
  raw_grads, raw_final = compiled(params0, batch_ids, np.ones(batch_ids.shape,
                                                               np.float32),
                                  train, test, hyperparameters)
  np.testing.assert_array_equal(grads, np.asarray(raw_grads))
  np.testing.assert_array_equal(final, np.asarray(raw_final))
  assert np.all(np.isfinite(grads)) and np.any(grads != 0)

  reference, curricula = _reference_and_curricula(batch_ids)
  result = _CALLS["first_order_losses"](params0, batch_ids, train, test, config)
  chunk_sharding, replicated = runs_lib.runs_shardings(NUM_RUNS)
  first_order = metagradients_lib._first_order_fn(  # pylint: disable=protected-access
      _LOSS_FN, structure, 0, chunk_sharding, replicated)
  valid = (curricula >= 0).astype(np.float32)
  coefficients = valid / np.maximum(valid.sum(-1, keepdims=True), 1)
  predicted, reference_losses, _ = first_order(
      params0, reference, np.ones(reference.shape, np.float32), curricula,
      coefficients, train, test, hyperparameters)
  np.testing.assert_array_equal(result.losses, np.asarray(predicted))
  np.testing.assert_array_equal(result.reference_losses, np.asarray(reference_losses))
