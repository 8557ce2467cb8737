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
import uuid
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import numpy as np

from simfluence_jax import _io
from simfluence_jax import sharding
from simfluence_jax.pipeline import fingerprint as fp

_logger = logging.getLogger("simfluence_jax.pipeline")
STAGES_DIR = "stages"
_STATUS = ("missing", "done", "unfinished", "changed")
# Bucket workdirs (`workdir_lock`): a lease older than this is stale (its job died);
# the job renews its own every _REFRESH_SECONDS, and reads it back _SETTLE_SECONDS
# after writing it (two jobs starting together: the store keeps one lease).
_LEASE_SECONDS = 300.0
_REFRESH_SECONDS = 60.0
_SETTLE_SECONDS = 2.0


@dataclasses.dataclass
class StageTiming:
  """How long a stage took.

  Attributes:
    seconds: this job's time in the stage (loading its outputs, when reused).
    reused: whether its stored outputs were reused.
    computed_seconds: the time its outputs took to compute: this job's when it
      computed them, else the seconds in the stage's record (None when the record
      has none, or on a process other than the primary, which reads no records).
  """

  seconds: float
  reused: bool
  computed_seconds: Optional[float] = None


class Workdir:
  """One experiment's directory (a seed's, with `num_seeds` > 1).

  Attributes:
    root: the directory (`epath.Path`; local or a bucket).
    config: the experiment config.
    overwrite: discard precious stages whose inputs changed instead of refusing.
    timings: stage name -> `StageTiming`, in the order the stages ran.
  """

  def __init__(self, root: _io.PathLike, config: Any, overwrite: bool = False,
               on_discard: Optional[Callable[[], None]] = None,
               environment: Optional[dict] = None):
    """`on_discard()` is called before a precious stage deletes its outputs (with
    `overwrite`, or outputs no record claims): the job's result files, computed
    from them, must not outlive them if the job then dies. `environment` (the
    packages and machine, `experiment.environment()`) is written into the record
    of every stage computed here, so a result can name what computed its reused
    stages (`other_environments`)."""
    _io.check_workdir(root)
    self.on_discard = on_discard
    self.environment = environment
    self._reused_environments: dict[str, Any] = {}
    self.root = _io.as_path(root)
    self.config = config
    self.overwrite = overwrite
    self.flat_config = fp.flatten_config(config)
    self.timings: dict[str, StageTiming] = {}
    self._inputs: dict[str, fp.Inputs] = {}
    # Records of stages that store nothing as they were before this job.
    self._replaced: dict[str, Optional[bytes]] = {}

  def path(self, *parts: str):
    return self.root.joinpath(*parts)

  def fingerprint(self, name: str) -> str:
    return self._inputs[name].fingerprint

  def inputs(self, name: str) -> fp.Inputs:
    return self._inputs[name]

  def _record_path(self, name: str):
    return self.path(STAGES_DIR, name + ".json")

  def _read_record(self, name: str) -> Optional[dict]:
    """The record, or None when there is none or it is unreadable (torn, or JSON
    that is not an object)."""
    path = self._record_path(name)
    if not path.exists():
      return None
    try:
      record = _io.read_json(path, f"stage {name}")
    except ValueError:
      return None
    return record if isinstance(record, dict) else None

  def read_record(self, name: str) -> Optional[dict]:
    """The stored record of stage `name` (None if there is none, or on a process
    other than the primary)."""
    return self._read_record(name) if sharding.is_primary() else None

  def discard_records(self, keep: Sequence[str] = ()) -> None:
    """Deletes the record of every stage but those of `keep`: each then runs as if
    never run (a precious one clears its outputs first). For `--overwrite` of a
    workdir whose records cannot say what they were computed from."""
    if sharding.is_primary() and self.path(STAGES_DIR).exists():
      for path in self.path(STAGES_DIR).iterdir():
        if path.name.endswith(".json") and path.name[:-len(".json")] not in keep:
          path.unlink()
    sharding.barrier("discarded stage records")

  def _write_record(self, name: str, inputs: fp.Inputs, status: str,
                    seconds: Optional[float] = None) -> None:
    check_lease(self.root)
    if sharding.is_primary():
      _io.write_json(self._record_path(name), dict(
          inputs.to_json(), stage=name, status=status, seconds=seconds,
          host=socket.gethostname(), time=time.strftime("%Y-%m-%d %H:%M:%S"),
          **({} if self.environment is None else {"environment": self.environment})))

  def refuse(self, message: str) -> fp.StaleWorkdirError:
    """The error refusing a stage, once the records of the stages that store
    nothing are put back as this job found them."""
    if sharding.is_primary():
      for name, content in self._replaced.items():
        path = self._record_path(name)
        if content is None:
          path.unlink()
        else:
          path.write_bytes(content)
    return fp.StaleWorkdirError(message)

  def other_environments(self) -> dict:
    """stage -> the environment its record names, for the stages this job reused
    that were computed under another one than `environment` ("not recorded" for
    records from before environments were; process 0's view)."""
    return {name: env for name, env in self._reused_environments.items()
            if env != self.environment}

  def stage(self, name: str, *, fields: Sequence[str],
            compute: Callable[[], Any],
            upstream: Sequence[str] = (),
            load: Optional[Callable[[], Any]] = None,
            save: Optional[Callable[[Any], None]] = None,
            outputs: Sequence[str] = (),
            precious: bool = False, version: int = 1,
            extra: Optional[dict] = None, checks: Optional[dict] = None) -> Any:
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
      checks: digests of inputs drawn again on every job (`fp.Inputs.checks`),
        compared where a record holds them; inherited by downstream stages.

    Raises:
      fingerprint.StaleWorkdirError: a precious stage's inputs changed.
    """
    check_lease(self.root)
    upstream_inputs = [self._inputs[u] for u in upstream]
    inputs = fp.Inputs(
        fields=fp.stage_fields(self.flat_config, fields,
                               [u.fields for u in upstream_inputs]),
        upstream={u: self._inputs[u].fingerprint for u in upstream},
        version=version, extra=dict(extra or {}),
        checks=dict(sorted(({k: v for u in upstream_inputs
                             for k, v in u.checks.items()}
                            | dict(checks or {})).items())))
    self._inputs[name] = inputs
    record = self.read_record(name)
    status = _STATUS[int(sharding.agree(_STATUS.index(fp.compare(record, inputs))))]
    owned = ", ".join(f"{o}/" for o in outputs) or "its outputs"
    where = f"--workdir={os.fspath(self.root)!r}: stage {name}"
    # A record file that read as none: torn, or JSON that is not an object.
    torn = bool(sharding.agree(np.int32(sharding.is_primary() and record is None and
                                        self._record_path(name).exists())))
    if torn and precious and not self.overwrite and any(
        self.path(o).exists() for o in outputs):
      raise self.refuse(
          f"{where}: its record {os.fspath(self._record_path(name))} is unreadable, so "
          f"what {owned} were computed from is unknown; restore the record, or "
          f"--overwrite to discard them and recompute.")
    start = time.perf_counter()
    if status == "done" and load is not None:
      _logger.info("stage %s: reusing its outputs (inputs unchanged)", name)
      try:
        value, problem = load(), None
      except fp.StaleWorkdirError:
        raise
      except (FileNotFoundError, ValueError) as e:
        value, problem = None, str(e)
      if not sharding.agree(np.int32(problem is not None)):
        if problem is not None:  # only this process: nothing to agree on
          raise ValueError(problem)
        # Only process 0 reads records (`read_record`: None elsewhere); what it
        # read is what every process reports (review h24: `record.get` on process
        # 1 raised, and the job hung in the next collective on every rerun).
        seconds = (record or {}).get("seconds")
        agreed = sharding.agree(np.float32(np.nan if seconds is None else seconds))
        if not sharding.is_primary():
          seconds = None if np.isnan(agreed) else float(agreed)
        self._reused_environments[name] = (record or {}).get("environment",
                                                             "not recorded")
        self.timings[name] = StageTiming(time.perf_counter() - start, True, seconds)
        return value
      if precious and not self.overwrite:
        raise self.refuse(
            f"{where}: its stored outputs cannot be read ({problem}); restore them, "
            f"or --overwrite to discard {owned} and recompute.")
      _logger.warning("stage %s: its stored outputs cannot be read (%s); "
                      "recomputing", name, problem)
      status = "changed"
    elif status == "changed":
      changes = "; ".join(fp.describe_changes(record or {}, inputs)) if record else ""
      if precious and not self.overwrite:
        raise self.refuse(
            f"{where} was computed with other settings ({changes}); use a fresh "
            f"--workdir, or --overwrite to discard {owned}.")
      _logger.info("stage %s: inputs changed (%s); recomputing", name, changes)
    if status in ("changed", "missing") and outputs:
      # Outputs without a record may be from a job that predates records, was
      # killed before writing one, or had its records discarded: never resume
      # those (a training stage would find another job's checkpoints).
      if precious and self.on_discard is not None:
        self.on_discard()
      if sharding.is_primary():
        for output in outputs:
          _io.remove_tree(self.path(output))
      sharding.barrier(f"cleared {name}")
    _logger.info("=== stage %s ===", name)
    if load is None and save is None and not outputs and sharding.is_primary():
      # It stores nothing, so it always runs: a later stage's refusal puts its
      # old record back (`refuse`), which still describes what the workdir holds.
      path = self._record_path(name)
      self._replaced.setdefault(name, path.read_bytes() if path.exists() else None)
    self._write_record(name, inputs, "running")
    value = compute()
    if save is not None:
      check_lease(self.root)  # a job that stalled in compute() saves nothing
      save(value)
    sharding.barrier(f"saved {name}")
    seconds = time.perf_counter() - start
    self._write_record(name, inputs, "done", seconds)
    self.timings[name] = StageTiming(seconds, False, seconds)
    _logger.info("=== stage %s done in %.1fs ===", name, seconds)
    return value


def _read_lease(lock) -> Optional[tuple[str, float]]:
  """(holder, age in seconds) of a bucket workdir's lease file, or None if none.

  An unreadable lease (a torn or foreign file) reads as infinitely old: stale.
  """
  try:
    text = lock.read_text().strip()
  except FileNotFoundError:
    return None
  holder, _, stamp = text.rpartition(" ")
  try:
    return holder, time.time() - float(stamp)
  except ValueError:
    return text, float("inf")


# Bucket workdirs whose lease another job took over while this one held it: root
# -> that job. `Workdir` refuses to run or record a stage there from then on.
_LOST_LEASES: dict[str, str] = {}
# Bucket workdirs this process holds the lease of: root -> (lease file, owner token).
_ACTIVE_LEASES: dict[str, tuple] = {}


def check_lease(root) -> None:
  """Raises ValueError if this job's lease of bucket workdir `root` (or of one
  above it) was taken over by another job (`_bucket_lease`).

  Reads the lease file itself (a small read of the object store), not only what
  the renewing thread last saw: a job that stalled past the lease (a paused VM)
  wakes before that thread runs again, and it saved a stage's outputs over those of
  the job that had taken the workdir over, whose record then vouched for them
  (review h24: its rerun reported the stalled job's numbers under its own config).
  A lease file that is gone counts as lost too (the other job finished).
  """
  path = os.fspath(root).rstrip("/")
  for held, (lock, owner) in list(_ACTIVE_LEASES.items()):
    if held not in _LOST_LEASES and (path == held or path.startswith(held + "/")):
      lease = _read_lease(lock)
      if lease is None or lease[0] != owner:
        _LOST_LEASES[held] = (lease[0] if lease else
                              "unknown: its lease file is gone")
  for lost, holder in list(_LOST_LEASES.items()):
    if path == lost or path.startswith(lost + "/"):
      raise ValueError(f"--workdir={lost!r}: another job ({holder}) took over this "
                       "job's lease (it stalled past the lease's "
                       f"{_LEASE_SECONDS:.0f} s); this job stops writing there.")


@contextlib.contextmanager
def _bucket_lease(workdir: _io.PathLike, root) -> Iterator[None]:
  """The single-writer rule of a bucket workdir, kept by a lease file (see
  `workdir_lock`)."""
  lock = root / ".lock"
  name = os.fspath(workdir)
  owner = f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
  lease = _read_lease(lock)
  if lease is not None:
    holder, age = lease
    if age < _LEASE_SECONDS:
      raise ValueError(
          f"--workdir={name!r} is in use by another job ({holder}, lease renewed "
          f"{age:.0f} s ago); a bucket workdir takes one job at a time. If that job "
          f"is dead, its lease goes stale {_LEASE_SECONDS:.0f} s after its last "
          f"renewal (or delete {os.fspath(lock)}).")
    _logger.warning("--workdir=%s: taking over the stale lease of %s (renewed %.0f s "
                    "ago; its job died)", name, holder, age)
  _logger.info(
      "--workdir=%s is on an object store, which has no file locks: one job at a "
      "time (single-writer rule), kept by the lease %s (renewed every %.0f s, stale "
      "after %.0f s)", name, os.fspath(lock), _REFRESH_SECONDS, _LEASE_SECONDS)

  def write_lease():
    lock.write_text(f"{owner} {time.time()}")

  write_lease()
  # Two jobs that both found no lease both wrote one; the object store keeps the
  # last write, so after a pause each reads back whose it is and one goes on.
  time.sleep(_SETTLE_SECONDS)
  lease = _read_lease(lock)
  if lease is None or lease[0] != owner:
    raise ValueError(
        f"--workdir={name!r}: another job ({lease[0] if lease else 'unknown'}) took "
        "the workdir at the same time; a bucket workdir takes one job at a time.")
  stop = threading.Event()
  key = os.fspath(root).rstrip("/")  # of `_ACTIVE_LEASES` and `_LOST_LEASES`
  _ACTIVE_LEASES[key] = (lock, owner)

  def refresh():
    while not stop.wait(_REFRESH_SECONDS):
      try:
        lease = _read_lease(lock)
        if lease is None or lease[0] != owner:
          # Gone: the job that took it over finished and removed it; writing it
          # again would take the workdir back unasked.
          holder = lease[0] if lease else "unknown: its lease file is gone"
          _logger.error("--workdir=%s: another job (%s) took over this job's lease "
                        "(this job stalled past %.0f s?): this job writes no more "
                        "stage records there.", name, holder, _LEASE_SECONDS)
          _LOST_LEASES[key] = holder
          return
        write_lease()
      except Exception as e:  # pylint: disable=broad-except
        _logger.warning("--workdir=%s: could not renew the lease (%s); retrying in "
                        "%.0f s", name, e, _REFRESH_SECONDS)

  thread = threading.Thread(target=refresh, daemon=True)
  thread.start()
  try:
    yield
  finally:
    stop.set()
    thread.join()
    _ACTIVE_LEASES.pop(key, None)
    _LOST_LEASES.pop(key, None)
    try:
      lease = _read_lease(lock)
      if lease is not None and lease[0] == owner:
        lock.unlink()
    except Exception as e:  # pylint: disable=broad-except
      _logger.warning("--workdir=%s: could not remove the lease %s (%s); it goes "
                      "stale in %.0f s", name, os.fspath(lock), e, _LEASE_SECONDS)


@contextlib.contextmanager
def workdir_lock(workdir: _io.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on `workdir` so two jobs never write into it at once.

  Local workdirs: an `flock` on `workdir/.lock`, released by the OS if the job
  dies (a killed job never leaves it stale). Only process 0 of a multi-process job
  locks (all processes share the workdir).

  Buckets (gs://) have no locks, and their writes are whole objects with no atomic
  rename of a directory, so the rule is one job per bucket workdir, kept by a lease:
  `.lock` holds the job's host, pid, a random token and the time; the job renews it
  every `_REFRESH_SECONDS` and refuses to start while another job's lease is
  younger than `_LEASE_SECONDS`. Two jobs starting together both write a lease and
  read it back after `_SETTLE_SECONDS`: only the one whose lease the store kept
  goes on. A job that died stops renewing, so a rerun after a preemption waits at
  most `_LEASE_SECONDS`; the job logs the rule when it takes the lease.

  Raises:
    ValueError: another job holds the lock, or `workdir` is a bucket other than
      gs:// (`_io.check_workdir`).
  """
  _io.check_workdir(workdir)
  if jax.process_index() != 0:
    yield
    return
  try:
    root = _io.makedirs(workdir)
  except ImportError as e:  # epath has no filesystem for the bucket here
    raise ValueError(f"--workdir={os.fspath(workdir)!r}: {e} (a gs:// workdir needs "
                     "TensorFlow or gcsfs: pip install 'simfluence_jax[gcs]').") from e
  if _io.is_remote(root):
    with _bucket_lease(workdir, root):
      yield
    return
  lock = root / ".lock"
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
