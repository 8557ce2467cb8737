"""The main job: the stages of one experiment in order, repeated over seeds.

`run(config, workdir)` is what `python -m simfluence_jax.main` calls. With
`config.num_seeds = K > 1` it runs the experiment for seeds seed..seed+K−1 in
`workdir/seed_<k>/` (full outputs each) and writes into `workdir` the mean over
seeds of every metric (per method, the ratio of the mean MSEs to curriculum_blind's,
the lowest `min_loss` and each seed's `undefined` reasons: `_mean_and_std`),
`metrics.json["std"]` and a report of mean ± std, with the
digest of each seed's metrics.json it was taken from
(`metrics.json["seed_metrics_digests"]`: `tables` refuses the mean once a seed is
rerun alone).

Once its recorded runs are settled (the precious stages reused, recomputed or
trained), a job removes the last one's result (metrics.json, report.md, plots/:
`clear_results`), so a job that stops after that leaves none that reads as current;
a job refused before it (a precious stage recorded with other settings) leaves the
last result, which still describes what the workdir holds.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import logging
import os
import pathlib
from typing import Callable, Optional

import flax
import jax
import numpy as np

from simfluence_jax import _io
from simfluence_jax import config_lib
from simfluence_jax import sharding
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import validate
from simfluence_jax.pipeline import workdir as workdir_lib

_logger = logging.getLogger("simfluence_jax.pipeline")


def _cost(config, runs: stages.Runs, wd: workdir_lib.Workdir, methods) -> dict:
  """method -> {"runs", "seconds", "run_equivalents"}: what each method cost.

  Runs used to fit count one each (a run recording gradients counts as the runs
  its time buys); the compute of the method's own stages is divided by the time of
  one plain training run. A reused stage counts the seconds it took when it was
  computed (its record), so a rerun reports the same cost; NaN where unknown. The
  metagradient stage predicts the unseen-example runs too: the held-out runs'
  share of its curricula is charged (one jvp per curriculum). Not charged to any
  method: the fitted simulators' rollouts of the held-out runs (in `evaluate`,
  with the metrics).
  """
  per_run = max(runs.seconds_per_run, 1e-9)
  held = config.num_held_out_runs
  unseen = config.unseen.num_runs if config.unseen.num_examples else 0
  held_share = held / (held + unseen)
  grad_runs = 0.0
  if runs.seconds_per_grad_run and runs.grad_trace is not None:
    grad_runs = runs.grad_trace.num_runs * runs.seconds_per_grad_run / per_run

  def seconds(*names):
    computed = [wd.timings[n].computed_seconds for n in names if n in wd.timings]
    return float("nan") if None in computed else float(sum(computed))

  fitted = float(config.num_runs)
  table = {
      "curriculum_blind": (fitted, 0.0),
      "simfluence_linear": (fitted, seconds("fit_simfluence_linear")),
      "simfluence_additive": (fitted, seconds("fit_simfluence_additive")),
      "simfluence_featurized": (fitted, seconds("features",
                                                "fit_simfluence_featurized")),
      "tracin_cp": (float(config.influence.tracin_num_runs),
                    seconds("tracin_cp_scores", "fit_tracin_cp")),
      "tracin_per_step": (grad_runs, seconds("fit_tracin_per_step")),
      "ekfac_if": (fitted, seconds("ekfac_scores", "fit_ekfac_if")),
      "metagradient": (0.0, held_share * seconds("metagradient")),
      "simfluence_hybrid": (fitted, held_share * seconds("metagradient")
                            + seconds("fit_simfluence_linear")),
  }
  return {m: {"runs": r, "seconds": s, "run_equivalents": r + s / per_run}
          for m, (r, s) in table.items() if m in methods}


def regime(runs: stages.Runs, curricula) -> dict:
  """How much the model learns and how much the curriculum matters (fitted runs).

  Returns:
    {"mean_loss_drop": 1 − mean L_T / mean L_0, "final_loss_std_across_runs": mean
    over test examples of the std across runs of L_T}; `run_seed` adds
    "removal_derivative_growth" (`training.derivative_growth` of the removal
    benchmark's reference run) when it runs that benchmark with metagradients.
  """
  losses = runs.group(curricula, "fit").losses
  return {"mean_loss_drop": float(1.0 - losses[:, -1].mean() / losses[:, 0].mean()),
          "final_loss_std_across_runs": float(losses[:, -1].std(axis=0).mean())}


def counterfactual_summary(result: dict) -> dict:
  """The numbers of a counterfactual result that a mean over seeds keeps.

  Returns:
    {"median_random": the median random curriculum's actual final target loss,
     method: {"actual_final" (mean over its searched curricula),
              "actual_improvement", "simulated_improvement",
              "fraction_beating_median"}}.
  """
  out = {"median_random": result["random"]["median_actual"]}
  for method, values in result["searched"].items():
    out[method] = {"actual_final": float(np.mean(values["actual_final"])),
                   **{k: values[k] for k in ("actual_improvement",
                                             "simulated_improvement",
                                             "fraction_beating_median")}}
  return out


def _summary(config, dataset, runs: stages.Runs, curricula,
             wd: workdir_lib.Workdir) -> dict:
  """What the payload's numbers were computed from: the config, sizes, devices,
  `environment` (this job's) and `other_environments` (the stages it reused that an
  earlier job computed with other packages or on another machine)."""
  return {"config": config.to_dict(), "dataset": dataset.name,
          "num_train_runs": len(curricula.fit),
          "num_held_out_runs": len(curricula.held_out),
          "num_unseen_runs": 0 if curricula.unseen is None else len(curricula.unseen),
          "unseen_ids": curricula.unseen_ids.tolist(),
          "num_steps": config.num_steps,
          "num_test_examples": config.num_test_examples,
          "seconds_per_run": runs.seconds_per_run, "devices": str(jax.devices()),
          "environment": wd.environment,
          "other_environments": wd.other_environments()}


# Packages whose numerics shape a job's numbers: the same code and seeds on two
# machines gave other base models and runs (README: Results), so a result names them.
_PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "orbax-checkpoint")


@functools.lru_cache(maxsize=None)
def source_digest() -> str:
  """Digest of this package's Python sources: stage versions are bumped by hand
  when a stage's numbers change, so a result also names the code that computed
  each reused stage (`other_environments`)."""
  root = pathlib.Path(__file__).resolve().parents[1]
  digest = hashlib.sha256()
  for path in sorted(root.rglob("*.py")):
    digest.update(path.relative_to(root).as_posix().encode() + b"\0")
    digest.update(path.read_bytes() + b"\0")
  return digest.hexdigest()[:16]


def environment() -> dict:
  """What computed a result besides the config: Python, the packages of
  `_PACKAGES` (None if absent), the machine and its CPU model, and a digest of
  this package's sources (`source_digest`)."""
  import importlib.metadata  # pylint: disable=g-import-not-at-top
  import platform  # pylint: disable=g-import-not-at-top
  packages = {}
  for name in _PACKAGES:
    try:
      packages[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      packages[name] = None
  cpu = platform.processor() or None
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((line.split(":", 1)[1].strip() for line in f
                  if line.startswith("model name")), cpu)
  except OSError:
    pass
  return {"python": platform.python_version(), "machine": platform.machine(),
          "cpu": cpu, "packages": packages, "code": source_digest()}


# What a finished job leaves as its result (`evaluation.write_report`): removed once
# a job's recorded runs are settled, so a job that stops after that (killed, failed)
# leaves none that reads as current (`python -m simfluence_jax.tables` refuses a
# missing metrics.json); one refused by a precious stage leaves the last result.
RESULT_FILES = ("metrics.json", "report.md", "plots")
TENSORBOARD_DIR = "tensorboard"
# tensorboard/<this>: which stage fingerprints the event files there were written
# from (`_tensorboard_part`); TensorBoard reads event files only.
_TENSORBOARD_SOURCES = "written_from.json"


def clear_results(workdir: str) -> None:
  """Removes `workdir`'s metrics.json, report.md and plots/ (process 0 only)."""
  if sharding.is_primary():
    for name in RESULT_FILES:
      _io.remove_tree(_io.as_path(workdir) / name)


def _tensorboard_part(wd: workdir_lib.Workdir, stage: str, logdir, write) -> None:
  """Writes one part of `wd`'s TensorBoard folder unless it shows `stage`'s outputs.

  `write()` writes event files into `logdir` (tensorboard/ or a folder in it) from
  the outputs of `stage` and returns how many scalars it wrote; when the stage's
  fingerprint differs from the one `logdir` was written from (or it never was),
  `logdir` is cleared first, so its curves are never those of discarded outputs
  beside the new ones, and a rerun that reuses the stage appends no second copy.
  The fingerprint is recorded only once the event files are written: a job killed
  before that leaves `logdir` unclaimed, and the next writes it again.
  """
  root = wd.path(TENSORBOARD_DIR)
  sources_path = root / _TENSORBOARD_SOURCES
  fingerprint = wd.fingerprint(stage)
  sources = {}
  if sharding.is_primary() and sources_path.exists():
    try:
      sources = _io.read_json(sources_path, "tensorboard")
    except ValueError:
      sources = {}  # a torn record: rewrite the part
    if not isinstance(sources, dict):
      sources = {}
  current = int(sources.get(stage) == fingerprint)
  if int(sharding.agree(current)):
    return
  if sharding.is_primary():
    # The claim goes first (a job killed while clearing or writing leaves none);
    # clearing the whole folder clears every part in it.
    sources = {} if logdir == root else {
        name: value for name, value in sources.items() if name != stage}
    _write_sources(sources_path, sources)
    _io.remove_tree(logdir)
  written = write()
  if sharding.is_primary() and written:  # none: TensorBoard is not installed
    _write_sources(sources_path, dict(sources, **{stage: fingerprint}))


def _write_sources(path, sources: dict) -> None:
  if sources:
    _io.write_json(path, sources)
  else:
    _io.remove_tree(path)


def run_seed(config, workdir: str, overwrite: bool = False,
             runs_settled: Optional[Callable[[], None]] = None) -> dict:
  """One experiment (one seed) in `workdir`; returns the metrics payload.

  `runs_settled()` is called once the recorded runs are, and before a precious
  stage deletes its outputs (a multi-seed job clears its own top-level result
  then).
  """
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top

  def discard():  # a precious stage is about to delete what the result came from
    clear_results(workdir)
    if runs_settled is not None:
      runs_settled()

  wd = workdir_lib.Workdir(workdir, config, overwrite, on_discard=discard,
                          environment=environment())
  config_lib.mesh_model_sizes(config, jax.device_count())  # refused before any work
  methods = config.methods
  curricula = stages.make_curricula(config)  # a pure function of the config
  stages.check_counterfactual_pools(config, curricula)  # before any stage runs
  dataset = stages.load_data(wd, config)
  model = stages.base_model(wd, config, dataset)
  runs = stages.record_runs(wd, config, dataset, model, curricula)
  # The precious stages passed: from here on the last result is this job's to replace.
  clear_results(workdir)
  if runs_settled is not None:
    runs_settled()
  # TensorBoard: tensorboard/ (runs/ and the means over runs) shows record_runs'
  # outputs, tensorboard/evaluation/ those of evaluate; each is rewritten when its
  # stage's outputs change (the whole folder with the runs).
  _tensorboard_part(wd, "record_runs", wd.path(TENSORBOARD_DIR),
                    lambda: evaluation.write_training_metrics(
                        os.fspath(wd.path(TENSORBOARD_DIR)), runs.trace))
  scores = {}
  if "tracin_cp" in methods:
    scores["tracin_cp"] = stages.tracin_cp(wd, config, dataset, model)
  if "ekfac_if" in methods:
    scores["ekfac_if"] = stages.ekfac_if(wd, config, dataset, model)
  sims = stages.fit_simulators(wd, config, runs, curricula, scores)
  if "simfluence_featurized" in methods:
    phi = stages.features(wd, config, dataset, model)
    sims["simfluence_featurized"] = stages.fit_featurized(wd, config, runs, curricula,
                                                          phi)
  direct = {}
  upstream = tuple(f"fit_{name}" for name in sims)
  if "metagradient" in methods:
    direct["metagradient"] = stages.metagradient(wd, config, dataset, model, curricula)
    upstream += ("metagradient",)
  result = stages.evaluate(wd, config, runs, curricula, sims, direct, upstream)
  evaluation_logdir = wd.path(TENSORBOARD_DIR, "evaluation")
  _tensorboard_part(wd, "evaluate", evaluation_logdir,
                    lambda: evaluation.write_evaluation_metrics(
                        os.fspath(evaluation_logdir), sims,
                        result.metrics["held_out"]))
  payload = dict(result.metrics["held_out"])
  if "unseen" in result.metrics:
    payload["unseen_examples"] = result.metrics["unseen"]
  if config.learning_curve:
    payload["learning_curve"] = stages.learning_curve(
        wd, config, runs, curricula, sims.get("simfluence_linear"))
  if config.removal.enabled:
    removals = stages.removal_runs(wd, config, dataset, model, curricula)
    removal = stages.removal_lds(wd, config, dataset, model, runs, sims, removals)
    payload["removal_lds"] = removal.lds
  counterfactual = stages.counterfactual(wd, config, dataset, model, runs, curricula,
                                         sims)
  if counterfactual is not None:
    payload["counterfactual"] = {k: v for k, v in counterfactual.items()
                                 if k != "batch_ids"}
    payload["counterfactual_summary"] = counterfactual_summary(counterfactual)
  payload["cost"] = _cost(config, runs, wd, payload)
  payload["regime"] = regime(runs, curricula)
  if config.removal.enabled and removal.derivative_growth is not None:
    payload["regime"]["removal_derivative_growth"] = removal.derivative_growth
  payload["stages"] = {name: {"seconds": t.seconds, "reused": t.reused}
                       for name, t in wd.timings.items()}
  payload["timings"] = {name: t.seconds for name, t in wd.timings.items()}
  payload["summary"] = _summary(config, dataset, runs, curricula, wd)
  if sharding.is_primary():
    evaluation.write_report(os.fspath(wd.root), payload=payload,
                            predictions=result.predictions, bands=result.bands,
                            actual=result.actual, test_texts=dataset.test_texts)
  return payload


def _seed_config(config, seed: int):
  seed_config = copy.deepcopy(config)
  with seed_config.unlocked():
    seed_config.seed = seed
    seed_config.num_seeds = 1
  return seed_config


# Where the mean over seeds is not the mean of the seeds' numbers (`_mean_and_std`).
_MISSING = object()


def _mean_and_std(payloads: list, labels: Optional[list] = None
                  ) -> tuple[dict, dict]:
  """Mean and std over seeds of every number at the same place in the payloads.

  A number that is None, missing or NaN in some seed is NaN in the mean. Per method
  (held-out and unseen-example runs), unlike the plain mean:
  * `<mse>_ratio` (to curriculum_blind) is the ratio of the mean MSEs, the mean of
    the method's `<mse>` over that of curriculum_blind's (NaN where that is not
    above 0, as for one seed), so it matches the mean MSEs beside it; its std is
    that of the per-seed ratios. (A payload holding a ratio without both MSEs,
    which the pipeline never writes, keeps the mean of the per-seed ratios.)
  * `min_loss` is the lowest over seeds (NaN only where every seed's is): a seed
    simulating a loss below 0 stays flagged.
  * `undefined` holds every seed's reasons, `{metric: "seed_0/: why; seed_1/:
    why"}` (seeds giving one reason share it), and names a seed lacking a number
    the others have.

  Args:
    payloads: each seed's metrics payload (`run_seed`).
    labels: how `undefined` names each seed (default `seed_<k>/`, its folder).

  Raises:
    ValueError: the seeds' methods differ (they are not the same experiment).
  """
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  labels = labels or [f"seed_{k}/" for k in range(len(payloads))]
  skip = ("summary", "stages", "counterfactual", "learning_curve", "timings")
  payloads = [{k: v for k, v in p.items() if k not in skip} for p in payloads]

  def number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(
        value, (bool, np.bool_))

  def walk(values):
    """values: one per seed (`_MISSING` where a seed has none) -> (mean, std)."""
    present = [v for v in values if v is not _MISSING]
    if any(isinstance(v, dict) for v in present):
      keys = []
      for v in present:
        if isinstance(v, dict):
          keys += [k for k in v if k not in keys]
      pairs = {k: walk([v.get(k, _MISSING) if isinstance(v, dict) else _MISSING
                        for v in values]) for k in keys}
      pairs = {k: p for k, p in pairs.items() if p is not None}
      return ({k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()})
    if present and all(number(v) or v is None for v in present):
      array = np.asarray([v if number(v) else np.nan for v in values], np.float64)
      # ddof 0: the spread of these K seeds (the README and report say so).
      return float(np.mean(array)), float(np.std(array))
    return None  # strings, bools, lists: per seed only

  def section(payload, key):
    """The dict of method entries at `key` (None: the payload's own)."""
    part = payload if key is None else payload.get(key)
    return part if isinstance(part, dict) else {}

  # The method entries: the held-out runs' (the payload's own) and unseen examples'.
  keys = [None] + (["unseen_examples"] * any(
      isinstance(p.get("unseen_examples"), dict) for p in payloads))
  for key in keys:
    method_sets = [_report.methods_of(section(p, key)) for p in payloads]
    for label, methods in zip(labels, method_sets):
      if set(methods) != set(method_sets[0]):
        raise ValueError(
            f"payloads: {'' if key is None else key + ' of '}{labels[0]} has "
            f"methods {sorted(method_sets[0])}, of {label} {sorted(methods)}: the "
            "seeds' methods differ.")
  mean, std = walk(payloads)
  for key in keys:
    blind = section(mean, key).get("curriculum_blind")
    for method in _report.methods_of(section(payloads[0], key)):
      values, spread = section(mean, key)[method], section(std, key)[method]
      seeds = [section(p, key)[method] for p in payloads]
      values.pop("undefined", None)  # strings: collected from the seeds below
      spread.pop("undefined", None)
      if "min_loss" in values:
        lowest = np.asarray([v["min_loss"] if number(v.get("min_loss")) else np.nan
                             for v in seeds], np.float64)
        values["min_loss"] = (float(np.nanmin(lowest)) if np.any(np.isfinite(lowest))
                              else float("nan"))
      for name in [k[:-len("_ratio")] for k in values if k.endswith("_ratio")]:
        if isinstance(blind, dict) and name in values and name in blind:
          values[name + "_ratio"] = (float(values[name] / blind[name])
                                     if blind[name] > 0 else float("nan"))
      undefined = _seed_reasons(seeds, labels, values, number)
      if undefined:
        values["undefined"] = undefined
  return mean, std


def _seed_reasons(seeds: list, labels: list, mean: dict, number) -> dict:
  """`undefined` of a method's mean over seeds: metric -> each seed's reason."""
  reasons = {}  # metric -> {reason: [labels]}
  for label, entry in zip(labels, seeds):
    given = entry.get("undefined") or {}
    for metric, reason in given.items():
      reasons.setdefault(metric, {}).setdefault(str(reason), []).append(label)
    for metric in mean:
      if metric in given or metric == "undefined":
        continue
      if metric not in entry:
        why = "missing from its results"
      elif entry[metric] is None:
        why = "no value (None)"
      else:
        continue
      reasons.setdefault(metric, {}).setdefault(why, []).append(label)
  return {metric: "; ".join(f"{', '.join(names)}: {reason}"
                            for reason, names in by_reason.items())
          for metric, by_reason in reasons.items()}


def run(config, workdir: str, overwrite: bool = False) -> dict:
  """The whole main job; returns the metrics payload written to metrics.json.

  Raises:
    ValueError: a bad config field (named), a model Flax cannot apply as the job
      does (`config.model`: flax's own error, first line), or a workdir holding
      runs of other settings (`fingerprint.StaleWorkdirError`).
  """
  validate.validate_config(config)
  with compile_optimizations(config):
    try:
      return _run(config, workdir, overwrite)
    except flax.errors.FlaxError as error:
      raise ValueError(_model_error(config, error)) from error


def _model_error(config, error) -> str:
  """One line for a Flax error raised applying the job's model (review h36: a factory
  model in training mode by default, or a checkpoint missing a collection, ended
  the command line in a 50-line traceback)."""
  names = [f"config.model.{field}={config.model.get(field)!r}"
           for field in ("factory", "checkpoint") if config.model.get(field)]
  first = (str(error).strip().splitlines() or [type(error).__name__])[0]
  return (f"config.model: Flax could not apply the model as the job does"
          f"{' (' + ', '.join(names) + ')' if names else ''}: {first.rstrip('.')}. The job "
          f"applies it as model.apply(variables, inputs), in its default mode (make "
          f"that deterministic: no dropout rng, BatchNorm on running averages), with "
          f"every collection the model reads in the variables.")


@contextlib.contextmanager
def compile_optimizations(config):
  """XLA compiles the job's programs with most optimisations off while the block runs
  when `config.compile_optimizations` is False (`jax_disable_most_optimizations`;
  part of the persistent cache's key, not of jax.jit's in-memory one). Restored
  afterwards, so a later job in the same process compiles what it has not compiled
  yet as its own config says."""
  before = jax.config.read("jax_disable_most_optimizations")
  if not config.get("compile_optimizations", True):
    jax.config.update("jax_disable_most_optimizations", True)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", before)


def _top_level_seed(root) -> Optional[int]:
  """The `seed` field a single-seed job's stage records at `root` hold (None: none
  recorded, or unreadable)."""
  for path in sorted((root / workdir_lib.STAGES_DIR).glob("*.json")):
    try:
      seed = _io.read_json(path, "stage record").get("fields", {}).get("seed")
    except (ValueError, AttributeError):
      continue
    if seed is not None:
      return int(seed)
  return None


def adopt_single_seed_job(workdir: str, first_seed: int) -> None:
  """Before a K-seed job: a single-seed job's outputs at `workdir`'s top level
  become `seed_0/`'s, or leave the TensorBoard view.

  A workdir first run with one seed holds that job at its top level. Left there,
  its `tensorboard/` showed beside the seeds' as if it were the K-seed job's,
  possibly of another config (review h22), and, when its seed is `first_seed`, seed
  0 was trained again in `seed_0/`. Moved (local workdirs, its seed `first_seed`,
  `seed_0/` holding no job), seed 0's stages reuse what their fingerprints still
  match and recompute the rest, as in any rerun. Otherwise the top level's
  `tensorboard/` is removed (a single-seed rerun rebuilds it from the stages) and a
  warning names what stays.
  """
  root = _io.as_path(workdir)
  if not sharding.is_primary() or not (root / workdir_lib.STAGES_DIR).exists():
    sharding.barrier("adopt_single_seed_job")
    return
  seed_0 = root / "seed_0"
  if (not _io.is_remote(workdir) and _top_level_seed(root) == first_seed
      and not (seed_0 / workdir_lib.STAGES_DIR).exists()):
    seed_0.mkdir(parents=True, exist_ok=True)
    moved = []
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
      if entry.name.startswith((".", "seed_")) or (seed_0 / entry.name).exists():
        continue
      entry.rename(seed_0 / entry.name)
      moved.append(entry.name)
    _logger.warning("multi-seed job: the single-seed job at the top of %s is its "
                    "seed 0; moved into seed_0/ (%s), where its stages are reused "
                    "where they still match.", workdir, ", ".join(moved))
  else:
    _io.remove_tree(root / TENSORBOARD_DIR)
    _logger.warning("multi-seed job: %s holds a single-seed job at its top level "
                    "(stages/, simulators/, ...) that is not this job's; its "
                    "tensorboard/ was removed, its other outputs are left as they "
                    "are.", workdir)
  sharding.barrier("adopt_single_seed_job")


def _run(config, workdir: str, overwrite: bool) -> dict:
  from simfluence_jax import evaluation  # pylint: disable=g-import-not-at-top
  from simfluence_jax.evaluation import _tables  # pylint: disable=g-import-not-at-top
  if config.num_seeds == 1:
    return run_seed(config, workdir, overwrite)
  seeds = [config.seed + k for k in range(config.num_seeds)]
  adopt_single_seed_job(workdir, config.seed)
  payloads = []
  for k, seed in enumerate(seeds):
    seed_dir = os.path.join(os.fspath(workdir), f"seed_{k}")
    # A seed's folder is a workdir of its own (rerun alone, as `tables` expects):
    # its lock keeps a job on it and this one from writing it at once.
    with workdir_lib.workdir_lock(seed_dir):
      payloads.append(run_seed(_seed_config(config, seed), seed_dir, overwrite,
                               runs_settled=lambda: clear_results(workdir)))
  mean, std = _mean_and_std(payloads)
  payload = dict(mean, std=std, seeds=seeds, num_seeds=len(seeds),
                 # The job's config (num_seeds K, the first seed), not seed 0's.
                 summary=dict(payloads[0]["summary"], seeds=seeds,
                              config=config.to_dict(), other_environments={
                                  f"seed_{k}/{name}": env
                                  for k, p in enumerate(payloads)
                                  for name, env in p["summary"].get(
                                      "other_environments", {}).items()}),
                 stages={f"seed_{k}/{name}": v for k, p in enumerate(payloads)
                         for name, v in p["stages"].items()})
  growth = [p.get("regime", {}).get("removal_derivative_growth") for p in payloads]
  if None not in growth:  # a flag per seed: their mean would hide one unstable run
    payload["regime"]["removal_derivative_growth_by_seed"] = growth
  if sharding.is_primary():
    # What each seed_<k>/metrics.json held when the mean was taken: `tables`
    # refuses this mean once a seed is rerun alone (its metrics.json changes).
    payload[_tables.SEED_DIGESTS] = {
        f"seed_{k}": _tables.metrics_digest(os.path.join(os.fspath(workdir),
                                                         f"seed_{k}"))
        for k in range(len(seeds))}
    evaluation.write_report(workdir, payload=payload)
  return payload


def enable_compilation_cache(config) -> None:
  """JAX's persistent compilation cache in `config.compilation_cache_dir` (None = off).

  Compiled programs are reused across processes, so a second run of the job (or a
  sweep's next cell) skips most compilation. Programs that compiled in under 0.5 s
  are not stored, unless $JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise
  (JAX's own settings in the environment win over these defaults).
  """
  directory = config.get("compilation_cache_dir")
  if not directory:
    return
  directory = os.path.expanduser(directory)
  if not _io.is_remote(directory):
    if os.path.exists(directory) and not os.path.isdir(directory):
      raise ValueError(f"config.compilation_cache_dir={config.compilation_cache_dir!r}"
                       ": a file, not a directory.")
    os.makedirs(directory, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", directory)
  for name, value in (("jax_persistent_cache_min_compile_time_secs", 0.5),
                      ("jax_persistent_cache_min_entry_size_bytes", 0)):
    if name.upper() not in os.environ:
      jax.config.update(name, value)
