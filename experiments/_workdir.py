"""The recorded pieces of a finished `configs/default.py` main job, for experiments."""

import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import workdir as workdir_lib


def load(workdir: str, seed: int, config=None):
  """(config, wd, dataset, model, curricula, runs) of the job's seed `seed`.

  The stages are reused from `workdir` (computed there if missing); `config`
  (default: `configs/default.py` with `seed`) must match the job's for reuse.
  """
  if config is None:
    config = config_lib.load_config("configs/default.py")
    config.seed = seed
  wd = workdir_lib.Workdir(workdir, config)
  dataset = stages.load_data(wd, config)
  model = stages.base_model(wd, config, dataset)
  curricula = stages.make_curricula(config)
  runs = stages.record_runs(wd, config, dataset, model, curricula)
  return config, wd, dataset, model, curricula, runs


def held_out(workdir: str, seed: int, no_padding: bool = False):
  """(config, dataset, model, held-out trace, fitted trace, curriculum_blind's
  all_steps_mse on the held-out runs) of the job's seed `seed`."""
  config, _, dataset, model, curricula, runs = load(workdir, seed)
  held, fit = runs.group(curricula, "held_out"), runs.group(curricula, "fit")
  if no_padding and np.any(held.batch_ids < 0):
    raise ValueError("this script assumes curricula without padding slots")
  blind = evaluation.all_steps_mse(
      evaluation.curriculum_blind(fit.losses, held.num_runs), held.losses)
  return config, dataset, model, held, fit, blind
