r"""MAGIC's removal benchmark with the full-batch reference's derivatives.

  python experiments/removal_full_batch.py WORKDIR SEED [FRACTION_LABEL]

The `metagradient` row of `removal_lds` differentiates the reference run itself
(fitted run 0; MAGIC's protocol). This script predicts the same removals with the
derivatives the `metagradient` method uses for held-out curricula, those of the
full-batch reference run: change ≈ J_full·(e_removal − e_run0), both curricula
expanded by one jvp each (`training.first_order_losses` with `curricula_weights`),
and prints the LDS of both predictions and of their mean (docs/experiments.md).
"""

import sys
import time

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages


def main(workdir, seed, label="1%"):
  config, wd, dataset, model, curricula, _ = _workdir.load(workdir, int(seed))
  removals = stages.removal_runs(wd, config, dataset, model, curricula)
  weights, actual = removals.weights[label], removals.actual_change[label]
  ids = removals.reference_ids
  start = time.perf_counter()
  result = training.first_order_losses(
      model.params, stages._reference_batch_ids(config),  # pylint: disable=protected-access
      np.repeat(ids[None], len(weights) + 1, 0), loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test,
      curricula_weights=np.concatenate([np.ones((1,) + ids.shape, np.float32), weights]),
      chunk_size=config.metagradient.chunk_size, seed=config.seed)
  seconds = time.perf_counter() - start
  final = np.asarray(result.losses)[:, -1]
  full_batch = final[1:] - final[:1]
  own = np.einsum("stb,tbm->sm", weights - 1.0,
                  np.load(wd.path("arrays", "removal_metagradients.npy")))
  scale = lambda p: float(np.median(np.abs(p)) / np.median(np.abs(actual)))
  for name, pred in (("around run 0 (MAGIC)", own), ("full-batch reference", full_batch),
                     ("mean of the two", 0.5 * (own + full_batch))):
    print(f"seed {seed} {label} {name}: LDS "
          f"{evaluation.removal_lds(pred, actual):.3f}, |predicted| / |actual| "
          f"{scale(pred):.2f}", flush=True)
  print(f"  ({len(weights) + 1} jvps: {seconds:.1f} s)")


if __name__ == "__main__":
  main(*sys.argv[1:])
