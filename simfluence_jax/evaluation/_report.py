"""`write_report`: metrics.json, report.md and plots for a set of methods."""

import json
import os
from typing import Optional

import numpy as np

from simfluence_jax import _io


def _json_float(value):
  value = float(value)
  return value if np.isfinite(value) else None  # JSON has no NaN


def _plots(plot_dir, predictions, bands, actual, metrics, test_texts, num_examples=4):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
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
      title = f"test {m}"
      if test_texts is not None:
        title += ": " + str(test_texts[m])[:30]
      ax.set_title(title, fontsize=8)
      ax.set_xlabel("step")
    axes[0, 0].set_ylabel("loss (held-out run 0)")
    axes[0, 0].legend(fontsize=7)
    path = os.path.join(plot_dir, f"trajectories_{method}.png")
    _io.save_figure(fig, path)
    written.append(path)

  fig, axes = plt.subplots(1, len(predictions), figsize=(3.5 * len(predictions), 3.5),
                           squeeze=False)
  for ax, (method, pred) in zip(axes[0], predictions.items()):
    pred_final = np.asarray(pred)[:, -1].ravel()
    actual_final = actual[:, -1].ravel()
    ax.scatter(actual_final, pred_final, s=4, alpha=0.5)
    lo = min(actual_final.min(), pred_final.min())
    hi = max(actual_final.max(), pred_final.max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_title(method, fontsize=9)
    ax.set_xlabel("actual final loss")
  axes[0, 0].set_ylabel("predicted final loss")
  path = os.path.join(plot_dir, "final_loss_scatter.png")
  _io.save_figure(fig, path)
  written.append(path)

  metric_names = sorted({k for v in metrics.values() for k in v})
  fig, axes = plt.subplots(1, len(metric_names), figsize=(3.5 * len(metric_names), 3),
                           squeeze=False)
  methods = list(metrics)
  for ax, name in zip(axes[0], metric_names):
    values = [metrics[m].get(name, np.nan) for m in methods]
    ax.bar(range(len(methods)), [0 if v is None else v for v in values],
           color=[f"C{i}" for i in range(len(methods))])
    ax.set_xticks(range(len(methods)))
    ax.set_xticklabels(methods, rotation=45, ha="right", fontsize=7)
    ax.set_title(name, fontsize=9)
  path = os.path.join(plot_dir, "metrics_bars.png")
  fig.tight_layout()
  _io.save_figure(fig, path)
  written.append(path)
  return written


def _counterfactual_plot(plot_dir, result):
  """Actual final target loss of searched vs random curricula, and their curves."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, (ax_curve, ax_scatter) = plt.subplots(1, 2, figsize=(11, 4))
  rand = result["random"]
  steps = np.arange(len(rand["mean_curve"]))
  ax_curve.fill_between(steps, rand["curve_low"], rand["curve_high"], color="0.8",
                        label="random (10–90%)")
  ax_curve.plot(steps, rand["mean_curve"], color="0.4", label="random (mean)")
  for i, (method, values) in enumerate(result["searched"].items()):
    ax_curve.plot(steps, values["mean_curve"], color=f"C{i}",
                  label=f"searched on {method}")
    ax_scatter.scatter(rand["simulated_final"][method], rand["actual_final"],
                       color=f"C{i}", marker=".", alpha=0.4)
    ax_scatter.scatter(values["simulated_final"], values["actual_final"],
                       color=f"C{i}", marker="*", s=80, label=method)
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
  path = os.path.join(plot_dir, "counterfactual.png")
  _io.save_figure(fig, path)
  return path


def _counterfactual_lines(result):
  rand = result["random"]
  lines = ["## Counterfactual curricula (searched on each simulator, then retrained)", "",
           f"Target test examples {result['targets']} (largest spread of final loss "
           f"across training runs). Each simulator searched "
           f"{result['num_searched_per_method']} curricula of the same size as the "
           f"random ones, which were then really trained; the baseline is the "
           f"{result['num_random']} random held-out curricula (median actual final "
           f"target loss {rand['median_actual']:.4f}). Improvement = median random − "
           "mean searched final target loss (positive = better than random).", "",
           "| searched on | actual final | actual improvement | simulated improvement |"
           " beats median random |", "|---|---|---|---|---|"]
  for method, values in result["searched"].items():
    lines.append(
        f"| {method} | {np.mean(values['actual_final']):.4f} | "
        f"{values['actual_improvement']:+.4f} | {values['simulated_improvement']:+.4f} "
        f"| {values['fraction_beating_median']:.0%} |")
  return lines + [""]


def write_report(workdir: str, *, metrics: dict, predictions: dict,
                 bands: Optional[dict], actual, timings: dict, summary: dict,
                 test_texts: Optional[list] = None,
                 counterfactual: Optional[dict] = None) -> dict:
  """Writes workdir/metrics.json, workdir/report.md and workdir/plots/*.png.

  Args:
    workdir: output directory.
    metrics: method -> {metric name -> float}.
    predictions: method -> float[R', T+1, M] simulated held-out trajectories.
    bands: method -> (mean, std), each float[R', T+1, M], or None.
    actual: float[R', T+1, M] actual held-out losses.
    timings: stage -> seconds.
    summary: JSON-serialisable description of the config / runs.
    test_texts: optional M strings used to title trajectory plots.
    counterfactual: optional result of `counterfactual.search_and_verify` (its JSON
      part goes into metrics.json["counterfactual"], a section and a plot into the
      report).

  Returns:
    dict with the written paths ("metrics", "report", "plots").
  """
  actual = np.asarray(actual)
  if actual.ndim != 3:
    raise ValueError(f"actual: expected float[R', T+1, M], got shape {actual.shape}.")
  for method, pred in predictions.items():
    if np.shape(pred) != actual.shape:
      raise ValueError(f"predictions[{method!r}]: expected shape {actual.shape}, got "
                       f"{np.shape(pred)}.")
  if test_texts is not None and len(test_texts) != actual.shape[2]:
    raise ValueError(f"test_texts: expected {actual.shape[2]} strings, got "
                     f"{len(test_texts)}.")
  os.makedirs(workdir, exist_ok=True)
  plot_dir = os.path.join(workdir, "plots")
  os.makedirs(plot_dir, exist_ok=True)

  payload = {method: {k: _json_float(v) for k, v in values.items()}
             for method, values in metrics.items()}
  payload["timings"] = {k: float(v) for k, v in timings.items()}
  if counterfactual is not None:
    payload["counterfactual"] = {k: v for k, v in counterfactual.items()
                                 if k != "batch_ids"}
  metrics_path = os.path.join(workdir, "metrics.json")
  _io.write_text(metrics_path, json.dumps(payload, indent=2, sort_keys=True))

  plots = _plots(plot_dir, predictions, bands, actual, metrics, test_texts)
  if counterfactual is not None:
    plots.append(_counterfactual_plot(plot_dir, counterfactual))

  names = sorted({k for v in metrics.values() for k in v})
  lines = ["# simfluence_jax report", "",
           f"Every method simulates {actual.shape[0]} held-out runs "
           f"({actual.shape[1] - 1} steps, {actual.shape[2]} test examples) that no "
           "simulator was fitted on.", "", "## Metrics (held-out runs)", "",
           "| method | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(names)]
  for method, values in metrics.items():
    cells = [f"{values[n]:.4g}" if n in values and values[n] is not None else "–"
             for n in names]
    lines.append(f"| {method} | " + " | ".join(cells) + " |")
  lines += ["", "MSEs: lower is better; Spearman / LDS: higher is better.", ""]
  if counterfactual is not None:
    lines += _counterfactual_lines(counterfactual)
  lines += ["## Timings", "", "| stage | seconds |", "|---|---|"]
  lines += [f"| {stage} | {float(sec):.2f} |" for stage, sec in timings.items()]
  lines += ["", "## Plots", ""]
  lines += [f"![{os.path.basename(p)}](plots/{os.path.basename(p)})" for p in plots]
  lines += ["", "## Run", "", "```",
            json.dumps(summary, indent=2, sort_keys=True, default=str), "```"]
  report_path = os.path.join(workdir, "report.md")
  _io.write_text(report_path, "\n".join(lines) + "\n")
  return {"metrics": metrics_path, "report": report_path, "plots": plots}
