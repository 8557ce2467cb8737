r"""Every benchmark of docs/design.md §7 side by side in one process: one table of ratios.

  python benchmarks/run.py                 # full sizes (several minutes on 2 CPUs)
  python benchmarks/run.py --quick         # ~1-2 minutes
  python benchmarks/run.py --quick --no_peers --out=/tmp/bench.json

Runs `measure()` of vmap_runs_bench, solver_bench, ekfac_bench, tracin_bench,
end_to_end_bench (each side a fresh process: whole-process times beside warm ones),
scoring_floor_bench (and, at full size, main_job_bench on `configs/default.py:tiny`),
then roofline_bench (each hot loop's FLOP/s as a fraction of the matmul peak),
prints one Markdown table

  benchmark | ours | peer / baseline | ratio | budget | met? | agreement

writes every number plus the machine (platform, CPUs, load, JAX backend and devices,
library versions) to `--out` (JSON) and a bar chart of each ratio against its budget
to `--plot` (PNG; default: `--out` with `.png`). Rows without a budget in
docs/design.md §7 (`vmap_runs`, EK-FAC self-influence) are shown, not judged ("–"). Peers (torch, Kronfluence, Captum) come
from the `bench` extra; a missing peer turns its row into
"skipped (pip install -e .[bench])". Timings on a shared machine are noisy.
"""

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common, *_bench

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

import ekfac_bench
import end_to_end_bench
import main_job_bench
import roofline_bench
import scoring_floor_bench
import solver_bench
import tracin_bench
import vmap_runs_bench
# pylint: enable=g-import-not-at-top,wrong-import-position

PEER_HINT = "skipped (pip install -e .[bench])"
# Row name -> (budget, direction): ">=" a speed-up at least budget, "<=" at most;
# (None, None): informational, no budget in docs/design.md §7.
# Issue 16: TracIn-CP >= 20x Captum warm and >= 5x end to end (whole processes),
# EK-FAC factors + scores >= 10x Kronfluence end to end, the solver >= 20x sklearn.
# It replaced the "vmapped runs >= 3x sequential" budget by the roofline (a
# compute-bound CPU has no idle capacity for vmap to fill): vmap_runs is shown only.
BUDGETS = {
    "vmap_runs": (None, None),
    "simfluence_linear_fit": (20.0, ">="),
    "ekfac_vs_kronfluence": (2.0, ">="),
    "ekfac_self_vs_kronfluence": (None, None),
    "tracin_vs_captum": (20.0, ">="),
    "tracin_end_to_end": (5.0, ">="),
    "ekfac_end_to_end": (10.0, ">="),
    "tracin_scoring_floor": (3.0, "<="),
    "ekfac_scoring_floor": (3.0, "<="),
    "main_job_tiny": (1.0, "<="),
}
ROWS = tuple(BUDGETS)
VMAP_SIZES = {"full": (16, 4, 3), "quick": (8, 2, 1), "smoke": (2, 2, 1)}  # R, T, repeats


def _row(name, description, ours, baseline, ratio, agreement="", raw=None):
  budget, direction = BUDGETS[name]
  met = (None if budget is None else
         bool(ratio >= budget if direction == ">=" else ratio <= budget))
  return {"name": name, "description": description, "status": "ok", "ours": ours,
          "baseline": baseline, "ratio": float(ratio), "budget": budget,
          "direction": direction, "met": met, "agreement": agreement,
          "raw": raw or {}}


def _skipped(name, description, status, raw=None):
  budget, direction = BUDGETS[name]
  return {"name": name, "description": description, "status": status, "ours": "",
          "baseline": "", "ratio": None, "budget": budget, "direction": direction,
          "met": None, "agreement": "", "raw": raw or {}}


def _vmap_rows(mode, peers):
  del peers
  runs, steps, repeats = VMAP_SIZES[mode]
  # smoke: a 1-layer d=32 model, only to check that it runs (compiling is most of it).
  model = {"d_model": 32, "num_layers": 1, "d_ff": 64} if mode == "smoke" else {}
  r = vmap_runs_bench.measure(runs, steps, repeats, stepwise=mode != "smoke", **model)
  return [_row("vmap_runs", f"{runs} runs vmapped vs one by one, "
               f"d={model.get('d_model', 64)} Transformer, T={steps}", f"{r['together_s'] / runs:.4f} s/run",
               f"sequential {r['sequential_s'] / runs:.4f} s/run", r["speedup"],
               "equal to 1e-5 (tests)", r)]


def _solver_rows(mode, peers):
  del peers
  r = solver_bench.measure(mode)
  return [_row("simfluence_linear_fit",
               f"Simfluence-Linear fit, N={r['num_train']}, M={r['num_test']}, "
               f"R·T={r['rows']}, B={r['batch_size']}", f"{r['ours_s']:.3f} s",
               f"sklearn Ridge {r['sklearn_s']:.3f} s (at tol {r['tol']:g}: "
               f"{r['sklearn_at_tol_s']:.3f} s, {r['speedup_at_tol']:.2f}×)",
               r["speedup"],
               f"residual {r['ours_residual']:.1e} vs {r['sklearn_residual']:.1e}; "
               f"rel. Δθ {r['max_rel_diff']:.1e}", r)]


def _peer_rows(name, module, peer_name, mode, peers):
  r = module.measure(mode, peer=peers)
  sizes = (f"MLP 64-128-10, N={r['num_train']}, Q={r['num_query']}" +
           (f", K={r['num_checkpoints']}" if "num_checkpoints" in r else ""))
  description = (("EK-FAC factors + pairwise scores" if module is ekfac_bench
                  else "TracIn-CP scores") + ", " + sizes)
  if "peer_s" not in r:
    status = PEER_HINT if peers else "skipped (--no_peers)"
    row = _skipped(name, description, status, r)
    row["ours"] = f"{r['ours_s']:.3f} s"
    return [row]
  agreement = f"Pearson {r['pearson']:.6f}"
  return [_row(name, description, f"{r['ours_s']:.3f} s",
               f"{peer_name} {r['peer_s']:.3f} s", r["speedup"], agreement, r)]


def _ekfac_rows(mode, peers):
  return _peer_rows("ekfac_vs_kronfluence", ekfac_bench, "Kronfluence", mode, peers)


def _ekfac_self_rows(mode, peers):
  name = "ekfac_self_vs_kronfluence"
  if not peers:
    return [_skipped(name, "EK-FAC self-influence", "skipped (--no_peers)")]
  r = ekfac_bench.measure_self(mode)
  description = f"EK-FAC self-influence (factors given), MLP 64-128-10, N={r['num_train']}"
  if "peer_s" not in r:
    row = _skipped(name, description, PEER_HINT, r)
    row["ours"] = f"{r['ours_s']:.3f} s"
    return [row]
  return [_row(name, description, f"{r['ours_s']:.3f} s",
               f"Kronfluence {r['peer_s']:.3f} s", r["speedup"],
               f"Pearson {r['pearson']:.6f}", r)]


def _tracin_rows(mode, peers):
  return _peer_rows("tracin_vs_captum", tracin_bench, "Captum TracInCP", mode, peers)


def _end_to_end_rows(mode, peers):
  # smoke: only our TracIn process (each fresh process pays imports and compilation).
  workloads = ("tracin",) if mode == "smoke" else ("tracin", "ekfac")
  result = end_to_end_bench.measure(mode, peer=peers, workloads=workloads)
  rows = []
  for workload, name, peer_name in (("tracin", "tracin_end_to_end", "Captum TracInCP"),
                                    ("ekfac", "ekfac_end_to_end", "Kronfluence")):
    if workload not in result:
      rows.append(_skipped(name, workload, f"skipped (--{mode})"))
      continue
    r = result[workload]
    ours = r["ours"]
    description = (f"{'TracIn-CP' if workload == 'tracin' else 'EK-FAC factors + scores'}"
                   f" as a whole process (imports, compile, compute), MLP 64-256-256-10, "
                   f"N={r['num_train']}, Q={r['num_query']}"
                   + (f", K={r['num_checkpoints']}" if workload == "tracin" else ""))
    cached = r["ours_cached"]
    ours_text = (f"{ours['end_to_end_s']:.2f} s cold (import {ours['import_s']:.2f}, 1st "
                 f"call {ours['first_call_s']:.2f}, warm {ours['second_call_s']:.2f}); "
                 f"{cached['end_to_end_s']:.2f} s with the compilation cache (1st call "
                 f"{cached['first_call_s']:.2f})")
    if "peer" not in r:
      row = _skipped(name, description, PEER_HINT if peers else "skipped (--no_peers)", r)
      row["ours"] = ours_text
    else:
      peer = r["peer"]
      row = _row(name, description, ours_text,
                 f"{peer_name} {peer['end_to_end_s']:.2f} s (warm "
                 f"{peer['second_call_s']:.2f}; cached ratio {r['cached_speedup']:.1f}×, "
                 f"warm ratio {r['warm_speedup']:.1f}×)",
                 r["end_to_end_speedup"], f"Pearson {r['pearson']:.6f}", r)
    rows.append(row)
  return rows


def _scoring_rows(mode, peers):
  del peers
  r = scoring_floor_bench.measure(mode, repeats=1 if mode == "smoke" else 3)
  sizes = f"MLP, N={r['num_train']}, Q={r['num_query']}"
  floor = f"per-example grads {r['floor_s'] * 1e3:.1f} ms"
  return [_row("tracin_scoring_floor", f"TracIn-CP scoring / gradient passes, {sizes}",
               f"{r['tracin_s'] * 1e3:.1f} ms", floor, r["tracin_ratio"], "", r),
          _row("ekfac_scoring_floor", f"EK-FAC scoring / gradient passes, {sizes}",
               f"{r['ekfac_s'] * 1e3:.1f} ms", floor, r["ekfac_ratio"], "", r)]


def _main_job_rows(mode, peers):
  del peers
  # Cold: with the home compilation cache the row read the cache as it found it
  # (29-33 s warm, 40 s cold), and did not say which.
  description = ("main job, configs/default.py:tiny, end to end (no compilation "
                 "cache)")
  if mode != "full":
    return [_skipped("main_job_tiny", description, f"skipped (--{mode})")]
  r = main_job_bench.measure("configs/default.py", "tiny", cold=True)
  return [_row("main_job_tiny", description, f"{r['total_s']:.1f} s",
               f"budget {r['budget_s']:.0f} s", r["total_s"] / r["budget_s"],
               "simfluence_linear all_steps_mse "
               f"{r['metrics'].get('simfluence_linear', {}).get('all_steps_mse', math.nan):.3f}",
               r)]


BENCHES = (("vmap_runs", ("vmap_runs",), _vmap_rows),
           ("solver", ("simfluence_linear_fit",), _solver_rows),
           ("ekfac", ("ekfac_vs_kronfluence",), _ekfac_rows),
           ("ekfac_self", ("ekfac_self_vs_kronfluence",), _ekfac_self_rows),
           ("tracin", ("tracin_vs_captum",), _tracin_rows),
           ("end_to_end", ("tracin_end_to_end", "ekfac_end_to_end"), _end_to_end_rows),
           ("scoring_floor", ("tracin_scoring_floor", "ekfac_scoring_floor"),
            _scoring_rows),
           ("main_job", ("main_job_tiny",), _main_job_rows))


def _commit():
  """The repository's HEAD commit (with "+changes" if its files differ), or None."""
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo,
                          capture_output=True, text=True, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                           cwd=repo, capture_output=True, text=True,
                           check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return None
  return head + ("+changes" if dirty else "")


def machine_info():
  """Where the numbers were measured: platform, CPUs, load, JAX, library versions."""
  versions = {}
  for module in ("jax", "jaxlib", "flax", "optax", "numpy", "scipy", "sklearn", "torch",
                 "kronfluence", "captum"):
    try:
      versions[module] = __import__(module).__version__
    except Exception:  # pylint: disable=broad-except
      versions[module] = None
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = None
  devices = jax.devices()
  cpu_model = None
  try:
    with open("/proc/cpuinfo") as f:  # Linux: "Intel(R) Xeon(R) ...", "AMD EPYC ..."
      cpu_model = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
  except OSError:
    pass
  return {"platform": platform.platform(), "machine": platform.machine(),
          "cpu_model": cpu_model,
          "processor": platform.processor(), "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "cpus_usable": affinity,
          "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
          "jax_backend": jax.default_backend(),
          "jax_devices": [str(d) for d in devices],
          "device_kind": devices[0].device_kind, "versions": versions}


def machine_line(machine):
  load = machine["load_average"]
  return (f"{machine['platform']}, {machine['cpus_usable'] or machine['cpu_count']} "
          f"CPUs usable ({machine['cpu_count']} total), load "
          f"{'/'.join(f'{x:.1f}' for x in load) if load else '?'}; JAX "
          f"{machine['versions']['jax']} {machine['jax_backend']} "
          f"({len(machine['jax_devices'])}x {machine['device_kind']})")


def _budget_text(row):
  if row["budget"] is None:
    return "–"
  if row["name"] == "main_job_tiny":
    return "≤ 60 s"
  return f"{'≥' if row['direction'] == '>=' else '≤'} {row['budget']:g}×"


def format_table(rows):
  """The rows as one Markdown table."""
  header = ("benchmark", "ours", "peer / baseline", "ratio", "budget", "met?",
            "agreement")
  lines = [header, ("---",) * len(header)]
  for row in rows:
    ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}×"
    met = ("–" if row["budget"] is None and row["status"] == "ok" else
           {True: "yes", False: "**no**", None: row["status"]}[row["met"]])
    lines.append((f"{row['name']}: {row['description']}", row["ours"], row["baseline"],
                  ratio, _budget_text(row), met, row["agreement"]))
  return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def plot(rows, path):
  """Horizontal bars: each ratio relative to its budget (≥ 1 = budget met)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  names, values, colors, labels = [], [], [], []
  for row in rows:
    names.append(row["name"])
    if row["ratio"] is None:
      values.append(0.0)
      colors.append("lightgrey")
      labels.append(row["status"])
      continue
    ratio, budget = max(row["ratio"], 1e-9), row["budget"]
    if budget is None:  # informational: a grey bar at 1, the ratio as its label
      values.append(1.0)
      colors.append("lightgrey")
      labels.append(f"{row['ratio']:.2f}× (no budget)")
      continue
    values.append(ratio / budget if row["direction"] == ">=" else budget / ratio)
    colors.append("tab:green" if row["met"] else "tab:red")
    labels.append(f"{row['ratio']:.2f}× (budget {_budget_text(row)})")
  fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
  y = np.arange(len(rows))[::-1]
  finite = [v for v in values if v > 0] or [1.0]
  low, high = min(min(finite), 1.0) / 2, max(max(finite), 1.0) * 4
  ax.barh(y, [v if v > 0 else low for v in values], color=colors, left=0)
  ax.set_xscale("log")
  ax.set_xlim(low, high)
  ax.axvline(1.0, color="black", linestyle="--", linewidth=1)
  for yi, v, label in zip(y, values, labels):
    ax.text(max(v, low) * 1.05, yi, label, va="center", fontsize=8)
  ax.set_yticks(y)
  ax.set_yticklabels(names)
  ax.set_xlabel("headroom over the docs/design.md §7 budget (ratio / budget; ≤-budgets "
                "inverted; ≥ 1 = met)")
  ax.set_title("simfluence_jax benchmarks")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def run(mode="full", peers=True, only=None, log=print):
  """Runs the benchmarks; returns the result dict that `--out` holds."""
  rows = []
  selected = [b for b in BENCHES if not only or b[0] in only]
  start_all, date, commit = (time.perf_counter(), time.strftime(
      "%Y-%m-%d %H:%M UTC", time.gmtime()), _commit())  # the code as it started
  for index, (bench, names, fn) in enumerate(selected):
    log(f"[{index + 1}/{len(selected)}] {bench} ({mode}) ...")
    start, cpu = time.perf_counter(), time.process_time()
    try:
      with warnings.catch_warnings():  # the peers' deprecation chatter
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", UserWarning)
        new_rows = fn(mode, peers)
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      new_rows = [_skipped(name, bench, f"error: {type(e).__name__}: {e}")
                  for name in names]
    for row in new_rows:
      row["seconds"] = time.perf_counter() - start
    rows.extend(new_rows)
    log(f"[{index + 1}/{len(selected)}] {bench} done in "
        f"{time.perf_counter() - start:.1f} s ({time.process_time() - cpu:.1f} s CPU)")
  return {"mode": mode, "peers": peers, "machine": machine_info(),
          "date": date, "commit": commit, "total_s": time.perf_counter() - start_all,
          "rows": {row["name"]: row for row in rows}}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  group = parser.add_mutually_exclusive_group()
  group.add_argument("--quick", action="store_true", help="small sizes, ~1-2 minutes")
  group.add_argument("--smoke", action="store_true",
                     help="tiny sizes, only checks that everything runs (tests)")
  parser.add_argument("--no_peers", action="store_true",
                      help="skip torch / Kronfluence / Captum even if installed")
  parser.add_argument("--only", default="",
                      help="comma-separated subset of: " + ",".join(b[0] for b in BENCHES))
  parser.add_argument("--out", default="/tmp/simfluence_bench/results.json",
                      help="JSON file for every number and the machine")
  parser.add_argument("--plot", default=None,
                      help="PNG bar chart (default: --out with .png; 'none' to skip)")
  args = parser.parse_args(argv)
  mode = "smoke" if args.smoke else "quick" if args.quick else "full"
  only = [x for x in args.only.split(",") if x]
  unknown = set(only) - {b[0] for b in BENCHES} - {"roofline"}
  if unknown:
    parser.error(f"--only: unknown {sorted(unknown)}")
  log = lambda message: print(message, file=sys.stderr, flush=True)
  result = run(mode, peers=not args.no_peers, only=only, log=log)
  rows = list(result["rows"].values())
  print(f"machine: {machine_line(result['machine'])}")
  print(f"mode: {mode}; {result['total_s']:.0f} s in all; timings on a shared machine "
        "are noisy")
  print()
  print(format_table(rows))
  if mode != "smoke" and (not only or "roofline" in only):
    # How close each hot loop gets to this machine's matmul peak (roofline_bench).
    log("=== roofline ===")
    result["roofline"] = roofline_bench.measure(mode)
    print()
    print(roofline_bench.table(result["roofline"]))
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=2, default=float)
  os.replace(tmp, args.out)
  print(f"\nwrote {args.out}")
  plot_path = args.plot or os.path.splitext(args.out)[0] + ".png"
  if plot_path != "none":
    plot(rows, plot_path)
    print(f"wrote {plot_path}")
  return 1 if any(r["status"].startswith("error") for r in rows) else 0


if __name__ == "__main__":
  sys.exit(main())
