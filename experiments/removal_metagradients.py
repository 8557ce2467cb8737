r"""Reverse-mode metagradients of the removal reference run (docs/experiments.md).

  python experiments/removal_metagradients.py WORKDIR SEED 1,8,32

Times `training.metagradients` of fitted run 0 with k test examples per reverse pass
and prints the largest difference to the k = first table.
"""

import sys
import time

import numpy as np

import _workdir
from simfluence_jax import training


def main(workdir, seed, counts):
  config, _, dataset, model, curricula, _ = _workdir.load(workdir, int(seed))
  first = None
  for k in (int(x) for x in counts.split(",")):
    start = time.perf_counter()
    table = training.metagradients(
        model.params, curricula.fit[0][None], loss_fn=model.loss_fn, config=config,
        train_arrays=dataset.train, test_arrays=dataset.test, cotangents_at_once=k)[0]
    seconds = time.perf_counter() - start
    first = table if first is None else first
    print(k, f"{seconds:.1f}s", "max difference", float(np.abs(table - first).max()),
          "scale", float(np.abs(first).max()), flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
