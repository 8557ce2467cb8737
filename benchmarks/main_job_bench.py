r"""Times the main job stage by stage.

  python benchmarks/main_job_bench.py               # configs/default.py
  python benchmarks/main_job_bench.py --arg=tiny    # configs/default.py:tiny

Prints the time of every stage and the total against the budget (default ≤ 600 s,
tiny ≤ 60 s on a 2-core CPU), and writes them as JSON.
"""

import argparse
import json
import os
import tempfile
import time

from absl import logging
import numpy as np

from simfluence_jax import config_lib
from simfluence_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config="configs/default.py", arg=None):
  """Runs the main job once in a temporary workdir.

  Returns:
    dict: `timings` per stage, `total_s`, `budget_s` (60 s for `tiny`, else 600 s)
    and the held-out `metrics` per method.
  """
  config = config_lib.load_config(
      os.path.join(REPO, config) + (f":{arg}" if arg else ""))
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.WARNING)
  try:
    with tempfile.TemporaryDirectory() as workdir:
      start = time.perf_counter()
      result = main_lib.train_and_evaluate(config, workdir)
      total = time.perf_counter() - start
  finally:
    logging.set_verbosity(verbosity)
  metrics = {name: {k: float(v) for k, v in values.items() if np.isscalar(v)}
             for name, values in result.items()
             if name != "timings" and isinstance(values, dict)}
  return {"timings": result["timings"], "total_s": total,
          "budget_s": 60.0 if arg == "tiny" else 600.0, "metrics": metrics}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--arg", default=None, help="config argument, e.g. tiny")
  parser.add_argument("--out", default=None, help="JSON file for the timings")
  args = parser.parse_args()
  r = measure(args.config, args.arg)
  result, total, budget = r, r["total_s"], r["budget_s"]
  print(f"{'stage':<28}{'seconds':>10}")
  for stage, seconds in result["timings"].items():
    print(f"{stage:<28}{seconds:>10.1f}")
  print(f"{'total':<28}{total:>10.1f}   budget {budget:.0f} s: "
        f"{'OK' if total <= budget else 'OVER'}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"timings": result["timings"], "total_s": total, "budget_s": budget}, f,
                indent=2)


if __name__ == "__main__":
  main()
