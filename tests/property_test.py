"""Property tests: random valid traces never crash; random invalid ones name the field.

Shapes are drawn from a few fixed tuples so JAX compiles each jitted function only a
handful of times; the contents (ids, losses, positions of bad values) are random.
"""

import math
import tempfile

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import evaluation
from simfluence_jax import simulators

# (R, T, B, M, N)
SHAPES = [(2, 3, 2, 3, 5), (3, 4, 3, 2, 7)]
SETTINGS = settings(max_examples=25, deadline=None)
FIELDS = ("batch_ids", "losses", "learning_rates")


def _arrays(shape, seed):
  num_runs, num_steps, batch, num_test, num_train = shape
  rng = np.random.default_rng(seed)
  return dict(
      batch_ids=rng.integers(-1, num_train, (num_runs, num_steps, batch)).astype(np.int32),
      losses=rng.uniform(0.1, 3.0, (num_runs, num_steps + 1, num_test)),
      learning_rates=rng.uniform(0.01, 1.0, (num_runs, num_steps)),
      num_train_examples=num_train)


shapes = st.sampled_from(SHAPES)
seeds = st.integers(0, 2**31 - 1)


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_valid_trace_round_trips(shape, seed):
  trace = sj.Trace(**_arrays(shape, seed), metadata={"seed": seed})
  with tempfile.TemporaryDirectory() as tmp:
    trace.save(tmp + "/t")
    loaded = sj.Trace.load(tmp + "/t")
  for name in FIELDS:
    original, back = getattr(trace, name), getattr(loaded, name)
    assert original.dtype == back.dtype, name
    np.testing.assert_array_equal(original, back, err_msg=name)
  assert loaded.num_train_examples == trace.num_train_examples
  assert loaded.metadata == {"seed": seed}
  assert loaded.train_grads is None and loaded.test_grads is None


@SETTINGS
@given(shape=shapes, seed=seeds, kind=st.sampled_from(simulators.KINDS),
       l2=st.sampled_from([1e-3, 0.1, 10.0]))
def test_fit_and_simulate_are_finite_and_shaped(shape, seed, kind, l2):
  num_runs, num_steps, _, num_test, num_train = shape
  trace = sj.Trace(**_arrays(shape, seed))
  simulator = simulators.fit(kind, trace, l2)
  assert simulator.kind == kind
  assert simulator.B.shape == (num_train, num_test)
  assert np.all(np.isfinite(np.asarray(simulator.B)))
  if kind == "linear":
    assert simulator.A.shape == (num_train, num_test)
    assert np.all(np.isfinite(np.asarray(simulator.A)))
  else:
    assert simulator.A is None
  pred = np.asarray(simulator.simulate(trace.batch_ids, trace.losses[:, 0]))
  assert pred.shape == (num_runs, num_steps + 1, num_test)
  np.testing.assert_array_equal(pred[:, 0], trace.losses[:, 0])
  assert np.all(np.isfinite(pred))
  metrics = evaluation.compute_metrics(pred, trace.losses)
  assert set(metrics) == set(evaluation.METRICS)
  for name, value in metrics.items():
    assert isinstance(value, float), name
    if name.endswith("mse"):  # MSEs of finite trajectories are finite.
      assert math.isfinite(value) and value >= 0.0, (name, value)
    else:  # Rank correlations: in [-1, 1], or NaN when every row is constant.
      assert math.isnan(value) or -1.0 - 1e-9 <= value <= 1.0 + 1e-9, (name, value)


@SETTINGS
@given(shape=shapes, seed=seeds)
def test_metrics_of_perfect_prediction(shape, seed):
  losses = sj.Trace(**_arrays(shape, seed)).losses
  metrics = evaluation.compute_metrics(losses, losses)
  assert metrics["all_steps_mse"] == 0.0 and metrics["final_step_mse"] == 0.0
  # Uniform random losses are a.s. distinct, so every ρ is defined and exactly 1.
  assert metrics["spearman"] == pytest.approx(1.0)


@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data())
def test_out_of_range_id_names_batch_ids(shape, seed, data):
  kwargs = _arrays(shape, seed)
  ids = kwargs["batch_ids"]
  position = tuple(data.draw(st.integers(0, n - 1)) for n in ids.shape)
  num_train = kwargs["num_train_examples"]
  bad = data.draw(st.one_of(st.integers(-1000, -2), st.integers(num_train, 10**6)))
  ids[position] = bad
  with pytest.raises(ValueError, match=r"Trace\.batch_ids: ids must be in \[-1"):
    sj.Trace(**kwargs)
  # The simulator refuses the same ids.
  simulator = simulators.additive_from_scores(np.zeros((num_train, shape[3])))
  with pytest.raises(ValueError, match="batch_ids"):
    simulator.simulate(ids, kwargs["losses"][:, 0])


@SETTINGS
@given(shape=shapes, seed=seeds, data=st.data(),
       value=st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_loss_names_losses_and_index(shape, seed, data, value):
  kwargs = _arrays(shape, seed)
  losses = kwargs["losses"]
  position = tuple(data.draw(st.integers(0, n - 1)) for n in losses.shape)
  losses[position] = value
  with pytest.raises(ValueError, match="Trace.losses: contains NaN or inf") as error:
    sj.Trace(**kwargs)
  assert str(position) in str(error.value)


@SETTINGS
@given(shape=shapes, seed=seeds, field=st.sampled_from(FIELDS),
       add=st.booleans())
def test_wrong_rank_names_the_field(shape, seed, field, add):
  kwargs = _arrays(shape, seed)
  value = kwargs[field]
  kwargs[field] = value[..., None] if add else value[0]
  with pytest.raises(ValueError, match=f"Trace.{field}: expected .* dimensions"):
    sj.Trace(**kwargs)
