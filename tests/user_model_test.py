"""Bring your own model and data: a factory model, a seqio Task, a base checkpoint."""

import os
import re
import sys

import jax
import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import models
from simfluence_jax import pipeline
from simfluence_jax import training

# Every test of this module in one xdist worker (pytest.ini: --dist loadgroup):
# its seqio Task imports TensorFlow (seconds) once, not in both workers.
pytestmark = pytest.mark.xdist_group("user_model_test")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _user_config(checkpoint=""):
  config = config_lib.load_config(os.path.join(REPO, "configs", "default.py:tiny"))
  config.model.factory = "user_project:make_model"
  config.model.checkpoint = checkpoint
  config.data.name = "seqio"
  config.data.seqio_module = "user_project"
  config.data.seqio_task = "user_project_copy_task"
  config.data.seq_len = 24
  config.num_train_examples, config.num_test_examples = 24, 8
  config.subset_size, config.batch_size, config.num_steps = 16, 4, 8
  config.num_runs, config.num_held_out_runs = 6, 3
  config.num_grad_runs = 2
  config.influence.tracin_num_runs = 2
  config.learning_curve = ()
  config.methods = ("curriculum_blind", "simfluence_linear", "tracin_cp", "ekfac_if")
  config.counterfactual.enabled = False
  # Of 24 examples the default 1% and 5% would both remove one.
  config.removal.fractions = (0.05, 0.2)
  return config


@pytest.fixture(scope="module", autouse=True)
def _importable():
  sys.path.insert(0, os.path.join(REPO, "tests", "user_project_pkg"))
  yield
  sys.path.pop(0)


def test_factory_model_and_seqio_task_run_end_to_end(tmp_path):
  config = _user_config()
  result = pipeline.run(config, str(tmp_path / "job"))
  assert np.isfinite(result["simfluence_linear"]["all_steps_mse"])
  assert result["summary"]["dataset"] == "user_project_copy_task"
  assert result["stages"]["record_runs"]["reused"] is False


def test_base_model_from_a_checkpoint_is_fingerprinted_by_its_contents(tmp_path):
  config = _user_config(checkpoint=str(tmp_path / "ckpt"))
  module = models.get_model(config.model, vocab_size=259)
  params = models.init_variables(module, np.zeros((1, 24), np.int32), seed=3)
  training.save_params(str(tmp_path / "ckpt"), params)
  wd = pipeline.Workdir(str(tmp_path / "job"), config)
  dataset = pipeline.stages.load_data(wd, config)
  model = pipeline.stages.base_model(wd, config, dataset)
  for got, want in zip(jax.tree_util.tree_leaves(model.params),
                       jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # Other weights at the same path: the stored base model is stale, and said so.
  training.save_params(str(tmp_path / "ckpt"), jax.tree_util.tree_map(
      lambda x: x + 1.0, params))
  wd = pipeline.Workdir(str(tmp_path / "job"), config)
  dataset = pipeline.stages.load_data(wd, config)
  with pytest.raises(pipeline.StaleWorkdirError, match="checkpoint changed"):
    pipeline.stages.base_model(wd, config, dataset)
  # Pre-training steps asked for with a checkpoint: refused, not ignored (review h36:
  # the base model was the checkpoint, and the stage record said pretrain_steps=50).
  config.pretrain_steps = 50
  with pytest.raises(ValueError, match=re.escape(
      "config.pretrain_steps=50: the base model is config.model.checkpoint, which the "
      "job does not pre-train; set config.pretrain_steps=0.")):
    pipeline.stages.base_model(wd, config, dataset)


def test_a_model_flax_cannot_apply_is_one_error_naming_the_factory(tmp_path):
  # Review h36: a factory model with dropout on by default ended the command line
  # in flax's 50-line traceback.
  config = _user_config()
  config.model.factory = "user_project:make_dropout_model"
  with pytest.raises(ValueError, match="^" + re.escape(
      "config.model: Flax could not apply the model as the job does "
      "(config.model.factory='user_project:make_dropout_model'): ")
                     + r"[^\n]*Dropout[^\n]*\. The job applies it as "
                     r"model.apply\(variables, inputs\), in its default mode[^\n]*$"):
    pipeline.run(config, str(tmp_path / "job"))


def test_bad_factory_is_named():
  config = _user_config()
  config.model.factory = "user_project:nope"
  with pytest.raises(ValueError, match="config.model.factory=.*cannot be imported"):
    models.get_model(config.model, vocab_size=259)
  config.model.factory = "no_colon"
  with pytest.raises(ValueError, match="expected 'package.module:function'"):
    models.get_model(config.model, vocab_size=259)


def test_a_test_split_that_is_the_train_split_is_refused():
  from simfluence_jax import data  # pylint: disable=g-import-not-at-top
  config = _user_config()
  config.data.test_split = config.data.train_split
  with pytest.raises(ValueError, match=(
      r"^config.data.test_split='train': the same split as config.data.train_split")):
    data.get_dataset(config.data)


def test_unknown_seqio_task_is_named(tmp_path):
  config = _user_config()
  config.data.seqio_task = "nope_task"
  with pytest.raises(ValueError, match="config.data.seqio_task='nope_task'"):
    pipeline.run(config, str(tmp_path / "job"))


def _base_model(config, workdir):
  wd = pipeline.Workdir(workdir, config)
  return wd, pipeline.stages.base_model(wd, config, pipeline.stages.load_data(wd, config))


@pytest.mark.parametrize("edit", ["activation", "init"])
def test_a_factory_model_edited_under_the_same_name_is_refused(tmp_path, monkeypatch,
                                                                edit):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import user_project  # pylint: disable=g-import-not-at-top
  config, workdir = _user_config(), str(tmp_path / "job")
  _base_model(config, workdir)
  # The same code again: the stored base model is reused.
  wd, _ = _base_model(config, workdir)
  assert wd.timings["base_model"].reused
  # Same config, same parameter shapes, other computation: the runs of the old
  # model must not be reused.
  if edit == "activation":
    monkeypatch.setattr(user_project, "ACTIVATION", nn.gelu)
  else:
    monkeypatch.setattr(user_project, "KERNEL_INIT", nn.initializers.zeros)
  with pytest.raises(pipeline.StaleWorkdirError,
                     match=r"model.factory computation changed.*--overwrite"):
    _base_model(config, workdir)
  # From a checkpoint, the initialiser no longer shapes anything: not refused.
  if edit == "init":
    monkeypatch.undo()
    config = _user_config(checkpoint=str(tmp_path / "ckpt"))
    module = models.get_model(config.model, vocab_size=259)
    training.save_params(str(tmp_path / "ckpt"), models.init_variables(
        module, np.zeros((1, 24), np.int32), seed=3))
    _base_model(config, str(tmp_path / "from_ckpt"))
    monkeypatch.setattr(user_project, "KERNEL_INIT", nn.initializers.zeros)
    wd, _ = _base_model(config, str(tmp_path / "from_ckpt"))
    assert wd.timings["base_model"].reused


def test_computation_digest_ignores_where_the_code_lives():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import fingerprint  # pylint: disable=g-import-not-at-top

  def make(scale):
    @jax.custom_jvp
    def f(x):
      return jnp.sin(x) * scale
    f.defjvp(lambda p, t: (f(p[0]), jnp.cos(p[0]) * t[0] * scale))
    table = jnp.arange(3.0) * scale
    return lambda x: f(x) + table

  x = jax.ShapeDtypeStruct((3,), jnp.float32)
  # Two function objects (other addresses) computing the same: one digest.
  assert (fingerprint.computation_digest(make(2.0), x) ==
          fingerprint.computation_digest(make(2.0), x))
  # Another closed-over constant, or another input shape: another digest.
  assert (fingerprint.computation_digest(make(2.0), x) !=
          fingerprint.computation_digest(make(3.0), x))
  assert (fingerprint.computation_digest(make(2.0), x) !=
          fingerprint.computation_digest(make(2.0), jax.ShapeDtypeStruct((2, 3), x.dtype)))


def test_factory_digest_traces_the_init_once_and_equals_the_two_trace_digest(
    tmp_path, monkeypatch):
  from simfluence_jax.pipeline import fingerprint  # pylint: disable=g-import-not-at-top
  config = _user_config()
  wd = pipeline.Workdir(str(tmp_path / "job"), config)
  dataset = pipeline.stages.load_data(wd, config)
  module = models.get_model(config.model, vocab_size=dataset.vocab_size)
  loss_fn = training.make_loss_fn(module, dataset.kind)
  example = {k: np.asarray(v[:1]) for k, v in dataset.train.items()}
  key = jax.random.PRNGKey(config.seed)
  # The digest as two separate traces compute it (what workdirs already record).
  params = jax.eval_shape(module.init, key, example["inputs"])
  want = fingerprint.digest([
      fingerprint.computation_digest(loss_fn, params, example),
      fingerprint.computation_digest(module.init, key, example["inputs"])])
  traces = {"init": 0}
  original = type(module).init

  def counting_init(self, *args, **kwargs):
    traces["init"] += 1
    return original(self, *args, **kwargs)

  monkeypatch.setattr(type(module), "init", counting_init)
  got = pipeline.stages._factory_digest(module, loss_fn, dataset, config.seed,  # pylint: disable=protected-access
                                        with_init=True)
  assert got == want
  assert traces["init"] == 1
