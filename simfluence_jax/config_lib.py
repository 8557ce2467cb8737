"""Shared pieces of the `configs/*.py` files (big_vision style `get_config(arg)`).

`base_config()` holds every field with its default and a comment; each file under
`configs/` starts from it and overrides what its workload needs. Variants come from the
config argument: `--config=configs/default.py:tiny` or `:tiny,num_runs=8`.
"""

import importlib.util
import os
from typing import Any

import ml_collections

from simfluence_jax import data


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"tiny,num_runs=8"` into a ConfigDict, with `defaults` for missing keys.

  A bare word sets a boolean flag (`tiny` -> tiny=True); `key=value` is converted to
  the type of the default (bool from "true"/"false", int, float, str).

  Raises:
    ValueError: unknown key or a value that does not convert.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...).")
      result[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        result[key] = value.lower() in ("true", "1")
      else:
        result[key] = type(default)(value)
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r}: expected a "
                       f"{type(default).__name__}.") from e
  return result


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `"configs/default.py:tiny"` the way `--config=` does.

  Raises:
    FileNotFoundError: the config file does not exist.
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
  """Every field of the main job, with its default (the LM fine-tuning workload)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the base model, the curricula and every projection.

  # --- Experiment sizes -----------------------------------------------------------
  config.num_train_examples = 200  # N: the pool of train examples runs draw from.
  config.num_test_examples = 32  # M: test examples whose loss is recorded every step.
  config.subset_size = 128  # Train examples each run draws from the pool.
  config.num_runs = 48  # R: runs the simulators are fitted on.
  config.num_held_out_runs = 16  # Runs only used to evaluate every method.
  config.batch_size = 8  # B: train examples per step.
  config.num_steps = 32  # T: steps per run (subset reshuffled every epoch).

  # --- Data (fields and comments: data.default_data_config) ----------------------
  config.data = data.default_data_config()
  config.data.num_train_examples = config.get_ref("num_train_examples")
  config.data.num_test_examples = config.get_ref("num_test_examples")
  config.data.seed = config.get_ref("seed")

  # --- Model ----------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = "transformer"  # transformer | mlp
  config.model.d_model = 64  # Transformer width.
  config.model.num_layers = 2  # Transformer blocks.
  config.model.num_heads = 4  # Attention heads.
  config.model.d_ff = 256  # MLP hidden width inside a block.
  config.model.hidden_sizes = (64,)  # MLP classifier hidden layers.

  # --- Base model (initialised, briefly pre-trained once, saved with orbax) ---------
  config.pretrain_steps = 300  # Steps of Adam on the task's pre-training split; 0 = none.
  config.pretrain_batch_size = 32
  config.pretrain_learning_rate = 3e-3

  # --- Fine-tuning runs -------------------------------------------------------------
  config.optimizer = "sgd"  # sgd | momentum | adam (SGD makes TracIn's step size exact).
  config.learning_rate = 0.003  # Peak step size (losses are summed over tokens; 0.03 diverges).
  config.lr_schedule = "constant"  # constant | linear (decay to 0).
  config.checkpoint_every = 8  # Steps between orbax checkpoints (resume + TracIn-CP).
  config.record_grads = True  # Record per-step projected gradients (per-step TracIn).
  config.projection_dim = 256  # K: dimension of the recorded gradient projections.

  # --- Simulators -----------------------------------------------------------------
  config.simulators = ml_collections.ConfigDict()
  config.simulators.l2 = 1e-2  # Ridge penalty of Simfluence-Linear / -Additive.
  config.simulators.num_band_samples = 32  # Posterior samples for uncertainty bands.

  # --- Influence kernels --------------------------------------------------------------
  config.influence = ml_collections.ConfigDict()
  config.influence.tracin_num_runs = 4  # Training runs whose checkpoints TracIn-CP uses.
  config.influence.fisher = "empirical"  # empirical | true (labels sampled from the model).
  config.influence.damping = ml_collections.config_dict.placeholder(float)  # None: 0.1 x mean eigenvalue.
  config.influence.chunk_size = 64  # Train examples per gradient chunk (bounds memory).

  # --- Counterfactual curricula (search on each simulator, verify by retraining) -----
  config.counterfactual = ml_collections.ConfigDict()
  config.counterfactual.enabled = True  # Search curricula and really retrain them.
  config.counterfactual.methods = ("simfluence_linear", "simfluence_additive",
                                   "tracin_cp", "ekfac_if")  # Simulators to search on.
  config.counterfactual.num_searched = 4  # Curricula searched and retrained per method.
  config.counterfactual.num_targets = 8  # Targets: test examples whose final loss varies most.
  config.counterfactual.num_iters = 300  # Local-search iterations per curriculum.
  config.counterfactual.num_proposals = 64  # Moves simulated in parallel per iteration.

  # --- Scale-out --------------------------------------------------------------------
  config.distributed = False  # Call jax.distributed.initialize() (multi-host).
  return config


def tfds_task_config(name: str) -> ml_collections.ConfigDict:
  """Fine-tuning the Transformer on a TFDS classification task read through seqio."""
  config = base_config()
  config.data.name = name
  config.data.seq_len = 128  # Prompts are long; truncated in the middle, answer kept.
  config.num_train_examples = 400
  config.num_test_examples = 64
  config.subset_size = 256
  config.num_steps = 64
  config.pretrain_steps = 0
  return config


def apply_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so the whole main job runs in well under a minute on 2 CPUs."""
  config.num_train_examples = min(config.num_train_examples, 48)
  config.num_test_examples = min(config.num_test_examples, 8)
  config.subset_size = min(config.subset_size, 32)
  config.num_runs = 8
  config.num_held_out_runs = 4
  config.batch_size = 4
  config.num_steps = 8
  config.pretrain_steps = 0  # Compiling a pre-training loop costs more than it teaches.
  config.data.num_pretrain_examples = 0
  config.checkpoint_every = 4
  config.projection_dim = 32
  config.simulators.num_band_samples = 8
  config.influence.tracin_num_runs = 2
  config.counterfactual.num_searched = 2
  config.counterfactual.num_targets = 4
  config.counterfactual.num_iters = 100
  if config.model.name == "transformer":
    config.model.d_model = 32
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.d_ff = 64
  return config
