"""Counterfactual curricula: search a curriculum on a simulator, then check it for real.

`search_and_verify` asks every chosen simulator for the curricula that would minimise
the final loss of some target test examples (`simulators.search_curriculum`, starting
from random curricula), retrains those curricula with the real training code (a
callback, so the caller decides how), and compares them with random curricula of the
same size that were really trained (the held-out runs in the main job):

* actual improvement: median final target loss of the random curricula minus the mean
  over the searched ones (positive = the search helped);
* simulated improvement: the same difference as the simulator predicted it;
* how often a searched curriculum beats the median random one.

Also here: loading the simulators a main job saved (`load_simulators`) and simulating
any curricula with all of them (`simulate_curricula`, `plot_trajectories`), which
`python -m simfluence_jax.simulate` runs on a curriculum file.
"""

import logging
import os
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _io
from simfluence_jax import simulators as simulators_lib
from simfluence_jax import trace as trace_lib
from simfluence_jax.simulators import _search
from simfluence_jax.simulators import _simulator



SIMULATORS_DIR = "simulators"
# The main job's stage records (`pipeline.workdir.STAGES_DIR`; not imported from
# there: `simfluence_jax.pipeline` imports every stage's libraries).
_STAGES_DIR = "stages"


def _stage_record(workdir: str, stage: str) -> Optional[dict]:
  """`workdir/stages/<stage>.json`, or None when there is none."""
  path = _io.as_path(workdir) / _STAGES_DIR / f"{stage}.json"
  return _io.read_json(path, "simulate") if path.exists() else None


def _seed_dirs(workdir: str) -> list:
  """The `seed_<k>` directories of `workdir` (a multi-seed job's), sorted by k."""
  root = _io.as_path(workdir)
  found = [c.name for c in root.iterdir() if c.name.startswith("seed_")
           and c.name[5:].isdigit() and c.is_dir()] if root.is_dir() else []
  return [os.path.join(workdir, n) for n in sorted(found, key=lambda n: int(n[5:]))]


def _check_current(workdir: str, names: Sequence[str], metrics) -> None:
  """Raises ValueError naming the first of `names` whose saved simulator is not the
  one the workdir's last main job fitted (see `load_simulators`)."""
  seeds = _seed_dirs(workdir) if metrics is None else []
  if seeds:
    raise ValueError(
        f"--workdir={workdir!r}: its last main job did not finish (no metrics.json) "
        "and it holds the seed_<k>/ workdirs of a multi-seed job, so its own "
        "simulators may be an older job's; use one seed's workdir "
        f"({', '.join(seeds)}) or rerun simfluence_jax.main.")
  # The methods of the job that wrote metrics.json; without one (a job that did not
  # finish, or stages called one by one from a colab), the records alone decide.
  methods = (((metrics or {}).get("summary") or {}).get("config") or {}).get(
      "methods")
  runs = _stage_record(workdir, "record_runs")
  for name in names:
    stale = f"simulators/{name} in --workdir={workdir!r} is stale"
    if methods is not None and name not in methods:
      raise ValueError(
          f"{stale}: {name} is not in the config.methods {list(methods)} of the job "
          f"that wrote metrics.json; pass --methods without it, or delete "
          f"simulators/{name}.")
    record = _stage_record(workdir, f"fit_{name}")
    if record is None or record.get("status") != "done":
      status = "missing" if record is None else f"{record.get('status')!r}"
      raise ValueError(f"{stale}: its stage record {_STAGES_DIR}/fit_{name}.json is "
                       f"{status}, not 'done'; rerun simfluence_jax.main.")
    if runs is None or runs.get("status") != "done":
      status = "missing" if runs is None else f"{runs.get('status')!r}"
      raise ValueError(f"{stale}: the stage record {_STAGES_DIR}/record_runs.json is "
                       f"{status}, not 'done'; rerun simfluence_jax.main.")
    fitted_on = (record.get("upstream") or {}).get("record_runs")
    if fitted_on != runs.get("fingerprint"):
      raise ValueError(
          f"{stale}: it was fitted on other runs (record_runs {fitted_on} in "
          f"{_STAGES_DIR}/fit_{name}.json, {runs.get('fingerprint')} in "
          f"{_STAGES_DIR}/record_runs.json); rerun simfluence_jax.main.")
    _check_upstream(workdir, f"fit_{name}", record, stale)


def _check_upstream(workdir: str, stage: str, record: dict, stale: str) -> None:
  """Raises ValueError (starting with `stale`) naming the first stage upstream of
  `stage` (whose stage record is `record`), at any depth, whose current record is
  not done or has another fingerprint than the one `stage` was computed from (e.g.
  ekfac_scores recomputed with another influence.damping by a job that stopped
  before refitting the simulator)."""
  pending, seen = [(stage, record)], set()
  while pending:
    child, child_record = pending.pop(0)
    for parent, used in sorted((child_record.get("upstream") or {}).items()):
      current = _stage_record(workdir, parent)
      where = f"{_STAGES_DIR}/{parent}.json"
      if current is None or current.get("status") != "done":
        status = "missing" if current is None else f"{current.get('status')!r}"
        raise ValueError(f"{stale}: the stage record {where} (upstream of {child}) "
                         f"is {status}, not 'done'; rerun simfluence_jax.main.")
      if current.get("fingerprint") != used:
        raise ValueError(
            f"{stale}: stage {parent} was recomputed since {child} used it "
            f"({parent} {used} in {_STAGES_DIR}/{child}.json, "
            f"{current.get('fingerprint')} in {where}); rerun simfluence_jax.main.")
      if parent not in seen:
        seen.add(parent)
        pending.append((parent, current))


def load_simulators(workdir: str, methods: Optional[Sequence[str]] = None
                    ) -> dict[str, simulators_lib.Simulator]:
  """The simulators the main job saved in `workdir/simulators/<method>/`.

  In a workdir of the main job (it has `stages/`), a simulator is loaded only if its
  `stages/fit_<method>.json` is done and was fitted on the runs of the current
  `stages/record_runs.json` (done; the record's upstream fingerprint) and on the
  current outputs of every other stage upstream of it, at any depth (e.g.
  `ekfac_scores`, `features`: each done, with the fingerprint recorded), and, when the
  workdir has a metrics.json (the last job finished: a job removes it when it
  starts), the method is in that job's `config.methods`. Without metrics.json, a
  workdir holding `seed_<k>/` directories (a multi-seed job that did not finish) is
  refused. A directory without `stages/` holds simulators saved by hand, loaded as
  they are.

  Without `methods`, every current simulator is loaded and a stale one is left out
  with a warning (refused when it is the only one); a stale one that `methods`
  names is refused.

  Raises:
    FileNotFoundError: the workdir holds no saved simulators (main job not finished).
    ValueError: a requested method is not among them; a named saved simulator (or,
      without `methods`, every one) is stale (named, with why); `workdir` is the top
      level of a multi-seed job (its simulators are in `seed_<k>/`).
  """
  root = os.path.join(workdir, SIMULATORS_DIR)
  metrics_path = _io.as_path(workdir) / "metrics.json"
  metrics = (_io.read_json(metrics_path, "simulate") if metrics_path.exists()
             else None)
  if isinstance(metrics, dict) and metrics.get("seeds"):
    raise ValueError(
        f"--workdir={workdir!r} is the top level of a {len(metrics['seeds'])}-seed "
        "job (metrics.json has \"seeds\"), which fits no simulator; use one seed's "
        "workdir: " + ", ".join(os.path.join(workdir, f"seed_{k}")
                                for k in range(len(metrics["seeds"]))) + ".")
  directory = _io.as_path(root)
  saved = sorted(child.name for child in directory.iterdir()
                 if (child / "simulator.json").exists()
                 ) if directory.is_dir() else []
  if not saved:
    raise FileNotFoundError(f"--workdir={workdir!r} holds no fitted simulators "
                            f"({root}/*/simulator.json); run simfluence_jax.main first.")
  named = methods is not None
  methods = list(methods) if named else saved
  if not methods:
    raise ValueError(f"--methods: empty; name at least one of the fitted simulators "
                     f"{saved}, or leave it out for all.")
  unknown = sorted(set(methods) - set(saved))
  if unknown:
    raise ValueError(f"--methods: {unknown} not fitted in {workdir!r}; available: "
                     f"{saved}.")
  if (_io.as_path(workdir) / _STAGES_DIR).is_dir():
    if named:
      _check_current(workdir, methods, metrics)
    else:
      # Every saved one that is current; a stale one (e.g. of a method the last job
      # dropped) is left out, said, and refused only when named.
      current = []
      for name in methods:
        try:
          _check_current(workdir, [name], metrics)
          current.append(name)
        except ValueError as error:
          logging.warning("simulate: leaving out %s", error)
      if not current:
        _check_current(workdir, methods, metrics)  # raises, naming the first
      methods = current
  return {name: simulators_lib.Simulator.load(os.path.join(root, name))
          for name in methods}


def base_initial_losses(workdir: str) -> np.ndarray:
  """float32[M] test losses of the base model (every run's `losses[:, 0]`)."""
  trace = trace_lib.Trace.load(os.path.join(workdir, "trace"), mmap=True)
  return np.array(trace.losses[0, 0], np.float32)


def recorded_batch_ids(workdir: str) -> np.ndarray:
  """int32[R, T, B] the curricula of every recorded run (-1 = padding)."""
  trace = trace_lib.Trace.load(os.path.join(workdir, "trace"), mmap=True)
  return np.asarray(trace.batch_ids)


def fit_fingerprints(workdir: str, names: Sequence[str]) -> dict:
  """method -> the "fingerprint" of `workdir/stages/fit_<method>.json` (the fit
  its saved simulator came from), None where there is no such record (simulators
  saved by hand)."""
  return {name: (_stage_record(workdir, f"fit_{name}") or {}).get("fingerprint")
          for name in names}


def unfitted_ids(sims: dict, batch_ids: np.ndarray) -> dict:
  """method -> int32[k] the ids of `batch_ids` its simulator has no fitted run
  for (`Simulator.unfitted_ids`), for the methods that have any."""
  found = {name: sim.unfitted_ids(batch_ids) for name, sim in sims.items()}
  return {name: ids for name, ids in found.items() if ids.size}


def simulate_curricula(sims: dict, batch_ids: np.ndarray, initial_losses: np.ndarray,
                       num_band_samples: int = 32, seed: int = 0, *,
                       allow_unfitted_ids: bool = False,
                       allow_extrapolation: bool = False) -> dict:
  """Every simulator's trajectories of `batch_ids` int32[R', T, B] from float32[M].

  `allow_unfitted_ids`: as in `Simulator.simulate` (without it, a simulator whose
  fitted runs never contained an id of `batch_ids` refuses, naming the ids);
  `allow_extrapolation`: as there too (roll out more steps than were fitted).
  `num_band_samples`: posterior draws of the bands, an integer >= 0 (0: no bands).

  Returns:
    method -> {"mean": float32[R', T+1, M] the point prediction (`Simulator.simulate`,
    the rollout of the fitted parameters: the numbers the main job's `evaluate`
    scores; the key keeps its old name), "std": float32[R', T+1, M] the std of the
    rollouts of `num_band_samples` posterior samples of the parameters, and
    "posterior_sample_mean": float32[R', T+1, M] their mean (not the point
    prediction: the rollout is not linear in the parameters, and the samples are
    few); both None for a simulator without a posterior or with no bands}.
  """
  if not _checks.is_int(num_band_samples) or num_band_samples < 0:
    raise ValueError(f"num_band_samples={num_band_samples!r}: must be an integer >= 0 "
                     "(0: no bands).")
  initial = np.repeat(np.asarray(initial_losses, np.float32)[None], len(batch_ids), 0)
  out = {}
  for name, sim in sims.items():
    point = np.asarray(sim.simulate(batch_ids, initial, allow_nonfinite=True,
                                    allow_unfitted_ids=allow_unfitted_ids,
                                    allow_extrapolation=allow_extrapolation))
    out[name] = {"mean": point, "std": None, "posterior_sample_mean": None}
    if sim.posterior is not None and num_band_samples > 0:
      sample_mean, std = sim.simulate_with_bands(
          batch_ids, initial, num_samples=num_band_samples, rng=seed,
          allow_nonfinite=True, allow_unfitted_ids=allow_unfitted_ids,
          allow_extrapolation=allow_extrapolation)
      out[name]["std"] = np.asarray(std)
      out[name]["posterior_sample_mean"] = np.asarray(sample_mean)
    # One method diverging on a curriculum does not stop the others: its
    # trajectory keeps the inf/NaN, and this says where.
    where = sim.first_nonfinite(point, ends_only=sim.final_only)
    if where is not None:
      run, step, column = where
      logging.warning("simulate: %s diverges on curriculum %d (non-finite loss of "
                      "test example %d from step %d); its trajectory keeps the "
                      "inf/NaN values.", name, run, column, step)
    elif out[name]["std"] is not None and not (
        np.all(np.isfinite(out[name]["std"]))
        and np.all(np.isfinite(out[name]["posterior_sample_mean"]))):
      logging.warning("simulate: %s's point prediction is finite but some of its %d "
                      "posterior samples diverge; its band (std, "
                      "posterior_sample_mean) keeps the inf/NaN values.", name,
                      num_band_samples)
  return out


def plot_trajectories(path: str, trajectories: dict, targets: np.ndarray,
                      title: str = "") -> None:
  """PNG of the mean loss of `targets` per step, one panel per curriculum (≤ 4).

  A line is a method's point prediction (`simulate_curricula`'s "mean"); its band,
  where it has one, the posterior samples' mean ± 2 std (centred where the samples
  are, which need not be on the line).
  """
  from simfluence_jax import _optional  # pylint: disable=g-import-not-at-top
  matplotlib = _optional.import_module("matplotlib", "report", "plot_trajectories")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  num_curricula = next(iter(trajectories.values()))["mean"].shape[0]
  shown = min(num_curricula, 4)
  fig, axes = plt.subplots(1, shown, figsize=(5 * shown, 3.5), squeeze=False)
  for r, ax in enumerate(axes[0]):
    for i, (name, values) in enumerate(trajectories.items()):
      point = values["mean"][r][:, targets].mean(-1)
      steps = np.arange(point.shape[0])
      ax.plot(steps, point, color=f"C{i}", label=name)
      if values["std"] is not None:
        # Band of the target mean; per-example stds combined as if independent.
        std = np.sqrt((values["std"][r][:, targets] ** 2).sum(-1)) / len(targets)
        centre = values.get("posterior_sample_mean")
        centre = point if centre is None else centre[r][:, targets].mean(-1)
        ax.fill_between(steps, centre - 2 * std, centre + 2 * std, color=f"C{i}",
                        alpha=0.2)
    ax.set_title(f"{title} curriculum {r}", fontsize=9)
    ax.set_xlabel("step")
  axes[0, 0].set_ylabel(f"mean simulated loss of {len(targets)} test examples")
  axes[0, 0].legend(fontsize=7, title="point prediction; band: posterior ±2σ",
                    title_fontsize=7)
  fig.tight_layout()
  _io.save_figure(fig, path)


def choose_targets(train_losses: np.ndarray, num_targets: int) -> np.ndarray:
  """The test examples whose final loss varies most across runs, int32[k] sorted.

  Those are the examples whose outcome the curriculum decides, so the ones a
  curriculum search can move.

  Args:
    train_losses: float[R, T+1, M] losses of R >= 2 training runs.
    num_targets: k, an integer in [1, M].

  Raises:
    ValueError: naming the argument: train_losses not [R, T+1, M] with R >= 2 (one
      run has no spread to rank by), num_targets not an integer in [1, M].
  """
  train_losses = np.asarray(train_losses)
  if train_losses.ndim != 3 or train_losses.shape[0] < 2:
    raise ValueError(f"train_losses: expected float[R, T+1, M] of R >= 2 runs (the "
                     f"spread of their final losses ranks the test examples), got "
                     f"shape {list(train_losses.shape)}.")
  num_test = train_losses.shape[-1]
  if not _checks.is_int(num_targets) or not 0 < num_targets <= num_test:
    raise ValueError(f"num_targets={num_targets!r}: must be an integer in "
                     f"[1, M={num_test}].")
  spread = np.std(train_losses[:, -1], axis=0)
  return np.sort(np.argsort(-spread, kind="stable")[:int(num_targets)]).astype(np.int32)


def _check_verify_inputs(methods, fitted, initial_losses, start_batch_ids,
                         random_batch_ids, random_losses, targets,
                         epoch_steps) -> dict:
  """Validates `search_and_verify`'s arrays (one line naming the argument);
  returns method -> int[C, T, B] its start curricula."""
  num_test = initial_losses.shape[0] if initial_losses.ndim == 1 else None
  if num_test is None or not np.all(np.isfinite(initial_losses)):
    raise ValueError(f"initial_losses: expected finite float32[M], got shape "
                     f"{list(initial_losses.shape)}.")
  if random_batch_ids.ndim != 3 or not np.issubdtype(random_batch_ids.dtype,
                                                     np.integer):
    raise ValueError(f"random_batch_ids: expected int[R', T, B], got "
                     f"{random_batch_ids.dtype} {list(random_batch_ids.shape)}.")
  runs, num_steps, width = random_batch_ids.shape
  if random_losses.ndim != 3 or random_losses.shape[0] != runs:
    raise ValueError(f"random_losses: expected float32[R'={runs}, T+1, M] (R' runs "
                     f"like random_batch_ids), got shape {list(random_losses.shape)}.")
  if random_losses.shape[1:] != (num_steps + 1, num_test):
    raise ValueError(f"random_losses: expected [R', T+1={num_steps + 1}, M={num_test}]"
                     f" (random_batch_ids has T={num_steps} steps, initial_losses M="
                     f"{num_test}), got shape {list(random_losses.shape)}.")
  # Every curriculum starts from the base model: the random runs' first losses are
  # initial_losses (evaluated by the same model; a float tolerance for another
  # batching of the evaluation).
  if not np.allclose(random_losses[:, 0], initial_losses[None], rtol=1e-4,
                     atol=1e-5):
    run, column = (int(i) for i in np.argwhere(~np.isclose(
        random_losses[:, 0], initial_losses[None], rtol=1e-4, atol=1e-5))[0])
    raise ValueError(
        f"random_losses: run {run} starts at loss {random_losses[run, 0, column]:.6g} "
        f"of test example {column}, not initial_losses[{column}]="
        f"{initial_losses[column]:.6g}; both must be the base model's losses.")
  if (targets.ndim != 1 or targets.size == 0 or not np.issubdtype(targets.dtype,
                                                                    np.integer)):
    raise ValueError(f"targets: expected a non-empty int[k] of test examples, got "
                     f"{targets.dtype} {list(targets.shape)}.")
  if targets.min() < 0 or targets.max() >= num_test:
    bad = targets[(targets < 0) | (targets >= num_test)]
    raise ValueError(f"targets: test examples must be in [0, M={num_test}), got "
                     f"{bad.tolist()}.")
  values, counts = np.unique(targets, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"targets: repeats test example {int(values[counts > 1][0])}; "
                     "give each once.")
  if epoch_steps is not None and (isinstance(epoch_steps, bool) or not isinstance(
      epoch_steps, int) or epoch_steps < 1):
    raise ValueError(f"epoch_steps={epoch_steps!r}: must be a positive integer or "
                     "None.")
  starts = (dict(start_batch_ids) if isinstance(start_batch_ids, dict) else
            {m: start_batch_ids for m in methods})
  missing = [m for m in methods if m not in starts]
  if missing:
    raise ValueError(f"start_batch_ids: no start curricula for methods {missing}.")
  count = None
  for method in methods:
    start = np.asarray(starts[method])
    who = ("start_batch_ids" if not isinstance(start_batch_ids, dict) else
           f"start_batch_ids[{method!r}]")
    if start.ndim != 3 or start.shape[1:] != (num_steps, width):
      raise ValueError(f"{who}: expected int[C, T={num_steps}, B={width}] like "
                       f"random_batch_ids, got shape {list(start.shape)}.")
    if count is not None and len(start) != count:
      raise ValueError(f"{who}: {len(start)} curricula, but another method has "
                       f"{count}; every method searches as many.")
    count = len(start)
    if _search.reorders(fitted[method], start):  # as search_curriculum checks them
      _search.check_epochs(start, epoch_steps, who)
    unfitted = fitted[method].unfitted_ids(start)
    if unfitted.size:
      raise ValueError(
          f"{who}: holds train ids {_simulator.format_ids(unfitted)} "
          f"({unfitted.size} in all) "
          f"that no fitted run of simulator {method!r} contained; draw its starts "
          "from its Simulator.fitted_ids.")
    starts[method] = start
  return starts


def search_and_verify(
    fitted: Dict[str, simulators_lib.Simulator], *,
    initial_losses: np.ndarray,
    start_batch_ids,
    random_batch_ids: np.ndarray,
    random_losses: np.ndarray,
    targets: Sequence[int],
    retrain: Callable[[np.ndarray], np.ndarray],
    methods: Optional[Sequence[str]] = None,
    num_iters: int = 300,
    num_proposals: int = 64,
    epoch_steps: Optional[int] = None,
    seed: int = 0) -> dict:
  """Searches curricula on each simulator, retrains them, compares with random ones.

  Args:
    fitted: method name -> fitted `Simulator`.
    initial_losses: float32[M] base-model test losses (start of every curriculum).
    start_batch_ids: int32[C, T, B] random curricula the searches start from (each
      method gets the same C starts), or method -> int32[C, T, B] (its own starts).
      A simulator with `fitted_ids` (fitted per id on runs) searches only among
      those ids (the `pool` of `search_curriculum`), and its starts must hold no
      other id (refused, naming it); draw them from the pool of the random
      curricula, so the search and its baseline draw from the same ids.
    random_batch_ids: int32[R', T, B] random curricula of the same size...
    random_losses: float32[R', T+1, M] ...and their actual losses (really trained).
      Their simulated finals are rolled out even where they hold ids a simulator
      has no fitted run for; such ids are listed per method in
      "random_unfitted_ids" (and warned about).
    targets: int[k] the test examples whose final loss the search minimises, in
      [0, M).
    retrain: `batch_ids int32[C', T, B] -> losses float32[C', T+1, M]`, the real
      training code; called once with every method's curricula stacked
      (C' = len(methods) · C, method-major).
    methods: which simulators to search with (default: all of `fitted`).
    num_iters, num_proposals, epoch_steps, seed: of `simulators.search_curriculum`
      (`epoch_steps`: the start curricula's steps per epoch; None: each is one
      epoch, so none may hold an id twice).

  Returns:
    A JSON-serialisable dict: "targets"; "random" {"actual_final" [R'],
    "median_actual", "simulated_final" {method: [R']}, "mean_curve" [T+1],
    "curve_low"/"curve_high" [T+1] (10th/90th percentile)}; "searched" {method:
    {"actual_final" [C], "simulated_final" [C], "start_simulated_final" [C],
    "actual_improvement", "simulated_improvement", "fraction_beating_median",
    "mean_curve" [T+1], "pool_size" (ids the search drew from), "random_unfitted_ids"
    [ids of the random curricula outside its fitted_ids]}}; plus "batch_ids"
    {method: int32[C, T, B]} (arrays, not JSON) for saving. Simulated losses are
    the search's objective: every step clipped at 0 (`search_curriculum`'s
    loss_floor).

  Raises:
    ValueError: naming the argument: unknown, repeated or no methods, start
      curricula of another T or B than random_batch_ids (or holding ids outside the
      simulator's fitted_ids, or whose epochs are not those of `epoch_steps`:
      `simulators._search.check_epochs`), random_losses not [R', T+1, M] or not
      starting at initial_losses, targets outside [0, M) or repeated; retrain's
      losses not [C', T+1, M].
  """
  methods = list(fitted) if methods is None else list(methods)
  if not methods:
    raise ValueError("methods: empty; name at least one fitted simulator "
                     f"({sorted(fitted)}), or None for all.")
  repeated = sorted({m for m in methods if methods.count(m) > 1})
  if repeated:
    raise ValueError(f"methods: {repeated} named more than once; each is searched "
                     "and retrained once.")
  unknown = sorted(set(methods) - set(fitted))
  if unknown:
    raise ValueError(f"counterfactual methods {unknown} are not fitted; fitted: "
                     f"{sorted(fitted)}.")
  targets = np.asarray(targets)
  random_batch_ids = np.asarray(random_batch_ids)
  random_losses = np.asarray(random_losses, np.float32)
  initial_losses = np.asarray(initial_losses, np.float32)
  starts = _check_verify_inputs(methods, fitted, initial_losses, start_batch_ids,
                                random_batch_ids, random_losses, targets,
                                epoch_steps)
  targets = targets.astype(np.int32)
  random_unfitted = {m: fitted[m].unfitted_ids(random_batch_ids) for m in methods}
  for method, ids in random_unfitted.items():
    if ids.size:
      logging.warning(
          "counterfactual: the random curricula hold train ids %s (%d in all) that "
          "no fitted run of %s contained; its simulated finals of them use its "
          "prior there (its search does not move them in).",
          _simulator.format_ids(ids), ids.size, method)

  def target_final(losses):  # float[R, T+1, M] -> float[R]
    return np.asarray(losses)[:, -1][:, targets].mean(-1)

  def simulated_final(sim, batch_ids):
    # What the search minimises (`search_curriculum`'s loss_floor): every step's
    # loss clipped at 0 (a final-only simulator: its final loss), so a searched
    # curriculum's simulated loss is its objective, never an impossible negative
    # loss. Only the targets are read; a simulator diverging on one of them
    # reports NaN there (as `evaluation` scores a diverging rollout), not an error
    # after the searched curricula were retrained. Unfitted ids: only the random
    # curricula can hold them (checked, listed and warned above).
    a, b = sim.phase_parameters()
    ids = jnp.asarray(batch_ids, jnp.int32)
    phases = jnp.asarray(sim.phase_of_steps(ids.shape[1]))
    finals = jax.vmap(lambda one: _simulator.final_losses(
        a, b, one, jnp.asarray(initial_losses, jnp.float32),
        linear=sim.kind == "linear", batch_mean=sim.batch_mean, phases=phases,
        floor=0.0,
        floor_each_step=not sim.final_only))(ids)
    return np.asarray(finals)[:, targets].mean(-1)

  searched_ids, pool_sizes = {}, {}
  for i, method in enumerate(methods):
    sim = fitted[method]
    pool = None if sim.fitted_ids is None else np.asarray(sim.fitted_ids, np.int32)
    pool_sizes[method] = (sim.num_train_examples if pool is None else len(pool))
    result = simulators_lib.search_curriculum(
        sim, initial_losses, starts[method], targets, pool=pool,
        num_iters=num_iters, num_proposals=num_proposals, epoch_steps=epoch_steps,
        seed=seed + i)
    searched_ids[method] = result.batch_ids
  stacked = np.concatenate([searched_ids[m] for m in methods], axis=0)
  actual = np.asarray(retrain(stacked), np.float32)
  expected = (stacked.shape[0], stacked.shape[1] + 1, initial_losses.shape[0])
  if actual.shape != expected:
    raise ValueError(f"retrain returned losses of shape {list(actual.shape)}; "
                     f"expected {list(expected)} (C'={expected[0]} curricula, T+1="
                     f"{expected[1]}, M={expected[2]} test examples like "
                     "random_losses).")

  random_actual = target_final(random_losses)
  median_actual = float(np.median(random_actual))
  random_curves = random_losses[:, :, targets].mean(-1)
  out = {
      "targets": targets.tolist(),
      "num_random": int(len(random_actual)),
      "num_searched_per_method": int(len(starts[methods[0]])) if methods else 0,
      "random": {
          "actual_final": random_actual.tolist(),
          "median_actual": median_actual,
          "simulated_final": {m: simulated_final(fitted[m], random_batch_ids).tolist()
                              for m in methods},
          "mean_curve": random_curves.mean(0).tolist(),
          "curve_low": np.percentile(random_curves, 10, axis=0).tolist(),
          "curve_high": np.percentile(random_curves, 90, axis=0).tolist(),
      },
      "searched": {},
  }
  per_method = out["num_searched_per_method"]
  for i, method in enumerate(methods):
    losses = actual[i * per_method:(i + 1) * per_method]
    sim_final = simulated_final(fitted[method], searched_ids[method])
    act_final = target_final(losses)
    sim_random_median = float(np.median(out["random"]["simulated_final"][method]))
    out["searched"][method] = {
        "actual_final": act_final.tolist(),
        "simulated_final": sim_final.tolist(),
        "start_simulated_final": simulated_final(fitted[method],
                                                 starts[method]).tolist(),
        "actual_improvement": median_actual - float(np.mean(act_final)),
        "simulated_improvement": sim_random_median - float(np.mean(sim_final)),
        "fraction_beating_median": float(np.mean(act_final < median_actual)),
        "mean_curve": losses[:, :, targets].mean(-1).mean(0).tolist(),
        "pool_size": int(pool_sizes[method]),
        "random_unfitted_ids": random_unfitted[method].tolist(),
    }
  out["batch_ids"] = searched_ids
  return out
