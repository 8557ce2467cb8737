r"""Simulate a curriculum nobody trained, with every simulator the main job fitted.

  python -m simfluence_jax.simulate --workdir=/tmp/sj --curriculum=my_curriculum.json

The curriculum file holds train example ids per step (`data.load_curriculum`: JSON
`[T][B]` or `[R'][T][B]`, or CSV with one step per line; -1 = padding). Every curriculum
starts from the base model, so the initial test losses are the trace's
`losses[0, 0]`. Writes into `--output_dir` (default `WORKDIR/simulated/<file stem>`):

* `trajectories.json`: per method, the simulated losses `mean` float[R', T+1, M] and,
  for simulators with a posterior (Simfluence-Linear / -Additive), `std` (parameter
  uncertainty; `null` otherwise);
* `trajectories.png`: the mean loss of the chosen test examples per step, one line per
  method with ±2σ bands.
"""

import json
import os
import sys
from typing import Optional, Sequence

from absl import app
from absl import flags
import numpy as np

from simfluence_jax import _io
from simfluence_jax import counterfactual
from simfluence_jax import data

def run(workdir: str, curriculum_path: str, output_dir: Optional[str] = None,
        methods: Optional[Sequence[str]] = None,
        targets: Optional[Sequence[int]] = None, num_band_samples: int = 32,
        seed: int = 0) -> dict:
  """Loads, validates, simulates, writes; returns {"output_dir", "trajectories"}."""
  sims = counterfactual.load_simulators(workdir, methods)
  any_sim = next(iter(sims.values()))
  batch_ids = data.load_curriculum(curriculum_path, any_sim.num_train_examples)
  initial = counterfactual.base_initial_losses(workdir)
  num_test = any_sim.num_test_examples
  if targets is None:
    targets = np.arange(num_test)
  else:
    targets = np.asarray([int(t) for t in targets])
    if targets.size == 0 or targets.min() < 0 or targets.max() >= num_test:
      raise ValueError(f"--targets: indices must be in [0, {num_test}), got "
                       f"{targets.tolist()}.")
  trajectories = counterfactual.simulate_curricula(sims, batch_ids, initial,
                                                   num_band_samples, seed)
  stem = os.path.splitext(os.path.basename(curriculum_path))[0]
  output_dir = output_dir or os.path.join(workdir, "simulated", stem)
  _io.makedirs(output_dir)
  payload = {
      "curriculum": os.fspath(_io.as_path(curriculum_path)),
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  f = flags.FLAGS
  if not f.workdir or not f.curriculum:
    print("error: --workdir and --curriculum are required", file=sys.stderr)
    sys.exit(2)
  try:
    result = run(f.workdir, f.curriculum, f.output_dir, f.methods, f.targets,
                 f.num_band_samples, f.seed)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  targets = result["targets"]
  print(f"{'method':22s} final mean loss of {len(targets)} test examples "
        "(per curriculum)")
  for name, values in result["trajectories"].items():
    finals = values["mean"][:, -1][:, targets].mean(-1)
    print(f"{name:22s} " + "  ".join(f"{v:.4f}" for v in finals))
  print(f"wrote {result['output_dir']}/trajectories.json and trajectories.png")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
