"""Configs load, variants shrink them, bad values are named."""

import dataclasses
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from simfluence_jax import config_lib
from simfluence_jax import pipeline
from simfluence_jax.pipeline import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def load(name, arg=None):
  return config_lib.load_config(f"{CONFIGS / name}.py" + (f":{arg}" if arg else ""))


@pytest.mark.parametrize("name", ["default", "digits_mlp", "glue_rte",
                                  "super_glue_copa"])
@pytest.mark.parametrize("arg", [None, "tiny"])
def test_every_config_is_valid(name, arg):
  config = load(name, arg)
  pipeline.validate_config(config)
  assert config.data.num_train_examples == config.num_train_examples


def test_tiny_shrinks_and_overrides_propagate():
  default, tiny = load("default"), load("default", "tiny")
  assert tiny.num_runs < default.num_runs and tiny.num_steps < default.num_steps
  tiny.num_train_examples = 40  # what --config.num_train_examples=40 does
  assert tiny.data.num_train_examples == 40


def test_load_config_missing_file():
  with pytest.raises(FileNotFoundError, match="nope.py"):
    config_lib.load_config("configs/nope.py:tiny")


def test_parse_arg():
  args = config_lib.parse_arg("tiny,size=3", tiny=False, size=1, name="a")
  assert args.tiny is True and args.size == 3 and args.name == "a"
  with pytest.raises(ValueError, match="'bogus' is unknown"):
    config_lib.parse_arg("bogus", tiny=False)
  with pytest.raises(ValueError, match="size='x': expected a int"):
    config_lib.parse_arg("size=x", size=1)


@pytest.mark.parametrize("field, value, message", [
    ("num_runs", 0, "config.num_runs=0: must be a positive integer"),
    ("batch_size", -1, "config.batch_size=-1"),
    ("learning_rate", 0.0, "config.learning_rate=0.0: must be a finite positive number"),
    ("subset_size", 1000, "config.subset_size=1000: larger than"),
    ("num_held_out_runs", 9, "config.num_held_out_runs=9: more held-out runs"),
    ("mesh_model", 0, "config.mesh_model=0: must be a positive integer"),
    ("warmup_steps", -1, "config.warmup_steps=-1: must be a non-negative integer"),
])
def test_bad_config_values_are_named(field, value, message):
  config = load("default", "tiny")
  config[field] = value
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)


@pytest.mark.parametrize("fractions, message", [
    ((0.01, 1.0), r"each must be in \(0, 1\)"),
    ((0.0,), r"each must be in \(0, 1\)"),
    # :tiny has N = 48: 1% and 2% both remove 1 example.
    ((0.01, 0.02), r"0.01 and 0.02 both remove 1 of the num_train_examples=48"),
])
def test_removal_fractions_must_remove_distinct_counts(fractions, message):
  config = load("default", "tiny")
  assert config.num_train_examples == 48
  config.removal.fractions = fractions
  with pytest.raises(ValueError, match=rf"^config.removal.fractions=.*{message}"):
    pipeline.validate_config(config)
  config.removal.enabled = False  # not read then
  pipeline.validate_config(config)


def test_an_empty_l2_grid_is_refused_before_any_stage_only_when_it_is_read():
  config = load("default", "tiny")
  config.simulators.l2_grid = ()
  config.simulators.l2 = None  # cross-validation over the grid (11 stages ran first)
  with pytest.raises(ValueError, match=r"^config.simulators.l2_grid=\(\): empty"):
    pipeline.validate_config(config)
  config.simulators.l2 = 1.0  # the grid is not read
  pipeline.validate_config(config)


@pytest.mark.parametrize("optimizer, field, value, message", [
    ("momentum", "momentum", 1.0, r"config.momentum=1.0: must be in \[0, 1\)"),
    ("adam", "eps", -1e-8, "config.eps=-1e-08: must be a finite positive number"),
    ("adam", "b2", 1.0, r"config.b2=1.0: must be in \[0, 1\)"),
])
def test_bad_numbers_of_the_chosen_optimizer_are_named(optimizer, field, value,
                                                        message):
  config = load("default", "tiny")
  config[field] = value
  pipeline.validate_config(config)  # plain SGD reads none of them
  config.optimizer = optimizer
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)


def test_a_model_axis_that_does_not_divide_the_devices_is_refused():
  config = load("default", "tiny")
  config.mesh_model = 3
  with pytest.raises(ValueError, match="config.mesh_model=3: must divide the job's "
                     "8 devices"):
    config_lib.mesh_model_sizes(config, 8)
  config.mesh_model = 2
  assert config_lib.mesh_model_sizes(config, 8) == (2, 2)
  config.influence.mesh_model = 8
  assert config_lib.mesh_model_sizes(config, 8) == (2, 8)
  # On one device too: the score kernels' axis is checked, not skipped.
  with pytest.raises(ValueError, match="config.influence.mesh_model=8: must divide "
                     "the job's 1 devices"):
    config_lib.mesh_model_sizes(dict_config(config, mesh_model=1), 1)
  config.mesh_model = jax.device_count() + 1
  with pytest.raises(ValueError, match=f"config.mesh_model={config.mesh_model}"):
    stages._runs_mesh(config)  # pylint: disable=protected-access


def dict_config(config, **overrides):
  config = config.copy_and_resolve_references()
  config.update(overrides)
  return config


def test_score_model_axis_is_validated():
  config = load("default", "tiny")
  config.influence.mesh_model = 0
  with pytest.raises(ValueError, match="config.influence.mesh_model=0: must be a "
                     "positive integer"):
    pipeline.validate_config(config)


def test_counterfactual_methods_are_validated():
  config = load("default", "tiny")
  for bad in ("curriculum_blind", "simfluence_hybrid", "ekfac"):
    config.counterfactual.methods = ("simfluence_linear", bad)
    with pytest.raises(ValueError, match=rf"counterfactual.methods: \['{bad}'\] cannot"):
      pipeline.validate_config(config)
  # The metagradient's table needs every example at every reference step.
  config.counterfactual.methods = ("metagradient",)
  config.metagradient.reference_batch_size = 16
  with pytest.raises(ValueError, match="reference_batch_size=16: the counterfactual "
                     "search on the metagradient needs the full-batch reference"):
    pipeline.validate_config(config)
  config.counterfactual.enabled = False
  pipeline.validate_config(config)


def _set_fields(config, overrides):
  """Sets dotted fields of `config`: {"section.field": value}."""
  for name, value in overrides.items():
    section = config
    *parents, leaf = name.split(".")
    for part in parents:
      section = section[part]
    section[leaf] = value


@pytest.mark.parametrize("overrides, message", [
    ({"counterfactual.num_searched": 0},
     r"^config.counterfactual.num_searched=0: must be a positive integer"),
    ({"counterfactual.num_targets": 0}, r"^config.counterfactual.num_targets=0"),
    ({"counterfactual.num_iters": 0}, r"^config.counterfactual.num_iters=0"),
    ({"counterfactual.num_proposals": -1}, r"^config.counterfactual.num_proposals=-1"),
    ({"counterfactual.num_targets": 10 ** 6},
     r"^config.counterfactual.num_targets=1000000: more than the "
     r"config.num_test_examples="),
    ({"counterfactual.methods": ("metagradient",), "subset_size": 30},
     r"^config.subset_size=30: the counterfactual search on the metagradient needs "
     r"whole batches"),
    ({"record_grads": False}, r"^config.methods: tracin_per_step needs recorded "
     r"gradients \(config.record_grads=False"),
    ({"num_grad_runs": 0}, r"^config.methods: tracin_per_step needs recorded "
     r"gradients \(config.record_grads=True, config.num_grad_runs=0\)"),
])
def test_settings_refused_before_anything_runs(overrides, message):
  # Each was accepted and then failed after every run was trained (the search's
  # sizes, the metagradient table's whole batches) or left its method out of every
  # output (tracin_per_step without recorded gradients).
  config = load("default", "tiny")
  config.counterfactual.enabled = True
  config.methods = tuple(dict.fromkeys(config.methods + ("tracin_per_step",
                                                         "metagradient")))
  pipeline.validate_config(config)
  _set_fields(config, overrides)
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)
  if "record_grads" in overrides or "num_grad_runs" in overrides:
    config.methods = tuple(m for m in config.methods if m != "tracin_per_step")
  else:
    config.counterfactual.enabled = False
  pipeline.validate_config(config)


@pytest.mark.parametrize("overrides, message", [
    # JAX keeps a seed's low 32 bits: 2**32 trained seed 0's model, bit for bit.
    ({"seed": 2 ** 32}, r"^config.seed=4294967296: seeds up to"),
    ({"seed": 2 ** 32 - 1, "num_seeds": 2}, r"^config.seed=4294967295: seeds up to "
     r"seed \+ num_seeds - 1 = 4294967296"),
    ({"seed": 2 ** 64}, r"^config.seed=18446744073709551616"),  # was OverflowError
    # Clamped to num_runs without a word (metrics.json recorded the value asked).
    ({"simulators.l2": None, "simulators.cv_folds": 100},
     r"^config.simulators.cv_folds=100: cross-validation over runs needs 2 to "
     r"config.num_runs=8 folds"),
    ({"simulators.l2": None, "simulators.cv_folds": 1},
     r"^config.simulators.cv_folds=1"),
    ({"simulators.num_phases": 100}, r"^config.simulators.num_phases=100: more "
     r"phases than the config.num_steps=8"),
    # The learning rate never got above 4.9e-5 of the 7e-4 asked.
    ({"warmup_steps": 100}, r"^config.warmup_steps=100: more than the "
     r"config.num_steps=8"),
    ({"pretrain_learning_rate": -0.003},
     r"^config.pretrain_learning_rate=-0.003: must be a finite positive number"),
    # Withheld from every fitted run and never evaluated.
    ({"unseen.num_runs": 0}, r"^config.unseen.num_examples=\d+ with "
     r"config.unseen.num_runs=0"),
    # These failed after every run was trained, naming no field.
    ({"metagradient.chunk_size": 0}, r"^config.metagradient.chunk_size=0"),
    ({"metagradient.reference_batch_size": -4},
     r"^config.metagradient.reference_batch_size=-4"),
    ({"removal.num_removals": 0}, r"^config.removal.num_removals=0"),
    ({"removal.fractions": (0.9,)}, r"^config.removal.fractions=\(0.9,\): 0.9 of "
     r"num_train_examples=\d+ removes \d+ examples, more than the reference run's "
     r"config.subset_size="),
    ({"simulators.l2": None, "simulators.l2_grid": (1.0, float("inf"))},
     r"^config.simulators.l2_grid=\(1.0, inf\): must be finite positive"),
    # Nothing searched, or no removal set, and no word of it.
    ({"counterfactual.enabled": True, "counterfactual.methods": ()},
     r"^config.counterfactual.methods=\(\): nothing to search"),
    ({"removal.fractions": ()}, r"^config.removal.fractions=\(\): no removal set"),
    # It failed in base_model, telling the MLP it "needs num_classes".
    ({"model.name": "mlp"}, r"^config.model.name='mlp': config.data.name="
     r"'synthetic_facts' is data for model.name='transformer'"),
])
def test_values_that_ran_as_another_setting_are_refused(overrides, message):
  """Review h28: each was clamped, ignored, or refused only after training."""
  config = load("default", "tiny")
  assert config.removal.enabled and config.unseen.num_examples
  pipeline.validate_config(config)
  _set_fields(config, overrides)
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)


def test_compilation_cache_follows_jax_settings_in_the_environment(monkeypatch):
  min_time = "jax_persistent_cache_min_compile_time_secs"
  saved = {name: getattr(jax.config, name) for name in (
      "jax_compilation_cache_dir", min_time, "jax_persistent_cache_min_entry_size_bytes")}
  try:
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere/xla")
    monkeypatch.setenv(min_time.upper(), "0")
    config = load("default")
    assert config.compilation_cache_dir == "/somewhere/xla"
    jax.config.update(min_time, 0.0)
    config.compilation_cache_dir = "gs://bucket/xla"  # remote: no directory made
    pipeline.enable_compilation_cache(config)
    assert jax.config.jax_compilation_cache_dir == "gs://bucket/xla"
    assert getattr(jax.config, min_time) == 0.0  # the environment's setting stays
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    monkeypatch.delenv(min_time.upper())
    config = load("default")
    assert config.compilation_cache_dir == config_lib.DEFAULT_COMPILATION_CACHE_DIR
    config.compilation_cache_dir = "gs://bucket/xla"
    pipeline.enable_compilation_cache(config)
    assert getattr(jax.config, min_time) == 0.5  # the job's default
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)


def test_a_compilation_cache_dir_that_is_a_file_is_one_line_naming_the_field(tmp_path):
  """Review h28: the job ended in a FileExistsError traceback."""
  path = tmp_path / "a_file"
  path.write_text("")
  proc = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.main", "--config=configs/default.py:tiny",
       f"--workdir={tmp_path / 'job'}", f"--config.compilation_cache_dir={path}"],
      cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip() == (f"error: config.compilation_cache_dir='{path}': a "
                                 "file, not a directory."), proc.stderr[-2000:]


def test_tiny_compiles_with_most_optimizations_off_only_while_it_runs(monkeypatch):
  from jax._src import compiler  # pylint: disable=g-import-not-at-top
  from simfluence_jax.pipeline import experiment  # pylint: disable=g-import-not-at-top

  def expensive_passes_off():
    options = compiler.get_compile_options(num_replicas=1, num_partitions=1)
    return options.executable_build_options.debug_options.xla_llvm_disable_expensive_passes

  assert load("default").compile_optimizations
  tiny = load("default", "tiny")
  assert not tiny.compile_optimizations
  seen = []
  monkeypatch.setattr(experiment, "_run", lambda *args: seen.append(
      expensive_passes_off()) or {"done": True})
  assert not expensive_passes_off()
  assert pipeline.run(tiny, "/nonexistent") == {"done": True}
  assert pipeline.run(load("default"), "/nonexistent") == {"done": True}
  assert seen == [True, False]  # what each job's programs compiled with
  assert not expensive_passes_off()  # restored after the tiny job
  monkeypatch.setattr(experiment, "_run", lambda *args: 1 / 0)
  with pytest.raises(ZeroDivisionError):
    pipeline.run(tiny, "/nonexistent")
  assert not expensive_passes_off()  # and after one that failed


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.py")))
def test_every_config_refuses_an_unknown_argument(name):
  # scale_8b.py threw its argument away: `:tiny` gave the 8B job without a word.
  with pytest.raises(ValueError, match="config argument 'bogus' is unknown"):
    load(name, "bogus")


@pytest.mark.parametrize("field, message", [
    ("num_step", r"^config.num_step: not a field of the main job \(a typo\?\)"),
    ("simulators.l2grid", r"^config.simulators.l2grid: not a field"),
])
def test_a_config_files_unknown_field_is_refused(field, message):
  # The command line refuses unknown fields; a config file's typo kept the default.
  config = load("default", "tiny")
  pipeline.validate_config(config)
  section, *rest = field.split(".")
  with config.unlocked():
    if rest:
      config[section][rest[0]] = 1.0
    else:
      config[section] = 64
  with pytest.raises(ValueError, match=message):
    pipeline.validate_config(config)


def test_data_sizes_untied_from_the_config_are_refused():
  # A config file rebuilding config.data (as default_data_config invites) untied
  # them: runs drew ids 0..47 of a 200-example dataset, the rest never trained.
  from simfluence_jax import data  # pylint: disable=g-import-not-at-top
  config = load("default", "tiny")
  config.data = data.default_data_config()
  config.data.num_pretrain_examples = 0
  config.data.seed = config.seed = 3
  with pytest.raises(ValueError, match=r"^config.data.num_train_examples=200: must "
                     r"equal config.num_train_examples=48"):
    pipeline.validate_config(config)
  config.data.num_train_examples, config.data.num_test_examples = 48, 8
  pipeline.validate_config(config)
  config.data.seed = 4
  with pytest.raises(ValueError, match=r"^config.data.seed=4: must equal "
                     r"config.seed=3"):
    pipeline.validate_config(config)


@pytest.mark.parametrize("flag", ["--config.data.seed=5", "--config.data.num_train_examples",
                                  "--config.data.num_test_examples=4"])
def test_a_flag_of_a_tied_data_field_is_refused(flag, capsys):
  # `--config.seed=1 --config.data.seed=5` set both to 5 (one field), and
  # `--config.data.seed` alone reseeded the model and the curricula too.
  from simfluence_jax import main  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit) as exit_:
    main.parse_flags(["main", "--config=configs/default.py:tiny", "--config.seed=1",
                      flag, "--workdir=/tmp/unused"])
  assert exit_.value.code == 2
  name = flag.split("=")[0]
  assert capsys.readouterr().err == (
      f"error: {name} is the same field as {name.replace('.data', '')} (it follows "
      f"it); set {name.replace('.data', '')} instead.\n")


def test_the_dataset_must_be_what_the_config_says():
  from simfluence_jax import data  # pylint: disable=g-import-not-at-top
  config = load("default", "tiny")
  dataset = data.get_dataset(config)
  # The model is built with the dataset's vocabulary: a config saying another one
  # (which the plan sizes the job by) is refused, the same one accepted.
  with config.unlocked():
    config.model.vocab_size = dataset.vocab_size + 5
  with pytest.raises(ValueError, match=rf"^config.model.vocab_size="
                     rf"{dataset.vocab_size + 5}: the model is built with the "
                     rf"dataset's vocabulary size, {dataset.vocab_size}"):
    stages.base_model(None, config, dataset)
  config.model.vocab_size = dataset.vocab_size
  # Review h28: max_len (and an MLP's num_classes) were ignored, the value asked
  # recorded in the results.
  with config.unlocked():
    config.model.max_len = config.data.seq_len // 2
  with pytest.raises(ValueError, match=rf"^config.model.max_len="
                     rf"{config.data.seq_len // 2}: the model is built with "
                     rf"config.data.seq_len, {config.data.seq_len}"):
    stages.base_model(None, config, dataset)
  config.model.max_len = None
  digits = load("digits_mlp", "tiny")
  digits_data = data.get_dataset(digits)
  with digits.unlocked():
    digits.model.num_classes = 3
  with pytest.raises(ValueError, match=r"^config.model.num_classes=3: the model is "
                     r"built with the dataset's number of classes, 10"):
    stages.base_model(None, digits, digits_data)
  # Pre-training steps with no pre-training split trained nothing, without a word.
  config.pretrain_steps = 5
  assert dataset.pretrain is None
  with pytest.raises(ValueError, match=r"^config.pretrain_steps=5: the "
                     r"'synthetic_facts' data has no pre-training split"):
    stages.base_model(None, config, dataset)
  # A dataset of other sizes than the config's (a source's own sizes).
  smaller = dataclasses.replace(dataset, train={
      k: v[:40] for k, v in dataset.train.items()})
  with pytest.raises(ValueError, match=r"^config.num_train_examples=48: the dataset "
                     r"has 40"):
    stages.check_dataset_sizes(config, smaller)
  stages.check_dataset_sizes(config, dataset)


def test_a_data_field_the_source_ignores_is_refused_before_anything_runs():
  # `data.get_dataset` refuses it too, but only once the data stage runs.
  config = load("default", "tiny")
  config.data.seqio_task = "my_task"
  with pytest.raises(ValueError, match=r"^config.data.seqio_task='my_task': only read "
                     r"by config.data.name='seqio'"):
    pipeline.validate_config(config)
