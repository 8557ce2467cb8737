r"""How much of a curriculum's effect survives float rounding: a ceiling for every method.

  python experiments/rounding_ceiling.py WORKDIR SEED [CONFIG]

Retrains the held-out curricula of a finished main job (`WORKDIR/seed_<SEED>` of
`CONFIG`, default `configs/default.py`) with the examples of every batch in another
order. The update is the same sum, so the two runs differ only in float rounding (the
order XLA adds the per-example terms in), as between two CPUs. Prints, for the
recorded runs against the reordered ones:

* `spearman_across_runs` between the two: the replicate reliability r. If a run's
  final loss is a function of its curriculum plus a rounding-driven part no predictor
  of the curriculum can know, the best such predictor reaches about √r against either
  replicate (Spearman's correction for attenuation);
* the median |difference| of the final losses against their across-run std;
* when the difference first exceeds 1e-4.

The numbers are in docs/experiments.md ("A ceiling from float rounding").
"""

import sys
import time

import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import evaluation
from simfluence_jax import training

sys.path.insert(0, "experiments")
import _workdir  # pylint: disable=g-import-not-at-top


def main(workdir, seed, config_path="configs/default.py"):
  config = config_lib.load_config(config_path)
  config.seed = int(seed)
  _, _, dataset, model, curricula, runs = _workdir.load(
      f"{workdir}/seed_{seed}", int(seed), config)
  held = runs.group(curricula, "held_out")
  ids = np.asarray(held.batch_ids)  # [R, T, B]
  rng = np.random.default_rng(int(seed))
  order = np.argsort(rng.random(ids.shape), axis=-1)
  shuffled = np.take_along_axis(ids, order, axis=-1)
  start = time.perf_counter()
  again = training.train_runs(
      model.params, ids, loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test, seed=config.seed,
      progress=False)
  reordered = training.train_runs(
      model.params, shuffled, loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test, seed=config.seed,
      progress=False)
  recorded = np.asarray(held.losses)
  same = np.asarray(again.trace.losses)
  other = np.asarray(reordered.trace.losses)
  gap = np.abs(other - recorded)  # [R, T+1, M]
  above = gap.max(axis=(0, 2)) > 1e-4
  first = f"step {np.argmax(above)}" if above.any() else "never"
  r = evaluation.spearman_across_runs(other, recorded)
  print(f"{config_path} seed {seed}, {ids.shape[0]} held-out runs, T={ids.shape[1]}, "
        f"B={ids.shape[2]}: same order reproduces the record to "
        f"{np.abs(same - recorded).max():.1e}; reordered batches: replicate ρ across "
        f"runs {r:.3f} (ceiling √r {np.sqrt(max(r, 0)):.3f}), median |ΔL_T| "
        f"{np.median(gap[:, -1]):.3g} against an across-run std "
        f"{recorded[:, -1].std(0).mean():.3g} (max {gap[:, -1].max():.2g}); max |ΔL_t| "
        f"first > 1e-4: {first} ({time.perf_counter() - start:.0f} s)", flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
