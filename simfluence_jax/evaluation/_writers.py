"""TensorBoard metrics of the main job: scalar event files and their log lines.

Layout under `logdir` of `write_training_metrics` (the main job's
`workdir/tensorboard`):

  runs/run_000/ ...   per run r: `train_loss` (mean loss of each step's batch, before
                      its update) and `test_loss` (mean over the M test examples after
                      the step; step 0 = the base model), step = training step
  ./                  `train_loss/mean_over_runs`, `test_loss/mean_over_runs` per step

and under `logdir` of `write_evaluation_metrics` (the main job's
`workdir/tensorboard/evaluation`): `fit/<simulator>/<key>` (numeric
`Simulator.fit_info`: solver iterations, relative residual, noise std, l2, ...) and
`held_out/<method>/<metric>` at step 0.

Each call adds an event file. The main job clears a folder before writing it again
(when the stage it shows was recomputed: `pipeline.experiment._tensorboard_part`),
so a folder never shows discarded runs' curves beside new ones.

Only process 0 writes event files; other processes only log, as clu recommends for
multi-host jobs (`create_default_writer(just_logging=True)`). A bucket `logdir`
(gs://...) gets its event files from a local directory when each call ends
(`_io.local_directory`): the writers write local files only, so no TensorFlow or
TensorBoard filesystem plugin is needed for the bucket.
The per-run curves skip the logging writer (R·T log lines would drown the job log);
everything else is also logged.

TensorBoard is optional (the `report` extra), and imported only when written. The
event files come from tensorboard's own `tensorboard.summary.Writer`, written with
plain file I/O (its event file writer would import TensorFlow where installed);
`clu.metric_writers` (which imports TensorFlow, seconds of start-up) writes the same
scalar summaries where only clu is installed; with neither, the job logs
"TensorBoard skipped: pip install 'simfluence_jax[report]'" once and writes nothing
here.
"""

import itertools
import logging
import os
import socket
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from simfluence_jax import _io
from simfluence_jax import _optional

_logger = logging.getLogger(__name__)


class _LoggingWriter:
  """Scalars to the job's log, in the format of clu's `LoggingWriter`."""

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    text = ", ".join(f"{k}={v:.6g}" for k, v in sorted(values.items()))
    _logger.info("[%d] %s", step, text)

  def close(self) -> None:
    pass


_EVENT_FILES = itertools.count()


class _LocalEventFile:
  """An event file in a local directory, written with plain Python file I/O.

  What `tensorboard.summary.writer.EventFileWriter` writes (a `brain.Event:2` file
  version record, then one record per event), without its `tf.io.gfile`: where
  TensorFlow is installed, that import alone costs seconds of every job's start-up.
  """

  def __init__(self, logdir: str):
    from tensorboard.compat.proto import event_pb2  # pylint: disable=g-import-not-at-top
    from tensorboard.summary.writer import record_writer  # pylint: disable=g-import-not-at-top
    os.makedirs(logdir, exist_ok=True)
    name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
            f"{os.getpid()}.{next(_EVENT_FILES)}")
    self._records = record_writer.RecordWriter(open(os.path.join(logdir, name), "wb"))
    self.add_event(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

  def add_event(self, event) -> None:
    self._records.write(event.SerializeToString())

  def flush(self) -> None:
    self._records.flush()

  def close(self) -> None:
    self._records.close()


class _TensorBoardWriter:
  """Event files through `tensorboard.summary.Writer` (no TensorFlow), plus the log."""

  def __init__(self, tensorboard_summary, logdir: str, log: bool):
    # tensorboard's own `DirectoryOutput` (the summaries it builds), writing through
    # `_LocalEventFile` instead of its gfile-based event file writer.
    output = tensorboard_summary.DirectoryOutput.__new__(
        tensorboard_summary.DirectoryOutput)
    output._ev_writer = _LocalEventFile(os.fspath(logdir))  # pylint: disable=protected-access
    self._events = tensorboard_summary.Writer(output)
    self._log = _LoggingWriter() if log else None

  def write_scalars(self, step: int, values: Mapping[str, float]) -> None:
    for tag, value in values.items():
      self._events.add_scalar(tag, value, step)
    if self._log is not None:
      self._log.write_scalars(step, values)

  def close(self) -> None:
    self._events.close()


def _backend():
  """("tensorboard", tensorboard.summary) | ("clu", clu.metric_writers) | None.

  tensorboard's own writer first: it imports in well under a second, where clu's
  imports TensorFlow (6-12 s of every job's start-up on 2 CPU cores) to write the
  same scalar events.
  """
  try:
    return "tensorboard", _optional.import_module("tensorboard.summary", "report",
                                                  "TensorBoard")
  except _optional.MissingExtraError:
    pass
  try:
    return "clu", _optional.import_module("clu.metric_writers", "report", "TensorBoard")
  except _optional.MissingExtraError:
    _optional.skipped("TensorBoard", "report")
    return None


def _summary_writer(backend, logdir: str):
  """Event files (process 0 only) and log lines, like clu's `create_default_writer`."""
  kind, module = backend
  primary = jax.process_index() == 0
  if kind == "clu":
    return module.create_default_writer(logdir, just_logging=not primary,
                                        asynchronous=False)
  return _TensorBoardWriter(module, logdir, log=True) if primary else _LoggingWriter()


def _event_writer(backend, logdir: str):
  """Event files only, no log lines (process 0 only)."""
  kind, module = backend
  if kind == "clu":
    return module.SummaryWriter(os.fspath(logdir))
  return _TensorBoardWriter(module, logdir, log=False)


def _scalars(values: Mapping[str, Any]) -> dict:
  """The finite real numbers of `values` (bools, strings, arrays are dropped)."""
  out = {}
  for key, value in values.items():
    if isinstance(value, (bool, np.bool_, str)) or not np.isscalar(value):
      continue
    value = float(value)
    if np.isfinite(value):
      out[key] = value
  return out


def write_training_metrics(logdir: str, trace, train_losses: Optional[np.ndarray] = None,
                           *, run_names: Optional[list] = None) -> int:
  """Writes per-run, per-step train and test losses; returns the scalars written.

  Args:
    logdir: the TensorBoard directory.
    trace: the recorded `Trace` (losses float[R, T+1, M]).
    train_losses: optional float[R, T'] (T' ≤ T), `TrainResult.train_losses`.
    run_names: R distinct names of the run subdirectories (default run_000,
      run_001, ...).

  Returns:
    The number of scalar values written to event files (0 on processes other than 0,
    and without the `report` extra).

  Raises:
    ValueError: `train_losses` not [R, T'] with T' ≤ T (more steps than the trace
      would be dropped), or `run_names` not R distinct names (two runs would write
      into one folder).
  """
  test_loss = np.asarray(trace.losses, np.float64).mean(axis=2)  # [R, T+1]
  num_runs, num_steps = test_loss.shape[0], test_loss.shape[1] - 1
  train = None if train_losses is None else np.asarray(train_losses, np.float64)
  if train is not None and (train.ndim != 2 or train.shape[0] != num_runs
                            or train.shape[1] > num_steps):
    raise ValueError(f"train_losses: expected float[{num_runs}, T'] with T' ≤ "
                     f"{num_steps} (the trace's runs and steps), got shape "
                     f"{train.shape}.")
  if run_names is not None:
    run_names = list(run_names)
    if len(run_names) != num_runs:
      raise ValueError(f"run_names: expected {num_runs} names (one per run of the "
                       f"trace), got {len(run_names)}.")
    repeated = sorted({str(n) for n in run_names if run_names.count(n) > 1})
    if repeated:
      raise ValueError(f"run_names: {repeated} given more than once (two runs would "
                       "write into one folder).")
  names = run_names or [f"run_{r:03d}" for r in range(num_runs)]
  backend = _backend()
  if backend is None:
    return 0
  with _io.local_directory(logdir) as local:
    written = _write_training_metrics(backend, local, test_loss, train, names)
  _logger.info("tensorboard: %d training scalars of %d runs in %s", written, num_runs,
               logdir)
  return written


def _write_training_metrics(backend, logdir: str, test_loss: np.ndarray,
                            train: Optional[np.ndarray], names: list) -> int:
  """`write_training_metrics` into a local `logdir`; the number of scalars written."""
  summary = _summary_writer(backend, logdir)
  written = 0
  try:
    if jax.process_index() == 0:
      for r in range(test_loss.shape[0]):
        writer = _event_writer(backend, os.path.join(logdir, "runs", names[r]))
        try:
          for step in range(test_loss.shape[1]):
            values = {"test_loss": test_loss[r, step]}
            # train_losses[r, t] is the loss of step t+1's batch before its update.
            if train is not None and 0 < step <= train.shape[1]:
              values["train_loss"] = train[r, step - 1]
            values = _scalars(values)
            writer.write_scalars(step, values)
            written += len(values)
        finally:
          writer.close()
    for step in range(test_loss.shape[1]):
      values = {"test_loss/mean_over_runs": test_loss[:, step].mean()}
      if train is not None and 0 < step <= train.shape[1]:
        values["train_loss/mean_over_runs"] = train[:, step - 1].mean()
      values = _scalars(values)
      if jax.process_index() == 0:
        written += len(values)
      summary.write_scalars(step, values)
  finally:
    summary.close()
  return written


def write_evaluation_metrics(logdir: str, simulators: Mapping[str, Any],
                             metrics: Mapping[str, Mapping[str, Any]], step: int = 0
                             ) -> int:
  """Writes each simulator's fit diagnostics and the held-out metrics of every method.

  Args:
    logdir: the TensorBoard directory.
    simulators: name -> `Simulator` (its numeric `fit_info` entries are written as
      `fit/<name>/<key>`).
    metrics: method -> metric -> value (`held_out/<method>/<metric>`).
    step: the step the values are written at.

  Returns:
    The number of scalar values written to event files (0 on processes other than 0,
    and without the `report` extra).
  """
  backend = _backend()
  if backend is None:
    return 0
  values = {}
  for name, sim in simulators.items():
    for key, value in _scalars(getattr(sim, "fit_info", {}) or {}).items():
      values[f"fit/{name}/{key}"] = value
  for method, method_metrics in metrics.items():
    for key, value in _scalars(method_metrics).items():
      values[f"held_out/{method}/{key}"] = value
  with _io.local_directory(logdir) as local:
    writer = _summary_writer(backend, local)
    try:
      writer.write_scalars(step, values)
    finally:
      writer.close()
  return len(values) if jax.process_index() == 0 else 0
