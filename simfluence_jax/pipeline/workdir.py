"""`Workdir`: where one experiment's stages keep their outputs and fingerprints.

`Workdir.stage(...)` runs one stage through the rules of `fingerprint.py`: reuse
its stored outputs when its inputs are unchanged, recompute when they changed, and
refuse (or, with `overwrite`, discard and recompute) for precious stages. It also
times every stage and remembers which were reused, for the report.

In a multi-process job every decision is taken by process 0 and broadcast, stage
records and plain files are written by process 0 only, and every process computes
(the kernels span all devices) and loads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Iterator, Optional, Sequence

import jax

from simfluence_jax import _io
from simfluence_jax import sharding
from simfluence_jax.pipeline import fingerprint as fp

_logger = logging.getLogger("simfluence_jax.pipeline")
STAGES_DIR = "stages"
_STATUS = ("missing", "done", "unfinished", "changed")
_LEASE_SECONDS = 300.0


@dataclasses.dataclass
class StageTiming:
  seconds: float
  reused: bool


class Workdir:
  """One experiment's directory (a seed's, with `num_seeds` > 1).

  Attributes:
    root: the directory (`epath.Path`; local or a bucket).
    config: the experiment config.
    overwrite: discard precious stages whose inputs changed instead of refusing.
    timings: stage name -> `StageTiming`, in the order the stages ran.
  """

  def __init__(self, root: _io.PathLike, config: Any, overwrite: bool = False):
    self.root = _io.as_path(root)
    self.config = config
    self.overwrite = overwrite
    self.flat_config = fp.flatten_config(config)
    self.timings: dict[str, StageTiming] = {}
    self._inputs: dict[str, fp.Inputs] = {}

  def path(self, *parts: str):
    return self.root.joinpath(*parts)

  def fingerprint(self, name: str) -> str:
    return self._inputs[name].fingerprint

  def inputs(self, name: str) -> fp.Inputs:
    return self._inputs[name]

  def _record_path(self, name: str):
    return self.path(STAGES_DIR, name + ".json")

  def _read_record(self, name: str) -> Optional[dict]:
    path = self._record_path(name)
    if not path.exists():
      return None
    try:
      return _io.read_json(path, f"stage {name}")
    except ValueError:
      return None  # a torn record: treat the stage as never run

  def _write_record(self, name: str, inputs: fp.Inputs, status: str,
                    seconds: Optional[float] = None) -> None:
    if sharding.is_primary():
      _io.write_json(self._record_path(name), dict(
          inputs.to_json(), stage=name, status=status, seconds=seconds,
          host=socket.gethostname(), time=time.strftime("%Y-%m-%d %H:%M:%S")))

  def stage(self, name: str, *, fields: Sequence[str],
            compute: Callable[[], Any],
            upstream: Sequence[str] = (),
            load: Optional[Callable[[], Any]] = None,
            save: Optional[Callable[[Any], None]] = None,
            outputs: Sequence[str] = (),
            precious: bool = False, version: int = 1,
            extra: Optional[dict] = None) -> Any:
    """Runs (or reuses) one stage and returns its value.

    Args:
      name: the stage's name (its record is `stages/<name>.json`).
      fields: config fields (or section prefixes) the stage reads itself.
      compute: `() -> value`, the stage's work.
      upstream: names of stages (run earlier on this Workdir) whose outputs it takes.
      load: `() -> value` from the stored outputs; None = the stage stores nothing
        and always runs (it is still timed and fingerprinted).
      save: `value -> None` storing the outputs (called on every process; write
        plain files only where `sharding.is_primary()`).
      outputs: paths relative to the workdir that the stage owns (deleted before a
        recompute of changed inputs).
      precious: recomputing would discard work a user may want (training runs):
        changed inputs refuse unless `overwrite`.
      version: the stage's code version (part of the fingerprint).
      extra: further inputs for the fingerprint (e.g. digests of data files).

    Raises:
      fingerprint.StaleWorkdirError: a precious stage's inputs changed.
    """
    upstream_inputs = [self._inputs[u] for u in upstream]
    inputs = fp.Inputs(
        fields=fp.stage_fields(self.flat_config, fields,
                               [u.fields for u in upstream_inputs]),
        upstream={u: self._inputs[u].fingerprint for u in upstream},
        version=version, extra=dict(extra or {}))
    self._inputs[name] = inputs
    record = self._read_record(name) if sharding.is_primary() else None
    status = _STATUS[int(sharding.agree(_STATUS.index(fp.compare(record, inputs))))]
    start = time.perf_counter()
    if status == "done" and load is not None:
      _logger.info("stage %s: reusing its outputs (inputs unchanged)", name)
      value = load()
      self.timings[name] = StageTiming(time.perf_counter() - start, True)
      return value
    if status == "changed":
      changes = "; ".join(fp.describe_changes(record or {}, inputs)) if record else ""
      if precious and not self.overwrite:
        owned = ", ".join(f"{o}/" for o in outputs) or "its outputs"
        raise fp.StaleWorkdirError(
            f"--workdir={os.fspath(self.root)!r}: stage {name} was computed with other "
            f"settings ({changes}); use a fresh --workdir, or --overwrite to discard "
            f"{owned}.")
      _logger.info("stage %s: inputs changed (%s); recomputing", name, changes)
    if status == "changed" or (precious and status == "missing"):
      # A precious stage without a record may still have outputs from a job that
      # predates records, or was killed before writing one: never resume those.
      if sharding.is_primary():
        for output in outputs:
          _io.remove_tree(self.path(output))
      sharding.barrier(f"cleared {name}")
    _logger.info("=== stage %s ===", name)
    self._write_record(name, inputs, "running")
    value = compute()
    if save is not None:
      save(value)
    sharding.barrier(f"saved {name}")
    seconds = time.perf_counter() - start
    self._write_record(name, inputs, "done", seconds)
    self.timings[name] = StageTiming(seconds, False)
    _logger.info("=== stage %s done in %.1fs ===", name, seconds)
    return value


@contextlib.contextmanager
def workdir_lock(workdir: _io.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` so two jobs never write into it at once.

  Local workdirs: an `flock` on `workdir/.lock`, released by the OS if the job
  dies (a killed job never leaves it stale). Only process 0 of a multi-process job
  locks (all processes share the workdir).

  Buckets have no locks: one job per bucket workdir is the rule. The job keeps
  `.lock` (host, pid, time) fresh every minute and refuses to start while another
  job's lock file is younger than `_LEASE_SECONDS`; a job that died stops
  refreshing it, so a rerun after a preemption waits at most that long.

  Raises:
    ValueError: another job holds the lock.
  """
  if jax.process_index() != 0:
    yield
    return
  root = _io.makedirs(workdir)
  lock = root / ".lock"
  owner = f"{socket.gethostname()} pid {os.getpid()}"
  if _io.is_remote(root):
    if lock.exists():
      text = lock.read_text().strip()
      holder, _, stamp = text.rpartition(" ")
      try:
        age = time.time() - float(stamp)
      except ValueError:
        age = float("inf")
      if age < _LEASE_SECONDS and holder != owner:
        raise ValueError(f"--workdir={os.fspath(workdir)!r} is in use by another job "
                         f"({holder}, {age:.0f} s ago); a bucket workdir takes one job "
                         "at a time.")
    stop = threading.Event()

    def refresh():
      while True:
        lock.write_text(f"{owner} {time.time()}")
        if stop.wait(60.0):
          return

    thread = threading.Thread(target=refresh, daemon=True)
    thread.start()
    try:
      yield
    finally:
      stop.set()
      thread.join()
      _io.remove_tree(lock)
    return
  with open(os.fspath(lock), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      f.seek(0)
      raise ValueError(f"--workdir={os.fspath(workdir)!r} is in use by another job "
                       f"(pid {f.read().strip() or '?'}).") from e
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
