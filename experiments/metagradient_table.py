r"""The metagradient's two routes on a finished main job: jvps against one table.

  python experiments/metagradient_table.py WORKDIR SEED [NUM_CURRICULA]

`training.first_order_final_losses` predicts curricula's final test losses to first
order around the main job's reference run (full batch) either by one forward-mode
pass per curriculum ("jvp", what the `metagradient` method does for whole
trajectories) or from the reference run's reverse-mode metagradient table ("table":
⌈M/8⌉ reverse passes once, then a gather-sum per curriculum). Prints the time of
each route on the job's first NUM_CURRICULA (default 8) held-out curricula, their
largest difference, and the break-even number of curricula; the numbers calibrate
`metagradients.choose_route` (docs/experiments.md).
"""

import sys
import time

import numpy as np

from simfluence_jax import training
from simfluence_jax.pipeline import stages

sys.path.insert(0, "experiments")
import _workdir  # pylint: disable=g-import-not-at-top


def main(workdir, seed, num_curricula="8"):
  config, _, dataset, model, curricula, _ = _workdir.load(f"{workdir}/seed_{seed}",
                                                          int(seed))
  reference = stages._reference_batch_ids(config)  # pylint: disable=protected-access
  chosen = curricula.held_out[:int(num_curricula)]
  kwargs = dict(loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
                test_arrays=dataset.test, seed=config.seed)
  times, results = {}, {}
  for route in ("jvp", "table", "jvp", "table"):  # the second calls are warm
    start = time.perf_counter()
    results[route] = training.first_order_final_losses(
        model.params, reference, chosen, route=route,
        chunk_size=config.metagradient.chunk_size,
        cotangents_at_once=config.metagradient.cotangents_at_once, **kwargs)
    times.setdefault(route, []).append(time.perf_counter() - start)
  jvp, table = results["jvp"], results["table"]
  change = np.abs(jvp.losses - jvp.reference_losses).max()
  per_curriculum = times["jvp"][1] / len(chosen)
  print(f"seed {seed}: {len(chosen)} curricula, reference S={reference.shape[1]}, "
        f"T={reference.shape[0]}, M={jvp.losses.shape[1]}; jvp route "
        f"{times['jvp'][0]:.1f} s cold / {times['jvp'][1]:.1f} s warm "
        f"({per_curriculum:.2f} s per curriculum); table route {times['table'][0]:.1f}"
        f" s cold / {times['table'][1]:.1f} s warm; max |table − jvp| "
        f"{np.abs(table.losses - jvp.losses).max():.2e} (largest predicted change "
        f"{change:.3f}); break-even at {times['table'][1] / per_curriculum:.1f} "
        f"curricula", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
