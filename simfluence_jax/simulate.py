r"""Simulate a curriculum nobody trained, with every simulator the main job fitted.

  python -m simfluence_jax.simulate --workdir=/tmp/sj --curriculum=my_curriculum.json

The curriculum file holds train example ids per step (`data.load_curriculum`: JSON
`[T][B]` or `[R'][T][B]`, or CSV with one step per line; -1 = padding). Every curriculum
starts from the base model, so the initial test losses are the trace's
`losses[0, 0]`. Writes into `--output_dir` (default `WORKDIR/simulated/<file stem>`):

* `trajectories.json`: per method, `mean` float[R', T+1, M] the point prediction of
  the losses (`Simulator.simulate`, the rollout of the fitted parameters: the same
  numbers the main job's `evaluate` stage scores; the field keeps its old name) and,
  for simulators with a posterior (Simfluence-Linear / -Additive) when
  `--num_band_samples` > 0, `std` (the std of the rollouts of that many posterior
  samples of the parameters: parameter uncertainty) and `posterior_sample_mean`
  (their mean, which is not `mean`: the rollout is not linear in the parameters;
  both `null` otherwise); `curriculum` (the file, absolute), `fits` (per
  method, the fingerprint of the `stages/fit_<method>.json` its simulator came
  from, null for simulators saved by hand: a main job that refits a simulator
  changes it, so a trajectory whose fingerprint differs from the current record
  is an older fit's) and `unfitted_ids` (per method, the curriculum's ids its fitted
  runs never contained; rolled out only with `--allow_unfitted_ids`); `below_zero`
  (per method whose point prediction goes below 0, an impossible loss, its
  minimum; also logged as a warning);
* `trajectories.png`: the mean loss of the chosen test examples per step, one line per
  method (its point prediction) with a band of its posterior samples' mean ±2σ.

The printed table holds, per method and curriculum, the point prediction of the final
loss averaged over the chosen test examples (`mean`'s, as `evaluate` scores).

Refused, in one line: a curriculum holding train ids that no fitted run of a chosen
simulator contained (e.g. the main job's unseen examples, `summary.unseen_ids`):
Simfluence-Linear / -Additive and per-step TracIn hold only their prior for them
(`Simulator.fitted_ids`); leave those methods out with `--methods`, or pass
`--allow_unfitted_ids`. Also refused: a default output folder that already holds
the trajectories of another curriculum file with the same stem (`c.json` and
`c.csv` both map to `simulated/c`); pass `--output_dir`.
"""

import json
import logging
import os
import re
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _cli
from simfluence_jax import _io
from simfluence_jax import counterfactual
from simfluence_jax import data
from simfluence_jax.simulators import _simulator


def _full_path(path: str) -> str:
  """An absolute local path (a URL such as gs://... as it is)."""
  text = os.fspath(_io.as_path(path))
  return text if "://" in text else os.path.abspath(text)


def _check_unfitted(sims: dict, found: dict, curriculum_path: str) -> None:
  """Raises ValueError naming the file if `found` (`counterfactual.unfitted_ids` of
  its curricula) lists ids outside a simulator's fitted runs."""
  if not found:
    return
  union = np.unique(np.concatenate(list(found.values())))
  others = [m for m in sims if m not in found]
  leave_out = (f"--methods={','.join(others)} keeps the saved simulators that "
               "predict every id; " if others else "")
  raise ValueError(
      f"--curriculum={curriculum_path}: holds train ids "
      f"{_simulator.format_ids(union)} ({union.size} in "
      f"all) that no fitted run contained; simulators {sorted(found)} have only their "
      f"prior for them; {leave_out}pass --allow_unfitted_ids to roll out anyway.")


def _check_short_steps(batch_ids: np.ndarray, workdir: str,
                       curriculum_path: str) -> None:
  """Raises ValueError naming the file if a step holds fewer ids (and not none)
  than every step of the workdir's recorded runs: a simulator sums per-example
  effects over a step's ids (Simfluence-Linear's α = Σ A_i ≈ 1 over a full
  batch), which the fitted runs never showed with fewer, while training averages
  over them: a one-id step predicted the loss falling to a quarter."""
  recorded = counterfactual.recorded_batch_ids(workdir)
  counts = (recorded >= 0).sum(-1)
  fewest = int(counts[counts > 0].min())
  given = (batch_ids >= 0).sum(-1)
  short = np.argwhere((given > 0) & (given < fewest))
  if short.size:
    r, t = (int(i) for i in short[0])
    raise ValueError(
        f"--curriculum={curriculum_path}: curriculum {r}, step {t} holds "
        f"{int(given[r, t])} ids, the recorded runs' steps at least {fewest} (of "
        f"{recorded.shape[-1]}): the simulators were never fitted on such steps "
        f"(they sum per-example effects over a step's ids; training averages "
        f"over them); pass --allow_extrapolation to roll out anyway.")


def _check_output_dir(output_dir: str, curriculum: str) -> None:
  """Refuses a default output folder holding another curriculum file's output."""
  path = os.path.join(output_dir, "trajectories.json")
  if not _io.exists(path):
    return
  try:
    previous = json.loads(_io.read_text(path)).get("curriculum")
  except (ValueError, AttributeError):
    previous = None
  if previous is not None and _full_path(previous) != curriculum:
    raise ValueError(
        f"--curriculum={curriculum}: its default output folder {output_dir} holds "
        f"the trajectories of another curriculum file ({previous}) with the same "
        "stem; pass --output_dir, or delete that folder.")


def _parse_targets(targets: Sequence, num_test: int) -> np.ndarray:
  """int[k] the distinct test example indices of --targets, in [0, M)."""
  parsed = []
  for value in targets:
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
      parsed.append(int(value))
    elif isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
      parsed.append(int(value))
    else:
      raise ValueError(f"--targets: {value!r} is not a test example index (an "
                       f"integer in [0, {num_test})).")
  targets = np.asarray(parsed, object)
  if targets.size == 0 or min(parsed) < 0 or max(parsed) >= num_test:
    raise ValueError(f"--targets: indices must be in [0, {num_test}), got "
                     f"{targets.tolist()}.")
  targets = targets.astype(np.int64)
  values, counts = np.unique(targets, return_counts=True)
  if (counts > 1).any():
    raise ValueError(f"--targets: repeats test example {int(values[counts > 1][0])}; "
                     "give each once.")
  return targets


def run(workdir: str, curriculum_path: str, output_dir: Optional[str] = None,
        methods: Optional[Sequence[str]] = None,
        targets: Optional[Sequence[int]] = None, num_band_samples: int = 32,
        seed: int = 0, allow_unfitted_ids: bool = False,
        allow_extrapolation: bool = False) -> dict:
  """Loads, validates, simulates, writes; returns {"output_dir", "trajectories"}.

  Raises:
    ValueError: in one line: a curriculum holding ids outside a chosen simulator's
      fitted runs (naming the file, the ids and the simulators) unless
      `allow_unfitted_ids`; a default output folder holding another curriculum
      file's trajectories; targets that are not distinct indices in [0, M);
      num_band_samples not an integer >= 0; what `load_simulators` and
      `data.load_curriculum` refuse.
  """
  if not _checks.is_int(num_band_samples) or num_band_samples < 0:
    raise ValueError(f"--num_band_samples={num_band_samples!r}: must be an integer "
                     ">= 0 (0: no bands).")
  sims = counterfactual.load_simulators(workdir, methods)
  any_sim = next(iter(sims.values()))
  batch_ids = data.load_curriculum(curriculum_path, any_sim.num_train_examples)
  for sim in sims.values():  # first what no flag lifts (a batch width, say)
    sim.check_curricula(batch_ids, allow_extrapolation=True,
                        who=f"--curriculum={curriculum_path}")
  unfitted = counterfactual.unfitted_ids(sims, batch_ids)
  if not allow_unfitted_ids:
    _check_unfitted(sims, unfitted, curriculum_path)
  if not allow_extrapolation:
    _check_short_steps(batch_ids, workdir, curriculum_path)
  initial = counterfactual.base_initial_losses(workdir)
  num_test = any_sim.num_test_examples
  targets = (np.arange(num_test) if targets is None else
             _parse_targets(targets, num_test))
  curriculum = _full_path(curriculum_path)
  stem = os.path.splitext(os.path.basename(curriculum_path))[0]
  if not output_dir:
    output_dir = os.path.join(workdir, "simulated", stem)
    _check_output_dir(output_dir, curriculum)
  for name, ids in unfitted.items():
    logging.warning("simulate: %s has no fitted run with train ids %s (%d in all); "
                    "its trajectories roll them out on its prior "
                    "(--allow_unfitted_ids).", name, ids[:10].tolist(), ids.size)
  trajectories = counterfactual.simulate_curricula(
      sims, batch_ids, initial, num_band_samples, seed,
      allow_unfitted_ids=allow_unfitted_ids, allow_extrapolation=allow_extrapolation)
  # A loss below 0 is impossible: said, as the main job's report does (review h32:
  # -23.0 came back unflagged, while the search clips at its loss_floor).
  below_zero = {name: float(np.nanmin(values["mean"]))
                for name, values in trajectories.items()
                if np.nanmin(values["mean"]) < 0}
  for name, lowest in below_zero.items():
    logging.warning("simulate: %s predicts losses below 0 (min %.4g), which no "
                    "training run can reach: the curriculum is outside what its "
                    "fit describes.", name, lowest)
  _io.makedirs(output_dir)
  payload = {
      "curriculum": curriculum,
      "below_zero": below_zero,
      "fits": counterfactual.fit_fingerprints(workdir, list(sims)),
      "allow_extrapolation": bool(allow_extrapolation),
      "unfitted_ids": {name: unfitted[name].tolist() if name in unfitted else []
                       for name in sims},
      "batch_ids_shape": list(batch_ids.shape),
      "initial_losses": initial.tolist(),
      "targets": targets.tolist(),
      "methods": {name: {k: None if v is None else np.round(v, 6).tolist()
                         for k, v in values.items()}
                  for name, values in trajectories.items()},
  }
  _io.write_text(os.path.join(output_dir, "trajectories.json"), json.dumps(payload))
  counterfactual.plot_trajectories(os.path.join(output_dir, "trajectories.png"),
                                   trajectories, targets, title=stem)
  return {"output_dir": output_dir, "trajectories": trajectories, "targets": targets}


def _define_flags() -> None:
  """Flags of the command line; defined only when run as a script, so that importing
  this module next to `simfluence_jax.main` (which also has --workdir) works."""
  flags.DEFINE_string("workdir", None, "Workdir of a finished main job.")
  flags.DEFINE_string("curriculum", None, "Curriculum file (.json / .csv).")
  flags.DEFINE_string("output_dir", None,
                      "Default: WORKDIR/simulated/<curriculum file stem>.")
  flags.DEFINE_list("methods", None, "Simulators to use (default: all saved).")
  flags.DEFINE_list("targets", None,
                    "Test example indices the plot averages (default: all).")
  flags.DEFINE_integer("num_band_samples", 32,
                       "Posterior samples for the uncertainty bands.")
  flags.DEFINE_integer("seed", 0, "Seed of the posterior samples.")
  flags.DEFINE_bool("allow_unfitted_ids", False,
                    "Roll out curricula holding train ids no fitted run contained, "
                    "on the prior of the simulators fitted per id (listed in "
                    "trajectories.json's unfitted_ids).")
  flags.DEFINE_bool("allow_extrapolation", False,
                    "Roll out curricula of more steps than the simulators were "
                    "fitted on (steps past them use the last phase's parameters), "
                    "or with steps holding fewer ids than any recorded run's.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if not f.workdir or not f.curriculum:
    print("error: --workdir and --curriculum are required", file=sys.stderr)
    sys.exit(2)
  try:
    result = run(f.workdir, f.curriculum, f.output_dir, f.methods, f.targets,
                 f.num_band_samples, f.seed, f.allow_unfitted_ids,
                 f.allow_extrapolation)
  except _cli.RUN_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  targets = result["targets"]
  print(f"{'method':22s} final loss, point prediction (as the main job's evaluate "
        f"scores), mean over {len(targets)} test examples (per curriculum; posterior "
        "bands: std in trajectories.json)")
  for name, values in result["trajectories"].items():
    finals = values["mean"][:, -1][:, targets].mean(-1)
    print(f"{name:22s} " + "  ".join(f"{v:.4f}" for v in finals))
  print(f"wrote {result['output_dir']}/trajectories.json and trajectories.png")


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=_cli.parse_flags)
