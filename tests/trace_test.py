"""Trace: validation names the bad field, save/load round-trips exactly, no pickle."""

import os
import pickle

import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import _checks


def _trace(num_runs=3, num_steps=5, batch=4, num_test=6, num_train=10, grads=False,
           seed=0):
  rng = np.random.default_rng(seed)
  batch_ids = rng.integers(-1, num_train, (num_runs, num_steps, batch)).astype(np.int32)
  kwargs = {}
  if grads:
    kwargs = dict(train_grads=rng.normal(size=(num_runs, num_steps, batch, 7)),
                  test_grads=rng.normal(size=(num_runs, num_steps, num_test, 7)))
  return sj.Trace(batch_ids=batch_ids,
                  losses=rng.random((num_runs, num_steps + 1, num_test)),
                  learning_rates=np.full((num_runs, num_steps), 0.1),
                  num_train_examples=num_train, metadata={"note": "x"}, **kwargs)


@pytest.mark.parametrize("grads", [False, True])
@pytest.mark.parametrize("mmap", [False, True])
def test_save_load_round_trips_exactly(tmp_path, grads, mmap):
  trace = _trace(grads=grads)
  trace.save(tmp_path / "t")
  loaded = sj.Trace.load(tmp_path / "t", mmap=mmap)
  for name in ("batch_ids", "losses", "learning_rates", "train_grads", "test_grads"):
    a, b = getattr(trace, name), getattr(loaded, name)
    if a is None:
      assert b is None
    else:
      assert a.dtype == b.dtype and np.array_equal(a, b), name
  assert loaded.num_train_examples == 10 and loaded.metadata == {"note": "x"}
  if mmap:
    assert isinstance(loaded.losses, np.memmap)


def test_save_replaces_existing_trace(tmp_path):
  _trace(seed=0).save(tmp_path / "t")
  second = _trace(seed=1)
  second.save(tmp_path / "t")
  assert np.array_equal(sj.Trace.load(tmp_path / "t").losses, second.losses)
  assert sorted(os.listdir(tmp_path)) == ["t"]  # No temporary directory left behind.


def test_shape_accessors_and_select_runs():
  trace = _trace(num_runs=4, grads=True)
  assert (trace.num_runs, trace.num_steps, trace.batch_size,
          trace.num_test_examples) == (4, 5, 4, 6)
  sub = trace.select_runs(slice(1, 3))
  assert sub.num_runs == 2 and np.array_equal(sub.losses, trace.losses[1:3])
  assert np.array_equal(sub.train_grads, trace.train_grads[1:3])
  with pytest.raises(ValueError, match="selects no run"):
    trace.select_runs(slice(5, 9))
  # A boolean mask and an index array select the same runs, in the order given.
  mask = np.array([True, False, True, False])
  np.testing.assert_array_equal(trace.select_runs(mask).losses, trace.losses[[0, 2]])
  np.testing.assert_array_equal(trace.select_runs([3, 0]).test_grads,
                                trace.test_grads[[3, 0]])
  # The same mask as 0/1 integers would index runs 1, 0, 1, 0: refused.
  with pytest.raises(ValueError, match=(
      r"^Trace.select_runs: runs=array\(\[1, 0, 1, 0\]\) names run 0 2 times "
      r"\(a 0/1 mask must be dtype bool")):
    trace.select_runs(mask.astype(np.int64))
  # A resample with replacement, asked for.
  boot = trace.select_runs([2, 2, 1], allow_repeats=True)
  np.testing.assert_array_equal(boot.batch_ids, trace.batch_ids[[2, 2, 1]])
  for runs, message in (([4], "does not index the trace's 4 runs"),
                        (mask[:3], "does not index the trace's 4 runs"),
                        (0, r"is one index; pass a list \(\[0\]\)")):
    with pytest.raises(ValueError, match=rf"^Trace.select_runs: runs=.* {message}"):
      trace.select_runs(runs)


def _kwargs():
  return dict(batch_ids=np.zeros((2, 3, 4), np.int32), losses=np.ones((2, 4, 5)),
              learning_rates=np.ones((2, 3)), num_train_examples=3)


@pytest.mark.parametrize("field, value, message", [
    ("batch_ids", np.zeros((2, 3), np.int32), "batch_ids: expected 3 dimensions"),
    ("batch_ids", np.full((2, 3, 4), 3), r"batch_ids: ids must be in \[-1"),
    ("batch_ids", np.full((2, 3, 4), -2), "found -2"),
    ("batch_ids", np.zeros((2, 3, 4), np.float32), "batch_ids: expected integer"),
    ("losses", np.ones((2, 3, 5)), r"losses: expected shape \[R=2, T\+1=4"),
    ("losses", np.full((2, 4, 5), np.nan), "losses: contains NaN"),
    ("learning_rates", np.ones((2, 4)), "learning_rates: expected shape"),
    ("learning_rates", np.full((2, 3), np.inf), "learning_rates: contains NaN or inf"),
    # A negative rate would flip every per-step TracIn effect; 0 (warm-up) is fine.
    ("learning_rates", np.array([[0.0, 0.1, 0.1], [0.1, -0.1, 0.1]]),
     r"^Trace.learning_rates: run 1 step 1 has -0.1; a learning rate must be >= 0"),

    ("num_train_examples", 0, "num_train_examples: expected a positive integer"),
    ("num_train_examples", 2.5, "num_train_examples"),
    ("metadata", {"x": object()}, "metadata: must be JSON"),
    ("train_grads", np.ones((2, 3, 4, 2)), "give both or neither"),
])
def test_bad_input_names_the_field(field, value, message):
  kwargs = _kwargs()
  kwargs[field] = value
  with pytest.raises(ValueError, match=message):
    sj.Trace(**kwargs)


def test_grads_shape_mismatch():
  kwargs = _kwargs()
  kwargs.update(train_grads=np.ones((2, 3, 4, 2)), test_grads=np.ones((2, 3, 4, 2)))
  with pytest.raises(ValueError, match=r"test_grads: 4 test examples, but "
                     r"Trace.losses has 5 \(\[2, 4, 5\]\)"):
    sj.Trace(**kwargs)
  kwargs.update(test_grads=np.ones((2, 2, 5, 2)))
  with pytest.raises(ValueError, match=r"test_grads: expected shape \(2, 3, 5"):
    sj.Trace(**kwargs)


@pytest.mark.parametrize("metadata, message", [
    ({1: "a"}, r"^Trace.metadata: key 1 \(int\): keys must be strings \(saved as "
     r"JSON, it would load as '1'\)"),
    ({"ids": [{"x": 1, 2: 3}]}, r"^Trace.metadata\['ids'\]\[0\]: key 2 \(int\)"),
])
def test_metadata_keys_that_json_would_change_are_refused(metadata, message):
  with pytest.raises(ValueError, match=message):
    sj.Trace(**dict(_kwargs(), metadata=metadata))


def test_metadata_is_held_as_load_returns_it(tmp_path):
  metadata = {"pair": (1, 2), "nested": {"k": [3]}}
  trace = sj.Trace(**dict(_kwargs(), metadata=metadata))
  assert trace.metadata == {"pair": [1, 2], "nested": {"k": [3]}}
  metadata["nested"]["k"].append(4)  # the caller's dict is not the trace's
  assert trace.metadata["nested"] == {"k": [3]}
  trace.save(tmp_path / "t")
  assert sj.Trace.load(tmp_path / "t").metadata == trace.metadata


def test_load_missing_and_corrupt_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="no trace directory"):
    sj.Trace.load(tmp_path / "nothing")
  _trace().save(tmp_path / "t")
  with open(tmp_path / "t" / "losses.npy", "r+b") as f:
    f.truncate(100)
  with pytest.raises(ValueError, match="losses.npy"):
    sj.Trace.load(tmp_path / "t")
  os.remove(tmp_path / "t" / "losses.npy")
  with pytest.raises(FileNotFoundError, match="losses.npy"):
    sj.Trace.load(tmp_path / "t")
  (tmp_path / "t" / "trace.json").write_text("{not json")
  with pytest.raises(ValueError, match="trace.json"):
    sj.Trace.load(tmp_path / "t")


class _Bomb:
  def __reduce__(self):
    return (os.system, ("touch BOOM",))


def test_pickled_array_is_refused_without_running_it(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _trace().save(tmp_path / "t")
  np.save(tmp_path / "t" / "losses.npy", np.array([_Bomb()], dtype=object),
          allow_pickle=True)
  with pytest.raises(ValueError, match="not a plain array"):
    sj.Trace.load(tmp_path / "t")
  assert not (tmp_path / "BOOM").exists()
  assert pickle  # the payload above is a real pickle


def test_nonfinite_values_are_found_block_by_block(monkeypatch):
  """The finiteness check of a (memory-mapped) trace reads it in blocks along the
  first axis; the first NaN/inf in C order is found wherever it lies."""
  monkeypatch.setattr(_checks, "_BLOCK_ELEMENTS", 10)  # 2 rows of 2 x 3 per block
  values = np.zeros((7, 2, 3), np.float32)
  assert _checks.first_nonfinite(values) is None
  for index in [(0, 0, 0), (1, 1, 2), (4, 0, 1), (6, 1, 2)]:
    bad = values.copy()
    bad[index] = np.inf
    bad[6, 1, 2] = np.nan  # a later one is not the first
    assert _checks.first_nonfinite(bad) == index
  assert _checks.first_nonfinite(np.float32(np.nan)) == ()
  assert _checks.first_nonfinite(np.float32(1.0)) is None


def test_a_trace_keeps_its_own_read_only_copy_of_the_callers_arrays():
  """Review h38: a Trace kept the caller's buffers, so one reused across experiments
  changed every earlier Trace under it (a refit's B moved 167%)."""
  ids = np.array([[[0, 1], [2, 3]]], np.int32)
  losses = np.array([[[1.0, 2.0], [0.5, 1.5], [0.25, 1.0]]], np.float32)
  trace = sj.Trace(batch_ids=ids, losses=losses,
                   learning_rates=np.full((1, 2), 0.1, np.float32),
                   num_train_examples=4)
  ids[:] = 3
  losses[:] = 7.0
  np.testing.assert_array_equal(trace.batch_ids, [[[0, 1], [2, 3]]])
  np.testing.assert_array_equal(trace.losses[0, :, 0], [1.0, 0.5, 0.25])
  with pytest.raises(ValueError, match="read-only"):
    trace.losses[0, 0, 0] = 9.0
