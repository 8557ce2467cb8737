"""The README's speed tables from `benchmarks/run.py --out` results (no flags here).

`python -m simfluence_jax.tables --bench=A.json,B.json,C.json` is the command line
around `bench_tables`. Each file is one run of `python benchmarks/run.py` (every
benchmark side by side in one process, peers in processes of their own); several
runs on one machine and one commit give a mean, since one run on a shared machine
can mislead. Two tables come out:

- each benchmark's ratio against its peer or baseline: the mean over the runs, with
  the lowest and highest, its goal (the budget `run.py` recorded with the row),
  whether the mean meets it and how many runs did where they disagree, and the
  first run's agreement with the peer. A whole-process row (`*_end_to_end`) gives
  three: cold, with the persistent compilation cache (a second process), and warm
  (a second call in one process); issue 16 asks ≥ 20× Captum warm of TracIn-CP on
  that workload. The solver's row is followed by its ratio against Ridge at Ridge's
  own tol (shown, not judged: the goal is at equal residual). A row some runs
  skipped or lack is the mean of the others and says of how many runs;
- each hot loop's FLOP/s as a fraction of the matmul peak the same run measured
  (`benchmarks/roofline_bench.py`), the training segment's goal 50%.

Runs are refused, naming the field, where a mean over them would mix machines or
code: a different `mode`, CPU model or commit (a commit with "+changes" ran on
uncommitted files and is refused too). A file written before runs recorded their
commit renders with a warning.
"""

import math
from typing import Callable, Optional, Sequence

import numpy as np

from simfluence_jax.evaluation._tables import _warn  # one warning format for every table

# Issue 16's warm goal for TracIn-CP, judged on the whole-process workload.
WARM_GOALS = {"tracin_end_to_end": 20.0}
# The roofline's goal: the training step at >= 50% of the measured matmul peak.
ROOFLINE_GOALS = {"train_segment": 0.5}
# Seconds of ours and of the peer or baseline in each row's raw numbers (run.py).
_SECONDS = {
    "vmap_runs": ("together_s", "sequential_s"),
    "simfluence_linear_fit": ("ours_s", "sklearn_s"),
    "ekfac_vs_kronfluence": ("ours_s", "peer_s"),
    "ekfac_self_vs_kronfluence": ("ours_s", "peer_s"),
    "tracin_vs_captum": ("ours_s", "peer_s"),
    "tracin_scoring_floor": ("tracin_s", "floor_s"),
    "ekfac_scoring_floor": ("ekfac_s", "floor_s"),
    "main_job_tiny": ("total_s", "budget_s"),
}
_PEERS = {"tracin_end_to_end": "Captum TracInCP", "ekfac_end_to_end": "Kronfluence"}


def _spread(values: Sequence[float], fmt: str) -> str:
  """`mean` of one value (or of values equal as printed), else `mean (min–max)`."""
  values = [v for v in values if v is not None and np.isfinite(v)]
  if not values:
    return "–"
  text = format(float(np.mean(values)), fmt)
  low, high = format(min(values), fmt), format(max(values), fmt)
  if low != high:  # runs that agree at the printed precision: one number
    text += f" ({low}–{high})"
  return text


def _seconds(values: Sequence[Optional[float]]) -> str:
  """`_spread` of seconds, to 3 significant digits of the largest (46.9 s, 0.174 s,
  0.00839 s)."""
  finite = [abs(v) for v in values if v is not None and np.isfinite(v) and v]
  digits = max(0, 2 - math.floor(math.log10(max(finite)))) if finite else 3
  return _spread(values, f".{digits}f") + " s"


def _met(values: Sequence[float], goal: Optional[float], direction: str) -> str:
  """'met' / '**missed**' for the mean, and in how many runs it was met where they
  differ."""
  values = [v for v in values if v is not None and np.isfinite(v)]
  if goal is None or not values:
    return "–"
  meets = [v >= goal if direction == ">=" else v <= goal for v in values]
  mean = float(np.mean(values))
  text = "met" if (mean >= goal if direction == ">=" else mean <= goal) else "**missed**"
  if 0 < sum(meets) < len(meets):
    text += f" ({sum(meets)} of {len(meets)} runs met it)"
  return text


def _goal_text(goal: Optional[float], direction: str, unit: str = "×") -> str:
  if goal is None:
    return "–"
  return f"{'≥' if direction == '>=' else '≤'} {goal:g}{unit}"


def check_runs(results: Sequence[dict], sources: Sequence[str],
               warn: Callable[[str], None] = _warn) -> None:
  """ValueError, naming the field and the files, where the runs differ in mode,
  CPU or code; a warning where a file does not say which commit it ran."""
  if not results:
    raise ValueError("--bench: no results files given.")
  fields = (("mode", lambda r: r.get("mode")),
            ("machine.cpu_model", lambda r: r.get("machine", {}).get("cpu_model")),
            ("machine.cpus_usable", lambda r: r.get("machine", {}).get("cpus_usable")),
            ("commit", lambda r: r.get("commit")))
  for name, get in fields:
    values = {get(r) for r in results}
    if len(values) > 1:
      by_file = ", ".join(f"{s}: {get(r)!r}" for s, r in zip(sources, results))
      raise ValueError(f"--bench: the runs differ in {name} ({by_file}); a mean is "
                       "only of runs of one mode on one machine and one commit.")
  commit = results[0].get("commit")
  if commit is None:
    warn(f"--bench: {', '.join(sources)} do(es) not record a commit (written before "
         "benchmarks/run.py kept one): the table cannot say which code it measured.")
  elif commit.endswith("+changes"):
    raise ValueError(f"--bench: commit={commit!r}: the runs measured uncommitted "
                     "files, which no commit reproduces; commit, then rerun "
                     "benchmarks/run.py.")


def _raw(row: dict, key: str) -> Optional[float]:
  value = row.get("raw", {})
  for part in key.split("."):
    if not isinstance(value, dict) or part not in value:
      return None
    value = value[part]
  return float(value) if isinstance(value, (int, float)) else None


def _label(text: str) -> str:
  """A baseline's name as run.py wrote it: its words up to the first number."""
  words = []
  for word in text.split():
    if word[:1].isdigit():
      break
    words.append(word)
  return " ".join(words)


def _ok(row: dict) -> bool:
  ratio = row.get("ratio")
  return row.get("status") == "ok" and ratio is not None and np.isfinite(ratio)


def _ratio_rows(results: Sequence[dict]) -> list:
  """(benchmark, ours, peer, ratios, goal, direction, agreement) for every row of
  the runs; a row measured in fewer runs than there are says in how many."""
  names = []
  for result in results:  # every row any run has, in run.py's order
    names += [n for n in result.get("rows", {}) if n not in names]
  out = []
  for name in names:
    rows = [r["rows"][name] for r in results if name in r.get("rows", {})]
    ok = [row for row in rows if _ok(row)]
    first = (ok or rows)[0]
    goal, direction = first.get("budget"), first.get("direction") or ">="
    description = f"{name}: {first.get('description', '')}"
    if ok and len(ok) < len(results):  # skipped or absent in the others
      description += f" ({len(ok)} of {len(results)} runs)"
    agreement = first.get("agreement") or ""
    if not ok:
      out.append((description, first.get("ours") or "–", first.get("status", "–"),
                  [], goal, direction, ""))
      continue
    seconds = lambda key: _seconds([_raw(r, key) for r in ok])  # pylint: disable=cell-var-from-loop
    if name in _PEERS:  # cold, cached, warm: each a ratio of its own
      peer = _PEERS[name]
      out.append((f"{description}; cold",
                  f"{seconds('ours.end_to_end_s')} (import "
                  f"{seconds('ours.import_s')}, 1st call {seconds('ours.first_call_s')})",
                  f"{peer} {seconds('peer.end_to_end_s')}",
                  [r["ratio"] for r in ok], goal, direction, agreement))
      out.append((f"{name}: the same, a second process with the compilation cache",
                  seconds("ours_cached.end_to_end_s"),
                  f"{peer} {seconds('peer.end_to_end_s')}",
                  [_raw(r, "cached_speedup") for r in ok], None, ">=", ""))
      out.append((f"{name}: the same, warm (a second call in one process)",
                  seconds("ours.second_call_s"),
                  f"{peer} {seconds('peer.second_call_s')}",
                  [_raw(r, "warm_speedup") for r in ok], WARM_GOALS.get(name), ">=",
                  ""))
      continue
    ours_key, peer_key = _SECONDS.get(name, (None, None))
    ours = seconds(ours_key) if ours_key else first.get("ours", "–")
    peer = (f"{_label(first.get('baseline', ''))} {seconds(peer_key)}" if peer_key
            else first.get("baseline", "–"))
    out.append((description, ours, peer, [r["ratio"] for r in ok], goal, direction,
                agreement))
    if name == "simfluence_linear_fit":  # the goal is at equal residual; Ridge at
      # its own tol stops at a larger residual, which ours goes past to check θ.
      out.append((f"{name}: the same, against Ridge at its own tol (it stops at a "
                  "larger residual)", seconds("ours_s"),
                  f"sklearn Ridge {seconds('sklearn_at_tol_s')}",
                  [_raw(r, "speedup_at_tol") for r in ok], None, ">=", ""))
  return out


def bench_tables(results: Sequence[dict], sources: Sequence[str],
                 warn: Callable[[str], None] = _warn) -> list:
  """The Markdown lines of both tables, after `check_runs`."""
  check_runs(results, sources, warn)
  first = results[0]
  machine = first.get("machine", {})
  versions = machine.get("versions", {})
  dates = sorted(r.get("date") or "?" for r in results)
  peers = ", ".join(f"{m} {versions[m]}" for m in ("torch", "kronfluence", "captum",
                                                   "sklearn") if versions.get(m))
  lines = [
      f"Generated by `python -m simfluence_jax.tables --bench=...` from "
      f"{len(results)} run{'s' * (len(results) > 1)} of `python benchmarks/run.py` "
      f"({', '.join(f'`{source}`' for source in sources)}; mode {first.get('mode')}; "
      f"{dates[0]}"
      + (f" to {dates[-1]}" if len(dates) > 1 else "")
      + f"; commit {first.get('commit') or 'not recorded'}) on "
      f"{machine.get('cpu_model') or machine.get('platform', '?')}, "
      f"{machine.get('cpus_usable') or machine.get('cpu_count')} CPUs usable, JAX "
      f"{versions.get('jax')} {machine.get('jax_backend', '')}"
      + (f"; peers: {peers}" if peers else "") + " (the first file's versions). "
      "Each value is the mean over the runs, (lowest–highest); \"met\" judges the "
      "mean; agreement with the peer is the first run's.", "",
      "| benchmark | ours | peer / baseline | ratio | goal | met? | agreement |",
      "|---|---|---|---|---|---|---|"]
  for (description, ours, peer, ratios, goal, direction,
       agreement) in _ratio_rows(results):
    ratio = _spread(ratios, ".2f")
    lines.append(f"| {description} | {ours} | {peer} | "
                 f"{ratio + '×' if ratio != '–' else ratio} | "
                 f"{_goal_text(goal, direction)} | {_met(ratios, goal, direction)} | "
                 f"{agreement} |")
  roofline = [r["roofline"] for r in results if r.get("roofline")]
  if roofline:
    peaks = [r["peak"]["flop_per_s"] / 1e9 for r in roofline]
    sizes = sorted({r["peak"].get("n") for r in roofline}, key=str)
    fewer = (f"; from {len(roofline)} of the {len(results)} runs, the others ran "
             "without it" if len(roofline) < len(results) else "")
    lines += ["", f"Each hot loop against the matmul peak each run measured (the "
              f"fastest float32 square matmul, n = {' / '.join(map(str, sizes))}: "
              f"{_spread(peaks, '.1f')} GFLOP/s; `benchmarks/roofline_bench.py`"
              f"{fewer}):", "",
              "| hot loop | GFLOP | seconds | GFLOP/s | fraction of peak | goal | met? |",
              "|---|---|---|---|---|---|---|"]
    names = []
    for r in roofline:
      names += [n for n in r["rows"] if n not in names]
    for name in names:
      rows = [r["rows"][name] for r in roofline
              if "flops" in r["rows"].get(name, {})]
      if not rows:
        status = next(r["rows"][name].get("status", "–") for r in roofline
                      if name in r["rows"])
        lines.append(f"| {name} | – | – | – | {status} | – | – |")
        continue
      fractions = [row["fraction_of_peak"] for row in rows]
      goal = ROOFLINE_GOALS.get(name)
      label = name + (f" ({len(rows)} of {len(roofline)} runs)"
                      if len(rows) < len(roofline) else "")
      lines.append(
          f"| {label} | {_spread([row['flops'] / 1e9 for row in rows], '.2f')} | "
          f"{_spread([row['seconds'] for row in rows], '.4f')} | "
          f"{_spread([row['flop_per_s'] / 1e9 for row in rows], '.1f')} | "
          f"{_spread([100 * f for f in fractions], '.1f')}% | "
          f"{_goal_text(None if goal is None else 100 * goal, '>=', '%')} | "
          f"{_met(fractions, goal, '>=')} |")
  return lines
