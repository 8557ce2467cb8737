"""The main job's stages: one plain function per stage, every input explicit.

Each function takes the `Workdir` it stores into, the config, and the outputs of
the stages it depends on, and returns its own output; `Workdir.stage` decides
whether it is computed, reused or refused (`fingerprint.py`). `experiment.py` calls
them in order; colabs and benchmarks can call any of them on their own.

Data flow (docs/design.md §3):

  data → base_model → curricula → record_runs → fit_simulators, tracin_cp, ekfac_if,
  tracin_per_step, features → simfluence_featurized; metagradient (no runs) →
  evaluate → learning_curve, counterfactual, removal_lds → report
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np

from simfluence_jax import _io
from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax import influence
from simfluence_jax import models
from simfluence_jax import sharding
from simfluence_jax import simulators
from simfluence_jax import trace as trace_lib
from simfluence_jax import training
from simfluence_jax.pipeline import fingerprint as fp
from simfluence_jax.pipeline import workdir as workdir_lib

_logger = logging.getLogger("simfluence_jax.pipeline")

# Config fields that shape the recorded runs (and so everything downstream).
DATA_FIELDS = ("data", "num_train_examples", "num_test_examples")
MODEL_FIELDS = ("model", "seed", "pretrain_steps", "pretrain_batch_size",
                "pretrain_learning_rate")
CURRICULA_FIELDS = ("seed", "num_train_examples", "subset_size", "num_runs",
                    "num_held_out_runs", "batch_size", "num_steps", "unseen")
OPTIMIZER_FIELDS = training.optim.CONFIG_FIELDS  # Every field the updates read.
RECORD_FIELDS = OPTIMIZER_FIELDS + ("checkpoint_every", "record_grads",
                                    "num_grad_runs", "projection_dim")


@dataclasses.dataclass(frozen=True)
class Model:
  """The model of the job: the linen module, its per-example loss, its base params."""

  module: Any
  loss_fn: Any
  params: Any
  kind: str


@dataclasses.dataclass(frozen=True)
class Curricula:
  """Batch ids of every group of runs, int32[runs, T, B] each (-1 = padding).

  Attributes:
    fit: the runs simulators are fitted on (R = config.num_runs).
    held_out: runs only used for evaluation, drawn like `fit`.
    unseen: runs drawn from all N train ids, so they contain `unseen_ids`, which
      no `fit` or `held_out` run contains (None when config.unseen.num_examples=0).
    unseen_ids: int32[U] train ids kept out of every fitted run.
    steps_per_epoch: batches per pass over a run's subset.
  """

  fit: np.ndarray
  held_out: np.ndarray
  unseen: Optional[np.ndarray]
  unseen_ids: np.ndarray
  steps_per_epoch: int

  def all_runs(self) -> np.ndarray:
    groups = [self.fit, self.held_out] + ([self.unseen] if self.unseen is not None
                                          else [])
    return np.concatenate(groups, axis=0)


@dataclasses.dataclass(frozen=True)
class Runs:
  """What `record_runs` produced.

  Attributes:
    trace: every run (fit, then held-out, then unseen), without gradients.
    grad_trace: the first `num_grad_runs` fitted runs with their recorded
      projected gradients (per-step TracIn), or None.
    seconds_per_run: wall time of one run without recorded gradients (the unit of
      every method's cost), and `seconds_per_grad_run` with them.
  """

  trace: trace_lib.Trace
  grad_trace: Optional[trace_lib.Trace]
  seconds_per_run: float
  seconds_per_grad_run: Optional[float]

  def group(self, curricula: Curricula, name: str) -> trace_lib.Trace:
    """The sub-trace of one group of runs ("fit", "held_out", "unseen")."""
    sizes = {"fit": len(curricula.fit), "held_out": len(curricula.held_out),
             "unseen": 0 if curricula.unseen is None else len(curricula.unseen)}
    order = ("fit", "held_out", "unseen")
    start = sum(sizes[n] for n in order[:order.index(name)])
    return self.trace.select_runs(slice(start, start + sizes[name]))


def check_dataset_sizes(config, dataset: data.Dataset) -> None:
  """Refuses a dataset whose N or M is not the config's: curricula and removals draw
  ids from `config.num_train_examples`, traces and influence scores index the
  dataset's rows, so the two must be the same examples."""
  for field in ("num_train_examples", "num_test_examples"):
    got = getattr(dataset, field)
    if got != config[field]:
      raise ValueError(f"config.{field}={config[field]}: the dataset has {got} "
                       f"(config.data.{field}={config.data[field]}): they must "
                       "agree.")


def load_data(wd: workdir_lib.Workdir, config) -> data.Dataset:
  """The train/test examples (generated or read each time; not stored).

  Their digest is part of the fingerprint, so a dataset that changed under the same
  config (a user's seqio Task, a TFDS version) is never mixed with runs trained on
  the old one.
  """
  start = time.perf_counter()
  dataset = data.get_dataset(config)
  check_dataset_sizes(config, dataset)
  digest = fp.tree_digest((dataset.train, dataset.test, dataset.pretrain))
  seconds = time.perf_counter() - start
  wd.stage("data", fields=DATA_FIELDS, compute=lambda: dataset,
           extra={"examples": digest})
  timing = wd.timings["data"]
  timing.seconds += seconds
  timing.computed_seconds = timing.seconds
  return dataset


def base_model(wd: workdir_lib.Workdir, config, dataset: data.Dataset) -> Model:
  """The model every run starts from: initialised, briefly pre-trained, saved (orbax).

  A built-in Transformer with `config.model.dropout` > 0 trains with dropout: its
  `loss_fn` takes the per-slot key `train_runs` (and the metagradients) pass and
  applies the model with `deterministic=False`; without a key (test losses,
  pre-training, features, influence) it runs deterministically.
  """
  # The model is built with the dataset's sizes (the plan sizes a job by them); one
  # asked for in config.model and not used is refused (review h28: num_classes and
  # max_len were ignored while the results recorded the value asked).
  for field, actual, what in (
      ("vocab_size", dataset.vocab_size, "the dataset's vocabulary size"),
      ("num_classes", dataset.num_classes, "the dataset's number of classes"),
      ("max_len", config.data.seq_len, "config.data.seq_len")):
    wanted = config.model.get(field)
    if wanted and wanted != actual:
      raise ValueError(f"config.model.{field}={wanted}: the model is built with "
                       f"{what}, {actual}; set it to that, or leave it unset.")
  if config.pretrain_steps and config.model.checkpoint:
    # It was ignored, and the stage record still said it (review h36).
    raise ValueError(f"config.pretrain_steps={config.pretrain_steps}: the base "
                     "model is config.model.checkpoint, which the job does not "
                     "pre-train; set config.pretrain_steps=0.")
  if config.pretrain_steps and dataset.pretrain is None:
    raise ValueError(f"config.pretrain_steps={config.pretrain_steps}: the "
                     f"{config.data.name!r} data has no pre-training split (or "
                     "config.data.num_pretrain_examples=0), so nothing would be "
                     "pre-trained; set config.pretrain_steps=0.")
  module = models.get_model(config.model, vocab_size=dataset.vocab_size,
                            num_classes=dataset.num_classes,
                            max_len=config.data.seq_len)
  dropout = float(getattr(module, "dropout", 0.0) or 0.0)
  trains_with_dropout = not config.model.factory and dropout > 0
  loss_fn = training.make_loss_fn(
      module, dataset.kind,
      train_kwargs={"deterministic": False} if trains_with_dropout else None)
  path = wd.path("base")

  def compute():
    if config.model.checkpoint:
      return training.load_params(config.model.checkpoint)
    params = models.init_variables(module, dataset.train["inputs"], seed=config.seed)
    if config.pretrain_steps:
      params = training.pretrain_base(
          params, loss_fn, dataset.pretrain, num_steps=config.pretrain_steps,
          batch_size=config.pretrain_batch_size,
          learning_rate=config.pretrain_learning_rate, seed=config.seed)
    return params

  extra = {}
  if trains_with_dropout:
    # Jobs before dropout was applied trained these settings deterministically:
    # their runs must not be reused as dropout runs (base_model is precious: a
    # workdir holding them is refused, or recomputed with --overwrite).
    extra["model.dropout"] = "applied in training"
  if config.model.checkpoint:
    # The checkpoint's contents, not just its path, shape every run.
    extra["checkpoint"] = fp.tree_digest(training.load_params(config.model.checkpoint))
  if config.model.factory:
    # A user's model is code the config only names: what it computes (its loss and,
    # without a checkpoint, its initialisation) is fingerprinted instead, so a model
    # edited under the same factory name never reuses runs of the old one. (The
    # built-in models are covered by the stages' code versions.)
    extra["model.factory computation"] = _factory_digest(
        module, loss_fn, dataset, config.seed, with_init=not config.model.checkpoint)
  params = wd.stage(
      "base_model", fields=MODEL_FIELDS, upstream=("data",), compute=compute,
      extra=extra,
      save=lambda params: training.save_params(path, params),
      load=lambda: training.load_params(path), outputs=("base",), precious=True)
  return Model(module, loss_fn, params, dataset.kind)


def _factory_digest(module, loss_fn, dataset: data.Dataset, seed: int,
                   with_init: bool) -> str:
  """`fingerprint.computation_digest` of a factory model's loss on one train
  example (and of its initialisation when `with_init`); traced, never run."""
  example = {name: np.asarray(array[:1]) for name, array in dataset.train.items()}
  key = jax.random.PRNGKey(seed)
  if with_init:  # the params' shapes from the init's own trace (traced once)
    init_digest, params = fp.computation_digest(module.init, key, example["inputs"],
                                                return_shape=True)
  else:
    params = jax.eval_shape(module.init, key, example["inputs"])
  parts = [fp.computation_digest(loss_fn, params, example)]
  if with_init:
    parts.append(init_digest)
  return fp.digest(parts)


def make_curricula(config) -> Curricula:
  """Batch ids of the fitted, held-out and unseen-example runs (pure: from the seed)."""
  num_train = config.num_train_examples
  steps_per_epoch = data.steps_per_epoch(config.subset_size, config.batch_size)
  num_epochs = -(-config.num_steps // steps_per_epoch)
  num_unseen = config.unseen.num_examples
  unseen_ids = np.sort(np.random.default_rng([config.seed, 7919]).permutation(
      num_train)[:num_unseen]).astype(np.int32)
  pool = np.setdiff1d(np.arange(num_train), unseen_ids) if num_unseen else None

  def draw(count, first_run, use_pool=True):
    return data.make_curricula(count, num_train, config.subset_size, num_epochs,
                               config.batch_size, config.seed, first_run=first_run,
                               pool=pool if use_pool else None)[:, :config.num_steps]

  num_fit, num_held = config.num_runs, config.num_held_out_runs
  unseen = (draw(config.unseen.num_runs, num_fit + num_held, use_pool=False)
            if num_unseen and config.unseen.num_runs else None)
  return Curricula(fit=draw(num_fit, 0), held_out=draw(num_held, num_fit),
                   unseen=unseen, unseen_ids=unseen_ids,
                   steps_per_epoch=steps_per_epoch)


def _train(config, model: Model, dataset, batch_ids, workdir, record_grads):
  """(TrainResult, seconds per run): the wall time of one whole run of T steps.

  A call that resumed from step s of T trained T − s steps: its time is scaled by
  T / (T − s) (an estimate, logged), so that a resumed job does not report every
  method's cost in units of a fraction of a run. The time is kept beside the runs'
  checkpoints (`<workdir>_timing.json`): a call that finds nothing left to train
  (the runs finished in a process that was stopped before the stage was saved)
  reads it back; NaN (unknown) when there is none. It was NaN for good before
  (review h22: tracin_per_step's cost after a resume).
  """
  timing_path = (None if workdir is None else
                 _io.as_path(os.fspath(workdir) + "_timing.json"))
  start = time.perf_counter()
  result = training.train_runs(
      model.params, batch_ids, loss_fn=model.loss_fn, config=config,
      train_arrays=dataset.train, test_arrays=dataset.test, workdir=workdir,
      checkpoint_every=config.checkpoint_every, record_grads=record_grads,
      projection_dim=config.projection_dim, seed=config.seed,
      mesh=_runs_mesh(config))
  seconds = (time.perf_counter() - start) / len(batch_ids)
  num_steps, resumed = batch_ids.shape[1], result.resumed_step
  trained = num_steps - resumed
  if resumed and not trained:
    saved = (_io.read_json(timing_path, "record_runs")
             if timing_path is not None and _io.exists(timing_path) else {})
    seconds = float(saved.get("seconds_per_run", float("nan")))
    how = ("the one measured when they were trained" if saved else
           "unknown (nothing was left to train, and no time was kept)")
  elif resumed:
    seconds = seconds * num_steps / trained
    how = f"estimated from the last {trained} steps"
  if resumed:
    _logger.warning("training: the runs in %s resumed at step %d of %d; the time "
                    "of one run (the unit of every method's cost) is %s.",
                    workdir, resumed, num_steps, how)
  if trained and timing_path is not None and sharding.is_primary():
    _io.write_json(timing_path, {"seconds_per_run": seconds,
                                 "estimated": bool(resumed)})
  return result, seconds


def record_runs(wd: workdir_lib.Workdir, config, dataset, model: Model,
                curricula: Curricula) -> Runs:
  """Trains every run from the base model and records its trace (resumable).

  The first `num_grad_runs` fitted runs also record projected per-step gradients
  (8× the cost of a plain run on the default model); the others do not.
  """
  batch_ids = curricula.all_runs()
  num_grad = min(config.num_grad_runs, len(curricula.fit)) if config.record_grads else 0

  def compute():
    grad_trace, grad_seconds = None, None
    if num_grad:
      result, grad_seconds = _train(config, model, dataset, batch_ids[:num_grad],
                                    wd.path("runs", "grads"), True)
      grad_trace = result.trace
    result, seconds = _train(config, model, dataset, batch_ids[num_grad:],
                             wd.path("runs", "plain"), False)
    if grad_trace is None:
      trace = result.trace
    else:
      trace = trace_lib.Trace(
          batch_ids=batch_ids,
          losses=np.concatenate([grad_trace.losses, result.trace.losses]),
          learning_rates=np.concatenate([grad_trace.learning_rates,
                                         result.trace.learning_rates]),
          num_train_examples=dataset.num_train_examples,
          metadata=result.trace.metadata)
    return Runs(trace, grad_trace, seconds, grad_seconds)

  def save(runs: Runs):
    if sharding.is_primary():
      runs.trace.save(wd.path("trace"))
      if runs.grad_trace is not None:
        runs.grad_trace.save(wd.path("grad_trace"))
      _io.write_json(wd.path("trace", "timing.json"), {
          "seconds_per_run": runs.seconds_per_run,
          "seconds_per_grad_run": runs.seconds_per_grad_run})
    sharding.barrier("saved trace")

  def load():
    timing = _io.read_json(wd.path("trace", "timing.json"), "record_runs")
    grad_path = wd.path("grad_trace")
    if num_grad and not grad_path.exists():
      # Without it tracin_per_step would drop out of the results unsaid.
      raise FileNotFoundError(f"{os.fspath(grad_path)} is missing (the per-step "
                              f"gradients of the first {num_grad} fitted runs)")
    return Runs(trace_lib.Trace.load(wd.path("trace")),
                trace_lib.Trace.load(grad_path) if num_grad else None,
                timing["seconds_per_run"], timing["seconds_per_grad_run"])

  _check_legacy_curricula(wd, batch_ids)
  return wd.stage("record_runs", fields=RECORD_FIELDS + CURRICULA_FIELDS,
                  upstream=("base_model",), compute=compute, save=save, load=load,
                  outputs=("runs", "trace", "grad_trace"), precious=True,
                  checks=curricula_checks(curricula))


def curricula_checks(curricula: Curricula) -> dict:
  """The `checks` of a stage computed from the curricula (`fp.Inputs.checks`).

  They are drawn again from the seed on every job, and NumPy does not promise its
  Generator stream across versions: a stage computed from other curricula under the
  same config is "changed" (refused if precious, else recomputed, and so is every
  stage downstream of it), never reused.
  """
  return {"curricula": fp.array_digest(curricula.all_runs())}


def _check_legacy_curricula(wd: workdir_lib.Workdir, batch_ids: np.ndarray) -> None:
  """A `record_runs` record written before `curricula_checks` existed holds no
  digest of its curricula: compares the stored trace's with this job's. Other ones
  are refused, or with `--overwrite` the record of every stage from record_runs on
  is discarded (none of them says which curricula it was computed from)."""
  first = ""  # where the curricula differ (process 0 reads; all agree)
  record = wd.read_record("record_runs")
  if (record is not None and "curricula" not in (record.get("checks") or {}) and
      record.get("status") == "done" and wd.path("trace", "batch_ids.npy").exists()):
    recorded = _io.load_npy(wd.path("trace", "batch_ids.npy"), "record_runs")
    if recorded.shape != batch_ids.shape:
      first = f"shape {recorded.shape} != {batch_ids.shape}"
    elif not np.array_equal(recorded, batch_ids):
      first = f"run {int(np.argwhere(recorded != batch_ids)[0][0])}"
  if not int(sharding.agree(int(bool(first)))):
    return
  first = first or "see process 0's log"
  if not wd.overwrite:
    raise wd.refuse(
        f"--workdir={os.fspath(wd.root)!r}: stage record_runs holds runs of other "
        f"curricula than this config's seed draws ({first}; another NumPy random "
        "stream?); use a fresh --workdir, or --overwrite to discard every stage from "
        "record_runs on.")
  _logger.warning("record_runs: the recorded runs' curricula are not this job's "
                  "(%s): --overwrite discards every stage from record_runs on.",
                  first)
  wd.discard_records(keep=("data", "base_model"))


def _cached_array(wd, name: str, compute, *, fields, upstream, version=1,
                  checks=None):
  """A stage whose output is one array, stored as `arrays/<name>.npy`."""
  path = wd.path("arrays", name + ".npy")

  def save(value):
    if sharding.is_primary():
      _io.save_npy(path, value)

  return wd.stage(name, fields=fields, upstream=upstream,
                  compute=lambda: np.asarray(sharding.to_host(compute())),
                  save=save, load=lambda: _io.load_npy(path, f"stage {name}"),
                  outputs=(f"arrays/{name}.npy",), version=version, checks=checks)


def _task(model: Model):
  """The influence task of the job's model, applied to `_trainable(params)`.

  The kernels differentiate every leaf they are given, so they get the `"params"`
  collection alone; any other collection of the variables dict (BatchNorm
  `batch_stats`: frozen in training, `training.make_loss_fn`) is the base model's,
  closed over here (the influence kernels refuse a variables dict holding them).
  """
  task_cls = (influence.LanguageModelingTask if model.kind == "lm" else
              influence.ClassificationTask)
  frozen = _frozen_collections(model.params)
  if not frozen:
    return task_cls(model.module.apply)

  def apply(variables, *args, **kwargs):
    return model.module.apply({**variables, **frozen}, *args, **kwargs)
  return task_cls(apply)


def _frozen_collections(params) -> dict:
  """The collections of a linen variables dict other than `"params"` ({} if none)."""
  if not isinstance(params, Mapping) or "params" not in params:
    return {}
  return {k: v for k, v in params.items() if k != "params"}


def _trainable(params):
  """`params` as the influence kernels take them: the `"params"` collection alone."""
  return {"params": params["params"]} if _frozen_collections(params) else params


def _train_batches(config, dataset):
  chunk = config.influence.chunk_size
  return [jax.tree_util.tree_map(lambda x: x[i:i + chunk], dataset.train)
          for i in range(0, dataset.num_train_examples, chunk)]


def _runs_mesh(config):
  # Runs over `runs`, each run's params and optimizer state over `mesh_model`.
  runs, _ = config_lib.mesh_model_sizes(config, jax.device_count())
  return sharding.runs_mesh(runs)


def _score_mesh(config):
  # Train examples of the score kernels over `data`, params and factors over `model`.
  _, scores = config_lib.mesh_model_sizes(config, jax.device_count())
  return sharding.scores_mesh(scores) if jax.device_count() > 1 else None


def tracin_checkpoints(wd, config) -> list:
  """Params of the first `influence.tracin_num_runs` fitted runs at every checkpoint
  a step was taken from (steps < T), in the order (checkpoint, run).

  Raises:
    FileNotFoundError: a checkpoint the config implies is missing (deleted).
  """
  num_grad = min(config.num_grad_runs, config.num_runs) if config.record_grads else 0
  wanted = list(range(config.influence.tracin_num_runs))
  groups = [("grads", wanted[:num_grad], 0), ("plain", wanted[num_grad:], num_grad)]
  expected = list(range(0, config.num_steps, config.checkpoint_every))
  per_run = {}
  for group, runs, offset in groups:
    if not runs:
      continue
    steps, params = training.load_tracin_checkpoints(wd.path("runs", group))
    missing = sorted(set(expected) - set(steps))
    if missing:
      raise FileNotFoundError(
          f"tracin_cp: TracIn checkpoints at steps {missing} are missing from "
          f"{wd.path('runs', group)}/tracin_ckpt (deleted?); restore them, or delete "
          f"{wd.path('stages', 'record_runs.json')} to train the runs again.")
    for r in runs:
      per_run[r] = [jax.tree_util.tree_map(
          lambda x, k=steps.index(s), r=r - offset: x[k, r], params) for s in expected]
  return [per_run[r][k] for k in range(len(expected)) for r in wanted]


def tracin_cp(wd, config, dataset, model: Model) -> np.ndarray:
  """float32[M, N] mean over checkpoints of ⟨∇ℓ_i(θ_k), ∇ℓ_q(θ_k)⟩."""
  def compute():
    checkpoints = [_trainable(c) for c in tracin_checkpoints(wd, config)]
    weights = [1.0 / len(checkpoints)] * len(checkpoints)
    return influence.tracin_scores(_task(model), checkpoints, weights, dataset.test,
                                   _train_batches(config, dataset),
                                   mesh=_score_mesh(config))
  # Version 2: layer discovery leaves the TransformerLM's position embedding (a
  # table shared by every example) to plain per-example gradients; version 1
  # scores took its tokens as example 0's, up to 70% off.
  return _cached_array(wd, "tracin_cp_scores", compute,
                       fields=("influence.tracin_num_runs", "influence.chunk_size"),
                       upstream=("record_runs",), version=2)


def ekfac_if(wd, config, dataset, model: Model) -> np.ndarray:
  """float32[M, N] EK-FAC influence ⟨∇ℓ_q, (G+λI)^{-1} ∇ℓ_i⟩ at the base model."""
  def compute():
    task, batches = _task(model), _train_batches(config, dataset)
    mesh = _score_mesh(config)
    params = _trainable(model.params)
    factors = influence.fit_ekfac(task, params, batches,
                                  fisher=config.influence.fisher,
                                  rng=jax.random.PRNGKey(config.seed), mesh=mesh)
    return influence.ekfac_scores(task, params, factors, dataset.test, batches,
                                  damping=config.influence.damping, mesh=mesh,
                                  query_rank=config.influence.query_rank)
  return _cached_array(wd, "ekfac_scores", compute,
                       fields=("influence.fisher", "influence.damping",
                               "influence.chunk_size", "influence.query_rank"),
                       upstream=("base_model",),
                       # 3: prompt tokens count in the covariances (2: unreleased)
                       version=3)


def _score_scale(step_scores: np.ndarray, fit_trace: trace_lib.Trace) -> np.ndarray:
  """float32[M] least-squares scale mapping a per-step score to a loss change.

  Influence-function scores have no natural per-step scale (it depends on the
  damping), so `ekfac_if` is calibrated on the fitted runs, the data every simulator
  sees: c_m = argmin_c Σ_{r,t} (L_t − L_{t−1} − c·Σ_{i∈c_t} s_{i,m})².
  """
  ids = fit_trace.batch_ids
  padded = np.concatenate([step_scores, np.zeros((1, step_scores.shape[1]))], axis=0)
  summed = padded[np.where(ids < 0, step_scores.shape[0], ids)].sum(axis=2)
  deltas = np.diff(fit_trace.losses, axis=1)
  denom = np.maximum((summed * summed).sum(axis=(0, 1)), 1e-30)
  return ((summed * deltas).sum(axis=(0, 1)) / denom).astype(np.float32)


# The `simulators` fields a ridge fit reads (`fit_ridge`); `num_band_samples` is
# evaluate's, `feature_dim` the features stage's, so changing them refits nothing
# (review h22: num_band_samples refitted three simulators and retrained the
# counterfactual curricula, bit-identical).
RIDGE_FIELDS = ("simulators.l2", "simulators.l2_grid", "simulators.cv_folds")


def fit_ridge(config, kind: str, fit_trace: trace_lib.Trace, **kwargs):
  """`simulators.fit` with `config.simulators.l2`, or `fit_cv` over its grid (None)."""
  sim_config = config.simulators
  kwargs = dict(kwargs, num_phases=sim_config.num_phases) if kind != "featurized" \
      else kwargs
  if sim_config.l2 is not None:
    return simulators.fit(kind, fit_trace, l2=sim_config.l2, **kwargs)
  folds = min(sim_config.cv_folds, fit_trace.num_runs)
  return simulators.fit_cv(kind, fit_trace, l2_grid=tuple(sim_config.l2_grid),
                           num_folds=folds, **kwargs)


def _simulator_stage(wd, name: str, compute, *, fields, upstream, version=1):
  """A stage whose output is one `Simulator`, stored as `simulators/<name>/`."""
  path = wd.path("simulators", name)

  def save(sim):
    if sharding.is_primary():
      sim.save(path)

  return wd.stage(f"fit_{name}", fields=fields, upstream=upstream, compute=compute,
                  save=save, load=lambda: simulators.Simulator.load(path),
                  outputs=(f"simulators/{name}",), version=version)


def fit_simulators(wd, config, runs: Runs, curricula: Curricula,
                   scores: dict) -> dict:
  """Every simulator of `config.methods`, fitted on the fitted runs only.

  Args:
    scores: method -> float32[M, N] attribution scores (`tracin_cp`, `ekfac_if`).

  Returns:
    method name -> `Simulator`.
  """
  fit_trace = runs.group(curricula, "fit")
  methods, sims = config.methods, {}
  # Version 2: the saved simulators record the ids of the fitted runs
  # (`Simulator.fitted_ids`), which `simulate` checks curricula against; 3: CG
  # goes on until θ settles (`simulators.solve`).
  for kind in ("linear", "additive"):
    name = f"simfluence_{kind}"
    if name in methods:
      sims[name] = _simulator_stage(
          wd, name, lambda kind=kind: fit_ridge(config, kind, fit_trace),
          fields=RIDGE_FIELDS + ("simulators.num_phases",),
          upstream=("record_runs",), version=3)
  mean_lr = float(np.mean(fit_trace.learning_rates))
  if "tracin_cp" in methods:
    # A step on batch c_t moves the loss by −(η/|c_t|)·Σ_i ⟨g_i, g_q⟩ (SGD on the mean).
    # batch_mean: a padded step of v ids divides by v, as training does.
    sims["tracin_cp"] = _simulator_stage(
        wd, "tracin_cp", lambda: simulators.additive_from_scores(
            -(mean_lr / config.batch_size) * scores["tracin_cp"].T, name="tracin_cp",
            batch_size=config.batch_size, num_steps=config.num_steps,
            batch_mean=True),
        fields=(), upstream=("tracin_cp_scores", "record_runs"), version=2)
  if "tracin_per_step" in methods and runs.grad_trace is not None:
    sims["tracin_per_step"] = _simulator_stage(
        wd, "tracin_per_step", lambda: simulators.tracin_per_step(runs.grad_trace),
        fields=(), upstream=("record_runs",), version=2)
  if "ekfac_if" in methods:
    step_scores = -scores["ekfac_if"].T
    sims["ekfac_if"] = _simulator_stage(
        wd, "ekfac_if", lambda: simulators.additive_from_scores(
            step_scores * _score_scale(step_scores, fit_trace)[None], name="ekfac_if",
            batch_size=config.batch_size, num_steps=config.num_steps),
        fields=(), upstream=("ekfac_scores", "record_runs"))
  return sims


@dataclasses.dataclass(frozen=True)
class Evaluation:
  """Held-out results of every method.

  Attributes:
    metrics: evaluation set ("held_out", "unseen") -> method -> metric -> value
      (the metrics of `evaluation.METRICS`, each MSE also as `<mse>_ratio` to
      curriculum_blind's, `min_loss`, `spearman_across_runs_skipped`: the test
      examples constant across runs that ρ across runs leaves out, and
      `undefined`: metric -> reason).
    predictions: method -> float32[R', T+1, M] on the held-out runs.
    bands: method -> (mean, std) posterior bands on the held-out runs.
    actual: float32[R', T+1, M] the held-out runs' losses.
  """

  metrics: dict
  predictions: dict
  bands: dict
  actual: np.ndarray


def _set_metrics(predictions: dict, actual: np.ndarray) -> dict:
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top
  out = {}
  for method, pred in predictions.items():
    values = evaluation.compute_metrics(pred, actual)
    values["min_loss"] = evaluation.min_loss(pred)
    values["spearman_across_runs_skipped"] = evaluation.spearman_across_runs_skipped(
        pred, actual)
    undefined = evaluation.undefined_reasons(pred, actual)
    if undefined:
      values["undefined"] = undefined
    out[method] = values
  blind = out.get("curriculum_blind")
  for values in out.values():
    for name in ("all_steps_mse", "final_step_mse"):
      ratio = values[name] / blind[name] if blind and blind[name] > 0 else np.nan
      values[name + "_ratio"] = float(ratio)
  return out


def hybrid(predictions: dict) -> np.ndarray:
  """`simfluence_hybrid`: the mean of the metagradient and Simfluence-Linear predictions.

  The two err differently (a first-order expansion with no fitted runs; a
  multiplicative model fitted on runs), so their equal-weight average is better than
  either on the MSEs (measured: docs/design.md §2, docs/experiments.md). No weight
  is fitted: the average needs no extra runs and cannot overfit the held-out runs.
  """
  missing = [m for m in ("metagradient", "simfluence_linear") if m not in predictions]
  if missing:
    raise ValueError(f"config.methods: simfluence_hybrid needs {missing} too.")
  return 0.5 * (predictions["metagradient"] + predictions["simfluence_linear"])


def evaluate(wd, config, runs: Runs, curricula: Curricula, sims: dict,
             direct: dict, upstream: tuple) -> Evaluation:
  """Every method's predictions of the held-out (and unseen-example) runs, scored.

  Args:
    sims: method -> fitted `Simulator`.
    direct: method -> {set name -> float32[R', T+1, M]} predictions made without a
      simulator (e.g. `metagradient`).
    upstream: names of the stages that produced `sims` and `direct`.
  """
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top
  fit_trace = runs.group(curricula, "fit")
  sets = {"held_out": runs.group(curricula, "held_out")}
  if curricula.unseen is not None:
    sets["unseen"] = runs.group(curricula, "unseen")

  def compute():
    metrics, predictions = {}, {}
    for set_name, held in sets.items():
      preds = {}
      if "curriculum_blind" in config.methods:
        preds["curriculum_blind"] = evaluation.curriculum_blind(fit_trace.losses,
                                                                held.num_runs)
      for name, sim in sims.items():
        # A diverging rollout is scored NaN with its reason (`evaluation`). Ids no
        # fitted run contained (the unseen examples; by chance, a held-out id no
        # fitted or gradient run drew) are rolled out on the simulator's prior:
        # measuring that is the point of these sets.
        preds[name] = np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0],
                                              allow_nonfinite=True,
                                              allow_unfitted_ids=True))
      for name, by_set in direct.items():
        preds[name] = np.asarray(by_set[set_name])
      if "simfluence_hybrid" in config.methods:
        preds["simfluence_hybrid"] = hybrid(preds)
      metrics[set_name] = _set_metrics(preds, held.losses)
      if set_name == "held_out":
        predictions = preds
    held = sets["held_out"]
    bands = {name: tuple(np.asarray(x) for x in sims[name].simulate_with_bands(
        held.batch_ids, held.losses[:, 0],
        num_samples=config.simulators.num_band_samples,
        rng=jax.random.PRNGKey(config.seed), allow_nonfinite=True,
        allow_unfitted_ids=True))
             for name in ("simfluence_linear", "simfluence_additive") if name in sims}
    return Evaluation(metrics, predictions, bands, held.losses)

  def save(result: Evaluation):
    if not sharding.is_primary():
      return
    _io.write_json(wd.path("evaluation", "metrics.json"), result.metrics)
    for name, pred in result.predictions.items():
      _io.save_npy(wd.path("evaluation", f"pred_{name}.npy"), pred)
    for name, (mean, std) in result.bands.items():
      _io.save_npy(wd.path("evaluation", f"band_mean_{name}.npy"), mean)
      _io.save_npy(wd.path("evaluation", f"band_std_{name}.npy"), std)

  def load():
    metrics = _io.read_json(wd.path("evaluation", "metrics.json"), "evaluate")
    get = lambda file: _io.load_npy(wd.path("evaluation", file), "evaluate")
    predictions = {name: get(f"pred_{name}.npy") for name in metrics["held_out"]}
    bands = {name: (get(f"band_mean_{name}.npy"), get(f"band_std_{name}.npy"))
             for name in ("simfluence_linear", "simfluence_additive") if name in sims}
    return Evaluation(metrics, predictions, bands, sets["held_out"].losses)

  # Version 2: ranked metrics skip rows that differ only by float rounding
  # (4fd73af); a record from before kept the old values where no fit_* upstream
  # changed (a review's reproduction). Version 4: a non-finite prediction's MSEs
  # are NaN (all_steps_mse was inf).
  return wd.stage("evaluate", fields=("methods", "simulators.num_band_samples"),
                  upstream=("record_runs",) + tuple(upstream), compute=compute,
                  save=save, load=load, outputs=("evaluation",),
                  version=4)  # 3: spearman_across_runs_skipped; 4: NaN MSEs


def metagradient_table_simulator(config, dataset, model: Model, test_ids,
                                 initial_losses):
  """The metagradient's final-loss prediction as a final-only simulator.

  The first-order expansion around the full-batch reference (`metagradient`'s), read
  from one reverse-mode table of the final losses of test examples `test_ids` (⌈k /
  `metagradient.cotangents_at_once`⌉ reverse passes), from `initial_losses`
  float32[M] (the base model's test losses, where every curriculum starts), as a
  simulator over all M test examples that predicts those k
  (`training.table_simulator`); what the curriculum search needs for thousands of
  curricula.
  """
  test_ids = np.asarray(test_ids, np.int32)
  reference = _reference_batch_ids(config)
  _logger.info("counterfactual: metagradient table of %d target test examples "
               "(reverse mode through the %d-step full-batch reference run)",
               len(test_ids), len(reference))
  kwargs = dict(loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
                test_arrays=jax.tree_util.tree_map(lambda x: x[test_ids], dataset.test),
                seed=config.seed)
  table, final = training.metagradients(
      model.params, reference, return_final_losses=True,
      cotangents_at_once=config.metagradient.cotangents_at_once, **kwargs)
  return training.table_simulator(
      table, reference, final, np.asarray(initial_losses, np.float32)[test_ids],
      num_train_examples=config.num_train_examples, batch_size=config.batch_size,
      test_columns=test_ids, num_test_examples=dataset.num_test_examples,
      name="metagradient")


def _check_pool(config, method: str, pool) -> None:
  if pool is not None and len(pool) < config.subset_size:
    raise ValueError(f"counterfactual: {method} is fitted on {len(pool)} train ids, "
                     f"fewer than subset_size={config.subset_size}: a start "
                     "curriculum of that size would hold ids it has no data for "
                     "(raise num_steps or num_runs, lower subset_size, or leave "
                     f"{method} out of counterfactual.methods).")


def check_counterfactual_pools(config, curricula: Curricula) -> None:
  """Refuses, before any run trains, a curriculum search `counterfactual` would
  refuse after every stage before it: a searched simulator fitted per id
  (Simfluence-Linear / -Additive on the fitted runs, per-step TracIn on the first
  `num_grad_runs` of them) draws its start curricula from the ids those runs hold
  (`simulators.fitted_ids_of`), at least `subset_size` of them."""
  cf = config.counterfactual
  if not cf.enabled:
    return
  grad_runs = curricula.fit[:min(config.num_grad_runs, config.num_runs)]
  pooled = {"simfluence_linear": (curricula.fit, config.simulators.num_phases),
            "simfluence_additive": (curricula.fit, config.simulators.num_phases),
            "tracin_per_step": (grad_runs, 1)}
  for method in cf.methods:
    if method in pooled and method in config.methods and len(pooled[method][0]):
      _check_pool(config, method, simulators.fitted_ids_of(*pooled[method]))


def counterfactual_starts(config, curricula: Curricula, pool=None,
                          method: str = "the searched simulator") -> np.ndarray:
  """int32[C, T, B] the random curricula a method's search starts from (the runs
  after all of `curricula`'s, so none is a training run), drawn from `pool` (the
  ids a searched simulator was fitted on, `Simulator.fitted_ids`; None: all N).

  Raises:
    ValueError: `pool` holds fewer ids than `subset_size`.
  """
  num_epochs = -(-config.num_steps // curricula.steps_per_epoch)
  _check_pool(config, method, pool)
  return data.make_curricula(
      config.counterfactual.num_searched, config.num_train_examples,
      config.subset_size, num_epochs, config.batch_size, config.seed,
      first_run=len(curricula.all_runs()),
      pool=None if pool is None else np.asarray(pool, np.int64))[:, :config.num_steps]


def counterfactual(wd, config, dataset, model: Model, runs: Runs,
                   curricula: Curricula, sims: dict) -> Optional[dict]:
  """Searches curricula on each simulator and retrains them (`counterfactual.py`).

  Searched: the `counterfactual.methods` that `config.methods` computes.
  "metagradient" searches on its first-order prediction of the targets' final
  losses (`metagradient_table_simulator`, built here: one reverse pass per 8
  targets through the full-batch reference run). A simulator fitted per id on the
  fitted runs (`Simulator.fitted_ids`: Simfluence-Linear / -Additive, per-step
  TracIn) starts from curricula drawn from those ids and moves only among them
  (so it never searches over the unseen examples it knows nothing of, and draws
  from the pool of the held-out runs it is compared with); the others (scores of
  all N ids, the metagradient's table) start from curricula of all N ids.
  """
  from simfluence_jax import counterfactual as cf_lib  # pylint: disable=g-import-not-at-top
  cf = config.counterfactual
  methods = [m for m in cf.methods if m in sims or (
      m == "metagradient" and "metagradient" in config.methods)]
  if not cf.enabled:
    return None
  skipped = [m for m in cf.methods if m not in methods]
  if skipped:
    _logger.warning("counterfactual: not searching on %s: not in config.methods "
                    "(searching on %s).", skipped, methods or "none")
  if not methods:
    return None
  fit_trace, held = runs.group(curricula, "fit"), runs.group(curricula, "held_out")
  targets = cf_lib.choose_targets(fit_trace.losses, cf.num_targets)
  start_ids = counterfactual_starts(config, curricula)

  def retrain(searched_ids):
    result, _ = _train(config, model, dataset, searched_ids,
                       wd.path("counterfactual_runs"), False)
    return result.trace.losses

  def compute():
    searched = {m: sims[m] for m in methods if m != "metagradient"}
    if "metagradient" in methods:
      searched["metagradient"] = metagradient_table_simulator(
          config, dataset, model, targets, fit_trace.losses[0, 0])
    starts = {m: start_ids if searched[m].fitted_ids is None else
              counterfactual_starts(config, curricula, pool=searched[m].fitted_ids,
                                    method=m)
              for m in methods}
    return cf_lib.search_and_verify(
        searched, initial_losses=fit_trace.losses[0, 0],
        start_batch_ids=starts, random_batch_ids=held.batch_ids,
        random_losses=held.losses, targets=targets,
        retrain=retrain, methods=methods, num_iters=cf.num_iters,
        num_proposals=cf.num_proposals, epoch_steps=curricula.steps_per_epoch,
        seed=config.seed)

  def save(result):
    if sharding.is_primary():
      _io.write_json(wd.path("counterfactual", "result.json"),
                     {k: v for k, v in result.items() if k != "batch_ids"})
      for method, ids in result["batch_ids"].items():
        _io.write_json(wd.path("counterfactual", f"searched_{method}.json"),
                       {"batch_ids": np.asarray(ids).tolist()})

  def load():
    result = _io.read_json(wd.path("counterfactual", "result.json"), "counterfactual")
    result["batch_ids"] = {
        m: np.asarray(_io.read_json(wd.path("counterfactual", f"searched_{m}.json"),
                                    "counterfactual")["batch_ids"], np.int32)
        for m in result["searched"]}
    return result

  table_fields = (("metagradient.reference_batch_size",) if "metagradient" in methods
                  else ())
  # Version 2: a simulator with `fitted_ids` searches only those ids.
  return wd.stage("counterfactual", fields=("counterfactual",) + table_fields,
                  upstream=("record_runs",) + tuple(
                      f"fit_{m}" for m in methods if m != "metagradient"),
                  compute=compute, save=save, load=load,
                  outputs=("counterfactual", "counterfactual_runs"),
                  version=3)  # 3: simulated losses clipped at 0, as the search


def curve_counts(requested, num_fitted: int) -> list:
  """The learning curve's run counts: those of `requested` in [1, num_fitted], and
  num_fitted itself; counts above it are left out with a warning naming them."""
  beyond = sorted(int(k) for k in requested if k > num_fitted)
  if beyond:
    _logger.warning("learning_curve: run counts %s exceed the %d fitted runs "
                    "(config.num_runs); the curve stops at %d.", beyond, num_fitted,
                    num_fitted)
  return sorted({int(k) for k in requested if 0 < k <= num_fitted} | {num_fitted})


def learning_curve(wd, config, runs: Runs, curricula: Curricula,
                   full_fit=None) -> dict:
  """Simfluence-Linear refitted on the first k fitted runs, for k in the config's grid.

  Args:
    full_fit: the `simfluence_linear` simulator of `fit_simulators` (fitted on every
      fitted run with the same settings), reused as the curve's last point instead
      of being fitted again; None = fit it here.

  Returns:
    {"num_runs": [k...], "spearman_across_runs": [...], "all_steps_mse": [...],
    "all_steps_mse_ratio": [...]} on the held-out runs (ratio to curriculum_blind).
  """
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top
  fit_trace, held = runs.group(curricula, "fit"), runs.group(curricula, "held_out")
  counts = curve_counts(config.learning_curve, fit_trace.num_runs)

  def compute():
    blind = evaluation.all_steps_mse(
        evaluation.curriculum_blind(fit_trace.losses, held.num_runs), held.losses)
    curve = {"num_runs": counts, "spearman_across_runs": [], "all_steps_mse": [],
             "all_steps_mse_ratio": []}
    for k in counts:
      sim = (full_fit if full_fit is not None and k == fit_trace.num_runs else
             fit_ridge(config, "linear", fit_trace.select_runs(slice(0, k))))
      # The first k runs may miss held-out ids: the curve measures that too.
      pred = np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0],
                                     allow_nonfinite=True, allow_unfitted_ids=True))
      mse = evaluation.all_steps_mse(pred, held.losses)
      curve["spearman_across_runs"].append(
          evaluation.spearman_across_runs(pred, held.losses))
      curve["all_steps_mse"].append(mse)
      curve["all_steps_mse_ratio"].append(mse / blind)
    return curve

  path = wd.path("learning_curve.json")
  return wd.stage(
      "learning_curve", fields=("learning_curve", "simulators.num_phases")
      + RIDGE_FIELDS,
      upstream=("record_runs",) + (("fit_simfluence_linear",) if full_fit is not None
                                   else ()), compute=compute,
      save=lambda c: _io.write_json(path, c) if sharding.is_primary() else None,
      load=lambda: _io.read_json(path, "learning_curve"),
      outputs=("learning_curve.json",),
      version=4)  # 2, 3: as evaluate's; 4: CG goes on until θ settles


def _reference_batch_ids(config) -> np.ndarray:
  """int32[T, S] the batches the metagradient expansion is taken around.

  `metagradient.reference_batch_size` = 0: full batch (every train id at every step,
  S = N, each weighted 1/N); B' > 0: B' ids drawn afresh every step (cheaper by
  N/B', further from any one curriculum).
  """
  num_train, size = config.num_train_examples, config.metagradient.reference_batch_size
  if not size or size >= num_train:
    return np.tile(np.arange(num_train, dtype=np.int32), (config.num_steps, 1))
  rng = np.random.default_rng([config.seed, 104729])
  return np.stack([rng.choice(num_train, size, replace=False)
                   for _ in range(config.num_steps)]).astype(np.int32)


def metagradient(wd, config, dataset, model: Model, curricula: Curricula) -> dict:
  """First-order predictions of the held-out (and unseen) runs, with no fitted runs.

  The test-loss trajectory is a function of per-step example weights; its
  first-order expansion around a reference run (`_reference_batch_ids`) is evaluated
  at each curriculum by one jvp (`training.first_order_losses`).

  Returns:
    set name ("held_out", "unseen") -> float32[R', T+1, M].
  """
  sets = {"held_out": curricula.held_out}
  if curricula.unseen is not None:
    sets["unseen"] = curricula.unseen

  def compute():
    stacked = np.concatenate(list(sets.values()))
    try:
      result = training.first_order_losses(
          model.params, _reference_batch_ids(config), stacked, loss_fn=model.loss_fn,
          config=config, train_arrays=dataset.train, test_arrays=dataset.test,
          chunk_size=config.metagradient.chunk_size, seed=config.seed)
    except training.SingularExpansionError as e:
      raise ValueError(
          f"config.metagradient.reference_batch_size="
          f"{config.metagradient.reference_batch_size} with config.optimizer="
          f"{config.optimizer!r}: {e} (0 = the full batch)") from e
    predicted = np.asarray(result.losses, np.float64)
    if config.metagradient.space == "log":
      # The same expansion read as one of log L: L_ref·exp((L̂ − L_ref)/L_ref).
      # Monotone per test example, so the same ranks across runs; losses stay > 0.
      reference = np.asarray(result.reference_losses, np.float64)[None]
      predicted = reference * np.exp(np.clip((predicted - reference) / reference,
                                             -30.0, 30.0))
    return predicted.astype(np.float32)

  predicted = _cached_array(
      wd, "metagradient", compute, upstream=("base_model",),
      fields=OPTIMIZER_FIELDS + CURRICULA_FIELDS + (
          "metagradient.reference_batch_size", "metagradient.chunk_size",
          "metagradient.space"),
      checks=dict(curricula_checks(curricula), metagradient_reference=fp.array_digest(
          _reference_batch_ids(config))))
  bounds = np.cumsum([0] + [len(v) for v in sets.values()])
  return {name: predicted[bounds[i]:bounds[i + 1]] for i, name in enumerate(sets)}


@dataclasses.dataclass(frozen=True)
class Removals:
  """MAGIC's removal benchmark around one reference run.

  Attributes:
    reference_ids: int32[T, B] the reference run's batches (fitted run 0).
    weights: fraction label ("1%", ...) -> float32[S, T, B], 0 at the occurrences
      of the removed examples (the step still divides by its valid slots).
    removed: fraction label -> int32[S, k] the removed train ids.
    actual_change: fraction label -> float32[S, M], retrained final loss minus the
      reference run's.
  """

  reference_ids: np.ndarray
  weights: dict
  removed: dict
  actual_change: dict


def _removal_sets(config, reference_ids):
  """Per fraction: S random sets of k = round(fraction·N) ids of the reference run."""
  present = np.unique(reference_ids[reference_ids >= 0])
  rng = np.random.default_rng([config.seed, 15485863])
  weights, removed = {}, {}
  for fraction in config.removal.fractions:
    label = f"{100 * fraction:g}%"
    k = max(1, int(round(fraction * config.num_train_examples)))
    sets = np.stack([rng.choice(present, k, replace=False)
                     for _ in range(config.removal.num_removals)]).astype(np.int32)
    removed[label] = sets
    weights[label] = np.stack([
        (~np.isin(reference_ids, s)).astype(np.float32) for s in sets])
  return weights, removed


def removal_runs(wd, config, dataset, model: Model,
                 curricula: Curricula) -> Removals:
  """Retrains the reference run (fitted run 0) with each removal set weighted 0."""
  reference_ids = curricula.fit[0]
  weights, removed = _removal_sets(config, reference_ids)
  labels = list(weights)

  def compute():
    stacked = np.concatenate([np.ones((1,) + reference_ids.shape, np.float32)] +
                             [weights[label] for label in labels])
    result = training.train_runs(
        model.params, np.repeat(reference_ids[None], len(stacked), 0),
        loss_fn=model.loss_fn, config=config, train_arrays=dataset.train,
        test_arrays=dataset.test, workdir=wd.path("removal", "runs"),
        checkpoint_every=config.num_steps, seed=config.seed, weights=stacked,
        mesh=_runs_mesh(config))
    final = result.trace.losses[:, -1]
    # The reference is retrained in the same call, so both sides share round-off.
    change = final[1:] - final[:1]
    bounds = np.cumsum([0] + [len(weights[label]) for label in labels])
    return {label: change[bounds[i]:bounds[i + 1]] for i, label in enumerate(labels)}

  path = lambda label: wd.path("removal", f"actual_change_{label.rstrip('%')}.npy")

  def save(changes):
    if sharding.is_primary():
      for label, change in changes.items():
        _io.save_npy(path(label), change)

  changes = wd.stage(
      "removal_runs", fields=("removal",) + OPTIMIZER_FIELDS + CURRICULA_FIELDS,
      upstream=("base_model",), compute=compute, save=save,
      load=lambda: {label: _io.load_npy(path(label), "removal_runs")
                    for label in labels},
      outputs=("removal",), checks=dict(curricula_checks(curricula), removal_sets=(
          fp.array_digest(*[removed[label] for label in labels]))))
  return Removals(reference_ids, weights, removed, changes)


def _tracin_terms(grad_trace: trace_lib.Trace, run: int) -> np.ndarray:
  """float32[T, B, M] per-step TracIn loss change of each occurrence of one run:
  −(η_t/|c_t|)·⟨P∇ℓ_i(θ_t), P∇ℓ_m(θ_t)⟩ from its recorded projected gradients."""
  ids = grad_trace.batch_ids[run]
  counts = np.maximum((ids >= 0).sum(1), 1).astype(np.float32)
  dots = np.einsum("tbk,tmk->tbm", grad_trace.train_grads[run],
                   grad_trace.test_grads[run])
  scale = -(grad_trace.learning_rates[run] / counts)[:, None, None]
  return (scale * dots * (ids >= 0)[:, :, None]).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class RemovalScores:
  """What `removal_lds` returns.

  Attributes:
    lds: method -> {fraction label -> LDS}.
    derivative_growth: `training.derivative_growth` of the reference run's
      metagradients (None without the metagradient method): well above 1, the run
      amplifies perturbations and first-order removal predictions are unreliable.
  """

  lds: dict
  derivative_growth: Optional[float]


def removal_lds(wd, config, dataset, model: Model, runs: Runs, sims: dict,
                removals: Removals) -> RemovalScores:
  """Predicted vs retrained loss changes of each removal set, per method.

  metagradient: exact reverse-mode derivatives of the reference run's final losses
  w.r.t. its occurrence weights, so a removal's first-order change is
  Σ (w − 1)·∂L_T/∂w; tracin_per_step: the same sum over the reference run's own
  per-step TracIn terms; every simulator: its rollout with the removal's weights
  minus its rollout of the reference.
  """
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top
  per_occurrence = {}
  if "metagradient" in config.methods:
    per_occurrence["metagradient"] = _cached_array(
        wd, "removal_metagradients", lambda: training.metagradients(
            model.params, removals.reference_ids[None], loss_fn=model.loss_fn,
            config=config, train_arrays=dataset.train,
            test_arrays=dataset.test,
            cotangents_at_once=config.metagradient.cotangents_at_once)[0],
        fields=OPTIMIZER_FIELDS + CURRICULA_FIELDS, upstream=("base_model",),
        checks=wd.inputs("removal_runs").checks)
  if "tracin_per_step" in config.methods and runs.grad_trace is not None:
    per_occurrence["tracin_per_step"] = _tracin_terms(runs.grad_trace, 0)
  initial = runs.trace.losses[:1, 0]
  ref_ids = removals.reference_ids[None]
  result = {}
  for label, weights in removals.weights.items():
    actual = removals.actual_change[label]
    predicted = {name: np.einsum("stb,tbm->sm", weights - 1.0, terms)
                 for name, terms in per_occurrence.items()}
    for name, sim in sims.items():
      if name in predicted:
        continue
      repeated = np.repeat(ref_ids, len(weights), 0)
      base = np.asarray(sim.simulate(ref_ids, initial, allow_nonfinite=True))[:, -1]
      removed = np.asarray(sim.simulate(repeated, np.repeat(initial, len(weights), 0),
                                        weights=weights, allow_nonfinite=True))[:, -1]
      predicted[name] = removed - base
    if "simfluence_hybrid" in config.methods:
      predicted["simfluence_hybrid"] = hybrid(predicted)
    for name, change in predicted.items():
      result.setdefault(name, {})[label] = evaluation.removal_lds(change, actual)
  growth = None
  if "metagradient" in per_occurrence:
    growth = training.derivative_growth(per_occurrence["metagradient"],
                                        runs.trace.learning_rates[0])
    warning = training.metagradients_lib.growth_warning(growth)
    if warning:
      _logger.warning("removal: %s", warning)
  return RemovalScores(result, growth)


def features(wd, config, dataset, model: Model) -> np.ndarray:
  """float32[N, F] per-example features: projected base-model loss gradients.

  The gradient of a train example's loss at the base model, projected to
  F = `simulators.feature_dim` dimensions by a seeded random projection and
  centred over examples and divided by one overall standard deviation, that of
  the projections before centring (so the features' own is below 1: 0.91 on
  `:tiny`; one scale
  for every feature keeps the projected gradients' geometry: a feature that varies
  more across examples weighs more), so one ridge penalty suits every feature.
  Examples with similar gradients move test losses alike — what a
  featurized simulator needs to simulate examples no fitted run contained.
  """
  from simfluence_jax import kernels  # pylint: disable=g-import-not-at-top
  dim = config.simulators.feature_dim
  key = jax.random.PRNGKey(config.seed + 1)

  @jax.jit
  def project(params, chunk):
    grads = kernels.per_example_grads(model.loss_fn, params, chunk)
    return kernels.project_pytree(grads, key, dim)

  def compute():
    chunks = [project(model.params, batch) for batch in _train_batches(config, dataset)]
    phi = np.concatenate([np.asarray(c) for c in chunks]).astype(np.float64)
    phi = (phi - phi.mean(0)) / max(float(phi.std()), 1e-12)
    return phi.astype(np.float32)

  return _cached_array(wd, "features", compute, upstream=("base_model",),
                       fields=("simulators.feature_dim", "influence.chunk_size"))


def featurized_simulator(config, fit_trace: trace_lib.Trace, phi: np.ndarray):
  """Simfluence-Linear whose A, B are linear functions of the features `phi`.

  With `simulators.featurized_corrections` (the default) each train example also
  gets its own correction, fitted as a second ridge regression centred on the
  feature model (`simulators.fit(..., prior_A=, prior_B=)`): where the fitted runs
  show an example, the runs correct its A_i, B_i; where they never show it (unseen
  examples) the feature model's A_i, B_i stand. Each ridge penalty is chosen by CV
  (or is `simulators.l2`).
  """
  features_only = fit_ridge(config, "featurized", fit_trace, features=phi,
                            name="simfluence_featurized")
  if not config.simulators.featurized_corrections:
    return features_only
  if config.simulators.l2 is not None:
    return fit_ridge(config, "linear", fit_trace, name="simfluence_featurized",
                     prior_A=np.asarray(features_only.A),
                     prior_B=np.asarray(features_only.B))
  chosen = features_only.fit_info["cv"]["chosen_l2"]

  def priors(runs):
    # The feature model's W refitted on the runs given (at the l2 chosen on all
    # runs): fitted on every run, the prior had seen each fold's held-out runs and
    # the corrections' CV favoured it (review h32: l2 = 100 where nested CV chose
    # 1e-3).
    if runs is fit_trace:
      model = features_only
    else:
      model = simulators.fit("featurized", runs, l2=chosen, features=phi)
    return np.asarray(model.A), np.asarray(model.B)

  return fit_ridge(config, "linear", fit_trace, name="simfluence_featurized",
                   priors=priors)


def fit_featurized(wd, config, runs: Runs, curricula: Curricula,
                   phi: np.ndarray) -> Any:
  """The `featurized_simulator` of the fitted runs, as a stage."""
  fit_trace = runs.group(curricula, "fit")
  return _simulator_stage(
      wd, "simfluence_featurized",
      lambda: featurized_simulator(config, fit_trace, phi),
      fields=RIDGE_FIELDS + ("simulators.num_phases",
                             "simulators.featurized_corrections"),
      upstream=("record_runs", "features"),
      version=4)  # 2: its corrections' CG goes on until θ settles; 3: float64
  # normal; 4: the corrections' CV refits the feature model per fold (nested)
