r"""Markdown tables for the README, generated from workdirs (never pasted by hand).

  python -m simfluence_jax.tables --workdir=/tmp/sj_default [--name=default] \
      [--goals=default|rough|none] [--readme=README.md]

Prints, from `WORKDIR/metrics.json` (a mean over seeds when the job ran several):
the held-out table (mean ± std), the unseen-example and removal-LDS tables, the
regime, and the goals of the fidelity issue with "met"/"missed" for each. With
`--readme`, the text between `<!-- tables:NAME -->` and `<!-- /tables:NAME -->` in
that file is replaced by the tables. `--sweep=DIR` adds the regime map of a sweep;
`--plans=A.json,B.json` the per-chip memory of each stage in plans written by
`python -m simfluence_jax.plan ... --out=A.json`.
"""

import json
import os
import re
import sys

from absl import app
from absl import flags
import numpy as np

from simfluence_jax import _io

_WORKDIR = flags.DEFINE_string("workdir", None, "A finished main job's workdir.")
_SWEEP = flags.DEFINE_string("sweep", None, "A finished sweep's workdir.")
_NAME = flags.DEFINE_string("name", "default", "Marker name in the README.")
_GOALS = flags.DEFINE_enum("goals", "default", ["default", "rough", "none"],
                           "Which goals to check.")
_README = flags.DEFINE_string("readme", None, "Update this file in place.")
_PLANS = flags.DEFINE_list("plans", None, "Plan JSON files (`plan --out=`).")

COLUMNS = ("all_steps_mse", "final_step_mse", "spearman", "spearman_across_runs")


def _get(payload, *keys, default=np.nan):
  value = payload
  for key in keys:
    if not isinstance(value, dict) or key not in value or value[key] is None:
      return default
    value = value[key]
  return value


def _fmt(mean, std=np.nan, digits=3):
  if mean is None or not np.isfinite(mean):
    return "–"
  text = f"{mean:.{digits}f}"
  if std is not None and np.isfinite(std) and std > 0:
    text += f" ± {std:.{digits}f}"
  return text


def methods_table(payload: dict, section: str = None) -> list:
  """Rows of every method: the four metrics (± std), MSEs also as ratio to blind."""
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  entries = payload if section is None else payload.get(section, {})
  std = payload.get("std", {}) if section is None else payload.get("std", {}).get(
      section, {})
  methods = _report.methods_of(entries) if section is None else list(entries)
  lines = ["| method | " + " | ".join(COLUMNS) + " | run-equivalents |",
           "|---" * (len(COLUMNS) + 2) + "|"]
  for method in methods:
    cells = []
    for name in COLUMNS:
      text = _fmt(_get(entries, method, name), _get(std, method, name))
      ratio = _get(entries, method, name + "_ratio")
      if name.endswith("mse") and method != "curriculum_blind" and np.isfinite(ratio):
        text += f" ({ratio:.2f}×)"
      cells.append(text)
    cells.append(_fmt(_get(payload, "cost", method, "run_equivalents"), digits=1))
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return lines


def removal_table(payload: dict) -> list:
  removal = payload.get("removal_lds") or {}
  if not removal:
    return []
  labels = sorted({k for v in removal.values() for k in v}, key=lambda s: float(
      s.rstrip("%")))
  std = payload.get("std", {}).get("removal_lds", {})
  lines = ["| method | " + " | ".join(f"removal LDS {label}" for label in labels) + " |",
           "|---" * (len(labels) + 1) + "|"]
  for method, values in removal.items():
    lines.append(f"| {method} | " + " | ".join(
        _fmt(_get(values, label), _get(std, method, label)) for label in labels) + " |")
  return lines


def _best(payload: dict, metric: str, section: str = None):
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  entries = payload if section is None else payload.get(section, {})
  methods = _report.methods_of(entries) if section is None else list(entries)
  scored = [(m, _get(entries, m, metric)) for m in methods
            if np.isfinite(_get(entries, m, metric))]
  if not scored:
    return None, np.nan
  return max(scored, key=lambda p: p[1])


def goals(payload: dict, which: str) -> list:
  """(goal, value, met) of the fidelity issue's "done when" list."""
  best, best_rho = _best(payload, "spearman_across_runs")
  checks = []
  if which == "default":
    checks += [
        ("mean test loss drops ≥ 30%", _get(payload, "regime", "mean_loss_drop"),
         lambda v: v >= 0.30),
        ("across-run std of final test losses ≥ 0.3",
         _get(payload, "regime", "final_loss_std_across_runs"), lambda v: v >= 0.3),
        (f"best method ({best}) spearman_across_runs ≥ 0.9", best_rho,
         lambda v: v >= 0.9),
        (f"{best}: all_steps_mse ≤ 0.3 × curriculum_blind's",
         _get(payload, best, "all_steps_mse_ratio") if best else np.nan,
         lambda v: v <= 0.3),
        (f"{best}: spearman ≥ 0.95", _get(payload, best, "spearman") if best else
         np.nan, lambda v: v >= 0.95),
        ("metagradient (no fitted runs) spearman_across_runs ≥ 0.85",
         _get(payload, "metagradient", "spearman_across_runs"), lambda v: v >= 0.85),
        ("metagradient removal LDS at 1% ≥ 0.9",
         _get(payload, "removal_lds", "metagradient", "1%"), lambda v: v >= 0.9),
        ("simfluence_featurized on unseen examples: spearman_across_runs ≥ 0.5",
         _get(payload, "unseen_examples", "simfluence_featurized",
              "spearman_across_runs"), lambda v: v >= 0.5),
        ("simfluence_featurized on unseen examples: all_steps_mse < blind's",
         _get(payload, "unseen_examples", "simfluence_featurized",
              "all_steps_mse_ratio"), lambda v: v < 1.0),
    ]
  elif which == "rough":
    checks.append((f"best method ({best}) spearman_across_runs ≥ 0.7", best_rho,
                   lambda v: v >= 0.7))
  return [(goal, value, bool(np.isfinite(value) and test(value)))
          for goal, value, test in checks]


def sweep_table(sweep_dir: str) -> list:
  cells = json.loads(_io.read_text(os.path.join(sweep_dir, "sweep.json")))
  methods = [m for m in cells[0]["metrics"] if m != "curriculum_blind"]
  lines = ["| cell | loss drop | across-run std | " + " | ".join(methods) + " |",
           "|---" * (len(methods) + 3) + "|"]
  for cell in cells:
    name = ", ".join(f"{k}={v}" for k, v in cell["overrides"].items())
    regime = cell.get("regime") or {}  # sweeps written before it was kept: –
    drop = regime.get("mean_loss_drop", np.nan)
    values = [f"{_fmt(100 * drop, digits=0)}%",
              _fmt(regime.get("final_loss_std_across_runs", np.nan), digits=2)]
    for method in methods:
      rho = _get(cell["metrics"], method, "spearman_across_runs")
      ratio = _get(cell["metrics"], method, "all_steps_mse_ratio")
      values.append(f"{_fmt(rho, digits=2)} / {_fmt(ratio, digits=2)}×")
    lines.append(f"| {name} | " + " | ".join(values) + " |")
  return lines + ["", "Per method: spearman_across_runs / all_steps_mse as a multiple "
                  "of curriculum_blind's. Loss drop: of the mean test loss over a run; "
                  "across-run std: of the final test losses (the curriculum's effect)."]


def render(payload: dict, which: str, source: str) -> str:
  seeds = payload.get("seeds")
  lines = [f"Generated by `python -m simfluence_jax.tables` from `{source}` "
           + (f"(mean ± std over seeds {seeds})." if seeds else "(one seed).")]
  from simfluence_jax.evaluation import _report  # pylint: disable=g-import-not-at-top
  regime = payload.get("regime")
  if regime:
    lines += ["", f"Regime: mean test loss drops "
              f"{_fmt(100 * regime['mean_loss_drop'], digits=1)}%; across-run std of "
              f"final test losses {_fmt(regime['final_loss_std_across_runs'])}."
              + (" Derivative growth of the removal reference run "
                 "(`training.derivative_growth`, about 1 or less: stable): "
                 + _report.growth_text(regime) + "."
                 if "removal_derivative_growth" in regime else "")]
  lines += ["", "Held-out runs:", ""] + methods_table(payload)
  if payload.get("unseen_examples"):
    lines += ["", "Runs containing train examples no fitted run contained:", ""]
    lines += methods_table(payload, "unseen_examples")
  removal = removal_table(payload)
  if removal:
    lines += ["", "MAGIC's removal benchmark (around fitted run 0):", ""] + removal
  checked = goals(payload, which)
  if checked:
    lines += ["", "| goal | value | |", "|---|---|---|"]
    lines += [f"| {goal} | {_fmt(value)} | {'met' if met else '**missed**'} |"
              for goal, value, met in checked]
  return "\n".join(lines) + "\n"


def update_readme(path: str, name: str, text: str) -> None:
  with open(path) as f:
    readme = f.read()
  start, end = f"<!-- tables:{name} -->", f"<!-- /tables:{name} -->"
  pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.S)
  if not pattern.search(readme):
    raise ValueError(f"--readme={path!r}: no {start} ... {end} block.")
  readme = pattern.sub(lambda _: f"{start}\n{text}{end}", readme)
  with open(path, "w") as f:
    f.write(readme)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  try:
    parts = []
    if _WORKDIR.value:
      payload = json.loads(_io.read_text(os.path.join(_WORKDIR.value, "metrics.json")))
      parts.append(render(payload, _GOALS.value, _WORKDIR.value))
    if _SWEEP.value:
      parts.append("\n".join(sweep_table(_SWEEP.value)) + "\n")
    if _PLANS.value:
      # pylint: disable-next=g-import-not-at-top
      from simfluence_jax.planning import report as plan_report
      plans = [json.loads(_io.read_text(path)) for path in _PLANS.value]
      parts.append("\n".join(plan_report.plans_table(plans)) + "\n")
    if not parts:
      raise ValueError("give --workdir, --sweep and/or --plans.")
    text = "\n".join(parts)
    print(text)
    if _README.value:
      update_readme(_README.value, _NAME.value, text)
  except (ValueError, FileNotFoundError, KeyError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
