r"""The metagradient's prediction read in log space, and a per-step offset (docs/experiments.md).

  python experiments/metagradient_log_space.py SEED_WORKDIR SEED

SEED_WORKDIR is one seed's folder of a finished `configs/default.py` job (e.g.
`/tmp/runs/default8/seed_0`). Reads the job's saved held-out predictions
(`evaluation/pred_*.npy`) and computes only the full-batch reference run's losses
(one `training.first_order_losses` call). Prints all_steps_mse / curriculum_blind's,
spearman_across_runs and spearman of: the metagradient as the job reports it (loss
space), read in log space (`config.metagradient.space = "log"`:
L_ref·exp((L̂ − L_ref)/L_ref)), shifted per (step, test example) by the fitted runs'
mean residual (actual minus prediction; the held-out runs' mean prediction stands in
for the fitted runs', both random curricula), and `simfluence_hybrid` with each.
"""

import os
import sys

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages


def main(workdir, seed):
  config, _, dataset, model, curricula, runs = _workdir.load(workdir, int(seed))
  held, fit = runs.group(curricula, "held_out"), runs.group(curricula, "fit")
  pred = lambda name: np.load(os.path.join(workdir, "evaluation", f"pred_{name}.npy"))
  metagradient = pred("metagradient").astype(np.float64)
  linear = pred("simfluence_linear").astype(np.float64)
  reference = np.asarray(training.first_order_losses(
      model.params, stages._reference_batch_ids(config), held.batch_ids[:1],  # pylint: disable=protected-access
      loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
      test_arrays=dataset.test, chunk_size=1, seed=config.seed).reference_losses,
                         np.float64)[None]
  log_space = reference * np.exp(np.clip((metagradient - reference) / reference,
                                         -30.0, 30.0))
  shifted = metagradient + fit.losses.mean(0) - metagradient.mean(0)
  blind = evaluation.all_steps_mse(
      evaluation.curriculum_blind(fit.losses, held.num_runs), held.losses)
  relative = (metagradient - reference) / reference
  print(f"largest relative first-order change {relative.max():.2f}, "
        f"{(relative > 1).mean():.2%} of entries above 1")
  for name, value in (("metagradient", metagradient), ("log space", log_space),
                      ("offset", shifted),
                      ("hybrid", 0.5 * (metagradient + linear)),
                      ("hybrid, log space", 0.5 * (log_space + linear)),
                      ("hybrid, offset", 0.5 * (shifted + linear))):
    print(f"{name:18s} mse_ratio "
          f"{evaluation.all_steps_mse(value, held.losses) / blind:9.3f}  rho "
          f"{evaluation.spearman_across_runs(value, held.losses):.3f}  spearman "
          f"{evaluation.spearman(value, held.losses):.3f}", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
