"""Metrics comparing simulated and actual loss trajectories on held-out runs.

All metrics take `pred, actual: float[R', T+1, M]` (index 0 = before the first
step) and average over held-out runs (or test examples for across-run metrics).
"""

import numpy as np
import scipy.stats

from simfluence_jax import trace as trace_lib


def _check(pred, actual):
  pred = np.asarray(pred, np.float64)
  actual = np.asarray(actual, np.float64)
  if actual.ndim != 3 or actual.shape[1] < 2:
    raise ValueError(f"actual: expected float[R', T+1, M] with T >= 1, got {actual.shape}.")
  if pred.shape != actual.shape:
    raise ValueError(f"pred: expected shape {actual.shape} (as actual), got {pred.shape}.")
  return pred, actual


def _rank(values, axis):
  return scipy.stats.rankdata(values, axis=axis)


def _rowwise_spearman(a, b):
  """Spearman ρ of each row of a, b: float[K, n] -> float[K] (NaN if a row is constant)."""
  ra, rb = _rank(a, 1), _rank(b, 1)
  ra = ra - ra.mean(1, keepdims=True)
  rb = rb - rb.mean(1, keepdims=True)
  den = np.sqrt(np.sum(ra * ra, 1) * np.sum(rb * rb, 1))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, np.sum(ra * rb, 1) / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values[np.isfinite(values)])) if np.any(np.isfinite(values)) \
      else float("nan")


def all_steps_mse(pred, actual) -> float:
  """Mean over runs, steps t = 1..T and test examples of (L̂_t − L_t)².

  Step 0 is excluded: simulations start from the actual initial losses.
  """
  pred, actual = _check(pred, actual)
  return float(np.mean((pred[:, 1:] - actual[:, 1:]) ** 2))


def final_step_mse(pred, actual) -> float:
  """Mean over runs and test examples of (L̂_T − L_T)²."""
  pred, actual = _check(pred, actual)
  return float(np.mean((pred[:, -1] - actual[:, -1]) ** 2))


def spearman(pred, actual) -> float:
  """Spearman ρ across the M test examples of final-step losses, averaged over runs.

  Runs where either side is constant (ρ undefined) are skipped; NaN if all are.
  """
  pred, actual = _check(pred, actual)
  return _nanmean(_rowwise_spearman(pred[:, -1], actual[:, -1]))


def spearman_across_runs(pred, actual) -> float:
  """For each test example, ρ across held-out runs of its final loss; mean over examples.

  Test examples with a constant prediction or outcome across runs are skipped;
  NaN if all are (e.g. a single held-out run).
  """
  pred, actual = _check(pred, actual)
  return _nanmean(_rowwise_spearman(pred[:, -1].T, actual[:, -1].T))


def lds(pred, actual) -> float:
  """Linear datamodeling score (Park et al., 2023) over held-out curricula.

  For each test example m: Spearman ρ across held-out runs between the predicted
  curriculum effect L̂_T − L_0 and the actual effect L_T − L_0; averaged over test
  examples (constant ones skipped, NaN if all are). For an additive simulator with
  scores B, L̂_T − L_0 = Σ over the run's batch occurrences of B_i: the linear
  datamodel of the run's (multi-)set of examples. Subtracting L_0 removes what does
  not depend on the curriculum, so when every run starts from the same model (the
  usual case) lds equals `spearman_across_runs`; they differ when initial losses
  vary across runs (e.g. several base-model seeds), where lds scores only the
  attribution part.
  """
  pred, actual = _check(pred, actual)
  effect_pred = (pred[:, -1] - actual[:, 0]).T
  effect_actual = (actual[:, -1] - actual[:, 0]).T
  return _nanmean(_rowwise_spearman(effect_pred, effect_actual))


METRICS = {"all_steps_mse": all_steps_mse, "final_step_mse": final_step_mse,
           "spearman": spearman, "spearman_across_runs": spearman_across_runs,
           "lds": lds}


def compute_metrics(pred, actual) -> dict:
  """Every metric of `METRICS` for predicted vs actual float[R', T+1, M] trajectories."""
  return {name: fn(pred, actual) for name, fn in METRICS.items()}


def evaluate(simulator, held_out_trace: trace_lib.Trace) -> dict:
  """Simulates the held-out curricula from their actual initial losses; all metrics.

  Returns:
    dict metric name -> float (keys of `METRICS`).
  """
  if not isinstance(held_out_trace, trace_lib.Trace):
    raise ValueError("held_out_trace: expected a simfluence_jax.Trace.")
  pred = simulator.simulate(held_out_trace.batch_ids, held_out_trace.losses[:, 0])
  return compute_metrics(pred, held_out_trace.losses)
