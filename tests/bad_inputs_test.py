"""Bad inputs across the library: each raises a clear error that names the problem."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax import evaluation
from simfluence_jax import influence
from simfluence_jax import simulators

REPO = pathlib.Path(__file__).resolve().parents[1]


def _trace_kwargs(**overrides):
  kwargs = dict(batch_ids=np.zeros((2, 3, 4), np.int32), losses=np.ones((2, 4, 5)),
                learning_rates=np.ones((2, 3)), num_train_examples=3)
  kwargs.update(overrides)
  return kwargs


def _trace():
  rng = np.random.default_rng(0)
  return sj.Trace(**_trace_kwargs(
      batch_ids=rng.integers(-1, 3, (2, 3, 4)).astype(np.int32),
      losses=rng.uniform(0.5, 2.0, (2, 4, 5))))


def _scores_simulator():  # N=3 train, M=5 test examples.
  return simulators.additive_from_scores(np.zeros((3, 5), np.float32))


class _MLP(nn.Module):

  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(nn.tanh(nn.Dense(4)(x)))


@functools.lru_cache(maxsize=None)
def _influence_setup():
  model = _MLP()
  inputs = jax.random.normal(jax.random.key(0), (6, 2))
  batch = {"inputs": inputs, "labels": jnp.arange(6) % 3}
  checkpoints = [model.init(jax.random.key(k), inputs) for k in range(2)]
  return influence.ClassificationTask(model.apply), checkpoints, batch


def _tracin(**kwargs):
  task, checkpoints, batch = _influence_setup()
  arguments = dict(task=task, checkpoints=checkpoints, learning_rates=[0.1, 0.1],
                   query_batch=batch, train_batches=[batch])
  arguments.update(kwargs)
  return influence.tracin_scores(**arguments)


def _fit_ekfac(**kwargs):
  task, checkpoints, batch = _influence_setup()
  return influence.fit_ekfac(task, checkpoints[0], [batch], **kwargs)


def _curricula(**kwargs):
  arguments = dict(num_runs=2, num_train_examples=20, subset_size=10, num_epochs=1,
                   batch_size=4, seed=0)
  arguments.update(kwargs)
  return data.make_curricula(**arguments)


def _dataset_with(**overrides):
  config = config_lib.load_config(str(REPO / "configs/default.py") + ":tiny")
  for key, value in overrides.items():
    config.data[key] = value
  return data.get_dataset(config)


def _simulate(batch_ids, initial_losses):
  return _scores_simulator().simulate(batch_ids, initial_losses)



CASES = [
    # -- simulators ------------------------------------------------------------------
    pytest.param(lambda: simulators.fit("quadratic", _trace()), ValueError,
                 r"kind: expected one of .*'quadratic'", id="fit-unknown-kind"),
    pytest.param(lambda: simulators.fit("linear", _trace(), l2=0.0), ValueError,
                 "l2: expected a positive number, got 0.0", id="fit-l2-zero"),
    pytest.param(lambda: simulators.fit("additive", _trace(), l2=-1.0), ValueError,
                 "l2: expected a positive number", id="fit-l2-negative"),
    pytest.param(lambda: simulators.fit("additive", _trace(), l2=float("nan")),
                 ValueError, "l2: expected a positive number", id="fit-l2-nan"),
    pytest.param(lambda: simulators.fit("additive", _trace(), l2="big"), ValueError,
                 "l2: expected a positive number, got 'big'", id="fit-l2-string"),
    pytest.param(lambda: simulators.fit("additive", _trace(), method="magic"),
                 ValueError, "method: expected one of", id="fit-unknown-method"),
    pytest.param(lambda: simulators.fit("linear", _trace_kwargs()), ValueError,
                 "trace: expected a simfluence_jax.Trace, got dict",
                 id="fit-dict-not-trace"),
    pytest.param(lambda: _simulate(np.zeros((3, 4), np.int32), np.zeros((1, 5))),
                 ValueError, r"batch_ids: expected int\[R', T, B\]",
                 id="simulate-batch-ids-rank-2"),
    pytest.param(lambda: _simulate(np.zeros((1, 3, 4)), np.zeros((1, 5))),
                 ValueError, "batch_ids: expected int.*float64",
                 id="simulate-batch-ids-float"),
    pytest.param(lambda: _simulate(np.full((1, 3, 4), 3), np.zeros((1, 5))),
                 ValueError, r"batch_ids: ids must be in \[-1, 3\)",
                 id="simulate-id-equals-n"),
    pytest.param(lambda: _simulate(np.full((1, 3, 4), -5), np.zeros((1, 5))),
                 ValueError, r"batch_ids: ids must be in \[-1, 3\)",
                 id="simulate-id-below-padding"),
    pytest.param(lambda: _simulate(np.zeros((1, 3, 4), np.int32), np.zeros((1, 4))),
                 ValueError, r"initial_losses: expected shape \(1, 5\), got \(1, 4\)",
                 id="simulate-initial-losses-wrong-m"),
    pytest.param(lambda: _simulate(np.zeros((2, 3, 4), np.int32), np.zeros((1, 5))),
                 ValueError, r"initial_losses: expected shape \(2, 5\)",
                 id="simulate-initial-losses-wrong-r"),
    pytest.param(lambda: _simulate(np.zeros((1, 3, 4), np.int32),
                                   np.full((1, 5), np.inf)),
                 ValueError, "initial_losses: contains NaN or inf",
                 id="simulate-initial-losses-inf"),
    pytest.param(lambda: simulators.additive_from_scores(np.zeros(4)), ValueError,
                 r"B: expected finite float\[N, M\], got shape \(4,\)",
                 id="scores-rank-1"),
    pytest.param(lambda: simulators.additive_from_scores(np.full((2, 2), np.nan)),
                 ValueError, "B: expected finite", id="scores-nan"),
    pytest.param(lambda: _scores_simulator().sample_parameters(2), ValueError,
                 "has no posterior", id="bands-without-posterior"),
    pytest.param(lambda: simulators.fit("additive", _trace()).sample_parameters(0),
                 ValueError, "num_samples: expected a positive integer",
                 id="bands-zero-samples"),
    pytest.param(lambda: simulators.tracin_per_step(_trace()), ValueError,
                 "trace: has no train_grads/test_grads", id="tracin-per-step-no-grads"),
    # -- evaluation ------------------------------------------------------------------
    pytest.param(lambda: evaluation.all_steps_mse(np.zeros((2, 4, 5)),
                                                  np.zeros((2, 4, 6))),
                 ValueError, r"pred: expected shape \(2, 4, 6\)",
                 id="metrics-pred-shape-mismatch"),
    pytest.param(lambda: evaluation.spearman(np.zeros((2, 1, 5)), np.zeros((2, 1, 5))),
                 ValueError, "actual: expected .* T >= 1", id="metrics-no-steps"),
    pytest.param(lambda: evaluation.lds(np.zeros((4, 5)), np.zeros((4, 5))),
                 ValueError, r"actual: expected float\[R', T\+1, M\]",
                 id="metrics-rank-2"),
    pytest.param(lambda: evaluation.evaluate(_scores_simulator(), _trace_kwargs()),
                 ValueError, "held_out_trace: expected a simfluence_jax.Trace",
                 id="evaluate-not-a-trace"),
    # -- influence -------------------------------------------------------------------
    pytest.param(lambda: _fit_ekfac(fisher="bogus"), ValueError,
                 "fisher must be one of .*'bogus'", id="ekfac-fisher-bogus"),
    pytest.param(lambda: _fit_ekfac(fisher="true"), ValueError,
                 "rng is required with fisher='true'", id="ekfac-true-fisher-no-rng"),
    pytest.param(lambda: _tracin(learning_rates=[0.1, 0.1, 0.1]), ValueError,
                 "learning_rates has 3 entries but there are 2 checkpoints",
                 id="tracin-lr-count-mismatch"),
    pytest.param(lambda: _tracin(checkpoints=[], learning_rates=[]), ValueError,
                 "checkpoints is empty", id="tracin-no-checkpoints"),
    # One checkpoint without its list: the dict iterated into its keys before.
    pytest.param(lambda: _tracin(checkpoints=_influence_setup()[1][0],
                                 learning_rates=[0.1]), ValueError,
                 r"^checkpoints: expected a sequence of parameter trees .* got one "
                 r"dict; pass \[params\]", id="tracin-one-checkpoint-unlisted"),
    # A list of query batches where one batch goes: a raw TypeError before.
    pytest.param(lambda: _tracin(query_batch=[_influence_setup()[2]]), ValueError,
                 r"^query_batch: expected one batch, a dict with keys \['inputs', "
                 r"'labels'\], got a list", id="tracin-query-batch-list"),
    pytest.param(lambda: _tracin(query_batch={"inputs": _influence_setup()[2]["inputs"]}),
                 ValueError, r"^query_batch: batch has no \['labels'\]",
                 id="tracin-query-batch-no-labels"),
    pytest.param(lambda: _tracin(projection_dim=4), ValueError,
                 "rng is required when projection_dim is set",
                 id="tracin-projection-without-rng"),
    pytest.param(lambda: _tracin(projection_dim=0, rng=jax.random.key(0)), ValueError,
                 "projection_dim must be a positive integer, got 0",
                 id="tracin-projection-dim-zero"),
    pytest.param(lambda: influence.tracin_self_influence(
        _influence_setup()[0], _influence_setup()[1], [1.0], [_influence_setup()[2]]),
                 ValueError, "learning_rates has 1 entries but there are 2",
                 id="tracin-self-lr-count-mismatch"),
    # -- data ------------------------------------------------------------------------
    pytest.param(lambda: _curricula(num_runs=True), ValueError,
                 "num_runs=True: must be an integer", id="curricula-bool-runs"),
    pytest.param(lambda: _curricula(num_epochs=1.0), ValueError,
                 "num_epochs=1.0: must be an integer", id="curricula-float-epochs"),
    pytest.param(lambda: _curricula(subset_size=21), ValueError,
                 "subset_size=21: must be <= num_train_examples=20",
                 id="curricula-subset-too-big"),
    pytest.param(lambda: _dataset_with(name="imagenet"), ValueError,
                 "config.data.name='imagenet': unknown", id="dataset-unknown-name"),
    # -- config ----------------------------------------------------------------------
    pytest.param(lambda: config_lib.load_config(str(REPO / "configs/missing.py:tiny")),
                 FileNotFoundError, "missing.py.* does not exist",
                 id="config-missing-file"),
    pytest.param(lambda: config_lib.parse_arg("tiny,runs=8", tiny=False), ValueError,
                 "config argument 'runs' is unknown", id="parse-arg-unknown-key"),
    pytest.param(lambda: config_lib.parse_arg("tiny=maybe", tiny=False), ValueError,
                 "tiny='maybe': expected a bool", id="parse-arg-bad-bool"),
    pytest.param(lambda: config_lib.parse_arg("size", size=1), ValueError,
                 "'size' needs a value", id="parse-arg-missing-value"),
    # -- Trace construction (cases not in trace_test.py) -----------------------------
    pytest.param(lambda: sj.Trace(**_trace_kwargs(losses=[["a", "b"]])), ValueError,
                 "Trace.losses", id="trace-string-losses"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(losses=np.ones((2, 4, 0)))),
                 ValueError, r"Trace.losses: expected shape .*M>0", id="trace-zero-m"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(batch_ids=np.zeros((0, 3, 4), int),
                                                  losses=np.ones((0, 4, 5)),
                                                  learning_rates=np.ones((0, 3)))),
                 ValueError, "Trace.batch_ids: every dimension must be non-empty",
                 id="trace-zero-runs"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(num_train_examples=True)),
                 ValueError, "num_train_examples: expected a positive integer",
                 id="trace-bool-num-train"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(
        losses=np.full((2, 4, 5), 1e300))), ValueError,
                 r"^Trace.losses: value 1e\+300 does not fit in float32.$",
                 id="trace-float32-overflow"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(
        batch_ids=np.full((2, 3, 4), 2**32, np.int64))), ValueError,
                 "Trace.batch_ids: value 4294967296 does not fit in int32",
                 id="trace-int64-id-wraps"),
    pytest.param(lambda: sj.Trace(**_trace_kwargs(
        train_grads=np.ones((2, 3, 4, 2)), test_grads=np.ones((2, 3, 5, 3)))),
                 ValueError, "Trace.test_grads: projection dim 3 differs",
                 id="trace-grad-dim-mismatch"),
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("call, error, message", CASES)
def test_bad_input_raises_clear_error(call, error, message):
  with pytest.raises(error, match=message):
    call()


def test_numpy_integers_are_integers():
  """Sizes given as NumPy integers (e.g. read from an array) work like Python ints;
  `isinstance(x, int)` refused np.int64 for these four before."""
  rng = jax.random.key(3)
  np.testing.assert_array_equal(_tracin(projection_dim=np.int64(4), rng=rng),
                                _tracin(projection_dim=4, rng=rng))
  task, checkpoints, batch = _influence_setup()
  factors = _fit_ekfac()
  scores = [influence.ekfac_scores(task, checkpoints[0], factors, batch, [batch],
                                   query_rank=rank) for rank in (1, np.int64(1))]
  np.testing.assert_array_equal(scores[1], scores[0])
  fitted = simulators.fit("additive", _trace())
  draws = [fitted.sample_parameters(n, rng=seed)
           for n, seed in ((2, 5), (np.int64(2), np.int64(5)))]
  jax.tree_util.tree_map(np.testing.assert_array_equal, draws[1], draws[0])
  with pytest.raises(ValueError, match="projection_dim must be a positive integer"):
    _tracin(projection_dim=4.0, rng=rng)


# -- Trace files ---------------------------------------------------------------------

class _Bomb:

  def __reduce__(self):
    return (os.system, ("touch PICKLE_RAN",))


def test_pickled_batch_ids_are_refused_without_running_them(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  _trace().save(tmp_path / "t")
  np.save(tmp_path / "t" / "batch_ids.npy", np.array([_Bomb()], dtype=object),
          allow_pickle=True)
  with pytest.raises(ValueError, match="batch_ids.npy.* not a plain array"):
    sj.Trace.load(tmp_path / "t")
  assert not (tmp_path / "PICKLE_RAN").exists()


@pytest.mark.parametrize("content, error, message", [
    pytest.param(None, ValueError, "trace.json.* is corrupt", id="truncated"),
    pytest.param('{"format_version": 2, "num_train_examples": 3}', ValueError,
                 "unsupported format_version 2", id="future-version"),
    pytest.param('{"format_version": 1, "num_train_examples": "3"}', ValueError,
                 "num_train_examples: expected a positive integer",
                 id="string-num-train"),
    pytest.param('{"format_version": 1}', ValueError,
                 r"trace.json' is corrupt \(no num_train_examples\)", id="missing-num-train"),
    pytest.param("[1]", ValueError, r"trace.json' is corrupt \(expected a JSON object\)",
                 id="json-not-an-object"),
])
def test_bad_trace_json(tmp_path, content, error, message):
  _trace().save(tmp_path / "t")
  meta = tmp_path / "t" / "trace.json"
  if content is None:  # Cut the valid file in half.
    text = meta.read_text()
    json.loads(text)
    content = text[:len(text) // 2]
  meta.write_text(content)
  with pytest.raises(error, match=message):
    sj.Trace.load(tmp_path / "t")


def test_load_of_a_file_not_a_directory(tmp_path):
  (tmp_path / "f").write_text("x")
  with pytest.raises(FileNotFoundError, match="no trace directory"):
    sj.Trace.load(tmp_path / "f")


# -- command line --------------------------------------------------------------------

def test_command_line_negative_learning_rate(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main",
       "--config=configs/default.py:tiny", "--config.learning_rate=-1",
       f"--workdir={tmp_path / 'work'}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert proc.stderr == ("error: config.learning_rate=-1.0: must be a finite positive "
                         "number.\n")
  assert "Traceback" not in proc.stderr
