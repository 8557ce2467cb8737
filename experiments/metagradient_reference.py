r"""First-order metagradient predictions around other reference runs (docs/experiments.md).

  python experiments/metagradient_reference.py WORKDIR SEED 0:8,100:8,64:8

Each variant is `reference_batch_size:chunk_size` (0 = full batch). Prints the time of
`training.first_order_losses` for the held-out curricula and their
spearman_across_runs and all_steps_mse / curriculum_blind's.
"""

import sys
import time

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages


def main(workdir, seed, variants):
  config, _, dataset, model, curricula, runs = _workdir.load(workdir, int(seed))
  held, fit = runs.group(curricula, "held_out"), runs.group(curricula, "fit")
  blind = evaluation.all_steps_mse(
      evaluation.curriculum_blind(fit.losses, held.num_runs), held.losses)
  for variant in variants.split(","):
    reference_size, chunk = (int(x) for x in variant.split(":"))
    config.metagradient.reference_batch_size = reference_size
    start = time.perf_counter()
    result = training.first_order_losses(
        model.params, stages._reference_batch_ids(config), held.batch_ids,  # pylint: disable=protected-access
        loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
        test_arrays=dataset.test, chunk_size=chunk, seed=config.seed)
    seconds = time.perf_counter() - start
    pred = np.asarray(result.losses)
    print(variant, f"{seconds:.1f}s",
          "rho", round(float(evaluation.spearman_across_runs(pred, held.losses)), 3),
          "mse_ratio", round(float(evaluation.all_steps_mse(pred, held.losses) / blind),
                             3), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
