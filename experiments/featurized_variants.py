r"""Featurized simulators with and without per-example corrections (docs/experiments.md).

  python experiments/featurized_variants.py WORKDIR SEED 32,64

Prints, per variant, (spearman_across_runs, all_steps_mse / curriculum_blind's) on
the held-out runs and on the runs containing unseen train examples. It stores the
features of each dimension in WORKDIR (the `features` stage), so the next main job
there recomputes its own: run it on a copy.
"""

import sys

import numpy as np

import _workdir
from simfluence_jax import evaluation
from simfluence_jax.pipeline import stages


def main(workdir, seed, dims):
  config, wd, dataset, model, curricula, runs = _workdir.load(workdir, int(seed))
  fit = runs.group(curricula, "fit")
  sets = {name: runs.group(curricula, name) for name in ("held_out", "unseen")}

  def score(label, sim):
    out = {}
    for name, held in sets.items():
      pred = np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0],
                                     allow_unfitted_ids=True))
      blind = evaluation.all_steps_mse(
          evaluation.curriculum_blind(fit.losses, held.num_runs), held.losses)
      out[name] = (round(float(evaluation.spearman_across_runs(pred, held.losses)), 3),
                   round(float(evaluation.all_steps_mse(pred, held.losses) / blind), 3))
    print(label, out, flush=True)

  score("linear", stages.fit_ridge(config, "linear", fit))
  for dim in (int(d) for d in dims.split(",")):
    config.simulators.feature_dim = dim
    # A fresh stage record: the features' fingerprint has the new dimension.
    config, wd, dataset, model, _, _ = _workdir.load(workdir, int(seed), config)
    phi = stages.features(wd, config, dataset, model)
    for corrections in (False, True):
      config.simulators.featurized_corrections = corrections
      score(f"featurized F={dim} corrections={corrections}",
            stages.featurized_simulator(config, fit, phi))


if __name__ == "__main__":
  main(*sys.argv[1:])
