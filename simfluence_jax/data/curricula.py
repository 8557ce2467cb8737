"""Curricula: which train examples each run sees, in which order.

Runs differ only in their curriculum. Each run trains on a random subset of the N
train examples, reshuffled every epoch; the subsets give the counterfactuals ("what
if example i had not been there?") that simulators and the LDS need.

Run r's curriculum is drawn from `np.random.default_rng([seed, first_run + r])`, so it
depends on its own run index only: adding runs never changes earlier ones, and
held-out runs are simply runs with other indices (e.g. `first_run=num_train_runs`).
"""

import math

import numpy as np

PADDING_ID = -1


def _check_int(name: str, value, minimum: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"make_curricula: {name}={value!r}: must be an integer.")
  if value < minimum:
    raise ValueError(f"make_curricula: {name}={value!r}: must be >= {minimum}.")
  return int(value)


def steps_per_epoch(subset_size: int, batch_size: int) -> int:
  """Number of batches per epoch; the last one may be partial (padded with -1)."""
  return math.ceil(subset_size / batch_size)


def make_curricula(num_runs: int,
                   num_train_examples: int,
                   subset_size: int,
                   num_epochs: int,
                   batch_size: int,
                   seed: int,
                   first_run: int = 0) -> np.ndarray:
  """Draws the batch ids of `num_runs` training runs.

  Each run draws `subset_size` distinct ids out of `[0, num_train_examples)` and
  visits them in a fresh random order every epoch. An epoch is
  `ceil(subset_size / batch_size)` batches; the tail of its last batch is padded
  with -1 so that no batch mixes two epochs.

  Args:
    num_runs: R, the number of runs to draw.
    num_train_examples: N, the number of train examples.
    subset_size: how many train examples each run trains on (<= N).
    num_epochs: passes over the run's subset.
    batch_size: B, examples per step.
    seed: non-negative base seed shared by all runs.
    first_run: index of the first run; run r of the result is run `first_run + r`.

  Returns:
    batch_ids: int32[R, T, B] with T = num_epochs * ceil(subset_size / batch_size),
      -1 = padding.

  Raises:
    ValueError: naming the argument, if one is not a valid integer or
      `subset_size > num_train_examples`.
  """
  num_runs = _check_int("num_runs", num_runs, 1)
  num_train_examples = _check_int("num_train_examples", num_train_examples, 1)
  subset_size = _check_int("subset_size", subset_size, 1)
  num_epochs = _check_int("num_epochs", num_epochs, 1)
  batch_size = _check_int("batch_size", batch_size, 1)
  seed = _check_int("seed", seed, 0)
  first_run = _check_int("first_run", first_run, 0)
  if subset_size > num_train_examples:
    raise ValueError(f"make_curricula: subset_size={subset_size}: must be <= "
                     f"num_train_examples={num_train_examples}.")

  num_batches = steps_per_epoch(subset_size, batch_size)
  batch_ids = np.full((num_runs, num_epochs * num_batches, batch_size), PADDING_ID,
                      dtype=np.int32)
  epoch_ids = np.full(num_batches * batch_size, PADDING_ID, dtype=np.int32)
  for run in range(num_runs):
    rng = np.random.default_rng([seed, first_run + run])
    subset = rng.choice(num_train_examples, size=subset_size, replace=False)
    for epoch in range(num_epochs):
      epoch_ids[:subset_size] = rng.permutation(subset)
      batch_ids[run, epoch * num_batches:(epoch + 1) * num_batches] = (
          epoch_ids.reshape(num_batches, batch_size))
  return batch_ids
