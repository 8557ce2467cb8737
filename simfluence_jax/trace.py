"""`Trace`: what a set of training runs recorded, the input of every simulator.

A trace holds, for R runs of T steps with batch size B and M test examples:

* `batch_ids: int32[R, T, B]`: train example ids of each step's batch, `-1` = padding
  (a step may be all padding: no gradient, so a no-op under SGD, while momentum
  and Adam still apply their state; so may a whole run, e.g. a control run
  trained on nothing).
* `losses: float32[R, T+1, M]`: loss of each test example before the first step
  (`losses[:, 0]`) and after every step (`losses[:, t]` is after step t).
* `learning_rates: float32[R, T]`: the schedule's learning rate at each step (the
  step size under SGD; momentum and Adam scale their update by it), ≥ 0.
* `num_train_examples`: N; valid ids are in `[0, N)`.
* Optional per-step projected gradients (for per-step TracIn), taken at the
  parameters *before* step t's update:
  `train_grads: float32[R, T, B, K]` for the batch examples (zeros at padding) and
  `test_grads: float32[R, T, M, K]` for the test examples.

On disk a trace is a directory of `.npy` files plus `trace.json`, written atomically
(temporary directory, then rename; `_io.atomic_directory`) and read with
`allow_pickle=False`, optionally memory-mapped (`Trace.load(path, mmap=True)`) for
traces larger than RAM. The directory may be in a bucket (gs://...; read whole).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _io

_FORMAT_VERSION = 1
_ARRAY_FIELDS = ("batch_ids", "losses", "learning_rates", "train_grads", "test_grads")


def _as_array(name: str, value: Any, dtype: Any, ndim: int) -> np.ndarray:
  """Converts `value` to an array of `dtype` and rank `ndim`, or raises naming `name`."""
  if isinstance(value, np.memmap):
    array = value
  else:
    try:
      array = np.asarray(value)
    except Exception as e:  # pylint: disable=broad-except
      raise ValueError(f"Trace.{name}: cannot be converted to an array ({e}).") from e
  if array.ndim != ndim:
    raise ValueError(
        f"Trace.{name}: expected {ndim} dimensions, got shape {array.shape}.")
  if np.issubdtype(dtype, np.integer):
    if not np.issubdtype(array.dtype, np.integer):
      raise ValueError(f"Trace.{name}: expected integer ids, got dtype {array.dtype}.")
  elif not (np.issubdtype(array.dtype, np.floating) or
            np.issubdtype(array.dtype, np.integer)):
    raise ValueError(f"Trace.{name}: expected floating point values, got dtype "
                     f"{array.dtype}.")
  if array.dtype != dtype:
    if (np.issubdtype(dtype, np.floating) and np.issubdtype(array.dtype, np.floating)
        and np.finfo(array.dtype).max > np.finfo(dtype).max and array.size):
      too_large = np.isfinite(array) & (np.abs(array) > np.finfo(dtype).max)
      if np.any(too_large):
        raise ValueError(f"Trace.{name}: value {float(array[too_large][0]):.6g} does "
                         f"not fit in {np.dtype(dtype).name}.")
    if np.issubdtype(dtype, np.integer) and array.size:
      info = np.iinfo(dtype)
      lo, hi = array.min(), array.max()
      if lo < info.min or hi > info.max:
        bad = lo if lo < info.min else hi
        raise ValueError(f"Trace.{name}: value {int(bad)} does not fit in {dtype.__name__}.")
    array = array.astype(dtype)
  elif array.flags.writeable and not isinstance(array, np.memmap):
    # The caller's own buffer otherwise: one reused across experiments changed every
    # earlier Trace under it (review h38: a refit's B moved 167%).
    array = array.copy()
  if array.flags.writeable and not isinstance(array, np.memmap):
    array.setflags(write=False)
  return array


def _check_string_keys(value: Any, where: str) -> None:
  """Refuses a dict key that is not a string, at any depth: JSON would read it back
  as one (metadata {1: ...} loads as {'1': ...})."""
  if isinstance(value, dict):
    for key, item in value.items():
      if not isinstance(key, str):
        raise ValueError(f"{where}: key {key!r} ({type(key).__name__}): keys must "
                         f"be strings (saved as JSON, it would load as {str(key)!r}).")
      _check_string_keys(item, f"{where}[{key!r}]")
  elif isinstance(value, (list, tuple)):
    for i, item in enumerate(value):
      _check_string_keys(item, f"{where}[{i}]")


def _check_finite(name: str, array: np.ndarray) -> None:
  bad = _checks.first_nonfinite(array)
  if bad is not None:
    raise ValueError(f"Trace.{name}: contains NaN or inf (first at index {bad}).")


@dataclasses.dataclass(frozen=True, eq=False)
class Trace:
  """Per-step batches and test-example losses of R training runs.

  Attributes:
    batch_ids: int32[R, T, B], train example ids per step, -1 = padding.
    losses: float32[R, T+1, M], test-example losses before and after every step.
    learning_rates: float32[R, T], the step size of every step.
    num_train_examples: N, the number of train examples (ids are in [0, N)).
    train_grads: optional float32[R, T, B, K], projected gradients of the batch
      examples at the parameters before step t (zeros at padding).
    test_grads: optional float32[R, T, M, K], projected gradients of the test
      examples at the parameters before step t.
    metadata: JSON-serialisable dict (config summary, example texts, ...).
  """

  batch_ids: np.ndarray
  losses: np.ndarray
  learning_rates: np.ndarray
  num_train_examples: int
  train_grads: Optional[np.ndarray] = None
  test_grads: Optional[np.ndarray] = None
  metadata: dict = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    set_ = lambda k, v: object.__setattr__(self, k, v)
    if isinstance(self.num_train_examples, bool) or not isinstance(
        self.num_train_examples, (int, np.integer)) or self.num_train_examples <= 0:
      raise ValueError("Trace.num_train_examples: expected a positive integer, got "
                       f"{self.num_train_examples!r}.")
    set_("num_train_examples", int(self.num_train_examples))
    batch_ids = _as_array("batch_ids", self.batch_ids, np.int32, 3)
    losses = _as_array("losses", self.losses, np.float32, 3)
    learning_rates = _as_array("learning_rates", self.learning_rates, np.float32, 2)
    num_runs, num_steps, batch_size = batch_ids.shape
    if num_runs == 0 or num_steps == 0 or batch_size == 0:
      raise ValueError(f"Trace.batch_ids: every dimension must be non-empty, got shape "
                       f"{batch_ids.shape}.")
    if losses.shape[:2] != (num_runs, num_steps + 1) or losses.shape[2] == 0:
      raise ValueError(
          f"Trace.losses: expected shape [R={num_runs}, T+1={num_steps + 1}, M>0] "
          f"to match batch_ids {batch_ids.shape}, got {losses.shape}.")
    if learning_rates.shape != (num_runs, num_steps):
      raise ValueError(f"Trace.learning_rates: expected shape [R={num_runs}, "
                       f"T={num_steps}], got {learning_rates.shape}.")
    lo, hi = int(batch_ids.min()), int(batch_ids.max())
    if lo < -1 or hi >= self.num_train_examples:
      bad = lo if lo < -1 else hi
      raise ValueError(
          f"Trace.batch_ids: ids must be in [-1, num_train_examples="
          f"{self.num_train_examples}), found {bad}.")
    _check_finite("losses", losses)
    _check_finite("learning_rates", learning_rates)
    if np.any(learning_rates < 0):
      run, step = (int(i[0]) for i in np.nonzero(learning_rates < 0))
      raise ValueError(f"Trace.learning_rates: run {run} step {step} has "
                       f"{float(learning_rates[run, step]):.6g}; a learning rate "
                       "must be >= 0 (0 for a step that does not train).")
    set_("batch_ids", batch_ids)
    set_("losses", losses)
    set_("learning_rates", learning_rates)
    for name, expected in (("train_grads", (num_runs, num_steps, batch_size)),
                           ("test_grads", (num_runs, num_steps, losses.shape[2]))):
      value = getattr(self, name)
      if value is None:
        continue
      value = _as_array(name, value, np.float32, 4)
      if (name == "test_grads" and value.shape[:2] == expected[:2]
          and value.shape[2] != expected[2]):
        raise ValueError(
            f"Trace.test_grads: {value.shape[2]} test examples, but Trace.losses has "
            f"{expected[2]} ({list(losses.shape)}); one of the two is from another "
            "trace.")
      if value.shape[:3] != expected:
        raise ValueError(f"Trace.{name}: expected shape {expected + ('K',)}, got "
                         f"{value.shape}.")
      _check_finite(name, value)
      set_(name, value)
    if (self.train_grads is None) != (self.test_grads is None):
      raise ValueError("Trace.train_grads/test_grads: give both or neither.")
    if self.train_grads is not None and (
        self.train_grads.shape[-1] != self.test_grads.shape[-1]):
      raise ValueError(
          f"Trace.test_grads: projection dim {self.test_grads.shape[-1]} differs from "
          f"train_grads' {self.train_grads.shape[-1]}.")
    _check_string_keys(self.metadata, "Trace.metadata")
    try:
      # What `load` would return: tuples read back as lists. A copy, so the
      # caller's dict does not alias the trace's.
      set_("metadata", json.loads(json.dumps(self.metadata)))
    except (TypeError, ValueError) as e:
      raise ValueError(f"Trace.metadata: must be JSON-serialisable ({e}).") from e

  # -- shape accessors --------------------------------------------------------------
  @property
  def num_runs(self) -> int:
    return self.batch_ids.shape[0]

  @property
  def num_steps(self) -> int:
    return self.batch_ids.shape[1]

  @property
  def batch_size(self) -> int:
    return self.batch_ids.shape[2]

  @property
  def num_test_examples(self) -> int:
    return self.losses.shape[2]

  @property
  def has_grads(self) -> bool:
    return self.train_grads is not None

  def select_runs(self, runs: Any, allow_repeats: bool = False) -> "Trace":
    """Returns the trace of a subset of runs (an index array, slice or boolean mask).

    An index array that names a run twice is refused unless `allow_repeats` (a
    resample with replacement): an integer 0/1 array meant as a mask would
    otherwise select runs 0 and 1 over and over, and a fit or metric on them count
    runs twice.
    """
    if np.ndim(runs) == 0 and not isinstance(runs, slice):
      raise ValueError(f"Trace.select_runs: runs={runs!r} is one index; pass a "
                       f"list ([{runs!r}]), a slice or a boolean mask.")
    try:
      index = np.arange(len(self.batch_ids))[runs]
    except IndexError as e:
      raise ValueError(f"Trace.select_runs: runs={runs!r} does not index the "
                       f"trace's {len(self.batch_ids)} runs ({e}).") from None
    if np.ndim(index) != 1 or len(index) == 0:
      raise ValueError(f"Trace.select_runs: runs={runs!r} selects no run.")
    values, counts = np.unique(index, return_counts=True)
    if not allow_repeats and counts.max() > 1:
      raise ValueError(
          f"Trace.select_runs: runs={runs!r} names run {int(values[counts > 1][0])} "
          f"{int(counts.max())} times (a 0/1 mask must be dtype bool; pass "
          "allow_repeats=True to resample runs).")
    pick = lambda a: None if a is None else np.asarray(a[index])
    batch_ids = pick(self.batch_ids)
    return Trace(batch_ids=batch_ids, losses=pick(self.losses),
                 learning_rates=pick(self.learning_rates),
                 num_train_examples=self.num_train_examples,
                 train_grads=pick(self.train_grads), test_grads=pick(self.test_grads),
                 metadata=dict(self.metadata))

  # -- persistence -----------------------------------------------------------------
  def save(self, path: str) -> None:
    """Writes the trace to directory `path` atomically (replacing an existing one)."""
    with _io.atomic_directory(path) as tmp:
      for name in _ARRAY_FIELDS:
        value = getattr(self, name)
        if value is not None:
          np.save(os.path.join(tmp, name + ".npy"), np.asarray(value),
                  allow_pickle=False)
      with open(os.path.join(tmp, "trace.json"), "w") as f:
        json.dump({"format_version": _FORMAT_VERSION,
                   "num_train_examples": self.num_train_examples,
                   "metadata": self.metadata}, f)

  @classmethod
  def load(cls, path: str, mmap: bool = False) -> "Trace":
    """Reads a trace written by `save`; `mmap=True` memory-maps the arrays.

    Raises:
      FileNotFoundError: `path` or a required file is missing.
      ValueError: a file is corrupt, truncated, pickled, or the contents are invalid.
    """
    path = os.fspath(path)
    meta_path = os.path.join(path, "trace.json")
    if not _io.as_path(path).is_dir():
      raise FileNotFoundError(f"Trace.load: no trace directory at {path!r}.")
    if not _io.exists(meta_path):
      raise FileNotFoundError(f"Trace.load: {meta_path!r} is missing (not a trace "
                              "directory, or an interrupted write).")
    try:
      meta = json.loads(_io.read_text(meta_path))
    except json.JSONDecodeError as e:
      raise ValueError(f"Trace.load: {meta_path!r} is corrupt ({e}).") from e
    if not isinstance(meta, dict):
      raise ValueError(f"Trace.load: {meta_path!r} is corrupt (expected a JSON object).")
    if "num_train_examples" not in meta:
      raise ValueError(f"Trace.load: {meta_path!r} is corrupt (no num_train_examples).")
    if meta.get("format_version") != _FORMAT_VERSION:
      raise ValueError(f"Trace.load: unsupported format_version "
                       f"{meta.get('format_version')!r} in {meta_path!r}.")
    arrays = {}
    for name in _ARRAY_FIELDS:
      file = os.path.join(path, name + ".npy")
      if not _io.exists(file) and name not in ("batch_ids", "losses",
                                               "learning_rates"):
        continue
      arrays[name] = _io.load_npy(file, "Trace.load", mmap=mmap)
    return cls(num_train_examples=meta["num_train_examples"],
               metadata=meta.get("metadata", {}), **arrays)
