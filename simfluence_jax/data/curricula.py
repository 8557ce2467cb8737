"""Curricula: which train examples each run sees, in which order.

Runs differ only in their curriculum. Each run trains on a random subset of the N
train examples, reshuffled every epoch; the subsets give the counterfactuals ("what
if example i had not been there?") that simulators and the LDS need.

Run r's curriculum is drawn from `np.random.default_rng([seed, first_run + r])`, so it
depends on its own run index only: adding runs never changes earlier ones, and
held-out runs are simply runs with other indices (e.g. `first_run=num_train_runs`).
"""

import json
import math
import os

import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _io

PADDING_ID = -1


def _check_int(name: str, value, minimum: int) -> int:
  if not _checks.is_int(value):
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
                   first_run: int = 0,
                   pool=None) -> np.ndarray:
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
    pool: the ids subsets are drawn from (int[P], distinct, in `[0, N)`); None = all
      N ids. The main job keeps some train examples out of every fitted run this
      way, to score simulators on examples no fitted run saw.

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
  if pool is not None:
    pool = np.asarray(pool)
    if (pool.ndim != 1 or not np.issubdtype(pool.dtype, np.integer)
        or len(np.unique(pool)) != len(pool) or pool.min(initial=0) < 0
        or pool.max(initial=0) >= num_train_examples):
      raise ValueError("make_curricula: pool must be distinct integer ids in "
                       f"[0, {num_train_examples}).")
    if subset_size > len(pool):
      raise ValueError(f"make_curricula: subset_size={subset_size}: must be <= the "
                       f"{len(pool)} ids of the pool.")

  num_batches = steps_per_epoch(subset_size, batch_size)
  batch_ids = np.full((num_runs, num_epochs * num_batches, batch_size), PADDING_ID,
                      dtype=np.int32)
  epoch_ids = np.full(num_batches * batch_size, PADDING_ID, dtype=np.int32)
  for run in range(num_runs):
    rng = np.random.default_rng([seed, first_run + run])
    if pool is None:
      subset = rng.choice(num_train_examples, size=subset_size, replace=False)
    else:
      subset = rng.choice(pool, size=subset_size, replace=False)
    for epoch in range(num_epochs):
      epoch_ids[:subset_size] = rng.permutation(subset)
      batch_ids[run, epoch * num_batches:(epoch + 1) * num_batches] = (
          epoch_ids.reshape(num_batches, batch_size))
  return batch_ids


def _curriculum_error(path: str, message: str) -> ValueError:
  return ValueError(f"curriculum file {path!r}: {message}")


def _parse_id(path: str, where: str, value, num_train_examples: int) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float, str)):
    raise _curriculum_error(path, f"{where}: {value!r} is not an example id.")
  try:
    number = value if isinstance(value, int) else float(value)
  except ValueError as e:
    raise _curriculum_error(path, f"{where}: {value!r} is not an integer id.") from e
  if isinstance(number, float) and not number.is_integer():
    raise _curriculum_error(path, f"{where}: {value!r} is not an integer id.")
  # Checked here, before it meets an int64 array (1e20 would overflow it).
  if not PADDING_ID <= number < num_train_examples:
    raise _curriculum_error(path, f"{where}: id {value} is outside "
                            f"[0, {num_train_examples}) (-1 = padding).")
  return int(number)


def load_curriculum(path: str, num_train_examples: int) -> np.ndarray:
  """Reads curricula from a JSON or CSV file and validates them.

  Formats (ids are train example ids in `[0, N)`, `-1` = padding):

  * JSON: a list of steps, each a list of ids (one curriculum, `[T][B]`), a list of
    such curricula (`[R'][T][B]`), or an object `{"batch_ids": ...}` holding either.
  * CSV: one step per line, ids separated by commas (one curriculum); empty cells are
    padding; blank lines and lines starting with `#` are skipped.

  Steps shorter than the longest are padded with -1.

  Args:
    path: the file (`.json` or `.csv`; local or in a bucket, gs://...).
    num_train_examples: N, from the trace the simulators were fitted on.

  Returns:
    batch_ids: int32[R', T, B].

  Raises:
    FileNotFoundError: no such file.
    ValueError: naming the file and the position of a bad id, a bad shape, or an
      unsupported extension.
  """
  if not _io.as_path(path).is_file():
    raise FileNotFoundError(f"curriculum file {path!r} does not exist.")
  extension = os.path.splitext(path)[1].lower()
  # A UTF-8 byte order mark (Excel's "CSV UTF-8", some editors' JSON) is not data.
  read = lambda: _io.read_text(path).removeprefix("\ufeff")
  if extension == ".json":
    try:
      value = json.loads(read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise _curriculum_error(path, f"not valid JSON ({e}).") from e
    if isinstance(value, dict):
      if "batch_ids" not in value:
        raise _curriculum_error(path, "a JSON object must hold \"batch_ids\".")
      extra = sorted(set(value) - {"batch_ids"})
      if extra:  # e.g. "weights", which were silently not applied
        raise _curriculum_error(path, f"unknown keys {extra}: a JSON object holds "
                                "only \"batch_ids\".")
      value = value["batch_ids"]
    if not isinstance(value, list) or not value:
      raise _curriculum_error(path, "expected a non-empty list of steps [T][B] or of "
                              "curricula [R'][T][B].")
    depth = 3 if isinstance(value[0], list) and value[0] and all(
        isinstance(step, list) for step in value[0]) else 2
    curricula = value if depth == 3 else [value]
  elif extension == ".csv":
    # read_text reads with universal newlines, as iterating an open file does.
    lines = [line.strip() for line in read().split("\n")]
    steps = []
    for line in lines:
      if not line or line.startswith("#"):
        continue
      cells = [cell.strip() for cell in line.split(",")]
      while len(cells) > 1 and not cells[-1]:
        cells.pop()  # a trailing comma: every step is padded to the widest anyway
      steps.append([cell or "-1" for cell in cells])  # empty cells: padding
    curricula = [steps]
  else:
    raise _curriculum_error(path, f"unsupported extension {extension!r}; use .json "
                            "or .csv.")
  parsed = []
  for r, steps in enumerate(curricula):
    if not isinstance(steps, list) or not steps:
      raise _curriculum_error(path, f"curriculum {r}: expected a non-empty list of "
                              "steps.")
    rows = []
    for t, step in enumerate(steps):
      if not isinstance(step, list):
        raise _curriculum_error(path, f"curriculum {r}, step {t}: expected a list of "
                                f"ids, got {step!r}.")
      rows.append([_parse_id(path, f"curriculum {r}, step {t}, slot {b}", v,
                             num_train_examples) for b, v in enumerate(step)])
    parsed.append(rows)
  num_steps = {len(rows) for rows in parsed}
  if len(num_steps) != 1:
    raise _curriculum_error(path, f"curricula have different numbers of steps "
                            f"{sorted(num_steps)}; give them the same T.")
  batch_size = max(len(row) for rows in parsed for row in rows)
  if batch_size == 0:
    raise _curriculum_error(path, "every step is empty.")
  batch_ids = np.full((len(parsed), num_steps.pop(), batch_size), PADDING_ID, np.int64)
  for r, rows in enumerate(parsed):
    for t, row in enumerate(rows):
      batch_ids[r, t, :len(row)] = row
  bad = (batch_ids < PADDING_ID) | (batch_ids >= num_train_examples)
  if bad.any():
    r, t, b = (int(i) for i in np.argwhere(bad)[0])
    raise _curriculum_error(path, f"curriculum {r}, step {t}, slot {b}: id "
                            f"{batch_ids[r, t, b]} is outside [0, {num_train_examples})"
                            " (-1 = padding).")
  if not (batch_ids >= 0).any():
    raise _curriculum_error(path, "holds no example id (all padding).")
  return batch_ids.astype(np.int32)
