"""Tests of the training step, multi-run training, checkpoints and resumption."""

import functools
import logging
import os
import re
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from simfluence_jax import losses
from simfluence_jax import models
from simfluence_jax import training
from simfluence_jax.kernels import projection

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# they share its setup and compiled programs, compiled once, not in both workers.
pytestmark = pytest.mark.xdist_group("training_test")

NUM_TRAIN, NUM_TEST, DIM, NUM_CLASSES = 12, 4, 5, 3
NUM_RUNS, NUM_STEPS, BATCH = 3, 6, 3


@pytest.fixture(scope="module", autouse=True)
def _quiet_orbax():
  logging.getLogger("absl").setLevel(logging.WARNING)


def _arrays(seed=0):
  rng = np.random.default_rng(seed)
  make = lambda n: {
      "inputs": rng.normal(size=(n, DIM)).astype(np.float32),
      "labels": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
  return make(NUM_TRAIN), make(NUM_TEST)


def _setup(seed=0):
  """model, loss_fn, params0, train, test: fresh copies of the arrays (tests edit
  them) around one model, initialisation and loss function per seed, so that tests
  training runs of the same shapes share their compiled programs (cached per loss
  function). Tests that count the programs built make a loss function of their own."""
  model, loss_fn, params0 = _model_once(seed)
  train, test = _arrays(seed)
  return model, loss_fn, params0, train, test


@functools.lru_cache(maxsize=None)
def _model_once(seed):
  model = models.MLPClassifier(hidden_sizes=(4,), num_classes=NUM_CLASSES)
  params0 = models.init_variables(model, _arrays(seed)[0]["inputs"], seed=seed)
  return model, training.make_loss_fn(model, "classification"), params0


def _batch_ids(seed=0, pad=True):
  rng = np.random.default_rng(seed)
  # Two epochs over the train set, reshuffled, like a curriculum.
  epochs = lambda: np.concatenate([rng.permutation(NUM_TRAIN) for _ in range(2)])
  ids = np.stack([epochs()[:NUM_STEPS * BATCH].reshape(NUM_STEPS, BATCH)
                  for _ in range(NUM_RUNS)]).astype(np.int32)
  if pad:
    ids[:, -1, -1] = -1  # a short last batch, as make_curricula produces
  return ids


def _config(optimizer="sgd", learning_rate=0.1, lr_schedule="constant"):
  return ml_collections.ConfigDict(dict(optimizer=optimizer, learning_rate=learning_rate,
                                        lr_schedule=lr_schedule))


def _assert_trees_close(a, b, atol):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=0)


def test_sgd_step_is_minus_lr_times_mean_gradient():
  _, loss_fn, params, train, test = _setup()
  lr = 0.3
  optimizer, schedule = training.make_optimizer(_config("sgd", lr))
  step = jax.jit(training.make_train_step(loss_fn, optimizer, schedule))
  ids = jnp.asarray([4, 7, 1], jnp.int32)
  new_params, _, test_losses, extras = step(
      params, optimizer.init(params), jnp.int32(0), ids, train, test)

  batch = jax.tree_util.tree_map(lambda x: x[np.asarray(ids)], train)

  @jax.jit  # the reference in one program (op by op, each op compiled its own)
  def reference(params):
    train_loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(
        params)
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return expected, loss_fn(expected, test), train_loss, loss_fn(params, test)

  expected, expected_test, train_loss, initial_test = reference(params)
  _assert_trees_close(new_params, expected, atol=1e-6)
  np.testing.assert_allclose(test_losses, expected_test, atol=1e-6)
  np.testing.assert_allclose(extras["train_loss"], train_loss, atol=1e-6)
  assert float(extras["learning_rate"]) == pytest.approx(lr)

  # The same step through train_runs (R=1, T=1) records the same numbers.
  result = training.train_runs(params, np.asarray(ids)[None, None], loss_fn=loss_fn,
                               config=_config("sgd", lr), train_arrays=train,
                               test_arrays=test, progress=False)
  np.testing.assert_allclose(result.trace.losses[0, 0], initial_test, atol=1e-6)
  np.testing.assert_allclose(result.trace.losses[0, 1], expected_test, atol=1e-6)
  np.testing.assert_allclose(result.trace.learning_rates, [[lr]])
  _assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], result.params), expected,
                      atol=1e-6)


def test_padding_ids_are_ignored():
  _, loss_fn, params, train, test = _setup()
  optimizer, schedule = training.make_optimizer(_config("momentum", 0.2))
  step = jax.jit(training.make_train_step(loss_fn, optimizer, schedule))
  opt_state = optimizer.init(params)
  padded = step(params, opt_state, jnp.int32(0), jnp.asarray([3, 9, -1]), train, test)
  plain = step(params, opt_state, jnp.int32(0), jnp.asarray([3, 9]), train, test)
  _assert_trees_close(padded[0], plain[0], atol=1e-6)
  np.testing.assert_allclose(padded[2], plain[2], atol=1e-6)
  np.testing.assert_allclose(padded[3]["train_loss"], plain[3]["train_loss"], atol=1e-6)


def test_vmapped_runs_equal_runs_trained_one_by_one():
  _, loss_fn, params0, train, test = _setup()
  batch_ids = _batch_ids()
  config = _config("momentum", 0.2, "linear")
  together = training.train_runs(params0, batch_ids, loss_fn=loss_fn,
                                 optimizer_config=config, train_arrays=train,
                                 test_arrays=test, progress=False, steps_per_segment=4)
  assert together.trace.losses.shape == (NUM_RUNS, NUM_STEPS + 1, NUM_TEST)
  np.testing.assert_allclose(together.trace.learning_rates[0],
                             0.2 * (1 - np.arange(NUM_STEPS) / NUM_STEPS), rtol=1e-6)
  for run in range(NUM_RUNS):
    alone = training.train_runs(params0, batch_ids[run:run + 1], loss_fn=loss_fn,
                                optimizer_config=config, train_arrays=train,
                                test_arrays=test, progress=False)
    np.testing.assert_allclose(alone.trace.losses[0], together.trace.losses[run],
                               atol=1e-5)
    np.testing.assert_allclose(alone.train_losses[0], together.train_losses[run],
                               atol=1e-5)
    _assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], alone.params),
                        jax.tree_util.tree_map(lambda x, r=run: x[r], together.params),
                        atol=1e-5)
  # Runs with different curricula do end differently.
  assert np.abs(together.trace.losses[0, -1] - together.trace.losses[1, -1]).max() > 1e-4


def test_runs_trained_in_groups_equal_runs_trained_one_by_one():
  # 5 runs in groups of 1, of 2 (the last group of 1 is a remainder) or all at once.
  _, loss_fn, params0, train, test = _setup()
  batch_ids = np.concatenate([_batch_ids(0), _batch_ids(1)[:2]])
  kwargs = dict(loss_fn=loss_fn, optimizer_config=_config("adam", 0.05, "linear"),
                train_arrays=train, test_arrays=test, progress=False)
  alone = [training.train_runs(params0, batch_ids[run:run + 1], **kwargs)
           for run in range(len(batch_ids))]
  for runs_per_group in (1, 2, 5):
    # Two segments of 3 steps: the state of every group carried across a segment
    # boundary, in one compiled program per grouping (a segment of another length,
    # the remainder of 6 steps in 4 + 2, is test_vmapped_runs_...'s).
    grouped = training.train_runs(params0, batch_ids, steps_per_segment=3,
                                  runs_per_group=runs_per_group, **kwargs)
    for run, one in enumerate(alone):
      np.testing.assert_allclose(grouped.trace.losses[run], one.trace.losses[0],
                                 atol=1e-5)
      np.testing.assert_allclose(grouped.train_losses[run], one.train_losses[0],
                                 atol=1e-5)
      np.testing.assert_allclose(grouped.trace.learning_rates[run],
                                 one.trace.learning_rates[0], rtol=1e-6)
      _assert_trees_close(
          jax.tree_util.tree_map(lambda x, r=run: x[r], grouped.params),
          jax.tree_util.tree_map(lambda x: x[0], one.params), atol=1e-5)
  with pytest.raises(ValueError, match="runs_per_group must be a positive integer"):
    training.train_runs(params0, batch_ids, runs_per_group=0, **kwargs)


def test_cpu_trains_runs_in_groups_only_when_they_are_large(monkeypatch):
  from simfluence_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  threshold, group = runs_lib.CPU_GROUP_MIN_BYTES, runs_lib.CPU_RUNS_PER_GROUP
  quarter = {"w": np.zeros(threshold // 16, np.float32)}  # threshold / 4 bytes
  assert runs_lib.default_runs_per_group(quarter, 4) == group
  assert runs_lib.default_runs_per_group(quarter, 3) is None
  chosen = []
  make_segment_fn = runs_lib.make_segment_fn

  def capturing(*args, runs_per_group=None, **kwargs):
    chosen.append(runs_per_group)
    return make_segment_fn(*args, runs_per_group=runs_per_group, **kwargs)

  monkeypatch.setattr(runs_lib, "make_segment_fn", capturing)
  model, _, params0, train, test = _setup()
  # A loss function of its own: every segment below is built here, none reused.
  loss_fn = training.make_loss_fn(model, "classification")
  kwargs = dict(loss_fn=loss_fn, optimizer_config=_config(), train_arrays=train,
                test_arrays=test, progress=False)
  training.train_runs(params0, _batch_ids(), **kwargs)  # a few bytes of params
  monkeypatch.setattr(runs_lib, "CPU_GROUP_MIN_BYTES", 1)  # every run is "large"
  training.train_runs(params0, _batch_ids(), **kwargs)
  training.train_runs(params0, _batch_ids(), record_grads=True, **kwargs)
  training.train_runs(params0, _batch_ids(), runs_per_group=1, **kwargs)
  assert chosen == [None, group, None, 1]


def test_recorded_grads_are_projected_per_example_grads():
  _, loss_fn, params0, train, test = _setup()
  batch_ids = _batch_ids()[:2, :3]
  batch_ids[1, 2, 1] = -1
  dim, seed = 16, 7
  kwargs = dict(loss_fn=loss_fn, optimizer_config=_config("sgd", 0.5),
                train_arrays=train, test_arrays=test, progress=False)
  result = training.train_runs(params0, batch_ids, checkpoint_every=1,
                               record_grads=True, projection_dim=dim, seed=seed,
                               **kwargs)
  plain = training.train_runs(params0, batch_ids, **kwargs)
  np.testing.assert_allclose(result.trace.losses, plain.trace.losses, atol=1e-6)
  trace = result.trace
  assert trace.train_grads.shape == (2, 3, BATCH, dim)
  assert trace.test_grads.shape == (2, 3, NUM_TEST, dim)
  np.testing.assert_array_equal(trace.train_grads[1, 2, 1], 0.0)

  steps, checkpoint_params = result.tracin_checkpoints()
  assert steps == [0, 1, 2, 3]
  key = training.projection_key(seed)

  # One jax.grad per example, independent of the vmapped per-example kernel (in one
  # program per number of examples: op by op, each op compiled a program of its own).
  @jax.jit
  def explicit(params, rows):
    grads = [jax.grad(lambda q, i=i: loss_fn(q, jax.tree_util.tree_map(
        lambda x: x[i:i + 1], rows))[0])(params)
             for i in range(len(rows["labels"]))]
    stacked = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)
    return projection.project_pytree(stacked, key, dim)

  for run in range(2):
    for step in range(3):
      params = jax.tree_util.tree_map(lambda x, r=run, s=step: x[s, r],
                                      checkpoint_params)
      valid = batch_ids[run, step] >= 0
      ids = batch_ids[run, step][valid]
      expected_train = np.asarray(explicit(params, jax.tree_util.tree_map(
          lambda x, i=ids: x[i], train)))
      np.testing.assert_allclose(trace.train_grads[run, step][valid], expected_train,
                                 atol=1e-5, rtol=1e-5)
      expected_test = np.asarray(explicit(params, test))
      np.testing.assert_allclose(trace.test_grads[run, step], expected_test,
                                 atol=1e-5, rtol=1e-5)
      # Train/test dot products (what per-step TracIn uses) agree as well.
      np.testing.assert_allclose(
          trace.train_grads[run, step][valid] @ trace.test_grads[run, step].T,
          expected_train @ expected_test.T, atol=1e-4, rtol=1e-4)


def test_resume_gives_identical_trace(tmp_path):
  _, loss_fn, params0, train, test = _setup()
  batch_ids = _batch_ids()
  kwargs = dict(loss_fn=loss_fn, optimizer_config=_config("adam", 0.05),
                train_arrays=train, test_arrays=test, checkpoint_every=2,
                record_grads=True, projection_dim=4, progress=False)
  one_go = training.train_runs(params0, batch_ids, **kwargs)
  workdir = str(tmp_path / "job")
  partial = training.train_runs(params0, batch_ids, workdir=workdir, max_steps=4,
                                **kwargs)
  assert partial.trace.num_steps == 4
  assert partial.checkpoint_steps == [0, 2, 4]
  resumed = training.train_runs(params0, batch_ids, workdir=workdir, **kwargs)
  for field in ("losses", "learning_rates", "train_grads", "test_grads"):
    np.testing.assert_array_equal(getattr(resumed.trace, field),
                                  getattr(one_go.trace, field))
  np.testing.assert_array_equal(resumed.train_losses, one_go.train_losses)
  _assert_trees_close(resumed.params, one_go.params, atol=0)

  steps, from_disk = training.load_tracin_checkpoints(workdir)
  assert steps == resumed.checkpoint_steps == [0, 2, 4, 6]
  memory_steps, in_memory = one_go.tracin_checkpoints()
  assert memory_steps == steps
  _assert_trees_close(from_disk, in_memory, atol=0)
  assert jax.tree_util.tree_leaves(from_disk)[0].shape[:2] == (4, NUM_RUNS)

  # A finished workdir returns its result without training again; another job's
  # curricula are refused.
  again = training.train_runs(params0, batch_ids, workdir=workdir, **kwargs)
  np.testing.assert_array_equal(again.trace.losses, one_go.trace.losses)
  with pytest.raises(ValueError, match="different"):
    training.train_runs(params0, batch_ids[:, ::-1].copy(), workdir=workdir, **kwargs)


def test_nan_loss_stops_naming_run_and_step(tmp_path):
  _, loss_fn, params0, train, test = _setup()
  batch_ids = _batch_ids(pad=False)
  bad_id = NUM_TRAIN - 1  # only ever in the batch of run 1, step 3
  batch_ids[batch_ids == bad_id] = 0
  batch_ids[1, 3, 0] = bad_id
  train["inputs"][bad_id] = np.nan
  workdir = str(tmp_path / "job")
  with pytest.raises(FloatingPointError, match=r"run 1 at step 3"):
    training.train_runs(params0, batch_ids, loss_fn=loss_fn,
                        optimizer_config=_config(), train_arrays=train,
                        test_arrays=test, workdir=workdir, checkpoint_every=1,
                        progress=False)
  assert training.tracin_steps(workdir) == [0, 1, 2, 3]
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "runs_ckpt"))) == [2, 3]


def test_params_round_trip_and_pretraining(tmp_path):
  _, loss_fn, params0, train, _ = _setup()
  path = str(tmp_path / "params")
  training.save_params(path, params0)
  _assert_trees_close(training.load_params(path, params0), params0, atol=0)
  _assert_trees_close(training.load_params(path), params0, atol=0)

  with pytest.raises(FileNotFoundError, match=r"^load_params: '.*missing' is not a "
                     "directory written by save_params.$"):
    training.load_params(str(tmp_path / "missing"))
  # Pre-training fits the data it was given.
  pretrained = training.pretrain_base(params0, loss_fn, train, num_steps=30,
                                      batch_size=4, learning_rate=0.05, seed=0)
  assert float(jnp.mean(loss_fn(pretrained, train))) < float(
      jnp.mean(loss_fn(params0, train)))


def test_optimizer_config_errors():
  with pytest.raises(ValueError, match="config.optimizer"):
    training.make_optimizer(_config("lion"))
  with pytest.raises(ValueError, match="config.lr_schedule"):
    training.make_optimizer(_config(lr_schedule="cosine"))
  with pytest.raises(ValueError, match="num_steps"):
    training.make_optimizer(_config(lr_schedule="linear"))
  _, loss_fn, params0, train, test = _setup()
  for bad in (0, -1):  # "max() arg is an empty sequence" before
    with pytest.raises(ValueError, match=rf"^train_runs: grad_chunk_size={bad}: must "
                       "be a positive integer"):
      training.train_runs(params0, _batch_ids(), loss_fn=loss_fn,
                          optimizer_config=_config(), train_arrays=train,
                          test_arrays=test, record_grads=True, grad_chunk_size=bad,
                          progress=False)
  # A missing or non-numeric number is named (float(None) raised a TypeError).
  for field, value, message in (
      ("learning_rate", None, r"config.learning_rate=None: expected a number \(the "
       r"field is missing\)"),
      ("learning_rate", "0.1x", "config.learning_rate='0.1x': expected a number"),
      ("momentum", None, "config.momentum=None: expected a number")):
    config = dict(optimizer="momentum", learning_rate=0.1, lr_schedule="constant")
    config[field] = value
    with pytest.raises(ValueError, match=rf"^{message}"):
      training.make_optimizer(config)
  del config["learning_rate"]
  with pytest.raises(ValueError, match=r"^config.learning_rate=None: expected"):
    training.make_optimizer(config)


def test_runs_sharded_over_two_host_devices_match_one_device():
  """Runs split over a 2-device "runs" mesh give the single-device numbers."""
  script = textwrap.dedent("""
      import os, sys
      os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=2"
      import jax, numpy as np
      sys.path.insert(0, %r)
      import training_test as t
      assert jax.device_count() == 2
      assert t.training.runs_shardings(2)[0].spec == jax.sharding.PartitionSpec("runs")
      assert t.training.runs_shardings(3)[0].spec == jax.sharding.PartitionSpec()
      _, loss_fn, params0, train, test = t._setup()
      ids = t._batch_ids()[:2]
      kwargs = dict(loss_fn=loss_fn, optimizer_config=t._config("adam", 0.05),
                    train_arrays=train, test_arrays=test, progress=False)
      sharded = t.training.train_runs(params0, ids, **kwargs)
      odd = t.training.train_runs(params0, t._batch_ids(), **kwargs)  # replicated
      # 6 runs, 3 per device, trained one at a time on each (the grouped path).
      six = np.concatenate([t._batch_ids(0), t._batch_ids(1)])
      grouped = t.training.train_runs(params0, six, runs_per_group=1, **kwargs)
      np.save(sys.argv[1], np.concatenate([sharded.trace.losses.ravel(),
                                           odd.trace.losses.ravel(),
                                           grouped.trace.losses.ravel()]))
  """) % os.path.dirname(os.path.abspath(__file__))
  out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"sharded_{os.getpid()}.npy")
  subprocess.run([sys.executable, "-c", script, out], check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
  multi = np.load(out)
  os.remove(out)
  _, loss_fn, params0, train, test = _setup()
  kwargs = dict(loss_fn=loss_fn, optimizer_config=_config("adam", 0.05),
                train_arrays=train, test_arrays=test, progress=False)
  single = np.concatenate([
      training.train_runs(params0, _batch_ids()[:2], **kwargs).trace.losses.ravel(),
      training.train_runs(params0, _batch_ids(), **kwargs).trace.losses.ravel(),
      training.train_runs(params0, np.concatenate([_batch_ids(0), _batch_ids(1)]),
                          runs_per_group=6, **kwargs).trace.losses.ravel()])
  np.testing.assert_allclose(multi, single, atol=1e-5)


def test_language_model_runs_record_losses_and_grads():
  rng = np.random.default_rng(0)
  def lm_arrays(n):
    tokens = rng.integers(0, 256, (n, 9)).astype(np.int32)
    mask = np.ones((n, 8), np.float32)
    mask[:, 6:] = 0.0  # padded tail tokens do not count
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask}
  train, test = lm_arrays(6), lm_arrays(2)
  model = models.TransformerLM(vocab_size=259, d_model=8, num_layers=1, num_heads=2,
                               d_ff=16, max_len=8)
  params0 = models.init_variables(model, train["inputs"])
  loss_fn = training.make_loss_fn(model, "lm")
  batch_ids = np.array([[[0, 1], [2, -1]], [[3, 4], [5, 0]]], np.int32)
  result = training.train_runs(params0, batch_ids, loss_fn=loss_fn,
                               optimizer_config=_config("adam", 1e-2),
                               train_arrays=train, test_arrays=test,
                               record_grads=True, projection_dim=4, progress=False)
  trace = result.trace
  assert trace.losses.shape == (2, 3, 2) and trace.test_grads.shape == (2, 2, 2, 4)
  # The model's log-probabilities in one program (op by op, each op compiled its own).
  log_probs = np.asarray(jax.jit(lambda p, x: jax.nn.log_softmax(model.apply(p, x)))(
      params0, test["inputs"]))
  expected = -np.sum(np.take_along_axis(log_probs, test["targets"][..., None],
                                        -1)[..., 0] * test["mask"], axis=-1)
  np.testing.assert_allclose(trace.losses[:, 0], np.broadcast_to(expected, (2, 2)),
                             rtol=1e-5)
  assert trace.metadata["optimizer"] == "adam"


def test_weighted_step_keeps_the_valid_count_as_denominator():
  """w·valid·ℓ summed, divided by the number of valid slots (MAGIC's convention)."""
  _, loss_fn, params, train, test = _setup()
  lr = 0.3
  ids = np.array([[[4, 7, 1, -1]]], np.int32)
  weights = np.array([[[2.0, 0.0, 0.5, 9.0]]], np.float32)  # 9 sits on padding
  result = training.train_runs(params, ids, weights=weights, loss_fn=loss_fn,
                               config=_config("sgd", lr), train_arrays=train,
                               test_arrays=test, progress=False)
  batch = jax.tree_util.tree_map(lambda x: x[[4, 7, 1]], train)

  @jax.jit  # the step by hand in one program (op by op, each op compiled its own)
  def reference(params):
    objective = lambda p: jnp.sum(jnp.array([2.0, 0.0, 0.5]) * loss_fn(p, batch)) / 3.0
    train_loss, grads = jax.value_and_grad(objective)(params)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads), train_loss

  expected, train_loss = reference(params)
  _assert_trees_close(jax.tree_util.tree_map(lambda x: x[0], result.params), expected,
                      atol=1e-6)
  np.testing.assert_allclose(result.train_losses[0, 0], train_loss, rtol=1e-6)
  np.testing.assert_allclose(training.effective_weights(ids, NUM_TRAIN)[0, 0, [4, 7, 1]],
                             [1 / 3] * 3, rtol=1e-6)
  np.testing.assert_allclose(training.effective_weights(ids, NUM_TRAIN, weights)[
      0, 0, [4, 7, 1]], [2 / 3, 0.0, 0.5 / 3], rtol=1e-6)
  # An id outside [-1, N) is refused (N counted in the step's denominator and its
  # weight vanished; -2 read as padding).
  for bad in (NUM_TRAIN, -2):
    with pytest.raises(ValueError, match=rf"^batch_ids: ids must be in \[-1, "
                       rf"num_train_examples={NUM_TRAIN}\) .* found {bad}"):
      training.effective_weights(np.full((1, 2), bad), NUM_TRAIN)


def test_weights_none_equals_ones_bit_for_bit_and_bad_weights_are_refused():
  _, loss_fn, params0, train, test = _setup()
  batch_ids = _batch_ids()
  kwargs = dict(loss_fn=loss_fn, config=_config("adam", 0.05), train_arrays=train,
                test_arrays=test, progress=False, record_grads=True, projection_dim=4)
  plain = training.train_runs(params0, batch_ids, **kwargs)
  ones = training.train_runs(params0, batch_ids, weights=np.ones(batch_ids.shape),
                             **kwargs)
  np.testing.assert_array_equal(plain.trace.losses, ones.trace.losses)
  np.testing.assert_array_equal(plain.trace.train_grads, ones.trace.train_grads)
  _assert_trees_close(plain.params, ones.params, atol=0)
  halved = np.ones(batch_ids.shape, np.float32)
  halved[:, 2] = 0.5
  assert not np.allclose(training.train_runs(params0, batch_ids, weights=halved,
                                             **kwargs).trace.losses,
                         plain.trace.losses)
  shape = ", ".join(str(n) for n in batch_ids.shape)
  with pytest.raises(ValueError, match=rf"^train_runs: weights must be float\[{shape}\] "
                                       r"like batch_ids, got float32\["):
    training.train_runs(params0, batch_ids, weights=halved[:, :2], **kwargs)
  halved[1, 3, 0] = np.inf
  with pytest.raises(ValueError, match=r"weights\[1, 3, 0\] = inf"):
    training.train_runs(params0, batch_ids, weights=halved, **kwargs)


class _CNN(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(3, (3, 3))(x))
    return nn.Dense(NUM_CLASSES)(jnp.reshape(x, (x.shape[0], -1)))


def test_cnn_runs_record_grads():
  """Was: NotImplementedError from the conv batching rule (test inputs unbatched)."""
  rng = np.random.default_rng(0)
  make = lambda n: {"inputs": rng.normal(size=(n, 5, 5, 1)).astype(np.float32),
                    "labels": rng.integers(0, NUM_CLASSES, n).astype(np.int32)}
  train, test = make(NUM_TRAIN), make(NUM_TEST)
  model = _CNN()
  params0 = models.init_variables(model, train["inputs"])  # model.init, jitted
  loss_fn = training.make_loss_fn(model, "classification")
  batch_ids = _batch_ids()[:2, :2]
  kwargs = dict(loss_fn=loss_fn, config=_config("sgd", 0.1), train_arrays=train,
                test_arrays=test, progress=False)
  result = training.train_runs(params0, batch_ids, record_grads=True,
                               projection_dim=6, **kwargs)
  plain = training.train_runs(params0, batch_ids, **kwargs)
  np.testing.assert_allclose(result.trace.losses, plain.trace.losses, atol=1e-6)
  key = training.projection_key(0)

  @jax.jit  # one jax.grad per example, in one program per number of examples
  def explicit(rows):
    grads = [jax.grad(lambda p, i=i: loss_fn(p, jax.tree_util.tree_map(
        lambda x: x[i:i + 1], rows))[0])(params0) for i in range(len(rows["labels"]))]
    stacked = jax.tree_util.tree_map(lambda *g: jnp.stack(g), *grads)
    return projection.project_pytree(stacked, key, 6)

  for arrays, recorded, ids in ((test, result.trace.test_grads[1, 0],
                                 np.arange(NUM_TEST)),
                                (train, result.trace.train_grads[1, 0],
                                 batch_ids[1, 0])):
    np.testing.assert_allclose(recorded, explicit(jax.tree_util.tree_map(
        lambda x, i=ids: x[i], arrays)), atol=1e-5, rtol=1e-5)


class _DropoutMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.Dropout(0.5, deterministic=not train)(nn.relu(nn.Dense(8)(x)))
    return nn.Dense(NUM_CLASSES)(x)


def test_dropout_keys_are_per_run_step_and_slot_reproducible_and_resumable(tmp_path):
  _, _, _, train, test = _setup()
  model = _DropoutMLP()
  params0 = models.init_variables(model, train["inputs"])
  loss_fn = training.make_loss_fn(model, "classification", train_kwargs={"train": True})
  batch_ids = _batch_ids()
  seed, lr = 3, 0.2
  kwargs = dict(loss_fn=loss_fn, config=_config("sgd", lr), train_arrays=train,
                test_arrays=test, progress=False, seed=seed)
  one_go = training.train_runs(params0, batch_ids, **kwargs)

  # Step 0 of run 2 by hand: slot b's dropout mask from
  # fold_in(fold_in(fold_in(dropout_key(seed), run), step), slot), eval-mode test loss.
  run, base = 2, training.dropout_key(seed)

  @jax.jit  # the step by hand in one program (op by op, each op compiled its own)
  def expected_test_losses(params):
    keys = [jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, run), 0),
                               b) for b in range(BATCH)]
    def objective(p):
      losses = [loss_fn(p, jax.tree_util.tree_map(lambda x, i=i: x[i:i + 1], train),
                        rng=k)[0] for i, k in zip(batch_ids[run, 0], keys)]
      return sum(losses) / BATCH
    expected = jax.tree_util.tree_map(lambda p, g: p - lr * g, params,
                                      jax.grad(objective)(params))
    return loss_fn(expected, test)

  np.testing.assert_allclose(one_go.trace.losses[run, 1],
                             expected_test_losses(params0), atol=1e-5)
  eval_mode = training.make_loss_fn(model, "classification")
  deterministic = training.train_runs(params0, batch_ids, **dict(kwargs,
                                                                 loss_fn=eval_mode))
  assert np.abs(deterministic.trace.losses[:, 1:] - one_go.trace.losses[:, 1:]).max(
  ) > 1e-3  # dropout is on in training
  np.testing.assert_array_equal(deterministic.trace.losses[:, 0],
                                one_go.trace.losses[:, 0])  # and off in eval

  # Recording gradients, another seed, resuming.
  recorded = training.train_runs(params0, batch_ids, record_grads=True,
                                 projection_dim=4, **kwargs)
  np.testing.assert_allclose(recorded.trace.losses, one_go.trace.losses, atol=1e-5)
  other_seed = training.train_runs(params0, batch_ids, **dict(kwargs, seed=seed + 1))
  assert np.abs(other_seed.trace.losses[:, 1:] - one_go.trace.losses[:, 1:]).max() > 1e-3
  workdir = str(tmp_path / "job")
  training.train_runs(params0, batch_ids, workdir=workdir, max_steps=3,
                      checkpoint_every=3, **kwargs)
  resumed = training.train_runs(params0, batch_ids, workdir=workdir,
                                checkpoint_every=3, **kwargs)
  np.testing.assert_array_equal(resumed.trace.losses, one_go.trace.losses)


class _BatchNormMLP(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.BatchNorm(use_running_average=True)(nn.Dense(6)(x))
    return nn.Dense(NUM_CLASSES)(nn.relu(x))


@functools.lru_cache(maxsize=None)
def _batch_norm_model():
  """model, variables (random running statistics), loss_fn: built once for both
  optimizers (one initialisation, one loss function's programs)."""
  model = _BatchNormMLP()
  variables = models.init_variables(model, _arrays()[0]["inputs"])
  rng = np.random.default_rng(1)
  variables = {"params": variables["params"], "batch_stats": {"BatchNorm_0": {
      "mean": rng.normal(size=6).astype(np.float32),
      "var": rng.uniform(0.5, 2.0, 6).astype(np.float32)}}}
  return model, variables, training.make_loss_fn(model, "classification")


@pytest.mark.parametrize("optimizer,loss_kind,record", [
    ("sgd", "make_loss_fn", False), ("adam", "make_loss_fn", False),
    ("adam", "custom", False), ("sgd", "custom", True)])
def test_batch_stats_pass_through_undifferentiated(optimizer, loss_kind, record):
  # A custom loss applying the whole variables dict trained the running statistics
  # (review h36: moved by 0.05-0.3); every training gradient now holds the
  # collections other than "params" fixed, as make_loss_fn's losses do.
  _, _, _, train, test = _setup()
  model, variables, loss_fn = _batch_norm_model()
  if loss_kind == "custom":
    loss_fn = lambda v, b: losses.classification_loss(model.apply(v, b["inputs"]),
                                                      b["labels"])
  lr = 0.1
  ids = np.array([[[2, 5, 8]]], np.int32)
  result = training.train_runs(variables, ids, loss_fn=loss_fn,
                               config=_config(optimizer, lr), train_arrays=train,
                               test_arrays=test, progress=False, record_grads=record,
                               projection_dim=4)
  final = jax.tree_util.tree_map(lambda x: x[0], result.params)
  _assert_trees_close(final["batch_stats"], variables["batch_stats"], atol=0)
  # The params step: gradient through the frozen running statistics.
  batch = jax.tree_util.tree_map(lambda x: x[[2, 5, 8]], train)
  def objective(params):
    logits = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                         batch["inputs"])
    return jnp.mean(losses.classification_loss(logits, batch["labels"]))
  step = (lambda g: lr * g) if optimizer == "sgd" else (
      lambda g: lr * g / (jnp.abs(g) + 1e-8))  # Adam's first step
  # In one program (op by op, each op compiled its own).
  expected = jax.jit(lambda params: jax.tree_util.tree_map(
      lambda p, g: p - step(g), params, jax.grad(objective)(params)))(
          variables["params"])
  _assert_trees_close(final["params"], expected, atol=1e-5)


def test_other_keys_beside_params_in_a_custom_loss_still_train():
  # Only Flax's state collections are held fixed: an adapter a custom loss adds
  # beside "params" trains (held fixed too, it stopped training: review h37).
  _, loss_fn, params0, train, test = _setup()
  variables = {**params0, "adapter": {"shift": np.zeros(NUM_CLASSES, np.float32)}}

  def custom(v, batch):
    return loss_fn({"params": v["params"]}, batch) + jnp.sum(
        v["adapter"]["shift"] * jnp.arange(NUM_CLASSES)) * jnp.ones(
            jax.tree_util.tree_leaves(batch)[0].shape[0])
  ids = np.array([[[2, 5, 8]]], np.int32)
  result = training.train_runs(variables, ids, loss_fn=custom, config=_config("sgd", 0.1),
                               train_arrays=train, test_arrays=test, progress=False)
  # d(loss)/d(shift) = arange(C) per example, so one SGD step moves it by -0.1·arange.
  np.testing.assert_allclose(result.params["adapter"]["shift"][0],
                             -0.1 * np.arange(NUM_CLASSES), atol=1e-6)


def test_params_training_cannot_differentiate_are_refused():
  from flax import nnx  # pylint: disable=g-import-not-at-top

  class Net(nnx.Module):

    def __init__(self, rngs):
      self.dense, self.norm = nnx.Linear(4, 3, rngs=rngs), nnx.BatchNorm(3, rngs=rngs)

  _, loss_fn, _, train, test = _setup()
  with pytest.raises(ValueError, match="^" + re.escape(
      "train_runs: params0 is an nnx.State holding ['BatchStat'] variables besides "
      "nnx.Param, and every leaf of params0 is trained; pass nnx.state(module, "
      "nnx.Param) and merge the rest inside loss_fn.") + "$"):
    training.train_runs(nnx.state(Net(nnx.Rngs(0))), np.zeros((1, 1, 2), np.int32),
                        loss_fn=loss_fn, config=_config(), train_arrays=train,
                        test_arrays=test, progress=False)
  # Each of these failed deep inside jax or flax (review h36).
  net = Net(nnx.Rngs(0))
  with pytest.raises(ValueError, match="^" + re.escape(
      "train_runs: params0 is an nnx.Module; pass nnx.state(module, nnx.Param) and "
      "merge the module inside loss_fn.") + "$"):
    training.train_runs(net, np.zeros((1, 1, 2), np.int32), loss_fn=loss_fn,
                        config=_config(), train_arrays=train, test_arrays=test,
                        progress=False)
  with pytest.raises(ValueError, match="^" + re.escape(
      "make_loss_fn: model must be a linen module (applied as model.apply(variables, "
      "inputs)), got a Net;")):
    training.make_loss_fn(net, "classification")
  _, _, params0, _, _ = _setup()
  with pytest.raises(ValueError, match="^" + re.escape(
      "train_runs: params0['consts']['order'] has dtype int32, and training "
      "differentiates every leaf of params0 (float only); close over such arrays "
      "in loss_fn.") + "$"):
    training.train_runs({**params0, "consts": {"order": np.arange(3, dtype=np.int32)}},
                        np.zeros((1, 1, 2), np.int32), loss_fn=loss_fn,
                        config=_config(), train_arrays=train, test_arrays=test,
                        progress=False)


def _net_class(activation):
  """A module class named Net: its repr is "Net()" whatever its activation."""
  class Net(nn.Module):  # pylint: disable=redefined-outer-name

    @nn.compact
    def __call__(self, x, train: bool = False):
      hidden = nn.Dense(6)(x)
      if train:
        hidden = hidden * 0.5
      return nn.Dense(NUM_CLASSES)(activation(hidden))
  return Net


@pytest.mark.parametrize("edit", ["activation", "training_path"])
def test_a_workdir_of_a_module_whose_code_changed_is_not_resumed(tmp_path, edit):
  # make_loss_fn described a module by its repr (its fields, not its code): after
  # relu was edited to tanh the call "resumed" the relu runs (review h36).
  _, _, _, train, test = _setup()
  before = _net_class(nn.relu)()
  after = _net_class(nn.tanh if edit == "activation" else nn.relu)()
  params0 = models.init_variables(before, train["inputs"][:1])
  kwargs = dict(train_arrays=train, test_arrays=test, config=_config(),
                progress=False)
  if edit == "training_path":  # the same eval path; training mode differs
    make = lambda m, scale: training.make_loss_fn(
        m, "classification", train_kwargs={"train": scale})
    first, second = make(before, False), make(after, True)
    assert first.description != second.description  # by train_kwargs, so:
    second.description = first.description  # only the computation tells them apart
  else:
    first = training.make_loss_fn(before, "classification")
    second = training.make_loss_fn(after, "classification")
    assert first.description == second.description
  ids = np.array([[[2, 5, 8], [1, 3, 4]]], np.int32)
  workdir = str(tmp_path / "job")
  training.train_runs(params0, ids, loss_fn=first, workdir=workdir, **kwargs)
  with pytest.raises(ValueError, match=re.escape("changed: loss_computation: ")):
    training.train_runs(params0, ids, loss_fn=second, workdir=workdir, **kwargs)


def _losses_one_by_one(loss_fn, params0, batch_ids, train, test, config):
  """Test losses [R, T+1, M] of runs trained one step at a time by `make_train_step`
  with `make_optimizer`'s numbers compiled in: the reference of `train_runs`, whose
  segment takes them as arguments."""
  optimizer, schedule = training.make_optimizer(config, num_steps=batch_ids.shape[1])
  step = jax.jit(training.make_train_step(loss_fn, optimizer, schedule))
  runs = []
  for ids in batch_ids:
    params, opt_state, losses_r = params0, optimizer.init(params0), [loss_fn(params0,
                                                                            test)]
    for t, ids_t in enumerate(ids):
      params, opt_state, test_losses, _ = step(params, opt_state, jnp.int32(t),
                                               jnp.asarray(ids_t), train, test)
      losses_r.append(test_losses)
    runs.append(np.stack(losses_r))
  return np.stack(runs)


@pytest.mark.parametrize("optimizer", ["momentum", "adam"])
def test_bfloat16_params_train_with_momentum_and_adam(optimizer):
  # The optimizer's numbers are float32 arguments: they promoted a bf16 momentum or
  # Adam moment to float32, and the segment's scan refused the carry (review h36).
  _, loss_fn, params0, train, test = _setup()
  params0 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params0)
  batch_ids = _batch_ids()
  config = dict(optimizer=optimizer, learning_rate=0.05, lr_schedule="constant")
  result = training.train_runs(params0, batch_ids, loss_fn=loss_fn, config=config,
                               train_arrays=train, test_arrays=test, progress=False)
  assert {x.dtype for x in jax.tree_util.tree_leaves(result.params)} == {
      np.dtype(jnp.bfloat16)}
  expected = _losses_one_by_one(loss_fn, params0, batch_ids, train, test, config)
  assert np.abs(expected[:, -1] - expected[:, 0]).max() > 0.05  # it trained
  np.testing.assert_allclose(result.trace.losses, expected, atol=0.02, rtol=0.02)


def test_repeated_calls_reuse_the_segment_and_every_setting_is_in_its_key(monkeypatch):
  from simfluence_jax.training import runs as runs_lib  # pylint: disable=g-import-not-at-top
  built, segments = [], []
  make_segment_fn = runs_lib.make_segment_fn

  def counting(*args, **kwargs):
    built.append(1)
    segments.append(make_segment_fn(*args, **kwargs))
    return segments[-1]

  monkeypatch.setattr(runs_lib, "make_segment_fn", counting)
  model, _, params0, train, test = _setup()
  # A loss function of its own: every segment below is built here, none reused.
  loss_fn = training.make_loss_fn(model, "classification")
  batch_ids = _batch_ids(0)

  def train_once(config, seed=0):
    return training.train_runs(params0, batch_ids, loss_fn=loss_fn,
                               optimizer_config=ml_collections.ConfigDict(config),
                               train_arrays=train, test_arrays=test, progress=False,
                               seed=seed).trace.losses

  base = dict(optimizer="momentum", learning_rate=0.1, momentum=0.9,
              lr_schedule="linear", end_learning_rate=0.0)
  first = train_once(base)
  np.testing.assert_array_equal(train_once(base), first)
  assert len(built) == 1  # the second call reused the compiled segment
  compiled = segments[0]._cache_size()  # pylint: disable=protected-access
  # The optimizer's numbers are arguments of the segment: the same program, neither
  # rebuilt nor compiled again, trains with the new value, as a step with the value
  # compiled in does. A stale value would train exactly the first runs again.
  for change in (dict(learning_rate=0.05), dict(momentum=0.5),
                 dict(end_learning_rate=0.05)):
    losses = train_once(dict(base, **change))
    assert np.abs(losses - first).max() > 1e-3, change
    np.testing.assert_allclose(losses, _losses_one_by_one(
        loss_fn, params0, batch_ids, train, test, dict(base, **change)), atol=2e-5)
    assert (len(built), segments[0]._cache_size()) == (1, compiled), change  # pylint: disable=protected-access
  # Every setting that shapes the program: a segment of its own.
  for change in (dict(optimizer="sgd"), dict(lr_schedule="constant"),
                 dict(warmup_steps=2)):
    count = len(built)
    losses = train_once(dict(base, **change))
    assert np.abs(losses - first).max() > 1e-3, change
    np.testing.assert_allclose(losses, _losses_one_by_one(
        loss_fn, params0, batch_ids, train, test, dict(base, **change)), atol=2e-5)
    assert len(built) == count + 1, change
  # The seed (projection and dropout keys; neither used by this model's runs).
  np.testing.assert_array_equal(train_once(base, seed=1), first)
  assert len(built) == 5
