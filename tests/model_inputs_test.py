"""What `get_model`, the losses, the projection kernels and `train_runs` refuse
(never a silent wrong answer), and that the valid neighbouring inputs give the
reference numbers.

Refused: a `config.model` field no built-in model reads (a typo kept the default),
model sizes that are not ints of the right range (a float was truncated, -1 layers
built none, a str `hidden_sizes` was read per character), a dropout outside [0, 1);
label / target / mask shapes that would broadcast into a wrong loss; pytree leaves
with another example count (regrouped into the first leaf's rows); a projection
block size < 1 or a bool dimension; negative LM input token ids (the embedding
wraps -1 to row V − 1); a mesh listing a device twice.
"""

import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import kernels
from simfluence_jax import losses
from simfluence_jax import models
from simfluence_jax import sharding
from simfluence_jax import training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VOCAB, LENGTH = 11, 6
_SMALL = dict(name="transformer", d_model=8, num_layers=1, num_heads=2, d_ff=16)


def _tokens(n=2):
  return np.random.default_rng(0).integers(0, VOCAB, (n, LENGTH)).astype(np.int32)


# --- get_model -------------------------------------------------------------------

@pytest.mark.parametrize("field,value,message", [
    ("num_layers", -1, "an int ≥ 0, got -1"),
    ("num_layers", True, "an int ≥ 0, got True"),
    ("num_layers", 2.0, "an int ≥ 0, got 2.0"),
    ("d_model", 0, "an int ≥ 1, got 0"),
    ("d_model", 64.9, "an int ≥ 1, got 64.9"),
    ("num_heads", -2, "an int ≥ 1, got -2"),
    ("num_heads", True, "an int ≥ 1, got True"),
    ("d_ff", 0, "an int ≥ 1, got 0"),
    ("max_len", 0, "an int ≥ 1, got 0"),
    ("dropout", 1.0, r"a rate in \[0, 1\), got 1.0"),
    ("dropout", -0.1, r"a rate in \[0, 1\), got -0.1"),
    ("dropout", float("nan"), r"a rate in \[0, 1\), got nan"),
    ("dropout", True, r"a rate in \[0, 1\), got True"),
    ("use_bias", "False", "a bool, got 'False'"),
])
def test_transformer_sizes_outside_their_range_are_refused(field, value, message):
  config = {**_SMALL, field: value}
  with pytest.raises(ValueError, match=rf"^config\.model\.{field}: must be {message}\.$"):
    models.get_model(config, vocab_size=VOCAB)


@pytest.mark.parametrize("hidden_sizes,message", [
    ((0,), "every width must be an int ≥ 1, got 0 at index 0"),
    ((32, 64.9), "every width must be an int ≥ 1, got 64.9 at index 1"),
    ((-4,), "every width must be an int ≥ 1, got -4 at index 0"),
    ((True,), "every width must be an int ≥ 1, got True at index 0"),
    ("128", "must be a sequence of ints ≥ 1, got '128'"),
    (64, "must be a sequence of ints ≥ 1, got 64"),
])
def test_mlp_hidden_sizes_that_are_not_ints_are_refused(hidden_sizes, message):
  with pytest.raises(ValueError, match=rf"^config\.model\.hidden_sizes: {message}\.$"):
    models.get_model({"name": "mlp", "hidden_sizes": hidden_sizes}, num_classes=3)


def test_sizes_given_by_the_caller_are_checked_by_their_name():
  with pytest.raises(ValueError, match=r"^vocab_size: must be an int ≥ 1, got 11\.5\.$"):
    models.get_model(_SMALL, vocab_size=11.5)
  with pytest.raises(ValueError, match=r"^max_len: must be an int ≥ 1, got 6\.0\.$"):
    models.get_model(_SMALL, vocab_size=VOCAB, max_len=6.0)
  with pytest.raises(ValueError, match=r"^config\.model\.num_classes: must be an int "
                                       r"≥ 1, got 2\.5\.$"):
    models.get_model({"name": "mlp", "num_classes": 2.5})


def test_an_unknown_model_field_is_refused():
  """`num_layer=6` used to build the default 2 layers without a word."""
  config = config_lib.base_config()
  config.model.num_layer = 6
  with pytest.raises(ValueError, match=r"^config\.model\.num_layer: unknown field "
                                       r"\(did you mean 'num_layers'\? known: name, "):
    models.get_model(config.model, vocab_size=259, max_len=32)
  with pytest.raises(ValueError, match=r"^config\.model\.widths: unknown field"):
    models.get_model({"name": "mlp", "widths": (8,)}, num_classes=3)


def make_tiny_factory_model(model_config, *, vocab_size=None, num_classes=None,
                            max_len=None):
  """A user's factory: it reads its own fields (`width`), which are not refused."""
  del vocab_size, max_len
  return models.MLPClassifier(hidden_sizes=(model_config["width"],),
                              num_classes=num_classes)


def test_every_shipped_config_and_a_factory_with_its_own_fields_still_build():
  default = models.get_model(config_lib.base_config().model, vocab_size=259,
                             max_len=32)
  assert repr(default) == repr(models.TransformerLM(vocab_size=259))
  assert sorted(config_lib.base_config().model) == sorted(
      set(config_lib.base_config().model) & set(models.KNOWN_FIELDS))
  digits = config_lib.base_config()
  digits.model.name = "mlp"
  assert models.get_model(digits.model, num_classes=10).hidden_sizes == (64,)
  factory = models.get_model(
      {"factory": f"{__name__}:make_tiny_factory_model", "width": 5}, num_classes=3)
  assert factory.hidden_sizes == (5,)


def test_valid_transformer_configs_build_the_same_model_as_before():
  """num_layers=0 (no block), dropout 0.5 and NumPy ints are valid: the model is
  the one the constructor builds from the same values, logits bit for bit."""
  tokens = _tokens()
  for changes in ({}, {"num_layers": 0}, {"d_model": np.int64(8)}):
    config = ml_collections.ConfigDict({**_SMALL, **changes})
    model = models.get_model(config, vocab_size=VOCAB, max_len=LENGTH)
    reference = models.TransformerLM(vocab_size=VOCAB, max_len=LENGTH, **{
        k: v for k, v in {**_SMALL, **changes}.items() if k != "name"})
    assert repr(model) == repr(reference)
    variables = models.init_variables(model, tokens)
    np.testing.assert_array_equal(
        model.apply(variables, tokens),
        reference.apply(models.init_variables(reference, tokens), tokens))
    blocks = [k for k in variables["params"] if k.startswith("block")]
    assert len(blocks) == model.num_layers
  dropped = models.get_model({**_SMALL, "dropout": 0.5}, vocab_size=VOCAB)
  assert dropped.dropout == 0.5


def test_valid_mlp_widths_give_the_reference_logits():
  model = models.get_model({"name": "mlp", "hidden_sizes": [6, np.int32(4)]},
                           num_classes=3)
  assert model.hidden_sizes == (6, 4) and model.num_classes == 3
  x = np.random.default_rng(1).normal(size=(5, 7)).astype(np.float32)
  variables = models.init_variables(model, x)
  p = jax.tree_util.tree_map(np.asarray, variables["params"])
  h = x
  for name in ("hidden_0", "hidden_1"):
    h = np.maximum(h @ p[name]["kernel"] + p[name]["bias"], 0)
  expected = h @ p["logits"]["kernel"] + p["logits"]["bias"]
  np.testing.assert_allclose(model.apply(variables, x), expected, rtol=1e-5,
                             atol=1e-6)


# --- losses ----------------------------------------------------------------------

def _reference_cross_entropy(logits, labels):
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(log_probs, labels[..., None], -1)[..., 0]


def test_classification_labels_of_another_shape_are_refused():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 5)).astype(np.float32)
  labels = np.array([0, 1, 2, 4], np.int32)
  for bad, got in ((labels[:1], r"\(1,\)"), (labels[:, None], r"\(4, 1\)")):
    with pytest.raises(ValueError, match=rf"^labels: expected shape \(4,\) "
                                         rf"\(logits\.shape\[:-1\]\), got {got}\.$"):
      losses.classification_loss(logits, bad)
  with pytest.raises(ValueError, match=r"^labels: expected shape \(1,\)"):
    jax.jit(losses.classification_loss)(logits[:1], labels)
  for fn in (losses.classification_loss, jax.jit(losses.classification_loss)):
    np.testing.assert_allclose(fn(logits, labels),
                               _reference_cross_entropy(logits, labels), rtol=1e-5)


def test_language_model_targets_and_mask_of_another_shape_are_refused():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(4, 4, 6)).astype(np.float32)
  targets = rng.integers(0, 6, (4, 4)).astype(np.int32)
  mask = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 1]],
                  np.float32)
  lm = losses.language_modeling_loss
  with pytest.raises(ValueError, match=r"^targets: expected shape \(4, 4\) "
                                       r"\(logits\.shape\[:-1\]\), got \(1, 4\)\.$"):
    lm(logits, targets[:1], mask)
  with pytest.raises(ValueError, match=r"^targets: expected shape \(1, 4\)"):
    lm(logits[:1], targets, mask)
  # Per-example lengths [B] broadcast against [B, L] when B == L.
  with pytest.raises(ValueError, match=r"^mask: expected shape \(4, 4\) "
                                       r"\(targets\.shape\), got \(4,\)\.$"):
    lm(logits, targets, mask.sum(-1))
  with pytest.raises(ValueError, match=r"^mask: expected shape \(4, 4\) "
                                       r"\(targets\.shape\), got \(4, 4, 1\)\."):
    jax.jit(lm)(logits, targets, mask[..., None])
  expected = (_reference_cross_entropy(logits, targets) * mask).sum(-1)
  for fn in (lm, jax.jit(lm)):
    np.testing.assert_allclose(fn(logits, targets, mask), expected, rtol=1e-5)


# --- projection ------------------------------------------------------------------

def test_leaves_with_another_example_count_are_refused():
  """[2, 3] and [3, 4] leaves were regrouped into 2 rows of 9 values."""
  for tree, n, shape in (
      ({"a": jnp.zeros((2, 3)), "b": jnp.zeros((3, 4))}, 2, r"\(3, 4\)"),
      ({"a": jnp.zeros((4, 3)), "b": jnp.zeros((2, 4))}, 4, r"\(2, 4\)"),
      ({"a": jnp.zeros((2, 3)), "b": jnp.float32(1.0)}, 2, r"\(\)"),
      ({"a": jnp.float32(1.0), "b": jnp.zeros((2, 3))}, None, r"\(\)")):
    with pytest.raises(ValueError, match=rf"^flatten_per_example: every leaf needs "
                                         rf"the leading example axis {n}, got shape "
                                         rf"{shape}\.$"):
      kernels.flatten_per_example(tree)
    with pytest.raises(ValueError, match=r"^flatten_per_example: every leaf"):
      kernels.project_pytree(tree, jax.random.key(0), 4)
  tree = {"a": jnp.arange(6.).reshape(2, 3), "b": jnp.arange(8.).reshape(2, 2, 2)}
  np.testing.assert_array_equal(
      kernels.flatten_per_example(tree),
      np.concatenate([np.arange(6.).reshape(2, 3), np.arange(8.).reshape(2, 4)], 1))


@pytest.mark.parametrize("kwargs,message", [
    (dict(dim=True), r"dim must be a positive integer, got True"),
    (dict(block_size=0), r"block_size must be a positive integer, got 0"),
    (dict(block_size=-1), r"block_size must be a positive integer, got -1"),
    (dict(block_size=7.0), r"block_size must be a positive integer, got 7\.0"),
    (dict(block_size=True), r"block_size must be a positive integer, got True"),
])
def test_projection_sizes_outside_their_range_are_refused(kwargs, message):
  vectors = jnp.ones((3, 50))
  with pytest.raises(ValueError, match=rf"^project: {message}\.$"):
    kernels.project(vectors, jax.random.key(0), **{"dim": 4, **kwargs})


def test_projection_sizes_may_be_numpy_integers():
  vectors = jnp.arange(150.0).reshape(3, 50)
  np.testing.assert_array_equal(
      kernels.project(vectors, jax.random.key(0), np.int64(4), block_size=np.int32(16)),
      kernels.project(vectors, jax.random.key(0), 4, block_size=16))


def _reference_matrix(key, num_params, dim, block_size):
  """R [P, K]: block b of `block_size` rows from fold_in(key, b), ±1/√K."""
  block_size = min(block_size, num_params)
  blocks = [jax.random.rademacher(jax.random.fold_in(key, b), (block_size, dim),
                                  jnp.float32)
            for b in range(math.ceil(num_params / block_size))]
  return np.concatenate(blocks)[:num_params] / math.sqrt(dim)


def test_the_matrix_is_a_function_of_key_block_size_and_dim():
  """Unchanged generation (recorded projections stay valid): the same (key,
  block_size, K) gives the same matrix; another block size another matrix."""
  key = jax.random.key(0)
  vectors = np.random.default_rng(1).normal(size=(3, 50)).astype(np.float32)
  for block_size in (7, 16, 1 << 14):
    projected = kernels.project(vectors, key, 8, block_size=block_size)
    np.testing.assert_allclose(
        projected, vectors @ _reference_matrix(key, 50, 8, block_size), rtol=1e-5,
        atol=1e-5)
    np.testing.assert_array_equal(
        projected, kernels.project(vectors, key, 8, block_size=block_size))
  assert not np.allclose(kernels.project(vectors, key, 8, block_size=7),
                         kernels.project(vectors, key, 8))


# --- train_runs: LM input token ids ----------------------------------------------

def _lm_setup():
  seq = np.random.default_rng(0).integers(0, VOCAB, (4, LENGTH + 1)).astype(np.int32)
  seq[0, 0], seq[1, 0] = 0, VOCAB - 1  # both ends of [0, V) occur as inputs
  arrays = {"inputs": seq[:, :-1].copy(), "targets": seq[:, 1:].copy(),
            "mask": np.ones((4, LENGTH), np.float32)}
  model = models.TransformerLM(vocab_size=VOCAB, d_model=8, num_layers=1,
                               num_heads=2, d_ff=16, max_len=LENGTH)
  loss_fn = training.make_loss_fn(model, "lm")
  return arrays, models.init_variables(model, arrays["inputs"]), loss_fn


def _train(params0, loss_fn, train, test, lr=0.1):
  config = ml_collections.ConfigDict(dict(optimizer="sgd", learning_rate=lr,
                                          lr_schedule="constant"))
  return training.train_runs(params0, np.array([[[0, 1]]], np.int32),
                             loss_fn=loss_fn, config=config, train_arrays=train,
                             test_arrays=test, progress=False)


@pytest.mark.parametrize("argument,index,value", [
    ("train_arrays", (0, 0), -1), ("test_arrays", (2, 3), -2),
    ("train_arrays", (3, 5), -VOCAB)])
def test_negative_language_model_input_ids_are_refused(
    argument, index, value):
  """-1 read embedding row V − 1 (the loss of a different sequence), silently;
  the mask does not matter: every input id is read."""
  arrays, params0, loss_fn = _lm_setup()
  bad = {**arrays, "inputs": arrays["inputs"].copy(), "mask": arrays["mask"].copy()}
  bad["inputs"][index] = value
  bad["mask"][index] = 0.0
  train, test = (bad, arrays) if argument == "train_arrays" else (arrays, bad)
  with pytest.raises(ValueError, match=(
      rf'^train_runs: {argument}\["inputs"\] must be ≥ 0 \(token ids; '
      rf"the embedding would wrap a negative one\), got {value} at row {index[0]} "
      rf"\(index \[{index[0]}, {index[1]}\]\)\.$")):
    _train(params0, loss_fn, train, test)


def test_valid_and_larger_input_ids_pass_the_check():
  """Ids in [0, V) pass (both ends occur); an id ≥ V (a model may embed an input-only
  token such as a BOS) is not refused by the check either. Training on valid ids
  is covered by training_test's language-model tests."""
  arrays, params0, loss_fn = _lm_setup()
  assert training.runs.check_arrays("train_runs", loss_fn, params0, arrays,
                                    arrays) == (4, 4)
  larger = {**arrays, "inputs": arrays["inputs"].copy()}
  larger["inputs"][0, 0] = VOCAB
  assert training.runs.check_arrays("train_runs", loss_fn, params0, larger,
                                    arrays) == (4, 4)


def test_features_of_a_classifier_are_not_token_ids():
  """Only LM ("targets") integer inputs are token ids: a classifier's integer
  features may be negative."""
  model = models.MLPClassifier(hidden_sizes=(4,), num_classes=3)
  arrays = {"inputs": np.array([[-5, 2], [7, -1]], np.int32),
            "labels": np.array([0, 2], np.int32)}
  loss_fn = training.make_loss_fn(model, "classification")
  params0 = models.init_variables(model, arrays["inputs"])
  result = _train(params0, loss_fn, arrays, arrays)
  np.testing.assert_allclose(result.trace.losses[0, 0], loss_fn(params0, arrays),
                             rtol=1e-6)



@pytest.mark.parametrize("field,value,message", [
    ("num_layer", 6, r"config.model.num_layer: unknown field \(did you mean "
                     r"'num_layers'\?"),
    ("num_layers", -3, r"config.model.num_layers: must be an int ≥ 0, got -3"),
    ("dropout", 1.5, r"config.model.dropout: must be a rate in \[0, 1\)")])
def test_the_main_job_refuses_bad_model_fields_before_any_stage(tmp_path, field,
                                                                 value, message):
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(os.path.join(REPO, "configs", "default.py:tiny"))
  with config.unlocked():
    config.model[field] = value
  with pytest.raises(ValueError, match=message):
    pipeline.run(config, str(tmp_path / "job"))
  assert not (tmp_path / "job").exists()  # refused before anything was written


def test_a_mesh_listing_a_device_twice_is_refused():
  # JAX accepted the mesh and failed later, placing an array, with "safe_zip()
  # argument 1 has length 2 but argument 0 has length 1".
  device = jax.devices()[0]
  with pytest.raises(ValueError, match=r"^make_mesh: device .* is listed more than "
                     "once"):
    sharding.make_mesh(runs=2, data=1, devices=[device, device])
  mesh = sharding.make_mesh(runs=1, data=1, devices=[device])
  assert mesh.devices.shape == (1, 1, 1)
  # Sizes: NumPy integers are integers; the message names only what was given
  # (it reported "runs=-1" for a model axis that did not divide the devices).
  mesh = sharding.make_mesh(data=np.int64(1), runs=None, model=np.int64(1),
                            devices=[device])
  assert mesh.devices.shape == (1, 1, 1) and sharding.data_size(mesh) == 1
  with pytest.raises(ValueError, match=r"^make_mesh: data=1 x model=3 does not divide "
                     r"the 1 devices, so no size of runs fits.$"):
    sharding.make_mesh(model=3, devices=[device])
  with pytest.raises(ValueError, match=r"^make_mesh: runs must be an integer >= 1, "
                     r"got 2.0.$"):
    sharding.make_mesh(runs=2.0, data=None, devices=[device])
  no_data_axis = jax.sharding.Mesh(np.array([device]), ("x",))
  assert sharding.data_size(no_data_axis) == sharding.model_size(no_data_axis) == 1
  # No devices: refused here, not as a ZeroDivisionError in train_runs later.
  with pytest.raises(ValueError, match=r"^make_mesh: devices is empty"):
    sharding.make_mesh(runs=None, devices=[])
  # A mesh without a runs axis, or not a mesh, for the run-sharded functions.
  from simfluence_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  for mesh in (no_data_axis, [device]):
    with pytest.raises(ValueError, match=r"^mesh must be a jax.sharding.Mesh with a "
                       "'runs' axis"):
      runs_lib.runs_shardings(2, mesh)
  # The solver's devices: a list of distinct jax devices.
  from simfluence_jax.simulators import _solver  # pylint: disable=g-import-not-at-top
  for devices, message in (([device, device], "lists a device more than once"),
                           (["cpu"], "expected jax devices"),
                           (device, "expected a list of jax devices")):
    with pytest.raises(ValueError, match=rf"^devices: .*{message}"):
      _solver.column_mesh(devices)
