r"""The main job: runs → trace → simulators and influence kernels → held-out report.

  python -m simfluence_jax.main --config=configs/default.py --workdir=/tmp/sj
  python -m simfluence_jax.main --config=configs/default.py:tiny --workdir=/tmp/sj \
      --config.num_runs=16

Every stage writes its result into the workdir before the next starts, so re-running
with the same workdir resumes (training from its last orbax checkpoint, later stages
from their saved outputs) and gives the same numbers.
"""

import contextlib
import fcntl
import json
import logging as std_logging
import os
import sys
import time
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np

from simfluence_jax import _io
from simfluence_jax import counterfactual
from simfluence_jax import evaluation
from simfluence_jax import influence
from simfluence_jax import sharding
from simfluence_jax import simulators
from simfluence_jax import trace as trace_lib
from simfluence_jax import training

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where outputs and checkpoints go.")

METHODS = ("simfluence_linear", "simfluence_additive", "tracin_cp", "tracin_per_step",
           "ekfac_if")


def validate_config(config) -> None:
  """Raises ValueError naming the first bad field of `config`."""
  positive = ("num_train_examples", "num_test_examples", "subset_size", "num_runs",
              "num_held_out_runs", "batch_size", "num_steps", "checkpoint_every",
              "projection_dim")
  for name in positive:
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name}={value!r}: must be a positive integer.")
  if not config.learning_rate > 0:
    raise ValueError(f"config.learning_rate={config.learning_rate!r}: must be positive.")
  if config.num_held_out_runs > config.num_runs:
    raise ValueError(f"config.num_held_out_runs={config.num_held_out_runs}: more held-out "
                     f"runs than the config.num_runs={config.num_runs} fitted on.")
  if config.subset_size > config.num_train_examples:
    raise ValueError(f"config.subset_size={config.subset_size}: larger than "
                     f"config.num_train_examples={config.num_train_examples}.")
  if config.batch_size > config.subset_size:
    raise ValueError(f"config.batch_size={config.batch_size}: larger than "
                     f"config.subset_size={config.subset_size}.")
  if config.influence.fisher not in ("empirical", "true"):
    raise ValueError(f"config.influence.fisher={config.influence.fisher!r}: must be "
                     "'empirical' or 'true'.")
  if not 0 < config.influence.tracin_num_runs <= config.num_runs:
    raise ValueError(f"config.influence.tracin_num_runs="
                     f"{config.influence.tracin_num_runs}: must be in [1, num_runs].")


class _Stages:
  """Times the stages of the job and caches their array outputs in the workdir."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    self.timings: dict[str, float] = {}
    self._timings_path = os.path.join(workdir, "timings.json")

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    logging.info("=== stage %s ===", name)
    start = time.perf_counter()
    result = fn()
    elapsed = time.perf_counter() - start
    self.timings[name] = elapsed
    if sharding.is_primary():
      _io.write_text(self._timings_path, json.dumps(self.timings, indent=2))
    logging.info("=== stage %s done in %.1fs ===", name, elapsed)
    return result

  def cached_array(self, name: str, fn: Callable[[], np.ndarray]) -> np.ndarray:
    """Runs the stage `fn` unless its output `workdir/arrays/name.npy` exists.

    In a multi-process job every process runs `fn` (its kernels span all devices)
    and gets the same array; process 0 writes it, the others wait for the write.
    """
    path = os.path.join(self.workdir, "arrays", name + ".npy")

    def compute():
      if sharding.agree(os.path.exists(path)):
        logging.info("%s: reusing %s", name, path)
        return np.load(path, allow_pickle=False)
      value = sharding.to_host(fn())
      if sharding.is_primary():
        _io.atomic_write(path, lambda tmp: np.save(tmp, value, allow_pickle=False))
      sharding.barrier(f"saved {name}")
      return value

    return self.run(name, compute)


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on `workdir` so two jobs never write into it at once.

  Only process 0 of a multi-process job locks (all processes share the workdir); the
  lock is released by the OS if the job dies, so a killed job never leaves it stale.

  Raises:
    ValueError: another job holds the lock.
  """
  if jax.process_index() != 0:
    yield
    return
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, ".lock")
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
      f.seek(0)
      raise ValueError(f"--workdir={workdir!r} is in use by another job "
                       f"(pid {f.read().strip() or '?'}).") from e
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _fit_score_scale(step_scores: np.ndarray, train_trace: trace_lib.Trace) -> np.ndarray:
  """Least-squares scale per test example mapping a per-step score to a loss change.

  Influence-function scores have no natural per-step scale (it depends on the damping),
  so `ekfac_if` is calibrated on the training runs, the data every simulator sees:
  c_m = argmin_c Σ_{r,t} (L_t − L_{t−1} − c·Σ_{i∈c_t} s_{i,m})².

  Args:
    step_scores: float[N, M] per-example score.
    train_trace: the training runs.

  Returns:
    float32[M].
  """
  ids = train_trace.batch_ids
  padded = np.concatenate([step_scores, np.zeros((1, step_scores.shape[1]))], axis=0)
  summed = padded[np.where(ids < 0, step_scores.shape[0], ids)].sum(axis=2)  # [R, T, M]
  deltas = np.diff(train_trace.losses, axis=1)
  denom = np.maximum((summed * summed).sum(axis=(0, 1)), 1e-30)
  return ((summed * deltas).sum(axis=(0, 1)) / denom).astype(np.float32)


def train_and_evaluate(config, workdir: str) -> dict:
  """Runs the whole pipeline; returns the metrics dict written to metrics.json."""
  # pylint: disable=g-import-not-at-top
  from simfluence_jax import data
  from simfluence_jax import models
  # pylint: enable=g-import-not-at-top

  validate_config(config)
  os.makedirs(workdir, exist_ok=True)
  stages = _Stages(workdir)
  logging.info("devices: %s", jax.devices())

  # --- Data ---------------------------------------------------------------------------
  dataset = stages.run("data", lambda: data.get_dataset(config))
  num_train, num_test = config.num_train_examples, config.num_test_examples
  logging.info("data %s: %d train, %d test examples (%s)", dataset.name, num_train,
               num_test, dataset.kind)

  # --- Model and base checkpoint ----------------------------------------------------
  model = models.get_model(config.model, vocab_size=dataset.vocab_size,
                           num_classes=dataset.num_classes, max_len=config.data.seq_len)
  loss_fn = training.make_loss_fn(model, dataset.kind)

  def make_base():
    params = models.init_variables(model, dataset.train["inputs"], seed=config.seed)
    if config.pretrain_steps and dataset.pretrain is not None:
      params = training.pretrain_base(
          params, loss_fn, dataset.pretrain, num_steps=config.pretrain_steps,
          batch_size=config.pretrain_batch_size,
          learning_rate=config.pretrain_learning_rate, seed=config.seed)
    return params

  base_params = stages.run(
      "base_model",
      lambda: training.get_base_params(os.path.join(workdir, "base"), make_base))

  # --- Curricula and runs -------------------------------------------------------------
  num_runs, num_held_out = config.num_runs, config.num_held_out_runs
  steps_per_epoch = -(-config.subset_size // config.batch_size)
  num_epochs = -(-config.num_steps // steps_per_epoch)
  batch_ids = data.make_curricula(
      num_runs + num_held_out, num_train, config.subset_size, num_epochs,
      config.batch_size, config.seed)[:, :config.num_steps]

  trace_path = os.path.join(workdir, "trace")

  def train():
    if sharding.agree(os.path.exists(os.path.join(trace_path, "trace.json"))):
      logging.info("reusing the trace in %s", trace_path)
      return trace_lib.Trace.load(trace_path)
    result = training.train_runs(
        base_params, batch_ids, loss_fn=loss_fn, config=config,
        train_arrays=dataset.train, test_arrays=dataset.test,
        workdir=os.path.join(workdir, "runs"),
        checkpoint_every=config.checkpoint_every, record_grads=config.record_grads,
        projection_dim=config.projection_dim, seed=config.seed)
    # The trace's host arrays are identical on every process; process 0 writes them.
    if sharding.is_primary():
      result.trace.save(trace_path)
    sharding.barrier("saved trace")
    # TensorBoard (workdir/tensorboard; event files on process 0 only).
    evaluation.write_training_metrics(os.path.join(workdir, "tensorboard"),
                                      result.trace, result.train_losses)
    return result.trace

  trace = stages.run("train_runs", train)
  train_trace = trace.select_runs(slice(0, num_runs))
  held_out = trace.select_runs(slice(num_runs, None))

  # --- Simulators ---------------------------------------------------------------------
  fitted = {}
  for kind in ("linear", "additive"):
    fitted[f"simfluence_{kind}"] = stages.run(
        f"fit_simfluence_{kind}",
        lambda kind=kind: simulators.fit(kind, train_trace, l2=config.simulators.l2))

  # --- Influence kernels ---------------------------------------------------------------
  task_cls = (influence.LanguageModelingTask if dataset.kind == "lm" else
              influence.ClassificationTask)
  task = task_cls(model.apply)
  chunk = config.influence.chunk_size
  train_batches = [jax.tree_util.tree_map(lambda x: x[i:i + chunk], dataset.train)
                   for i in range(0, num_train, chunk)]
  mean_lr = float(np.mean(train_trace.learning_rates))
  # Train examples of the score kernels are split over every device of the job.
  mesh = (sharding.make_mesh(runs=1, data=None) if jax.device_count() > 1 else None)

  def tracin_cp():
    steps, ckpt_params = training.load_tracin_checkpoints(os.path.join(workdir, "runs"))
    # Gradients at the checkpoints that steps were taken from (not the final one),
    # of the first runs; the mean dot product stands in for ⟨g_i(θ_t), g_q(θ_t)⟩.
    use = [k for k, step in enumerate(steps) if step < config.num_steps]
    checkpoints = [jax.tree_util.tree_map(lambda x, k=k, r=r: x[k, r], ckpt_params)
                   for k in use for r in range(config.influence.tracin_num_runs)]
    weights = [1.0 / len(checkpoints)] * len(checkpoints)
    return influence.tracin_scores(task, checkpoints, weights, dataset.test,
                                   train_batches, mesh=mesh)

  def ekfac_if():
    factors = influence.fit_ekfac(
        task, base_params, train_batches, fisher=config.influence.fisher,
        rng=jax.random.PRNGKey(config.seed), mesh=mesh)
    return influence.ekfac_scores(task, base_params, factors, dataset.test,
                                  train_batches, damping=config.influence.damping,
                                  mesh=mesh)

  tracin_dots = stages.cached_array("tracin_cp_scores", tracin_cp)  # [M, N]
  ekfac = stages.cached_array("ekfac_scores", ekfac_if)  # [M, N]
  # A step on batch c_t moves the loss by −(η/|c_t|)·Σ_i ⟨g_i, g_q⟩ (SGD on the mean).
  fitted["tracin_cp"] = simulators.additive_from_scores(
      -(mean_lr / config.batch_size) * tracin_dots.T, name="tracin_cp")
  if train_trace.has_grads:
    fitted["tracin_per_step"] = stages.run(
        "fit_tracin_per_step", lambda: simulators.tracin_per_step(train_trace))
  ekfac_step = -ekfac.T
  fitted["ekfac_if"] = simulators.additive_from_scores(
      ekfac_step * _fit_score_scale(ekfac_step, train_trace)[None], name="ekfac_if")

  # --- Held-out evaluation and report --------------------------------------------------
  def evaluate():
    metrics, predictions, bands = {}, {}, {}
    initial = held_out.losses[:, 0]
    for name, sim in fitted.items():
      predictions[name] = np.asarray(sim.simulate(held_out.batch_ids, initial))
      metrics[name] = evaluation.compute_metrics(predictions[name], held_out.losses)
    for name in ("simfluence_linear", "simfluence_additive"):
      bands[name] = tuple(np.asarray(x) for x in fitted[name].simulate_with_bands(
          held_out.batch_ids, initial, num_samples=config.simulators.num_band_samples,
          rng=jax.random.PRNGKey(config.seed)))
    return metrics, predictions, bands

  metrics, predictions, bands = stages.run("evaluate", evaluate)
  evaluation.write_evaluation_metrics(os.path.join(workdir, "tensorboard"), fitted,
                                      metrics)

  # --- Fitted simulators, for `python -m simfluence_jax.simulate` ----------------------
  if sharding.is_primary():
    stages.run("save_simulators", lambda: [
        sim.save(os.path.join(workdir, counterfactual.SIMULATORS_DIR, name))
        for name, sim in fitted.items()])

  # --- Counterfactual curricula: search on each simulator, retrain for real ------------
  counterfactual_result = None
  if config.counterfactual.enabled:
    cf = config.counterfactual
    start_ids = data.make_curricula(
        cf.num_searched, num_train, config.subset_size, num_epochs, config.batch_size,
        config.seed, first_run=num_runs + num_held_out)[:, :config.num_steps]

    def retrain(searched_ids):
      return stages.cached_array("counterfactual_losses", lambda: training.train_runs(
          base_params, searched_ids, loss_fn=loss_fn, config=config,
          train_arrays=dataset.train, test_arrays=dataset.test,
          workdir=os.path.join(workdir, "counterfactual_runs"),
          checkpoint_every=config.checkpoint_every, seed=config.seed).trace.losses)

    counterfactual_result = stages.run(
        "counterfactual", lambda: counterfactual.search_and_verify(
            fitted, initial_losses=train_trace.losses[0, 0], start_batch_ids=start_ids,
            random_batch_ids=held_out.batch_ids, random_losses=held_out.losses,
            targets=counterfactual.choose_targets(train_trace.losses, cf.num_targets),
            retrain=retrain, methods=cf.methods, num_iters=cf.num_iters,
            num_proposals=cf.num_proposals, epoch_steps=steps_per_epoch,
            seed=config.seed))
    if sharding.is_primary():
      for method, ids in counterfactual_result["batch_ids"].items():
        _io.write_text(
            os.path.join(workdir, "counterfactual", f"searched_{method}.json"),
            json.dumps({"batch_ids": ids.tolist()}))
  summary = {
      "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
      "dataset": dataset.name, "num_train_runs": num_runs,
      "num_held_out_runs": num_held_out, "devices": str(jax.devices()),
  }
  if sharding.is_primary():
    stages.run("report", lambda: evaluation.write_report(
        workdir, metrics=metrics, predictions=predictions, bands=bands,
        actual=held_out.losses, timings=stages.timings, summary=summary,
        test_texts=dataset.test_texts, counterfactual=counterfactual_result))
  for name in metrics:
    logging.info("%-20s %s", name, {k: round(float(v), 4) for k, v in
                                     metrics[name].items() if np.isscalar(v)})
  result = {**metrics, "timings": stages.timings}
  if counterfactual_result is not None:
    result["counterfactual"] = {k: v for k, v in counterfactual_result.items()
                                if k != "batch_ids"}
  return result


def initialize_distributed() -> None:
  """`jax.distributed.initialize()`, from SJ_* variables (launch/local.sh) or auto.

  On TPU pods and SLURM clusters JAX finds the coordinator itself; the local launcher
  sets SJ_COORDINATOR, SJ_NUM_PROCESSES and SJ_PROCESS_ID, and CPU processes use gloo
  collectives.
  """
  coordinator = os.environ.get("SJ_COORDINATOR")
  if not coordinator:
    jax.distributed.initialize()
    return
  try:
    num_processes = int(os.environ["SJ_NUM_PROCESSES"])
    process_id = int(os.environ["SJ_PROCESS_ID"])
  except (KeyError, ValueError) as e:
    raise ValueError("SJ_COORDINATOR is set, so SJ_NUM_PROCESSES and SJ_PROCESS_ID "
                     f"must be integers ({e}).") from e
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def _quiet_orbax(record) -> bool:
  """Drops orbax's INFO chatter (several lines per checkpoint) from the job's log."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # Library modules log through the standard logger; show their progress lines.
  std_logging.getLogger("simfluence_jax").setLevel(std_logging.INFO)
  if _CONFIG.value is None or _WORKDIR.value is None:
    print("error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  try:
    if _CONFIG.value.distributed:
      initialize_distributed()
    with workdir_lock(_WORKDIR.value):
      train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError, FloatingPointError) as e:
    # Bad input, or a run that diverged: one clear line, no traceback.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
