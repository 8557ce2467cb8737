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

from simfluence_jax import config_lib
from simfluence_jax import main as main_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--arg", default=None, help="config argument, e.g. tiny")
  parser.add_argument("--out", default=None, help="JSON file for the timings")
  args = parser.parse_args()
  config = config_lib.load_config(
      os.path.join(REPO, args.config) + (f":{args.arg}" if args.arg else ""))
  logging.set_verbosity(logging.WARNING)
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    result = main_lib.train_and_evaluate(config, workdir)
    total = time.perf_counter() - start
  budget = 60.0 if args.arg == "tiny" else 600.0
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
