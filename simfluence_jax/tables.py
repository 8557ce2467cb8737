r"""Markdown tables for the README, generated from workdirs (never pasted by hand).

  python -m simfluence_jax.tables --workdir=/tmp/sj_default [--name=default] \
      [--goals=default|rough|none] [--readme=README.md]

Prints, from `WORKDIR/metrics.json` (a mean over seeds when the job ran several):
the held-out table (mean ± std), the unseen-example and removal-LDS tables, the
regime, and the goals of the fidelity issue with "met"/"missed" for each. With
`--readme`, the text between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` in
that file is replaced by the tables. `--sweep=DIR` adds the regime map of a sweep;
`--plans=A.json,B.json` the per-chip memory of each stage in plans written by
`python -m simfluence_jax.plan ... --out=A.json`; `--bench=A.json,B.json,...` the
speed tables, a mean over runs of `python benchmarks/run.py --out=A.json` on one
machine and commit (`evaluation._bench_tables`). The tables themselves are built by
`simfluence_jax.evaluation._tables`, which defines no flags.

A job removes its metrics.json once its runs are settled (a sweep its sweep.json when
it starts) and writes it when it finishes, so a missing one is refused: the last job
there did not finish. A summary whose parts were rerun alone since it was written is
refused too, naming the part and what to rerun: a multi-seed job's metrics.json when
a `seed_<k>/` was, a sweep's sweep.json when a cell (or a cell's seed) was; a file
written before these checks renders with a warning.
"""

import os
import sys

from absl import app
from absl import flags

from simfluence_jax import _cli
from simfluence_jax import _io
from simfluence_jax.evaluation._bench_tables import bench_tables
from simfluence_jax.evaluation._tables import load_json_files
from simfluence_jax.evaluation._tables import load_metrics
from simfluence_jax.evaluation._tables import render
from simfluence_jax.evaluation._tables import sweep_table
from simfluence_jax.evaluation._tables import update_readme

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished main job's workdir.")
_SWEEP = flags.DEFINE_string("sweep", None, "A finished sweep's workdir.")
_NAME = flags.DEFINE_string("name", "default", "Marker name in the README.")
_GOALS = flags.DEFINE_enum("goals", "default", ["default", "rough", "none"],
                           "Which goals to check.")
_README = flags.DEFINE_string("readme", None, "Update this file in place.")
_PLANS = flags.DEFINE_list("plans", None, "Plan JSON files (`plan --out=`).")
_BENCH = flags.DEFINE_list("bench", None, "Results of `python benchmarks/run.py "
                           "--out=FILE`, one file per run (a mean over them).")


def _finished(directory: str, name: str, flag: str, job: str) -> str:
  """`directory/name`; ValueError if missing: a job removes its result before it
  replaces it and writes it when it finishes, so the last job there did not
  finish."""
  path = os.path.join(directory, name)
  if not _io.exists(path):
    raise ValueError(f"--{flag}={directory!r} has no {name}: its last {job} did not "
                     "finish (or never ran there); rerun it.")
  return path


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  try:
    parts = []
    if _WORKDIR.value:
      _finished(_WORKDIR.value, "metrics.json", "workdir", "main job")
      payload = load_metrics(_WORKDIR.value)  # refused if a seed was rerun since
      parts.append(render(payload, _GOALS.value, _WORKDIR.value))
    if _SWEEP.value:
      _finished(_SWEEP.value, "sweep.json", "sweep", "sweep")
      parts.append("\n".join(sweep_table(_SWEEP.value)) + "\n")
    if _PLANS.value:
      # pylint: disable-next=g-import-not-at-top
      from simfluence_jax.planning import report as plan_report
      plans = load_json_files(_PLANS.value, "plans", "a plan",
                              "python -m simfluence_jax.plan ... --out=FILE")
      parts.append("\n".join(plan_report.plans_table(plans)) + "\n")
    if _BENCH.value:
      results = load_json_files(_BENCH.value, "bench", "benchmarks/run.py's results",
                                "python benchmarks/run.py --out=FILE")
      parts.append("\n".join(bench_tables(results, _BENCH.value)) + "\n")
    if not parts:
      raise ValueError("give --workdir, --sweep, --plans and/or --bench.")
    text = "\n".join(parts)
    print(text)
    if _README.value:
      update_readme(_README.value, _NAME.value, text)
  except (KeyError,) + _cli.RUN_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=_cli.parse_flags)
