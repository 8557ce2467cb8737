"""Counterfactual curricula: search a curriculum on a simulator, then check it for real.

`search_and_verify` asks every chosen simulator for the curricula that would minimise
the final loss of some target test examples (`simulators.search_curriculum`, starting
from random curricula), retrains those curricula with the real training code (a
callback, so the caller decides how), and compares them with random curricula of the
same size that were really trained (the held-out runs in the main job):

* actual improvement: median final target loss of the random curricula minus that of
  the searched ones (positive = the search helped);
* simulated improvement: the same difference as the simulator predicted it;
* how often a searched curriculum beats the median random one.

Also here: loading the simulators a main job saved (`load_simulators`) and simulating
any curricula with all of them (`simulate_curricula`, `plot_trajectories`), which
`python -m simfluence_jax.simulate` runs on a curriculum file.
"""

import os
from typing import Callable, Dict, Optional, Sequence

import numpy as np

from simfluence_jax import _io
from simfluence_jax import simulators as simulators_lib
from simfluence_jax import trace as trace_lib



SIMULATORS_DIR = "simulators"


def load_simulators(workdir: str, methods: Optional[Sequence[str]] = None
                    ) -> dict[str, simulators_lib.Simulator]:
  """The simulators the main job saved in `workdir/simulators/<method>/`.

  Raises:
    FileNotFoundError: the workdir holds no saved simulators (main job not finished).
    ValueError: a requested method is not among them.
  """
  root = os.path.join(workdir, SIMULATORS_DIR)
  directory = _io.as_path(root)
  saved = sorted(child.name for child in directory.iterdir()
                 if (child / "simulator.json").exists()
                 ) if directory.is_dir() else []
  if not saved:
    raise FileNotFoundError(f"--workdir={workdir!r} holds no fitted simulators "
                            f"({root}/*/simulator.json); run simfluence_jax.main first.")
  methods = saved if methods is None else list(methods)
  unknown = sorted(set(methods) - set(saved))
  if unknown:
    raise ValueError(f"--methods: {unknown} not fitted in {workdir!r}; available: "
                     f"{saved}.")
  return {name: simulators_lib.Simulator.load(os.path.join(root, name))
          for name in methods}


def base_initial_losses(workdir: str) -> np.ndarray:
  """float32[M] test losses of the base model (every run's `losses[:, 0]`)."""
  trace = trace_lib.Trace.load(os.path.join(workdir, "trace"), mmap=True)
  return np.array(trace.losses[0, 0], np.float32)


def simulate_curricula(sims: dict, batch_ids: np.ndarray, initial_losses: np.ndarray,
                       num_band_samples: int = 32, seed: int = 0) -> dict:
  """Every simulator's trajectories of `batch_ids` int32[R', T, B] from float32[M].

  Returns:
    method -> {"mean": float32[R', T+1, M], "std": float32[R', T+1, M] or None}.
  """
  initial = np.repeat(np.asarray(initial_losses, np.float32)[None], len(batch_ids), 0)
  out = {}
  for name, sim in sims.items():
    if sim.posterior is not None and num_band_samples > 0:
      mean, std = sim.simulate_with_bands(batch_ids, initial,
                                          num_samples=num_band_samples,
                                          rng=seed)
      out[name] = {"mean": np.asarray(mean), "std": np.asarray(std)}
    else:
      out[name] = {"mean": np.asarray(sim.simulate(batch_ids, initial)), "std": None}
  return out


def plot_trajectories(path: str, trajectories: dict, targets: np.ndarray,
                      title: str = "") -> None:
  """PNG of the mean loss of `targets` per step, one panel per curriculum (≤ 4)."""
  from simfluence_jax import _optional  # pylint: disable=g-import-not-at-top
  matplotlib = _optional.import_module("matplotlib", "report", "plot_trajectories")
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  num_curricula = next(iter(trajectories.values()))["mean"].shape[0]
  shown = min(num_curricula, 4)
  fig, axes = plt.subplots(1, shown, figsize=(5 * shown, 3.5), squeeze=False)
  for r, ax in enumerate(axes[0]):
    for i, (name, values) in enumerate(trajectories.items()):
      mean = values["mean"][r][:, targets].mean(-1)
      steps = np.arange(mean.shape[0])
      ax.plot(steps, mean, color=f"C{i}", label=name)
      if values["std"] is not None:
        # Band of the target mean; per-example stds combined as if independent.
        std = np.sqrt((values["std"][r][:, targets] ** 2).sum(-1)) / len(targets)
        ax.fill_between(steps, mean - 2 * std, mean + 2 * std, color=f"C{i}", alpha=0.2)
    ax.set_title(f"{title} curriculum {r}", fontsize=9)
    ax.set_xlabel("step")
  axes[0, 0].set_ylabel(f"mean simulated loss of {len(targets)} test examples")
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  _io.save_figure(fig, path)


def choose_targets(train_losses: np.ndarray, num_targets: int) -> np.ndarray:
  """The test examples whose final loss varies most across runs, int32[k] sorted.

  Those are the examples whose outcome the curriculum decides, so the ones a
  curriculum search can move.

  Args:
    train_losses: float[R, T+1, M] losses of the training runs.
    num_targets: k, at most M.
  """
  num_test = train_losses.shape[-1]
  if isinstance(num_targets, bool) or not 0 < int(num_targets) <= num_test:
    raise ValueError(f"num_targets={num_targets!r}: must be in [1, M={num_test}].")
  spread = np.std(np.asarray(train_losses)[:, -1], axis=0)
  return np.sort(np.argsort(-spread, kind="stable")[:int(num_targets)]).astype(np.int32)


def search_and_verify(
    fitted: Dict[str, simulators_lib.Simulator], *,
    initial_losses: np.ndarray,
    start_batch_ids: np.ndarray,
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
      method gets the same C starts).
    random_batch_ids: int32[R', T, B] random curricula of the same size...
    random_losses: float32[R', T+1, M] ...and their actual losses (really trained).
    targets: int[k] the test examples whose final loss the search minimises.
    retrain: `batch_ids int32[C', T, B] -> losses float32[C', T+1, M]`, the real
      training code; called once with every method's curricula stacked
      (C' = len(methods) · C, method-major).
    methods: which simulators to search with (default: all of `fitted`).
    num_iters, num_proposals, epoch_steps, seed: of `simulators.search_curriculum`.

  Returns:
    A JSON-serialisable dict: "targets"; "random" {"actual_final" [R'],
    "median_actual", "simulated_final" {method: [R']}, "mean_curve" [T+1],
    "curve_low"/"curve_high" [T+1] (10th/90th percentile)}; "searched" {method:
    {"actual_final" [C], "simulated_final" [C], "start_simulated_final" [C],
    "actual_improvement", "simulated_improvement", "fraction_beating_median",
    "mean_curve" [T+1]}}; plus "batch_ids" {method: int32[C, T, B]} (arrays, not
    JSON) for saving.
  """
  methods = list(fitted) if methods is None else list(methods)
  unknown = sorted(set(methods) - set(fitted))
  if unknown:
    raise ValueError(f"counterfactual methods {unknown} are not fitted; fitted: "
                     f"{sorted(fitted)}.")
  targets = np.asarray(targets, np.int32)
  random_batch_ids = np.asarray(random_batch_ids)
  random_losses = np.asarray(random_losses, np.float32)
  initial_losses = np.asarray(initial_losses, np.float32)
  if random_losses.shape[0] != random_batch_ids.shape[0]:
    raise ValueError(f"random_losses: {random_losses.shape[0]} runs but random_batch_ids "
                     f"has {random_batch_ids.shape[0]}.")

  def target_final(losses):  # float[R, T+1, M] -> float[R]
    return np.asarray(losses)[:, -1][:, targets].mean(-1)

  def simulated_final(sim, batch_ids):
    initial = np.repeat(initial_losses[None], len(batch_ids), axis=0)
    return target_final(sim.simulate(batch_ids, initial))

  searched_ids = {}
  for i, method in enumerate(methods):
    result = simulators_lib.search_curriculum(
        fitted[method], initial_losses, start_batch_ids, targets,
        num_iters=num_iters, num_proposals=num_proposals, epoch_steps=epoch_steps,
        seed=seed + i)
    searched_ids[method] = result.batch_ids
  stacked = np.concatenate([searched_ids[m] for m in methods], axis=0)
  actual = np.asarray(retrain(stacked), np.float32)
  if actual.shape[:2] != (stacked.shape[0], stacked.shape[1] + 1):
    raise ValueError(f"retrain returned losses of shape {actual.shape}; expected "
                     f"[{stacked.shape[0]}, {stacked.shape[1] + 1}, M].")

  random_actual = target_final(random_losses)
  median_actual = float(np.median(random_actual))
  random_curves = random_losses[:, :, targets].mean(-1)
  out = {
      "targets": targets.tolist(),
      "num_random": int(len(random_actual)),
      "num_searched_per_method": int(len(start_batch_ids)),
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
  per_method = len(start_batch_ids)
  for i, method in enumerate(methods):
    losses = actual[i * per_method:(i + 1) * per_method]
    sim_final = simulated_final(fitted[method], searched_ids[method])
    act_final = target_final(losses)
    sim_random_median = float(np.median(out["random"]["simulated_final"][method]))
    out["searched"][method] = {
        "actual_final": act_final.tolist(),
        "simulated_final": sim_final.tolist(),
        "start_simulated_final": simulated_final(fitted[method],
                                                 start_batch_ids).tolist(),
        "actual_improvement": median_actual - float(np.mean(act_final)),
        "simulated_improvement": sim_random_median - float(np.mean(sim_final)),
        "fraction_beating_median": float(np.mean(act_final < median_actual)),
        "mean_curve": losses[:, :, targets].mean(-1).mean(0).tolist(),
    }
  out["batch_ids"] = searched_ids
  return out
