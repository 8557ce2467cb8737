"""`write_report`: metrics.json, report.md and plots of one experiment (or of seeds).

The report reads everything from the metrics payload the pipeline builds (the same
dict that goes to metrics.json), so a report can be regenerated from a workdir:

* per method (held-out runs): every metric of `METRICS`, each MSE also as a ratio to
  `curriculum_blind`, `min_loss` (a simulated loss below 0 is impossible and
  flagged), `spearman_across_runs_skipped` (an int: the test examples constant
  across runs that `spearman_across_runs` leaves out of its mean; flagged when
  above 0) and `undefined` (metric -> why it is NaN); in a mean over seeds
  (`pipeline.experiment`) a ratio is that of the mean MSEs, `min_loss` the lowest
  over seeds, `spearman_across_runs_skipped` the mean count over seeds (a float)
  and `undefined` each seed's reasons, named by its `seed_<k>/`;
* `unseen_examples`, `removal_lds`, `cost`, `learning_curve`, `counterfactual`,
  `stages` (seconds, reused) and, for a mean over seeds, `std` and `seeds`.
"""

import json
import os
import re
from typing import Optional

import numpy as np

from simfluence_jax import _io
from simfluence_jax import _optional

METRIC_COLUMNS = ("all_steps_mse", "final_step_mse", "spearman",
                  "spearman_across_runs")


def json_float(value):
  """float, or None for NaN/inf (JSON has no NaN)."""
  value = float(value)
  return value if np.isfinite(value) else None


def clean_json(value):
  """`value` with every float NaN/inf replaced by None and numpy scalars unwrapped."""
  if isinstance(value, dict):
    return {k: clean_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [clean_json(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return json_float(value)
  if isinstance(value, np.integer):
    return int(value)
  return value


def methods_of(payload: dict) -> list:
  """The payload's method entries: the dicts holding a held-out metric as a number
  (or None: undefined). No other top-level entry does: cost, regime, removal_lds,
  counterfactual, ... hold none, the learning curve holds lists of them."""
  return [k for k, v in payload.items() if isinstance(v, dict) and any(
      c in v and (v[c] is None or isinstance(v[c], (int, float)))
      for c in METRIC_COLUMNS)]


def _matplotlib():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _set_margins(fig, left=0.75, right=0.2, bottom=0.55, top=0.35, wspace=0.3):
  """Room in inches for tick labels, axis labels and titles, set without measuring
  text: `tight_layout` (and `bbox_inches="tight"`) render the figure to measure it,
  which for the one-row panels of a report costs as much as saving it."""
  width, height = fig.get_size_inches()
  fig.subplots_adjust(left=left / width, right=1 - right / width,
                      bottom=bottom / height, top=1 - top / height, wspace=wspace)


def _trajectory_plots(plot_dir, predictions, bands, actual, test_texts,
                      num_examples=4):
  plt = _matplotlib()
  num_test = actual.shape[2]
  examples = np.linspace(0, num_test - 1, min(num_examples, num_test)).astype(int)
  steps = np.arange(actual.shape[1])
  written = []
  for method, pred in predictions.items():
    pred = np.asarray(pred)
    fig, axes = plt.subplots(1, len(examples), figsize=(4 * len(examples), 3),
                             squeeze=False)
    for ax, m in zip(axes[0], examples):
      ax.plot(steps, actual[0, :, m], "k-", label="actual")
      ax.plot(steps, pred[0, :, m], "C0-", label=method)
      if bands and method in bands:
        mean, std = (np.asarray(v) for v in bands[method])
        ax.fill_between(steps, mean[0, :, m] - 2 * std[0, :, m],
                        mean[0, :, m] + 2 * std[0, :, m], color="C0", alpha=0.2,
                        label="±2σ")
      if np.nanmin(pred[0, :, m]) < 0:
        ax.axhline(0.0, color="r", lw=0.8, ls=":", label="loss < 0: impossible")
      title = f"test {m}"
      if test_texts is not None:
        title += ": " + str(test_texts[m])[:30]
      ax.set_title(title, fontsize=8)
      ax.set_xlabel("step")
    axes[0, 0].set_ylabel("loss (held-out run 0)")
    axes[0, 0].legend(fontsize=7)
    _set_margins(fig)
    path = plot_dir / f"trajectories_{method}.png"
    _io.save_figure(fig, path)
    written.append(path)

  fig, axes = plt.subplots(1, len(predictions), figsize=(3.5 * len(predictions), 3.5),
                           squeeze=False)
  for ax, (method, pred) in zip(axes[0], predictions.items()):
    pred_final = np.asarray(pred)[:, -1].ravel()
    actual_final = actual[:, -1].ravel()
    ax.scatter(actual_final, pred_final, s=4, alpha=0.5)
    finite = np.isfinite(pred_final)
    lo = min(actual_final.min(), pred_final[finite].min(initial=actual_final.min()))
    hi = max(actual_final.max(), pred_final[finite].max(initial=actual_final.max()))
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_title(method, fontsize=9)
    ax.set_xlabel("actual final loss")
  axes[0, 0].set_ylabel("predicted final loss")
  _set_margins(fig)
  path = plot_dir / "final_loss_scatter.png"
  _io.save_figure(fig, path)
  written.append(path)
  return written


def _metric_bars(plot_dir, payload):
  """One panel per metric; MSEs on a log axis so one bad method does not flatten
  the rest; error bars = std over seeds when there are several."""
  plt = _matplotlib()
  methods = methods_of(payload)
  std = payload.get("std", {})
  fig, axes = plt.subplots(1, len(METRIC_COLUMNS),
                           figsize=(3.5 * len(METRIC_COLUMNS), 3.2), squeeze=False)
  for ax, name in zip(axes[0], METRIC_COLUMNS):
    values = [payload[m].get(name) for m in methods]
    values = [np.nan if v is None else v for v in values]
    errors = [std.get(m, {}).get(name) or 0.0 for m in methods]
    ax.bar(range(len(methods)), values, yerr=errors if std else None,
           color=[f"C{i}" for i in range(len(methods))])
    if name.endswith("mse"):
      ax.set_yscale("log")
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
    ax.set_title(name + (" (log)" if name.endswith("mse") else ""), fontsize=9)
  fig.tight_layout()
  path = plot_dir / "metrics_bars.png"
  _io.save_figure(fig, path)
  return path


def _learning_curve_plot(plot_dir, curve):
  plt = _matplotlib()
  fig, (ax_rho, ax_mse) = plt.subplots(1, 2, figsize=(9, 3.2))
  ax_rho.plot(curve["num_runs"], curve["spearman_across_runs"], "o-")
  ax_rho.set_xlabel("fitted runs")
  ax_rho.set_ylabel("spearman_across_runs")
  ax_mse.plot(curve["num_runs"], curve["all_steps_mse_ratio"], "o-")
  ax_mse.axhline(1.0, color="0.5", ls="--", lw=0.8, label="curriculum_blind")
  ax_mse.set_xlabel("fitted runs")
  ax_mse.set_ylabel("all_steps_mse / curriculum_blind")
  ax_mse.legend(fontsize=7)
  fig.suptitle("Simfluence-Linear learning curve (held-out runs)", fontsize=9)
  fig.tight_layout()
  path = plot_dir / "learning_curve.png"
  _io.save_figure(fig, path)
  return path


def _counterfactual_plot(plot_dir, result):
  """Actual final target loss of searched vs random curricula, and their curves."""
  plt = _matplotlib()
  fig, (ax_curve, ax_scatter) = plt.subplots(1, 2, figsize=(11, 4))
  rand = result["random"]
  steps = np.arange(len(rand["mean_curve"]))
  ax_curve.fill_between(steps, rand["curve_low"], rand["curve_high"], color="0.8",
                        label="random (10–90%)")
  ax_curve.plot(steps, rand["mean_curve"], color="0.4", label="random (mean)")
  for i, (method, values) in enumerate(result["searched"].items()):
    ax_curve.plot(steps, values["mean_curve"], color=f"C{i}",
                  label=f"searched on {method}")
    # None: a NaN in metrics.json (a diverging simulator's finals): not drawn.
    ax_scatter.scatter(_floats(rand["simulated_final"][method]),
                       _floats(rand["actual_final"]), color=f"C{i}", marker=".",
                       alpha=0.4)
    ax_scatter.scatter(_floats(values["simulated_final"]),
                       _floats(values["actual_final"]), color=f"C{i}", marker="*",
                       s=80, label=method)
  ax_scatter.axhline(rand["median_actual"], color="0.4", ls="--", lw=0.8,
                     label="median random (actual)")
  ax_curve.set_xlabel("step")
  ax_curve.set_ylabel(f"actual mean loss of {len(result['targets'])} target examples")
  ax_curve.legend(fontsize=7)
  ax_scatter.set_xlabel("simulated final target loss")
  ax_scatter.set_ylabel("actual final target loss (retrained)")
  ax_scatter.set_title("★ searched, · random curricula", fontsize=9)
  ax_scatter.legend(fontsize=7)
  fig.tight_layout()
  path = plot_dir / "counterfactual.png"
  _io.save_figure(fig, path)
  return path


def _finite_number(value) -> bool:
  """A real number that is neither NaN nor inf (None: JSON's NaN, is not)."""
  return (isinstance(value, (int, float, np.number)) and not isinstance(value, bool)
          and bool(np.isfinite(value)))


def _number(value, fmt: str) -> str:
  """`value` formatted, or "–" for None/NaN/inf (a NaN a payload holds on purpose,
  e.g. a diverging simulator's simulated finals; None once in metrics.json)."""
  return format(value, fmt) if _finite_number(value) else "–"


def _floats(values) -> np.ndarray:
  """float64 array of a list from metrics.json (None, JSON's NaN, back to NaN)."""
  return np.asarray([np.nan if v is None else v for v in values], np.float64)


def _cell(value, std=None, fmt=".4g"):
  if value is None or (isinstance(value, float) and not np.isfinite(value)):
    return "NaN"
  text = format(value, fmt)
  if std is not None and np.isfinite(std):
    text += f" ± {std:{fmt}}"
  return text


def _methods_table(entries: dict, std: dict, ratios: bool = True,
                   cost: Optional[dict] = None) -> list:
  header = ["method"] + list(METRIC_COLUMNS) + (["run-equivalents"] if cost else [])
  lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
  for method, values in entries.items():
    cells = []
    for name in METRIC_COLUMNS:
      text = _cell(values.get(name), std.get(method, {}).get(name))
      ratio = values.get(name + "_ratio")
      if ratios and ratio is not None and name.endswith("mse") and (
          method != "curriculum_blind"):
        text += f" ({_cell(ratio, fmt='.2f')}×)"
      cells.append(text)
    if cost:
      cells.append(_cell(cost.get(method, {}).get("run_equivalents"), fmt=".1f"))
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  return lines


def growth_text(regime: dict) -> str:
  """The removal reference run's derivative growth: per seed when there are several;
  "–" for one that is NaN (`training.derivative_growth`: too few steps) or None."""
  by_seed = regime.get("removal_derivative_growth_by_seed")
  if by_seed:
    return " / ".join(_number(g, ".2f") for g in by_seed) + " (seeds)"
  return _number(regime.get("removal_derivative_growth"), ".2f")


SKIPPED = "spearman_across_runs_skipped"


def skipped_text(values: dict, num_test=None, seeds=None) -> str:
  """The flag of a method entry whose `spearman_across_runs` left test examples out
  of its mean (`SKIPPED` above 0), or "" (none left out; or the metric is NaN, which
  `undefined` explains)."""
  skipped = values.get(SKIPPED)
  if (not _finite_number(skipped) or skipped <= 0
      or not _finite_number(values.get("spearman_across_runs"))):
    return ""
  count = str(int(skipped)) if float(skipped).is_integer() else f"{skipped:.2f}"
  of = f" of {num_test}" if _finite_number(num_test) else ""
  return (f"`spearman_across_runs` leaves out {count}{of} test examples"
          + (" on average over seeds" if seeds else "")
          + ": their predicted or actual final loss is the same in every run (to "
          "float rounding), so they have no ρ across runs; it is the mean over the "
          f"others (`{SKIPPED}`)")


def _warnings(payload: dict) -> list:
  from simfluence_jax.training import metagradients_lib  # pylint: disable=g-import-not-at-top
  lines = []
  regime = payload.get("regime") or {}
  growth = regime.get("removal_derivative_growth_by_seed") or [
      regime.get("removal_derivative_growth")]
  seeds = payload.get("seeds") or [None] * len(growth)
  for seed, value in zip(seeds, growth):
    warning = metagradients_lib.growth_warning(
        value, "" if seed is None else f" (seed {seed})")
    if warning:
      lines.append(f"- {warning}")
  for method in methods_of(payload):
    values = payload[method]
    if values.get("min_loss") is not None and values["min_loss"] < 0:
      lines.append(f"- **{method}** simulates losses below 0 (min "
                   f"{values['min_loss']:.3g}): physically impossible for a "
                   "cross-entropy loss; its MSEs include extrapolation.")
    for metric, reason in values.get("undefined", {}).items():
      lines.append(f"- {method}: `{metric}` is undefined: {reason}.")
  num_test = (payload.get("summary") or {}).get("num_test_examples")
  unseen = payload.get("unseen_examples")
  for where, entries in [("", payload)] + (
      [(" (unseen-example runs)", unseen)] if isinstance(unseen, dict) else []):
    for method in methods_of(entries):
      text = skipped_text(entries[method], num_test, payload.get("seeds"))
      if text:
        lines.append(f"- {method}{where}: {text}.")
  return lines


def _counterfactual_lines(result):
  rand = result["random"]
  lines = ["## Counterfactual curricula (searched on each simulator, then retrained)", "",
           f"Target test examples {result['targets']} (largest spread of final loss "
           f"across training runs). Each simulator searched "
           f"{result['num_searched_per_method']} curricula of the same size as the "
           f"random ones, which were then really trained; the baseline is the "
           f"{result['num_random']} random held-out curricula (median actual final "
           f"target loss {_number(rand['median_actual'], '.4f')}). Improvement = "
           "median random − "
           "mean searched final target loss (positive = better than random).", "",
           "| searched on | actual final | actual improvement | simulated improvement |"
           " beats median random |", "|---|---|---|---|---|"]
  for method, values in result["searched"].items():
    lines.append(
        f"| {method} | {_number(np.mean(_floats(values['actual_final'])), '.4f')} | "
        f"{_number(values['actual_improvement'], '+.4f')} | "
        f"{_number(values['simulated_improvement'], '+.4f')} "
        f"| {_number(values['fraction_beating_median'], '.0%')} |")
  return lines + [""]


def counterfactual_summary_table(summary: dict, std: dict) -> list:
  """Markdown rows of a `counterfactual_summary` (± its std over seeds, if any)."""
  def cell(method, key, fmt):
    value, spread = summary[method].get(key), std.get(method, {}).get(key)
    text = _number(value, fmt)
    if text != "–" and _finite_number(spread) and spread:
      text += f" ± {spread:{fmt.lstrip('+')}}"
    return text

  lines = ["| searched on | actual final target loss | actual improvement | "
           "simulated improvement | beats median random |", "|---|---|---|---|---|"]
  for method in sorted(k for k in summary if k != "median_random"):
    lines.append(f"| {method} | {cell(method, 'actual_final', '.3f')} | "
                 f"{cell(method, 'actual_improvement', '+.3f')} | "
                 f"{cell(method, 'simulated_improvement', '+.3f')} | "
                 f"{cell(method, 'fraction_beating_median', '.0%')} |")
  return lines


def stage_list(names) -> str:
  """Stage names, a multi-seed job's `seed_<k>/<stage>` grouped by stage: "runs,
  fit (seeds 0, 1, 2)" for the six names of two stages in three seeds."""
  plain, seeds_of = [], {}
  for name in names:
    match = re.fullmatch(r"seed_(\d+)/(.+)", name)
    if match:
      seeds_of.setdefault(match.group(2), []).append(int(match.group(1)))
    else:
      plain.append(name)
  groups = {}  # the seeds -> their stages, in the order first met
  for stage, seeds in seeds_of.items():
    groups.setdefault(tuple(sorted(seeds)), []).append(stage)
  return "; ".join(plain + [
      f"{', '.join(stages)} (seed{'s' * (len(seeds) > 1)} "
      f"{', '.join(map(str, seeds))})" for seeds, stages in groups.items()])


def environment_text(payload: dict) -> str:
  """" Computed with jax 0.10.2, flax ..., on <CPU>." from a payload's
  `summary.environment`, or "" (a job from before it was recorded)."""
  env = payload.get("summary", {}).get("environment")
  if not env:
    return ""
  def describe(env):
    packages = ", ".join(f"{name} {version}" for name, version in
                         env.get("packages", {}).items() if version)
    code = f" (simfluence_jax sources {env['code']})" if env.get("code") else ""
    return (f"Python {env.get('python')}, {packages}, on "
            f"{env.get('cpu') or env.get('machine')}{code}")

  text = f" Computed with {describe(env)}."
  others = payload.get("summary", {}).get("other_environments") or {}
  unknown = sorted(k for k, v in others.items() if not isinstance(v, dict))
  known = {k: v for k, v in others.items() if isinstance(v, dict)}
  for variant in sorted({describe(v) for v in known.values()}):
    stages = sorted(k for k, v in known.items() if describe(v) == variant)
    text += f" Reused stages computed with {variant}: {stage_list(stages)}."
  if unknown:
    text += (f" {len(unknown)} reused stage(s) were computed before environments "
             "were recorded (`summary.other_environments`).")
  return text


def report_lines(payload: dict, plots=()) -> list:
  """The markdown lines of report.md for a metrics payload (one seed or a mean)."""
  std = payload.get("std", {})
  summary = payload.get("summary", {})
  seeds = payload.get("seeds")
  methods = {m: payload[m] for m in methods_of(payload)}
  lines = ["# simfluence_jax report", ""]
  if seeds:
    lines += [f"Mean ± std over {len(seeds)} seeds {seeds} (each a full experiment in "
              "`seed_<k>/`; std with ddof 0; the learning curve and per-seed "
              "details are in `seed_<k>/report.md`).", ""]
  environment = environment_text(payload).strip()
  if environment:
    lines += [environment, ""]
  lines += [f"Every method predicts {summary.get('num_held_out_runs', '?')} held-out "
            f"runs ({summary.get('num_steps', '?')} steps, "
            f"{summary.get('num_test_examples', '?')} test examples) that no simulator "
            f"was fitted on ({summary.get('num_train_runs', '?')} fitted runs).", ""]
  if payload.get("regime"):
    r, r_std = payload["regime"], std.get("regime", {})
    lines += [f"Regime: the mean test loss drops by "
              f"{_cell(100 * r['mean_loss_drop'], 100 * r_std.get('mean_loss_drop', np.nan), '.1f')}"
              f"% over a run; the final loss of a test example varies across curricula "
              f"by a std of {_cell(r['final_loss_std_across_runs'], r_std.get('final_loss_std_across_runs'), '.3f')}."
              + (f" Derivative growth of the removal benchmark's reference run (how "
                 f"much it amplifies a perturbation of its first steps; about 1 or "
                 f"less: stable): {growth_text(r)}."
                 if "removal_derivative_growth" in r else ""), ""]
  lines += ["## Held-out runs", ""]
  lines += _methods_table(methods, std, cost=payload.get("cost"))
  lines += ["", "MSEs: lower is better, (×) = ratio to curriculum_blind"
            + (" (the ratio of the mean MSEs over seeds; its std over seeds is "
               "`std`'s `<mse>_ratio` in metrics.json)" if seeds else "")
            + ", the mean "
            "trajectory of the fitted runs, which knows nothing of the curriculum. "
            "Spearman: higher is better; `spearman` ranks test examples (mostly *which "
            "example*: blind scores high), `spearman_across_runs` ranks curricula (the "
            "counterfactual question; = LDS on these runs). Run-equivalents: runs "
            "used to fit plus compute to predict, in units of one training run.", ""]
  warnings = _warnings(payload)
  if warnings:
    lines += ["### Flags", ""] + warnings + [""]
  if payload.get("unseen_examples"):
    lines += ["## Runs with train examples no fitted run contained", ""]
    lines += _methods_table(payload["unseen_examples"], std.get("unseen_examples", {}))
    lines += [""]
  if payload.get("removal_lds"):
    fractions = sorted({f for v in payload["removal_lds"].values() for f in v})
    lines += ["## Removal LDS (MAGIC's protocol)", "",
              "| method | " + " | ".join(fractions) + " |",
              "|---" * (len(fractions) + 1) + "|"]
    removal_std = std.get("removal_lds", {})
    for method, values in payload["removal_lds"].items():
      lines.append(f"| {method} | " + " | ".join(
          _cell(values.get(f), removal_std.get(method, {}).get(f), ".3f")
          for f in fractions) + " |")
    lines += [""]
  curve = payload.get("learning_curve")
  if curve:
    lines += ["## Learning curve (Simfluence-Linear)", "",
              "| fitted runs | spearman_across_runs | all_steps_mse / blind |",
              "|---|---|---|"]
    for k, rho, ratio in zip(curve["num_runs"], curve["spearman_across_runs"],
                             curve["all_steps_mse_ratio"]):
      lines.append(f"| {k} | {_cell(rho, fmt='.3f')} | {_cell(ratio, fmt='.3f')} |")
    lines += [""]
  if payload.get("counterfactual"):
    lines += _counterfactual_lines(payload["counterfactual"])
  elif payload.get("counterfactual_summary"):
    # Its own name: `summary` is the run's (config, versions), printed under "Run"
    # (the mean over seeds printed this one there instead).
    searched = payload["counterfactual_summary"]
    median_std = std.get("counterfactual_summary", {}).get("median_random")
    lines += ["## Counterfactual curricula (searched on each simulator, then retrained)",
              "", f"Median random curriculum's actual final target loss "
              f"{_number(searched.get('median_random'), '.3f')}"
              + (f" ± {_number(median_std, '.3f')}" if median_std is not None else "")
              + "; per seed in `seed_<k>/report.md`.", ""]
    lines += counterfactual_summary_table(
        searched, std.get("counterfactual_summary", {})) + [""]
  stages = payload.get("stages", {})
  if stages:
    total = sum(v["seconds"] for v in stages.values())
    lines += ["## Stages", "", "| stage | seconds | |", "|---|---|---|"]
    lines += [f"| {name} | {v['seconds']:.2f} | {'reused' if v['reused'] else ''} |"
              for name, v in stages.items()]
    lines += [f"| **total** | {total:.1f} | |", ""]
  if plots:
    lines += ["## Plots", ""]
    lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots]
    lines += [""]
  if summary:
    lines += ["## Run", "", "```", json.dumps(summary, indent=2, sort_keys=True,
                                               default=str), "```"]
  return lines


def write_report(workdir: str, *, payload: dict, predictions: Optional[dict] = None,
                 bands: Optional[dict] = None, actual=None,
                 test_texts: Optional[list] = None) -> dict:
  """Writes workdir/metrics.json, workdir/report.md and workdir/plots/*.png.

  plots/ is the report's own folder: it is cleared first, so it holds this report's
  plots only. metrics.json is written last: it is there once the report is whole.

  Args:
    workdir: output directory.
    payload: the metrics dict (module docstring); written as metrics.json.
    predictions: method -> float[R', T+1, M] simulated held-out trajectories (for
      trajectory and scatter plots; None for a mean over seeds).
    bands: method -> (mean, std), each float[R', T+1, M], or None.
    actual: float[R', T+1, M] actual held-out losses (with `predictions`).
    test_texts: optional M strings used to title trajectory plots.

  Returns:
    dict with the written paths ("metrics", "report", "plots").
  """
  root = _io.as_path(workdir)
  if predictions:
    actual = np.asarray(actual)
    if actual.ndim != 3:
      raise ValueError(f"actual: expected float[R', T+1, M], got shape {actual.shape}.")
    for method, pred in predictions.items():
      if np.shape(pred) != actual.shape:
        raise ValueError(f"predictions[{method!r}]: expected shape {actual.shape}, "
                         f"got {np.shape(pred)}.")
    if test_texts is not None and len(test_texts) != actual.shape[2]:
      raise ValueError(f"test_texts: expected {actual.shape[2]} strings, got "
                       f"{len(test_texts)}.")
  payload = clean_json(payload)
  metrics_path = root / "metrics.json"
  # Plots are drawn into a local directory first (matplotlib writes files), then
  # moved into the workdir atomically by `_io`. plots/ is the report's own: cleared
  # first, so no plot of an earlier report (a method since dropped, another number
  # of seeds) stays beside the new ones.
  plot_dir = root / "plots"
  _io.remove_tree(plot_dir)
  plots = []
  if not _optional.available("matplotlib"):
    _optional.skipped("Plots", "report")
  else:
    if methods_of(payload):
      plots.append(_metric_bars(plot_dir, payload))
    if predictions:
      plots += _trajectory_plots(plot_dir, predictions, bands, actual, test_texts)
    if payload.get("learning_curve"):
      plots.append(_learning_curve_plot(plot_dir, payload["learning_curve"]))
    if payload.get("counterfactual"):
      plots.append(_counterfactual_plot(plot_dir, payload["counterfactual"]))
  report_path = root / "report.md"
  _io.write_text(report_path, "\n".join(report_lines(payload, plots)) + "\n")
  # Last: a workdir's metrics.json says its job finished (`tables`, `simulate`).
  _io.write_text(metrics_path, json.dumps(payload, indent=2, sort_keys=True))
  return {"metrics": os.fspath(metrics_path), "report": os.fspath(report_path),
          "plots": [os.fspath(p) for p in plots]}
