"""The README's tables from a finished job's or sweep's outputs (no flags here).

`python -m simfluence_jax.tables` is the command line around these functions: the
held-out table (mean ± std), the unseen-example and removal-LDS tables, the regime,
the goals of the fidelity issue with "met"/"missed" for each, and a sweep's regime
map. They are importable without defining absl flags, unlike the entry points.

A summary is never rendered from results rerun since it was written: a multi-seed
job's metrics.json records the digest of each `seed_<k>/metrics.json`
(`SEED_DIGESTS`), a sweep's sweep.json that of each cell's metrics.json
(`metrics_digest`); `load_metrics` and `sweep_table` compare them with the files
now and refuse one that differs or is missing, naming it and what to rerun. A file
written before these records renders with one warning (nothing to check against).
"""

import hashlib
import json
import os
import re
import sys
from typing import Callable, Optional

import numpy as np

from simfluence_jax import _io
from simfluence_jax.evaluation import _report

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
  if std is not None and np.isfinite(std):  # 0 too: seeds that agree
    text += f" ± {std:.{digits}f}"
  return text


def methods_table(payload: dict, section: str = None) -> list:
  """Rows of every method: the four metrics (± std), MSEs also as ratio to blind
  (in a mean over seeds the ratio of the mean MSEs: `ratio_legend`)."""
  entries = payload if section is None else payload.get(section, {})
  std = payload.get("std", {}) if section is None else payload.get("std", {}).get(
      section, {})
  methods = _report.methods_of(entries) if section is None else list(entries)
  # Cost is measured for the held-out predictions; a section (the unseen-example
  # runs) has none of its own, so it gets no cost column (it showed the held-out's).
  with_cost = section is None
  lines = ["| method | " + " | ".join(COLUMNS) + (" | run-equivalents |" if with_cost
                                                  else " |"),
           "|---" * (len(COLUMNS) + 1 + with_cost) + "|"]
  for method in methods:
    cells = []
    for name in COLUMNS:
      text = _fmt(_get(entries, method, name), _get(std, method, name))
      ratio = _get(entries, method, name + "_ratio")
      if name.endswith("mse") and method != "curriculum_blind" and np.isfinite(ratio):
        text += f" ({ratio:.2f}×)"
      cells.append(text)
    if with_cost:
      cells.append(_fmt(_get(payload, "cost", method, "run_equivalents"), digits=1))
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return lines


def ratio_legend(payload: dict) -> str:
  """What the (×) after an MSE in `methods_table` is, for this payload."""
  return ("(×): the MSE as a multiple of curriculum_blind's"
          + ("; over seeds, the ratio of the mean MSEs (metrics.json's `std` holds "
             "the std over seeds of the per-seed ratios)." if payload.get("seeds")
             else "."))


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


def _best(payload: dict, metric: str):
  """(method, value, the other methods tied with it) for the highest `metric`.

  Values equal at the tables' 3 decimals are a tie, which the lower all_steps_mse
  ratio breaks.
  """
  scored = [(m, _get(payload, m, metric)) for m in _report.methods_of(payload)
            if np.isfinite(_get(payload, m, metric))]
  if not scored:
    return None, np.nan, []
  mse = lambda m: _get(payload, m, "all_steps_mse_ratio", default=np.inf)
  best, value = max(scored, key=lambda p: (round(p[1], 3), -mse(p[0])))
  tied = [m for m, v in scored if m != best and round(v, 3) == round(value, 3)]
  return best, value, tied


def goals(payload: dict, which: str) -> list:
  """(goal, value, met) of the fidelity issue's "done when" list."""
  return [(goal, value, met) for goal, value, met, _ in _goal_rows(payload, which)]


def _goal_rows(payload: dict, which: str) -> list:
  """(goal, value, met, the value as the table shows it): with the digits it takes
  for the shown number to pass or fail as the value does (0.29996 read "0.300
  **missed**"); the loss drop in percent, as its goal."""
  best, best_rho, tied = _best(payload, "spearman_across_runs")
  label = best
  if tied:
    label += f"; tied with {', '.join(tied)} at 3 decimals, lower MSE"
  checks = []
  if which == "default":
    checks += [
        ("mean test loss drops ≥ 30%",
         100 * _get(payload, "regime", "mean_loss_drop"), lambda v: v >= 30),
        ("across-run std of final test losses ≥ 0.3",
         _get(payload, "regime", "final_loss_std_across_runs"), lambda v: v >= 0.3),
        (f"best method ({label}) spearman_across_runs ≥ 0.9", best_rho,
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
    checks.append((f"best method ({label}) spearman_across_runs ≥ 0.7", best_rho,
                   lambda v: v >= 0.7))
  rows = []
  for goal, value, test in checks:
    met = bool(np.isfinite(value) and test(value))
    percent = goal.endswith("%")
    digits = 1 if percent else 3
    while np.isfinite(value) and digits < 8 and test(round(value, digits)) != met:
      digits += 1
    text = _fmt(value, digits=digits) + ("%" if percent and np.isfinite(value) else "")
    rows.append((goal, value, met, text))
  return rows


# A multi-seed job's metrics.json: {"seed_<k>": metrics_digest of seed_<k>/}.
SEED_DIGESTS = "seed_metrics_digests"
# Bookkeeping of how a job ran, not what it computed (a rerun that reuses every
# stage rewrites them): left out of the digest.
_UNDIGESTED = ("timings", "stages")


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def metrics_digest(workdir: str) -> Optional[str]:
  """A digest of what `workdir/metrics.json` holds now (None: there is none).

  Everything but `timings` and `stages`: a rerun that computes the same results
  keeps it, one that changes any number a table shows changes it.
  """
  path = os.path.join(os.fspath(workdir), "metrics.json")
  if not _io.exists(path):
    return None
  payload = json.loads(_io.read_text(path))
  if isinstance(payload, dict):
    payload = {k: v for k, v in payload.items() if k not in _UNDIGESTED}
  text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def check_seeds(workdir: str, payload: dict, where: str,
                rerun: str = "rerun the job (its other seeds are reused).",
                warn: Callable[[str], None] = _warn) -> None:
  """Refuses a multi-seed `payload` (workdir's metrics.json) whose seeds changed.

  Args:
    workdir: the job's directory, holding `seed_<k>/`.
    payload: its metrics.json.
    where: the start of a message (`--workdir='DIR'`).
    rerun: the end of a refusal: what to rerun.
    warn: called once when the payload has no digests to check (written before
      they were recorded).

  Raises:
    ValueError: a `seed_<k>/metrics.json` missing or rerun since `payload` was
      written (its mean ± std is stale).
  """
  if not payload.get("seeds"):
    return  # one seed: the job's own results
  digests = payload.get(SEED_DIGESTS)
  if not digests:
    warn(f"{where}: metrics.json predates its seeds' digests ({SEED_DIGESTS}); "
         "cannot check that no seed_<k>/ was rerun since (rerun the job to record "
         "them).")
    return
  for name, recorded in digests.items():
    _check_digest(os.path.join(os.fspath(workdir), name), recorded, f"{name}/",
                  "metrics.json was written (its mean over seeds is stale)",
                  where, rerun)


def _check_digest(workdir: str, recorded: str, what: str, since: str, where: str,
                  rerun: str) -> None:
  """Refuses `workdir`'s metrics.json when missing or other than `recorded`."""
  now = metrics_digest(workdir)
  if now is None:
    raise ValueError(f"{where}: {what} has no metrics.json: its last main job did "
                     f"not finish; {rerun}")
  if now != recorded:
    raise ValueError(f"{where}: {what} was rerun after {since}; {rerun}")


def load_metrics(workdir: str, warn: Callable[[str], None] = _warn) -> dict:
  """`workdir/metrics.json`, refused when one of its seeds was rerun since."""
  payload = json.loads(_io.read_text(os.path.join(os.fspath(workdir),
                                                  "metrics.json")))
  check_seeds(workdir, payload, f"--workdir={workdir!r}", warn=warn)
  return payload


def check_cells(sweep_dir: str, cells: list,
                warn: Callable[[str], None] = _warn) -> None:
  """Refuses sweep.json's `cells` when a cell's metrics.json changed since.

  A cell with a digest is compared with its metrics.json now, and a multi-seed
  cell's seeds with it (`check_seeds`); cells without one (a sweep.json written
  before they were recorded) give one warning.

  Raises:
    ValueError: naming the first cell missing its metrics.json or rerun since.
  """
  where = f"--sweep={sweep_dir!r}"
  rerun = "rerun the sweep (its other cells are reused)."
  unchecked, seeds_unchecked = False, []
  for cell in cells:
    recorded = cell.get("metrics_digest")
    if recorded is None:
      unchecked = True
      continue
    name = cell.get("workdir") or ",".join(f"{k}={v}" for k, v in
                                          cell["overrides"].items())
    workdir = os.path.join(os.fspath(sweep_dir), name)
    _check_digest(workdir, recorded, f"cell {name}", "sweep.json was written",
                  where, rerun)
    payload = json.loads(_io.read_text(os.path.join(workdir, "metrics.json")))
    check_seeds(workdir, payload, f"{where}: cell {name}", rerun,
                warn=lambda _, name=name: seeds_unchecked.append(name))
  if unchecked:
    warn(f"{where}: sweep.json has no digest of some cells' metrics.json (written "
         "before they were recorded, or a cell wrote none); cannot check that they "
         "were not rerun since (rerun the sweep to record them).")
  if seeds_unchecked:
    warn(f"{where}: the metrics.json of cells {', '.join(seeds_unchecked)} predates "
         f"their seeds' digests ({SEED_DIGESTS}); cannot check that no seed_<k>/ "
         "was rerun since (rerun the sweep to record them).")


def sweep_table(sweep_dir: str, warn: Callable[[str], None] = _warn) -> list:
  """The regime map of a sweep; refused when a cell was rerun since sweep.json
  (`check_cells`)."""
  cells = json.loads(_io.read_text(os.path.join(sweep_dir, "sweep.json")))
  check_cells(sweep_dir, cells, warn)
  # Every cell's methods (a cell may lack one: –), alphabetical, as in the held-out
  # tables (a multi-seed cell's mean payload keeps its metrics file's sorted keys, a
  # one-seed cell the order it computed them in).
  methods = sorted({m for c in cells for m in c["metrics"]} - {"curriculum_blind"})
  # With the removal benchmark and metagradients in the cells: their stability.
  growth = any("removal_derivative_growth" in (c.get("regime") or {}) for c in cells)
  regime_columns = ["loss drop", "across-run std"] + (["derivative growth"] * growth)
  lines = ["| cell | " + " | ".join(regime_columns + methods) + " |",
           "|---" * (len(methods) + len(regime_columns) + 1) + "|"]
  for cell in cells:
    name = ", ".join(f"{k}={v}" for k, v in cell["overrides"].items())
    regime = cell.get("regime") or {}  # sweeps written before it was kept: –
    drop = regime.get("mean_loss_drop", np.nan)
    values = [f"{_fmt(100 * drop, digits=0)}%",
              _fmt(regime.get("final_loss_std_across_runs", np.nan), digits=2)]
    if growth:  # per seed, as in the report: a mean would hide one unstable seed
      values.append(_report.growth_text(regime)
                    if "removal_derivative_growth" in regime else "–")
    for method in methods:
      if method not in cell["metrics"]:
        values.append("–")
        continue
      rho = _get(cell["metrics"], method, "spearman_across_runs")
      ratio = _get(cell["metrics"], method, "all_steps_mse_ratio")
      spread = ""
      if "std" in cell:
        spread = f" ± {_fmt(_get(cell['std'], method, 'spearman_across_runs'), digits=2)}"
      values.append(f"{_fmt(rho, digits=2)}{spread} / {_fmt(ratio, digits=2)}×")
    lines.append(f"| {name} | " + " | ".join(values) + " |")
  seeds = {tuple(c["seeds"]) for c in cells if c.get("seeds")}
  return lines + ["", "Per method: spearman_across_runs"
                  + (" (mean ± std over seeds "
                     + " / ".join(str(list(s)) for s in sorted(seeds)) + ")"
                     if seeds else " (one seed)")
                  + " / all_steps_mse as a multiple of curriculum_blind's"
                  + (" (over seeds, the ratio of the mean MSEs)" if seeds else "")
                  + "; – where a cell has no such method. Loss drop: of the mean "
                  "test loss over a run; "
                  "across-run std: of the final test losses (the curriculum's effect)."
                  + (" Derivative growth: of the removal benchmark's reference run, "
                     "per seed where a cell ran several "
                     "(above 1.5 it amplifies perturbations of its first steps, and "
                     "first-order predictions overshoot)." if growth else "")]


def render(payload: dict, which: str, source: str) -> str:
  seeds = payload.get("seeds")
  lines = [f"Generated by `python -m simfluence_jax.tables` from `{source}` "
           + (f"(mean ± std over seeds {seeds})." if seeds else "(one seed).")
           + _report.environment_text(payload)]
  regime = payload.get("regime")
  if regime:
    regime_std = payload.get("std", {}).get("regime", {})
    lines += ["", f"Regime: mean test loss drops "
              f"{_fmt(100 * regime['mean_loss_drop'], 100 * _get(regime_std, 'mean_loss_drop'), digits=1)}%; "
              f"across-run std of final test losses "
              f"{_fmt(regime['final_loss_std_across_runs'], _get(regime_std, 'final_loss_std_across_runs'))}."
              + (" Derivative growth of the removal reference run "
                 "(`training.derivative_growth`, about 1 or less: stable): "
                 + _report.growth_text(regime) + "."
                 if "removal_derivative_growth" in regime else "")]
  lines += ["", "Held-out runs:", ""] + methods_table(payload)
  if payload.get("unseen_examples"):
    lines += ["", "Runs containing train examples no fitted run contained:", ""]
    lines += methods_table(payload, "unseen_examples")
  lines += ["", ratio_legend(payload)]
  removal = removal_table(payload)
  if removal:
    lines += ["", "MAGIC's removal benchmark (around fitted run 0):", ""] + removal
  summary = payload.get("counterfactual_summary")
  if summary:
    num_targets = _get(payload, "summary", "config", "counterfactual", "num_targets",
                       default="the")
    lines += ["", "Counterfactual curricula: searched on each simulator to lower the "
              f"final loss of {num_targets} test examples whose final loss varies "
              "most across the fitted runs, then "
              "retrained (improvement = median random curriculum's actual final "
              f"target loss, {_fmt(summary['median_random'])}, minus the searched "
              "ones' mean):", ""]
    lines += _report.counterfactual_summary_table(
        summary, payload.get("std", {}).get("counterfactual_summary", {}))
  checked = _goal_rows(payload, which)
  if checked:
    lines += ["", "| goal | value | |", "|---|---|---|"]
    lines += [f"| {goal} | {text} | {'met' if met else '**missed**'} |"
              for goal, _, met, text in checked]
  return "\n".join(lines) + "\n"


def load_json_files(paths, flag: str, what: str, how: str) -> list:
  """Each file's JSON object (plans, benchmark results: dicts with "rows");
  ValueError naming the `--flag` and the file that is missing, not JSON or not
  `what`, and `how` to write one."""
  loaded = []
  for path in paths:
    if not _io.exists(path):
      raise ValueError(f"--{flag}: {path!r} does not exist (write one with {how}).")
    try:
      payload = json.loads(_io.read_text(path))
    except json.JSONDecodeError as e:
      raise ValueError(f"--{flag}: {path!r} is not JSON ({e}); write one with "
                       f"{how}.") from None
    if not isinstance(payload, dict) or "rows" not in payload:
      # A list or a metrics.json ended in a TypeError or "error: 'rows'".
      raise ValueError(f"--{flag}: {path!r} is JSON but not {what} (no 'rows'; "
                       f"write one with {how}).")
    loaded.append(payload)
  return loaded


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
