r"""Times the main job as a whole process, and stage by stage.

  python benchmarks/main_job_bench.py               # configs/default.py
  python benchmarks/main_job_bench.py --arg=tiny    # configs/default.py:tiny

Runs `python -m simfluence_jax.main` in a fresh workdir as a subprocess (imports,
compilation and compute: what a user waits for), reads the stage times from its
metrics.json, and prints them with the total against the budget (default ≤ 600 s,
tiny ≤ 60 s on a 2-core CPU). With `--cold`, the persistent compilation cache is
turned off, as on a machine's first run.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(config="configs/default.py", arg=None, cold=False, extra_flags=()):
  """Runs the main job once, as a subprocess, in a temporary workdir.

  Returns:
    dict: `total_s` (the whole process), `timings` per stage, `budget_s` (60 s for
    `tiny`, else 600 s) and the held-out `metrics` per method.
  """
  spec = config + (f":{arg}" if arg else "")
  flags = list(extra_flags)
  env = dict(os.environ)
  if cold:
    flags.append("--config.compilation_cache_dir=")
    # JAX reads the variable at import, before the job's config could turn the
    # cache off (review h26: a user's exported cache made the cold row warm).
    env["JAX_COMPILATION_CACHE_DIR"] = ""
  with tempfile.TemporaryDirectory() as workdir:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "simfluence_jax.main", f"--config={spec}",
         f"--workdir={workdir}", *flags], cwd=REPO, capture_output=True, text=True,
        env=env)
    total = time.perf_counter() - start
    if proc.returncode:
      raise RuntimeError(f"the main job failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(workdir, "metrics.json")) as f:
      result = json.load(f)
  metrics = {name: {k: v for k, v in values.items() if isinstance(v, (int, float))}
             for name, values in result.items()
             if isinstance(values, dict) and "all_steps_mse" in values}
  return {"timings": result["timings"], "total_s": total,
          "budget_s": 60.0 if arg == "tiny" else 600.0, "metrics": metrics}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/default.py")
  parser.add_argument("--arg", default=None, help="config argument, e.g. tiny")
  parser.add_argument("--out", default=None, help="JSON file for the timings")
  parser.add_argument("--cold", action="store_true",
                      help="no persistent compilation cache")
  args = parser.parse_args()
  r = measure(args.config, args.arg, args.cold)
  result, total, budget = r, r["total_s"], r["budget_s"]
  print(f"{'stage':<28}{'seconds':>10}")
  for stage, seconds in result["timings"].items():
    print(f"{stage:<28}{seconds:>10.1f}")
  print(f"{'whole process':<28}{total:>10.1f}   budget {budget:.0f} s: "
        f"{'OK' if total <= budget else 'OVER'}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump({"timings": result["timings"], "total_s": total, "budget_s": budget}, f,
                indent=2)


if __name__ == "__main__":
  main()
