"""Functions whose closed-over values change under JAX's trace cache (review h38).

JAX caches a trace by the function object: a task or loss function reused after a
value it closes over changed computed with the old value, silently (TracIn 84% off,
EK-FAC 88%, factors under other batch_stats 281%, metagradients 11×). Each is refused
now in one line, and a function binding the new value gives the brute-force answer.
"""

import enum
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from simfluence_jax import _closures
from simfluence_jax import influence
from simfluence_jax import losses
from simfluence_jax import training
import _influence_fixtures as fixtures


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x):
    x = nn.BatchNorm(use_running_average=True)(nn.Dense(4)(x))
    return nn.Dense(3)(nn.relu(x))


MODEL = _Net()
X = fixtures.normal(0, (8, 5))
BATCH = {"inputs": X, "labels": (np.arange(8) % 3).astype(np.int32)}
QUERY = {"inputs": X[:3], "labels": BATCH["labels"][:3]}
VARIABLES = fixtures.host_init(MODEL, X[:1])
STATS_A = {"BatchNorm_0": {"mean": np.full(4, 0.1, np.float32),
                           "var": np.ones(4, np.float32)}}
STATS_B = {"BatchNorm_0": {"mean": np.full(4, -0.5, np.float32),
                           "var": np.full(4, 3.0, np.float32)}}
PARAMS = {"params": VARIABLES["params"]}

REUSED_TASK = "^task: its loss computes something other than at this task's first call"


def _apply(params, x, stats):
  return MODEL.apply({**params, "batch_stats": stats}, x)


def _tracin_brute_force(stats, lr=0.1):
  """lr · ⟨∇ℓ_q, ∇ℓ_i⟩ from explicit per-example gradients under `stats`."""
  def loss(params, x, y):
    logits = _apply(params, x[None], stats)
    return -jax.nn.log_softmax(logits)[0, y]
  flat = lambda g: jnp.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(g)])
  grad = jax.jit(jax.vmap(lambda x, y: flat(jax.grad(loss)(PARAMS, x, y))))
  return lr * np.asarray(grad(QUERY["inputs"], QUERY["labels"])
                         @ grad(BATCH["inputs"], BATCH["labels"]).T)


def test_a_task_reused_after_its_closed_over_stats_changed_is_refused():
  stats = STATS_A
  task = influence.ClassificationTask(lambda p, x: _apply(p, x, stats))
  first = influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH])
  np.testing.assert_allclose(first, _tracin_brute_force(STATS_A), rtol=2e-4,
                             atol=1e-6)
  stats = STATS_B  # the closure reads the new statistics; JAX's trace the old ones
  for call in (lambda: influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH]),
               lambda: influence.tracin_self_influence(task, [PARAMS], [0.1], [BATCH]),
               lambda: influence.fit_ekfac(task, PARAMS, [BATCH])):
    with pytest.raises(ValueError, match=REUSED_TASK):
      call()
  # What the message advises: a new task binding the value.
  bound = influence.ClassificationTask(lambda p, x, s=STATS_B: _apply(p, x, s))
  np.testing.assert_allclose(
      influence.tracin_scores(bound, [PARAMS], [0.1], QUERY, [BATCH]),
      _tracin_brute_force(STATS_B), rtol=2e-4, atol=1e-6)
  assert not np.allclose(_tracin_brute_force(STATS_A), _tracin_brute_force(STATS_B),
                         rtol=0.05)


def test_factors_fitted_under_other_closed_over_stats_are_refused():
  task_a = influence.ClassificationTask(lambda p, x: _apply(p, x, STATS_A))
  factors = influence.fit_ekfac(task_a, PARAMS, [BATCH])
  # Another task closing over the same values: accepted, the same scores.
  same = influence.ClassificationTask(lambda p, x, s=dict(STATS_A): _apply(p, x, s))
  np.testing.assert_array_equal(
      influence.ekfac_scores(same, PARAMS, factors, QUERY, [BATCH]),
      influence.ekfac_scores(task_a, PARAMS, factors, QUERY, [BATCH]))
  task_b = influence.ClassificationTask(lambda p, x: _apply(p, x, STATS_B))
  with pytest.raises(ValueError, match=re.escape(
      "factors: fitted under other values of the arrays the task's loss reads from "
      "outside its params (e.g. the batch_stats its apply_fn closes over; 2 arrays in "
      "the factors, 2 for the task): refit them under these values, or pass "
      "factors.for_other_params() to apply them here on purpose.")):
    influence.ekfac_scores(task_b, PARAMS, factors, QUERY, [BATCH])
  # On purpose: the other statistics' scores with A's factors, not A's scores.
  other = influence.ekfac_scores(task_b, PARAMS, factors.for_other_params(), QUERY,
                                 [BATCH])
  assert np.all(np.isfinite(other))


def _train_setup():
  model = nn.Dense(3)
  rng = np.random.default_rng(0)
  train = {"inputs": fixtures.normal(1, (6, 5)),
           "labels": rng.integers(0, 3, 6).astype(np.int32)}
  test = {"inputs": fixtures.normal(2, (4, 5)),
          "labels": rng.integers(0, 3, 4).astype(np.int32)}
  params = fixtures.host_init(model, train["inputs"][:1])
  ids = np.array([[[0, 1], [2, 3]], [[4, 5], [1, 2]]], np.int32)
  kwargs = dict(config={"optimizer": "sgd", "learning_rate": 0.5},
                train_arrays=train, test_arrays=test)
  return model, params, ids, test, kwargs


def test_a_loss_fn_reused_after_its_closed_over_temperature_changed_is_refused():
  model, params, ids, test, kwargs = _train_setup()
  temperature = 1.0
  loss_fn = lambda p, b: losses.classification_loss(
      model.apply(p, b["inputs"]) / temperature, b["labels"])
  training.train_runs(params, ids, loss_fn=loss_fn, progress=False, **kwargs)
  temperature = 4.0
  for call in (lambda: training.train_runs(params, ids, loss_fn=loss_fn,
                                           progress=False, **kwargs),
               lambda: training.metagradients(params, ids, loss_fn=loss_fn, **kwargs)):
    with pytest.raises(ValueError, match=(
        "^(train_runs|metagradients): loss_fn computes something other than at its "
        "first call with these shapes")):
      call()
  bound = lambda p, b, t=4.0: losses.classification_loss(
      model.apply(p, b["inputs"]) / t, b["labels"])
  result = training.train_runs(params, ids, loss_fn=bound, progress=False, **kwargs)
  logits = np.asarray(model.apply(params, test["inputs"]), np.float64) / 4.0
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  want = -log_probs[np.arange(4), test["labels"]]
  np.testing.assert_allclose(result.trace.losses[:, 0], np.tile(want, (2, 1)),
                             rtol=1e-5)


def test_a_loss_fn_failing_on_the_arrays_is_one_line_naming_them():
  model, params, ids, test, kwargs = _train_setup()
  loss_fn = training.make_loss_fn(model, "classification")
  kwargs["test_arrays"] = {"inputs": fixtures.normal(3, (4, 6)),
                           "labels": test["labels"]}
  with pytest.raises(ValueError, match=(
      r"^train_runs: loss_fn fails on params0 and one example of test_arrays "
      r"\(ScopeParamShapeError: [^\n]*\)\.$")):
    training.train_runs(params, ids, loss_fn=loss_fn, progress=False, **kwargs)


def test_a_query_of_another_feature_size_is_one_line_naming_it():
  task = influence.ClassificationTask(lambda p, x: _apply(p, x, STATS_A))
  query = {"inputs": fixtures.normal(4, (3, 6)), "labels": QUERY["labels"]}
  with pytest.raises(ValueError, match=(
      r"^query_batch: the task's model fails on it \(ScopeParamShapeError: "
      r"[^\n]*\)\.$")):
    influence.tracin_scores(task, [PARAMS], [0.1], query, [BATCH])


class _Coupled(nn.Module):
  """Examples coupled through the batch mean (train-mode-BatchNorm-like), weakly."""
  coupling: float = 0.05
  dtype: object = None

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, dtype=self.dtype)(x)
    h = h - self.coupling * jnp.mean(h, axis=0, keepdims=True)
    return nn.Dense(3, dtype=self.dtype)(nn.relu(h))


def test_bfloat16_inputs_to_a_float32_model_do_not_loosen_the_independence_check():
  """Review h39: the tolerance followed the inputs' bfloat16 (3.1%), so a coupling
  float32 refuses was accepted, and TracIn moved 3.1% with chunk_size."""
  model = _Coupled()
  params = fixtures.host_init(model, X[:1])
  batch = {"inputs": jnp.asarray(X, jnp.bfloat16), "labels": BATCH["labels"]}
  task = influence.ClassificationTask(model.apply)
  with pytest.raises(ValueError, match="^train_batches: examples interact in the batch"):
    influence.tracin_scores(task, [params], [0.1], batch, [batch])
  # Uncoupled, the same bfloat16 inputs score as explicit per-example gradients.
  plain = _Coupled(coupling=0.0)
  task = influence.ClassificationTask(plain.apply)

  def loss(p, x, y):
    return -jax.nn.log_softmax(plain.apply(p, x[None]))[0, y]
  flat = lambda g: jnp.concatenate([v.ravel() for v in jax.tree_util.tree_leaves(g)])
  grad = jax.jit(jax.vmap(lambda x, y: flat(jax.grad(loss)(params, x, y))))
  g = np.asarray(grad(batch["inputs"], batch["labels"]), np.float64)
  np.testing.assert_allclose(
      influence.tracin_scores(task, [params], [0.1], batch, [batch]), 0.1 * g @ g.T,
      rtol=2e-4, atol=1e-6)
  # A model computing in bfloat16 rounds at bfloat16: its own tolerance.
  bf16 = _Coupled(coupling=0.0, dtype=jnp.bfloat16)
  scores = influence.tracin_scores(influence.ClassificationTask(bf16.apply), [params],
                                   [0.1], batch, [batch])
  assert np.all(np.isfinite(scores))


def test_derivatives_of_bfloat16_training_are_refused_and_training_warns():
  """Review h39: bfloat16 params round every update (updates under half a step are
  lost), which no derivative sees: metagradients were 33-117% off retraining."""
  model, params, ids, _, kwargs = _train_setup()
  params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  loss_fn = training.make_loss_fn(model, "classification")
  with pytest.raises(ValueError, match=re.escape(
      "metagradients: params0['params']['bias'] is bfloat16: training rounds each "
      "update to bfloat16")):
    training.metagradients(params, ids, loss_fn=loss_fn, **kwargs)
  with pytest.raises(ValueError, match="^first_order_losses: params0"):
    training.first_order_losses(params, ids[0], ids, loss_fn=loss_fn, **kwargs)
  with pytest.warns(UserWarning, match=re.escape(
      "train_runs: params0 has ['bfloat16'] leaves: each update is rounded")):
    training.train_runs(params, ids, loss_fn=loss_fn, progress=False, **kwargs)


def test_params_and_factors_swapped_is_one_line():
  """Review h38: a TypeError from inside the model ('EKFACFactors' is not iterable)."""
  task = influence.ClassificationTask(lambda p, x: _apply(p, x, STATS_A))
  factors = influence.fit_ekfac(task, PARAMS, [BATCH])
  with pytest.raises(ValueError, match=re.escape(
      "params: got EKFACFactors; the arguments are (task, params, factors, ...).")):
    influence.ekfac_scores(task, factors, PARAMS, QUERY, [BATCH])


# --- Review h40: what the first version of these checks refused or missed ---------------


class _Scaled(nn.Module):
  """A weakly typed scalar param (strongly typed once trained)."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x) * self.param("t", lambda key: jnp.array(1.0))


def test_a_weakly_typed_param_and_its_trained_value_are_the_same_function():
  model, (_, _, ids, _, kwargs) = _Scaled(), _train_setup()
  params = {"params": {"Dense_0": fixtures.host_init(nn.Dense(3), X[:1])["params"],
                       "t": jnp.array(1.0)}}
  assert params["params"]["t"].weak_type
  loss_fn = training.make_loss_fn(model, "classification")
  trained = training.train_runs(params, ids, loss_fn=loss_fn, progress=False,
                                **kwargs).params
  strong = jax.tree_util.tree_map(lambda x: jnp.asarray(x[0]), trained)
  assert not strong["params"]["t"].weak_type
  training.train_runs(strong, ids, loss_fn=loss_fn, progress=False, **kwargs)
  task = influence.ClassificationTask(model.apply)
  for p in (params, strong):
    assert np.all(np.isfinite(influence.tracin_scores(task, [p], [0.1], QUERY, [BATCH])))


def test_complex_and_int4_closed_over_constants_are_checksummed():
  table = jnp.exp(1j * jnp.arange(5.0)).astype(jnp.complex64)
  codes = jnp.array([[1, -2, 3], [0, 1, -1], [2, 2, 0], [-3, 1, 1], [0, 0, 1]],
                    jnp.int4)
  apply = lambda p, x: MODEL.apply({**p, "batch_stats": STATS_A}, x) + jnp.real(
      (x * table) @ codes.astype(jnp.complex64))
  task = influence.ClassificationTask(apply)
  for _ in range(2):
    assert np.all(np.isfinite(influence.tracin_scores(task, [PARAMS], [0.1], QUERY,
                                                      [BATCH])))


def test_a_closure_read_by_the_measurement_or_an_inner_jit_is_checked_too():
  weights = {"w": 1.0}

  class Weighted(influence.ClassificationTask):
    def measurement(self, params, batch):
      return weights["w"] * super().measurement(params, batch)

  weighted = Weighted(lambda p, x: _apply(p, x, STATS_A))
  stats = STATS_A

  def inner_jit(p, x):  # a new inner jit per call, reading `stats` when traced
    return jax.jit(lambda q, y: _apply(q, y, stats))(p, x)
  inner = influence.ClassificationTask(inner_jit)
  for task in (weighted, inner):
    influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH])
  weights["w"], stats = 2.0, STATS_B
  with pytest.raises(ValueError, match="^task: its measurement computes something"):
    influence.tracin_scores(weighted, [PARAMS], [0.1], QUERY, [BATCH])
  with pytest.raises(ValueError, match=REUSED_TASK):
    influence.tracin_scores(inner, [PARAMS], [0.1], QUERY, [BATCH])


def test_closed_over_tables_an_ulp_apart_are_the_same_values():
  """A table a model builds with numpy at trace time differs by an ulp on another
  CPU; factors fitted there must still apply here (review h40), other values not."""
  table = np.exp(np.linspace(-2, 2, 40)).astype(np.float32).reshape(8, 5)
  summary = lambda t: _closures.constants_summary(
      jax.make_jaxpr(lambda x: x @ jnp.asarray(t).T)(np.zeros((1, 5), np.float32)))
  ulp = np.nextafter(table, np.float32(np.inf))
  assert _closures.same_summary(summary(table), summary(ulp))
  assert not _closures.same_summary(summary(table), summary(table * 1.001))
  assert not _closures.same_summary(summary(table), summary(table[:, ::-1].copy()))
  assert _closures.same_summary("", "") and not _closures.same_summary(summary(table), "")


def test_old_factors_without_the_closed_part_still_apply():
  import dataclasses  # pylint: disable=g-import-not-at-top
  task = influence.ClassificationTask(lambda p, x: _apply(p, x, STATS_A))
  factors = influence.fit_ekfac(task, PARAMS, [BATCH])
  assert "+closed:" in factors.values_checksum
  old = dataclasses.replace(
      factors, values_checksum=factors.values_checksum.split("+closed:")[0])
  np.testing.assert_array_equal(
      influence.ekfac_scores(task, PARAMS, old, QUERY, [BATCH]),
      influence.ekfac_scores(task, PARAMS, factors, QUERY, [BATCH]))


def test_training_traces_test_arrays_without_a_key_and_frozen_bf16_stats_are_allowed():
  model, params, ids, test, kwargs = _train_setup()

  def loss_fn(p, b, rng=None):  # the training path reads a field only train has
    logits = model.apply(p, b["inputs"] * (1.0 if rng is None else b["scale"]))
    return losses.classification_loss(logits, b["labels"])
  kwargs["train_arrays"] = dict(kwargs["train_arrays"],
                                scale=np.ones((6, 1), np.float32))
  result = training.train_runs(params, ids, loss_fn=loss_fn, progress=False, seed=0,
                               **kwargs)
  assert np.all(np.isfinite(result.trace.losses))
  # bfloat16 state collections beside float32 params: held fixed, never rounded.
  net_params = {"params": VARIABLES["params"], "batch_stats": jax.tree_util.tree_map(
      lambda x: jnp.asarray(x, jnp.bfloat16), STATS_A)}
  net_loss = training.make_loss_fn(MODEL, "classification")
  grads = training.metagradients(net_params, ids, loss_fn=net_loss,
                                 config=kwargs["config"], train_arrays=BATCH,
                                 test_arrays=QUERY)
  assert np.all(np.isfinite(grads))


class _Bf16Activations(nn.Module):
  """bfloat16 params and activations, dots accumulating in float32 (review h40)."""

  @nn.compact
  def __call__(self, x):
    for i in range(3):
      k = self.param(f"k{i}", nn.initializers.lecun_normal(), (x.shape[-1], 64),
                     jnp.bfloat16)
      x = jax.lax.dot_general(x.astype(jnp.bfloat16), k, (((1,), (0,)), ((), ())),
                              preferred_element_type=jnp.float32)
      x = jax.nn.gelu(x.astype(jnp.bfloat16))
      x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1,
                                     keepdims=True) + 1e-6).astype(jnp.bfloat16)
    k = self.param("head", nn.initializers.lecun_normal(), (64, 3), jnp.bfloat16)
    return jax.lax.dot_general(x, k, (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)


def test_rounding_to_bfloat16_after_float32_reductions_is_not_an_interaction():
  """Its batch-of-2 and batch-of-1 losses differ by bfloat16 rounding (1e-3): the
  check's tolerance follows the narrowest float a result is cast to."""
  model = _Bf16Activations()
  x = fixtures.normal(5, (64, 32))
  batch = {"inputs": x, "labels": (np.arange(64) % 3).astype(np.int32)}
  params = model.init(jax.random.key(0), x[:1])
  scores = influence.tracin_scores(influence.ClassificationTask(model.apply), [params],
                                   [0.1], jax.tree_util.tree_map(lambda a: a[:4], batch),
                                   [batch])
  assert np.all(np.isfinite(scores))


# --- the Python-level fingerprint that lets a call skip the fresh trace -----------

_SCALE = 1.0  # a module global a loss reads


class _Holder:
  scale = 1.0  # a class attribute a loss reads

  def __init__(self):
    self.offset = jnp.zeros(())


def _scaled_loss(model, extra):
  """A classification loss whose logits depend on every kind of outside value."""
  def loss(params, batch, k=1.0):
    logits = model.apply(params, batch["inputs"]) * _SCALE * k * _Holder.scale
    logits = logits + extra["bias"] + holder.offset + cell[0]
    return losses.classification_loss(logits, batch["labels"])
  holder, cell = _Holder(), [jnp.zeros(())]
  return loss, holder, cell


def _change_global(loss, holder, cell, extra):
  global _SCALE
  _SCALE = 2.0


def _restore_global():
  global _SCALE
  _SCALE = 1.0


_CHANGES = {
    "module global": _change_global,
    "class attribute": lambda loss, holder, cell, extra: setattr(_Holder, "scale", 3.0),
    "instance attribute": lambda loss, holder, cell, extra: setattr(
        holder, "offset", jnp.ones(())),
    "dict item": lambda loss, holder, cell, extra: extra.__setitem__(
        "bias", jnp.ones(3)),
    "list item": lambda loss, holder, cell, extra: cell.__setitem__(0, jnp.ones(())),
    "default argument": lambda loss, holder, cell, extra: setattr(
        loss, "__defaults__", (2.0,)),
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_a_change_the_fingerprint_sees_is_traced_and_refused(change, monkeypatch):
  model, params, ids, _, kwargs = _train_setup()
  extra = {"bias": jnp.zeros(3)}
  loss, holder, cell = _scaled_loss(model, extra)
  traced = []
  trace = _closures.trace
  monkeypatch.setattr(_closures, "trace",
                      lambda *a, **k: traced.append(1) or trace(*a, **k))
  try:
    training.train_runs(params, ids, loss_fn=loss, progress=False, **kwargs)
    assert len(traced) == 1  # the train example (the test example: same shapes)
    training.train_runs(params, ids, loss_fn=loss, progress=False, **kwargs)
    assert len(traced) == 1  # nothing it reads changed: no trace
    _CHANGES[change](loss, holder, cell, extra)
    with pytest.raises(ValueError, match="^train_runs: loss_fn computes something "
                       "other than at its first call"):
      training.train_runs(params, ids, loss_fn=loss, progress=False, **kwargs)
    assert len(traced) == 2
  finally:
    _restore_global()
    _Holder.scale = 1.0


def test_a_task_call_skips_the_trace_until_its_closure_changes(monkeypatch):
  bias, stats = {"b": jnp.zeros(3)}, jax.tree_util.tree_map(jnp.asarray, STATS_A)
  task = influence.ClassificationTask(  # jax arrays: immutable, compared by identity
      lambda p, x: MODEL.apply({**p, "batch_stats": stats}, x) + bias["b"])
  traced = []
  trace = _closures.trace
  monkeypatch.setattr(_closures, "trace",
                      lambda *a, **k: traced.append(1) or trace(*a, **k))
  first = influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH])
  assert len(traced) == 2  # the loss on the train batch, the measurement on the query
  np.testing.assert_array_equal(
      influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH]), first)
  assert len(traced) == 2
  bias["b"] = jnp.ones(3)
  with pytest.raises(ValueError, match=REUSED_TASK):
    influence.tracin_scores(task, [PARAMS], [0.1], QUERY, [BATCH])


def test_what_the_fingerprint_cannot_see_into_is_traced_every_call():
  import os  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  table = np.ones(3, np.float32)  # writable in place
  for fn in (lambda x: x * table, lambda x: x * float(os.environ.get("T", "1")),
             lambda x: x * globals()["_SCALE"], lambda x: x * fixtures.normal(0, (1,))):
    assert _closures.fingerprint(fn) is None
  frozen = jnp.ones(3)
  fn = lambda x, k=0.0: x * frozen + k
  plain = _closures.fingerprint(fn)
  assert plain is not None and plain == _closures.fingerprint(fn)
  with jax.default_matmul_precision("highest"):  # JAX's trace-time settings count
    assert _closures.fingerprint(fn) != plain
  fn.__defaults__ = (-0.0,)  # another literal in the trace
  assert _closures.fingerprint(fn) != plain


class _Float(float):
  pass


class _Items(list):
  pass


class _Slotted:
  __slots__ = ("__private",)

  def __init__(self, value):
    self.__private = value

  def value(self):
    return self.__private


def test_the_fingerprint_sees_values_in_subclasses_slots_and_c_fields():
  import collections  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  first_pair = collections.namedtuple("Pair", "a b")
  other_pair = collections.namedtuple("Pair", "b a")  # same name, other fields
  values = {"float subclass": (_Float(1.5), _Float(2.5)),
            "private slot": (_Slotted(1.0), _Slotted(2.0)),
            "defaultdict factory": (collections.defaultdict(lambda: 1.0),
                                    collections.defaultdict(lambda: 2.0)),
            "namedtuple class": (first_pair(1.0, 2.0), other_pair(1.0, 2.0)),
            "list subclass": (_Items([1.0]), _Items([2.0]))}
  for name, (before, after) in values.items():
    box = [before]
    fn = lambda x, box=box: x * box[0]
    seen = _closures.fingerprint(fn)
    assert seen is not None and seen == _closures.fingerprint(fn), name
    box[0] = after
    assert _closures.fingerprint(fn) != seen, name
  jitted = jax.jit(lambda x: x * _SCALE)  # an inner jit's own trace cache
  fn = lambda x: jitted(x)
  seen = _closures.fingerprint(fn)
  assert seen is not None
  global _SCALE
  _SCALE = 5.0
  try:
    assert _closures.fingerprint(fn) != seen
  finally:
    _SCALE = 1.0


def test_a_remembered_fingerprint_keeps_neither_the_task_nor_its_arrays_alive():
  import gc  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import weakref  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  stats = jax.tree_util.tree_map(jnp.asarray, STATS_A)
  task = influence.ClassificationTask(
      lambda p, x, s=stats: MODEL.apply({**p, "batch_stats": s}, x))
  _closures.memoized(task, "check", task.loss, lambda: "traced")
  assert _closures.memoized(task, "check", task.loss, lambda: "again") == "traced"
  task_ref = weakref.ref(task)
  array_ref = weakref.ref(stats["BatchNorm_0"]["mean"])
  del task, stats
  gc.collect()
  assert task_ref() is None and array_ref() is None


def test_each_object_of_a_closure_is_walked_for_itself():
  """Objects of one class side by side: each one's attributes count (a walk that
  named objects by id saw a freed temporary's id reused by the next one's)."""
  first, second = _Holder(), _Holder()
  fn = lambda x: x * first.offset * second.offset
  seen = _closures.fingerprint(fn)
  second.offset = jnp.ones(())
  assert _closures.fingerprint(fn) != seen
  first.offset = jnp.ones(())
  assert _closures.fingerprint(fn) != seen


# Review h41: what the first fingerprint missed, each a stale answer where a fresh
# trace refused. The model reads a module global through a class reached by name
# (a submodule made inside @nn.compact), under a lifted transform, or through a
# metaclass; each change must still be refused.

_BLOCK_SCALE = 1.0


class _Block(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x) * _BLOCK_SCALE


class _Outer(nn.Module):

  @nn.compact
  def __call__(self, x):
    return _Block()(nn.relu(nn.Dense(4)(x)))  # _Block reached by name only


class _Meta(type):
  scale = 1.0


class _ByMeta(metaclass=_Meta):
  pass


def _set_block_scale(value):
  global _BLOCK_SCALE
  _BLOCK_SCALE = value


@pytest.mark.parametrize("case", ["submodule by name", "lifted transform",
                                  "metaclass attribute", "class made by new_class"])
def test_classes_are_walked_however_they_are_reached(case):
  import types  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  model = _Outer() if case != "lifted transform" else nn.remat(_Outer)()
  made = types.new_class("Config", (), {}, lambda ns: ns.update(scale=1.0))
  scale = {"metaclass attribute": lambda: _ByMeta.scale,
           "class made by new_class": lambda: made.scale}.get(case, lambda: 1.0)
  params = {"params": fixtures.host_init(model, X[:1])["params"]}
  task = influence.ClassificationTask(lambda p, x: model.apply(p, x) * scale())
  influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])
  try:
    if case == "metaclass attribute":
      _Meta.scale = 2.0
    elif case == "class made by new_class":
      made.scale = 2.0
    else:
      _set_block_scale(3.0)
    with pytest.raises(ValueError, match=REUSED_TASK):
      influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])
  finally:
    _set_block_scale(1.0)
    _Meta.scale = 1.0


class _Partial(functools.partial):

  def __call__(self, *args, **kwargs):
    return super().__call__(*args, **kwargs) * self.scale


class _HidingDict(dict):

  def items(self):  # hides private entries from whoever iterates it
    return [(k, v) for k, v in super().items() if not k.startswith("_")]


class _Mode(enum.Enum):
  TRAIN = {"scale": 1.0}  # a mutable value
  EVAL = 0


_Mode.EVAL.scale = 1.0  # an attribute set on a member


def test_subclasses_enum_values_and_narrow_dtypes_are_seen():
  import ml_dtypes  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  partial = _Partial(jnp.multiply, 2.0)
  partial.scale = 1.0
  hiding = _HidingDict(_bias=jnp.zeros(3))
  box = [jnp.dtype(ml_dtypes.int4)]
  fns = {"partial subclass attribute": (lambda x: partial(x),
                                        lambda: setattr(partial, "scale", 2.0)),
         "entry a subclass's items() hides": (
             lambda x: x + hiding["_bias"],
             lambda: hiding.__setitem__("_bias", jnp.ones(3))),
         "enum member's value": (lambda x: x * _Mode.TRAIN.value["scale"],
                                 lambda: _Mode.TRAIN.value.__setitem__("scale", 2.0)),
         "enum member's attribute": (lambda x: x * _Mode.EVAL.scale,
                                     lambda: setattr(_Mode.EVAL, "scale", 2.0)),
         "a 1-byte ml_dtype for another": (
             lambda x: x.astype(box[0]), lambda: box.__setitem__(
                 0, jnp.dtype(ml_dtypes.float8_e4m3fn)))}
  for name, (fn, change) in fns.items():
    seen = _closures.fingerprint(fn)
    assert seen is not None and seen == _closures.fingerprint(fn), name
    change()
    assert _closures.fingerprint(fn) != seen, name


def test_a_proxy_in_a_closure_is_traced_not_a_crash():
  import weakref  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  class Stats(dict):
    pass
  stats = Stats(b=jnp.zeros(3))
  proxy = weakref.proxy(stats)  # claims dict's class, is none of its MRO
  assert _closures.fingerprint(lambda x: x + proxy["b"]) is None
  dense = nn.Dense(3)
  task = influence.ClassificationTask(lambda p, x: dense.apply(p, x) + proxy["b"])
  scores = influence.tracin_scores(task, [fixtures.host_init(dense, X[:1])], [0.1],
                                   QUERY, [BATCH])
  assert np.all(np.isfinite(scores))


# Review h42: a second round of holes, each a stale answer where a fresh trace
# refused (or a crash, or a walk costlier than the trace).

_PROXY_SCALE = 1.0


class _FunctionProxy:
  """Claims its target's class (as wrapt's FunctionWrapper does); calling it reads
  a global the target does not."""

  def __init__(self, fn):
    self.fn = fn

  @property
  def __class__(self):
    return type(self.fn)

  def __call__(self, *args):
    return self.fn(*args) * _PROXY_SCALE


def _set_proxy_scale(value):
  global _PROXY_SCALE
  _PROXY_SCALE = value


def test_imports_proxies_and_identity_inside_the_function_are_seen():
  import sys  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  import types  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  settings = types.ModuleType("sj_test_settings")  # a user's module
  settings.SCALE = 1.0
  sys.modules["sj_test_settings"] = settings

  def imports_at_trace_time(x):
    import sj_test_settings  # pylint: disable=g-import-not-at-top,import-error
    return x * sj_test_settings.SCALE

  proxy = _FunctionProxy(lambda x: x)
  shared = {"w": 1.0}
  pair = {"student": shared, "teacher": shared}  # tied: one object twice
  try:
    assert _closures.fingerprint(imports_at_trace_time) is None  # traced each call
    assert isinstance(proxy, types.FunctionType)  # walked as what it is
    seen = _closures.fingerprint(proxy)
    _set_proxy_scale(2.0)
    assert _closures.fingerprint(proxy) != seen
    tied = lambda x: x * (2.0 if pair["student"] is pair["teacher"] else 1.0)
    seen = _closures.fingerprint(tied)
    pair["teacher"] = {"w": 1.0}  # equal values, untied
    assert _closures.fingerprint(tied) != seen
  finally:
    del sys.modules["sj_test_settings"]
    _set_proxy_scale(1.0)


def test_a_lifted_class_holding_the_users_function_is_walked():
  transform = {"scale": 1.0}
  model = nn.map_variables(nn.Dense, "params", trans_in_fn=lambda v: jax.tree_util.tree_map(
      lambda w: w * transform["scale"], v), init=True)(3)
  params = {"params": fixtures.host_init(model, X[:1])["params"]}
  task = influence.ClassificationTask(model.apply)
  assert _closures.fingerprint(task.loss) is not None
  influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])
  transform["scale"] = 2.0
  with pytest.raises(ValueError, match=REUSED_TASK):
    influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])


class _MeanOverSequence(nn.Module):

  @nn.compact
  def __call__(self, x):  # [B, S, 5] -> [B, 3], any S
    return nn.Dense(3)(x).mean(axis=1) * _BLOCK_SCALE


def test_every_batch_shape_is_checked_not_only_the_first():
  model = _MeanOverSequence()
  rng = np.random.default_rng(0)
  short, long = ({"inputs": rng.normal(size=(4, s, 5)).astype(np.float32),
                  "labels": np.arange(4, dtype=np.int32) % 3} for s in (2, 3))
  params = fixtures.host_init(model, short["inputs"][:1])
  task = influence.ClassificationTask(model.apply)
  influence.tracin_scores(task, [params], [0.1], short, [short, long])
  try:
    _set_block_scale(3.0)
    # The program for the longer sequences was compiled at the first call: a call
    # whose first batch is long must not record the new value as the first.
    with pytest.raises(ValueError, match=REUSED_TASK):
      influence.tracin_scores(task, [params], [0.1], short, [long, short])
  finally:
    _set_block_scale(1.0)


def test_deep_and_large_closures_are_traced_without_a_walk_each_call(monkeypatch):
  import sys  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  chain = None
  for i in range(20_000):  # a parent-linked chain the loss never reads
    chain = {"parent": chain, "i": i}
  limit = sys.getrecursionlimit()
  sys.setrecursionlimit(200_000)  # review h42: the walk overflowed the C stack
  try:
    assert _closures.fingerprint(lambda x: x if chain else x) is None
  finally:
    sys.setrecursionlimit(limit)
  vocab = {f"token{i}": i for i in range(50_000)}  # too large to walk each call
  assert _closures.fingerprint(lambda x: x * len(vocab)) is None
  dense = nn.Dense(3)
  task = influence.ClassificationTask(
      lambda p, x: dense.apply(p, x) + 0 * len(vocab))
  params = fixtures.host_init(dense, X[:1])
  walks = []
  fingerprint = _closures.fingerprint
  monkeypatch.setattr(_closures, "fingerprint",
                      lambda fn: walks.append(1) or fingerprint(fn))
  influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])
  first = len(walks)
  influence.tracin_scores(task, [params], [0.1], QUERY, [BATCH])
  assert len(walks) == first  # opaque once: traced since, without walking again


def test_a_tree_structures_static_data_is_walked():
  """Review h43: a `flax.struct` field with pytree_node=False lives in the tree
  structure by reference; a structure kept by the loss (an unravel function) reads
  the user's config through it."""
  from flax import struct  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  from jax import flatten_util  # pylint: disable=g-import-not-at-top,import-outside-toplevel

  @struct.dataclass
  class Bundle:
    weights: jax.Array
    config: dict = struct.field(pytree_node=False)

  config = {"temperature": 1.0}
  _, unravel = flatten_util.ravel_pytree(Bundle(jnp.ones(3), config))
  fn = lambda flat: unravel(flat).weights / unravel(flat).config["temperature"]
  seen = _closures.fingerprint(fn)
  assert seen is not None
  config["temperature"] = 2.0
  assert _closures.fingerprint(fn) != seen


def test_a_flat_parameter_vector_scores_like_the_tree_it_unravels_to():
  """Review h43: params that are one array (ravel_pytree's) crashed layer discovery
  (an IndexError on the root's empty path)."""
  from jax import flatten_util  # pylint: disable=g-import-not-at-top,import-outside-toplevel
  dense = nn.Dense(3)
  params = fixtures.host_init(dense, X[:1])
  flat, unravel = flatten_util.ravel_pytree(params)
  tree_task = influence.ClassificationTask(dense.apply)
  flat_task = influence.ClassificationTask(lambda f, x: dense.apply(unravel(f), x))
  np.testing.assert_allclose(
      influence.tracin_scores(flat_task, [flat], [0.1], QUERY, [BATCH]),
      influence.tracin_scores(tree_task, [params], [0.1], QUERY, [BATCH]),
      rtol=1e-5, atol=1e-7)
