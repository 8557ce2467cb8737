r"""Curriculum search on the metagradient table, against the fitted simulators' searches.

  python experiments/counterfactual_table.py WORKDIR SEED

On a finished main job (`configs/default.py`, `WORKDIR/seed_<SEED>`): the
counterfactual stage searched curricula that minimise the final loss of the 8 test
examples whose final loss varies most (`counterfactual.choose_targets`) on each
fitted simulator and retrained them. Here the same search, from the same starting
curricula, runs on the metagradient's first-order prediction around the full-batch
reference: one reverse-mode table of the targets' final losses
(`training.metagradients`, one pass of 8 cotangents), read as a step-dependent
additive simulator (`training.table_simulator`). Its searched curricula are
retrained and compared with the job's (`counterfactual/result.json`). Jobs run since
the metagradient joined the default search hold its row too ("(job)": the stage
searches it with the seed of its place among the methods, this script with the first).

Prints, per method: the actual and simulated improvement over the median random
curriculum, and the searched curricula's actual target losses; and the table's cost.
"""

import sys
import tempfile
import time

import jax
import numpy as np

from simfluence_jax import _io
from simfluence_jax import counterfactual as cf_lib
from simfluence_jax.pipeline import stages

sys.path.insert(0, "experiments")
import _workdir  # pylint: disable=g-import-not-at-top


def main(workdir, seed):
  root = f"{workdir}/seed_{seed}"
  config, _, dataset, model, curricula, runs = _workdir.load(root, int(seed))
  cf = config.counterfactual
  fit, held = runs.group(curricula, "fit"), runs.group(curricula, "held_out")
  targets = cf_lib.choose_targets(fit.losses, cf.num_targets)
  start_ids = stages.counterfactual_starts(config, curricula)
  job = _io.read_json(f"{root}/counterfactual/result.json", "counterfactual")
  assert job["targets"] == targets.tolist(), "another job's targets"

  initial = np.asarray(fit.losses[0, 0], np.float32)
  start = time.perf_counter()
  sim = stages.metagradient_table_simulator(config, dataset, model, targets, initial)
  table_seconds = time.perf_counter() - start
  # The table simulator against the job's jvp predictions of the held-out runs.
  jvp = np.load(f"{root}/arrays/metagradient.npy")[:held.num_runs, -1]
  table_final = np.asarray(sim.simulate(
      held.batch_ids, np.repeat(initial[None], held.num_runs, 0)))[:, -1]
  agreement = np.abs(table_final[:, targets] - jvp[:, targets]).max()

  def retrain(ids):
    with tempfile.TemporaryDirectory() as tmp:
      result, _ = stages._train(config, model, dataset, ids, tmp, False)  # pylint: disable=protected-access
    return result.trace.losses

  start = time.perf_counter()
  result = cf_lib.search_and_verify(
      {"metagradient": sim}, initial_losses=initial, start_batch_ids=start_ids,
      random_batch_ids=held.batch_ids, random_losses=held.losses, targets=targets,
      retrain=retrain, num_iters=cf.num_iters, num_proposals=cf.num_proposals,
      epoch_steps=curricula.steps_per_epoch, seed=config.seed)
  search_seconds = time.perf_counter() - start
  print(f"seed {seed}: table {table_seconds:.1f} s, search and "
        f"retraining {search_seconds:.1f} s; max |table − jvp| on the held-out "
        f"targets {agreement:.2e}; median random {job['random']['median_actual']:.3f}")
  rows = {"metagradient (here)": result["searched"]["metagradient"],
          **{f"{m} (job)": v for m, v in job["searched"].items()}}
  for method, value in rows.items():
    print(f"  {method:26s} actual improvement {value['actual_improvement']:.3f} "
          f"simulated {value['simulated_improvement']:.3f}  actual "
          f"{np.round(value['actual_final'], 3).tolist()}", flush=True)
  jax.clear_caches()


if __name__ == "__main__":
  main(*sys.argv[1:])
