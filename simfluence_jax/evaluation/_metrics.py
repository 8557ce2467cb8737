"""Metrics comparing simulated and actual loss trajectories on held-out runs.

All metrics take `pred, actual: float[R', T+1, M]` (index 0 = before the first
step) and average over held-out runs (or test examples for across-run metrics).

Nothing is hidden: a non-finite prediction makes every metric NaN (a Spearman ρ
over ranks would otherwise turn an exploded simulator into a perfect one), and a ρ
across runs needs at least `MIN_RUNS_FOR_RHO` held-out runs; `undefined_reasons`
says why a metric is NaN, and `spearman_across_runs_skipped` how many test examples
`spearman_across_runs` left out of its mean (constant across runs: ρ undefined).
"""

import numpy as np

from simfluence_jax import _checks
from simfluence_jax import trace as trace_lib

MIN_RUNS_FOR_RHO = 3
# Losses that differ by less than this share of their scale (max(1, |L|)) are
# equal: the float32 rounding of the same prediction computed for another
# curriculum (an order-blind simulator on permuted runs differs by ~5e-7 of the
# loss), whose ranks would be noise. Ranked metrics skip such rows as constant.
# The scale is at least 1, so below a loss of 1 the tolerance is 1e-5 absolute: a
# cross-entropy computed in float32 from logits of size ~1-10 carries rounding of
# ~1e-6 however small the loss, so a spread of 1e-5 there is not a ranking.
ROUNDING_RTOL = 1e-5


def _check(pred, actual):
  pred = np.asarray(pred, np.float64)
  actual = np.asarray(actual, np.float64)
  if actual.ndim != 3 or actual.shape[1] < 2:
    raise ValueError(f"actual: expected float[R', T+1, M] with T >= 1, got {actual.shape}.")
  if pred.shape != actual.shape:
    raise ValueError(f"pred: expected shape {actual.shape} (as actual), got {pred.shape}.")
  if not np.all(np.isfinite(actual)):
    raise ValueError("actual: contains NaN or inf (a diverged held-out run).")
  return pred, actual


def rankdata(values: np.ndarray, axis: int = -1) -> np.ndarray:
  """Ranks 1..n along `axis`, ties given their average rank (scipy's "average")."""
  values = np.moveaxis(np.asarray(values, np.float64), axis, -1)
  order = np.argsort(values, axis=-1, kind="stable")
  sorted_values = np.take_along_axis(values, order, -1)
  n = values.shape[-1]
  ranks_sorted = np.broadcast_to(np.arange(1, n + 1, dtype=np.float64),
                                 values.shape).copy()
  # Average the ranks of each run of equal values (flattened over leading axes).
  flat_values = sorted_values.reshape(-1, n)
  flat_ranks = ranks_sorted.reshape(-1, n)
  for row in range(flat_values.shape[0]):
    v = flat_values[row]
    starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])
    if len(starts) == n:
      continue
    ends = np.r_[starts[1:], n]
    for start, end in zip(starts, ends):
      if end - start > 1:
        flat_ranks[row, start:end] = (start + 1 + end) / 2.0
  ranks = np.empty_like(ranks_sorted)
  np.put_along_axis(ranks, order, flat_ranks.reshape(values.shape), -1)
  return np.moveaxis(ranks, -1, axis)


def constant_rows(x, rtol: float = 0.0, scale=None) -> np.ndarray:
  """bool[K]: rows of float[K, n] whose spread is at most `rtol` · max(1, max |·|)
  of the row of `scale` (default x; rtol 0: exactly constant). A difference of
  losses passes the losses as `scale`: their rounding is its noise."""
  x = np.asarray(x, np.float64)
  scale = np.abs(x if scale is None else np.asarray(scale, np.float64))
  return np.ptp(x, axis=1) <= rtol * np.maximum(1.0, np.max(scale, axis=1))


def _rowwise_spearman(a, b, rtol: float = 0.0, scales=(None, None)):
  """Spearman ρ of each row of a, b: float[K, n] -> float[K] (NaN where a row of
  either is constant, to `rtol` of its scale: `constant_rows`)."""
  constant = (constant_rows(a, rtol, scales[0]) |
              constant_rows(b, rtol, scales[1]))
  ra, rb = rankdata(a, 1), rankdata(b, 1)
  ra = ra - ra.mean(1, keepdims=True)
  rb = rb - rb.mean(1, keepdims=True)
  den = np.sqrt(np.sum(ra * ra, 1) * np.sum(rb * rb, 1))
  den = np.where(constant, 0.0, den)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(den > 0, np.sum(ra * rb, 1) / np.where(den > 0, den, 1.0), np.nan)


def _nanmean(values):
  values = np.asarray(values, np.float64)
  return float(np.mean(values[np.isfinite(values)])) if np.any(np.isfinite(values)) \
      else float("nan")


def _finite(pred) -> bool:
  return bool(np.all(np.isfinite(pred)))


def all_steps_mse(pred, actual) -> float:
  """Mean over runs, steps t = 1..T and test examples of (L̂_t − L_t)².

  Step 0 is excluded: simulations start from the actual initial losses. NaN if
  any L̂_t is non-finite (as every metric; inf before).
  """
  pred, actual = _check(pred, actual)
  if not _finite(pred):
    return float("nan")
  return float(np.mean((pred[:, 1:] - actual[:, 1:]) ** 2))


def final_step_mse(pred, actual) -> float:
  """Mean over runs and test examples of (L̂_T − L_T)² (NaN if any L̂_t is)."""
  pred, actual = _check(pred, actual)
  if not _finite(pred):
    return float("nan")
  return float(np.mean((pred[:, -1] - actual[:, -1]) ** 2))


def spearman(pred, actual) -> float:
  """Spearman ρ across the M test examples of final-step losses, averaged over runs.

  NaN if any prediction is non-finite; runs where either side is constant (ρ
  undefined; to float rounding, `ROUNDING_RTOL`) are skipped, NaN if all are.
  """
  pred, actual = _check(pred, actual)
  if not _finite(pred):
    return float("nan")
  return _nanmean(_rowwise_spearman(pred[:, -1], actual[:, -1], ROUNDING_RTOL))


def spearman_across_runs(pred, actual) -> float:
  """For each test example, ρ across held-out runs of its final loss; mean over examples.

  This is the linear datamodeling score (Park et al., 2023) of the held-out
  curricula: the counterfactual question "which curriculum gives the lower loss".
  NaN with fewer than `MIN_RUNS_FOR_RHO` runs or a non-finite prediction; test
  examples with a constant prediction or outcome across runs (to float rounding,
  `ROUNDING_RTOL`: ranking rounding noise is not a prediction) are skipped, and
  counted by `spearman_across_runs_skipped` (reported beside this metric).
  """
  rho = _across_runs_rho(pred, actual)
  return float("nan") if rho is None else _nanmean(rho)


def _across_runs_rho(pred, actual):
  """float[M] each test example's ρ across runs (NaN: constant, skipped), or None
  when `spearman_across_runs` is undefined as a whole (non-finite prediction, fewer
  than `MIN_RUNS_FOR_RHO` runs)."""
  pred, actual = _check(pred, actual)
  if not _finite(pred) or pred.shape[0] < MIN_RUNS_FOR_RHO:
    return None
  return _rowwise_spearman(pred[:, -1].T, actual[:, -1].T, ROUNDING_RTOL)


def spearman_across_runs_skipped(pred, actual) -> int:
  """How many of the M test examples `spearman_across_runs` leaves out of its mean.

  Those whose predicted or actual final loss is the same for every held-out run (to
  float rounding, `ROUNDING_RTOL`): ρ across runs is undefined for them, so the
  metric is the mean over the other M − skipped. M: every one is, and the metric is
  NaN (`undefined_reasons` says why). 0 where the metric is NaN as a whole (a
  non-finite prediction, fewer than `MIN_RUNS_FOR_RHO` runs): nothing was ranked,
  and `undefined_reasons` says why.
  """
  rho = _across_runs_rho(pred, actual)
  return 0 if rho is None else int(np.sum(np.isnan(rho)))


def lds(pred, actual) -> float:
  """Linear datamodeling score over held-out curricula: ρ across runs of the
  predicted vs actual effect L_T − L_0, averaged over test examples.

  With every run starting from the same model (always, in the main job) this equals
  `spearman_across_runs` (rows equal to float rounding, `ROUNDING_RTOL`, skipped
  alike), so the main job reports that one only; MAGIC's removal protocol is
  `removal_lds`.
  """
  pred, actual = _check(pred, actual)
  if not _finite(pred) or pred.shape[0] < MIN_RUNS_FOR_RHO:
    return float("nan")
  effect_pred = (pred[:, -1] - actual[:, 0]).T
  effect_actual = (actual[:, -1] - actual[:, 0]).T
  # Constant to the rounding of the losses, as `spearman_across_runs` (review h27:
  # measured against the effects' own size, a row of rounding noise was ranked).
  return _nanmean(_rowwise_spearman(effect_pred, effect_actual, ROUNDING_RTOL,
                                    scales=(pred[:, -1].T, actual[:, -1].T)))


def removal_lds(predicted_change, actual_change) -> float:
  """MAGIC's LDS: per test example, ρ across removals of predicted vs actual change.

  Args:
    predicted_change: float[S, M], predicted change of the final loss of each test
      example when the examples of removal s are dropped from the reference run.
    actual_change: float[S, M], the change measured by retraining.

  Returns:
    The mean over test examples (those constant across removals, to float
    rounding, `ROUNDING_RTOL`, skipped: ranking rounding noise is not a
    prediction); NaN if a prediction is non-finite or S < `MIN_RUNS_FOR_RHO`.

  Raises:
    ValueError: shapes that differ or are not [S, M], or a non-finite
      `actual_change` (a diverged retrain: ranking its NaN would score it as the
      largest change), as the held-out metrics refuse a non-finite actual.
  """
  predicted_change = np.asarray(predicted_change, np.float64)
  actual_change = np.asarray(actual_change, np.float64)
  if predicted_change.shape != actual_change.shape or predicted_change.ndim != 2:
    raise ValueError(f"predicted_change: expected shape {actual_change.shape} "
                     f"[S, M], got {predicted_change.shape}.")
  if not _finite(actual_change):
    bad = _checks.first_nonfinite(actual_change)
    raise ValueError(f"actual_change: contains NaN or inf (first at removal {bad[0]}, "
                     f"test example {bad[1]}: a diverged retrain).")
  if not _finite(predicted_change) or predicted_change.shape[0] < MIN_RUNS_FOR_RHO:
    return float("nan")
  return _nanmean(_rowwise_spearman(predicted_change.T, actual_change.T,
                                    ROUNDING_RTOL))


def min_loss(pred) -> float:
  """The lowest simulated loss (below 0 is physically impossible for a CE loss)."""
  pred = np.asarray(pred, np.float64)
  return float(np.min(pred)) if _finite(pred) else float("nan")


METRICS = {"all_steps_mse": all_steps_mse, "final_step_mse": final_step_mse,
           "spearman": spearman, "spearman_across_runs": spearman_across_runs}


def undefined_reasons(pred, actual) -> dict:
  """metric name -> why it is NaN, for the metrics of `METRICS` that are."""
  pred, actual = _check(pred, actual)
  reasons = {}
  if not _finite(pred):
    bad = _checks.first_nonfinite(pred)
    why = (f"the prediction is non-finite (first at run {bad[0]}, step {bad[1]}, "
           f"test example {bad[2]})")
    return {name: why for name in METRICS}
  if pred.shape[0] < MIN_RUNS_FOR_RHO:
    reasons["spearman_across_runs"] = (
        f"needs at least {MIN_RUNS_FOR_RHO} held-out runs, got {pred.shape[0]}")
  elif np.all(constant_rows(pred[:, -1].T)):
    reasons["spearman_across_runs"] = (
        "the prediction is the same for every run (it ignores the curriculum)")
  elif np.all(constant_rows(pred[:, -1].T, ROUNDING_RTOL)):
    reasons["spearman_across_runs"] = (
        f"the prediction differs across runs only by float rounding (at most "
        f"{ROUNDING_RTOL:g} of the loss): it ignores the curriculum, here the order")
  elif np.all(constant_rows(actual[:, -1].T, ROUNDING_RTOL)):
    reasons["spearman_across_runs"] = "the actual final losses do not vary across runs"
  elif spearman_across_runs_skipped(pred, actual) == pred.shape[2]:
    # Each test example constant on one side or the other: none left to average.
    flat_pred = int(np.sum(constant_rows(pred[:, -1].T, ROUNDING_RTOL)))
    flat_actual = int(np.sum(constant_rows(actual[:, -1].T, ROUNDING_RTOL)))
    reasons["spearman_across_runs"] = (
        f"every test example is constant across runs in the prediction "
        f"({flat_pred} of {pred.shape[2]}) or in the actual final loss "
        f"({flat_actual}): ρ is undefined for each")
  if np.all(constant_rows(pred[:, -1], ROUNDING_RTOL)):
    reasons["spearman"] = "the prediction is the same for every test example"
  elif np.isnan(spearman(pred, actual)):
    flat_pred = int(np.sum(constant_rows(pred[:, -1], ROUNDING_RTOL)))
    flat_actual = int(np.sum(constant_rows(actual[:, -1], ROUNDING_RTOL)))
    reasons["spearman"] = (
        f"every run is constant across test examples in the prediction "
        f"({flat_pred} of {pred.shape[0]}) or in the actual final loss "
        f"({flat_actual}): ρ is undefined for each")
  return reasons


def compute_metrics(pred, actual) -> dict:
  """Every metric of `METRICS` for predicted vs actual float[R', T+1, M] trajectories."""
  return {name: fn(pred, actual) for name, fn in METRICS.items()}


def curriculum_blind(fit_losses, num_runs: int) -> np.ndarray:
  """The curriculum-blind prediction: the mean trajectory of the fitted runs.

  Args:
    fit_losses: float[R, T+1, M] losses of the fitted runs.
    num_runs: R', how many curricula to predict (all get the same trajectory).

  Returns:
    float32[R', T+1, M].
  """
  mean = np.mean(np.asarray(fit_losses, np.float64), axis=0).astype(np.float32)
  return np.repeat(mean[None], num_runs, axis=0)


def evaluate(simulator, held_out_trace: trace_lib.Trace,
             allow_unfitted_ids: bool = False) -> dict:
  """Simulates the held-out curricula from their actual initial losses; all metrics.

  `allow_unfitted_ids`: score a per-id simulator on runs holding ids its fitted
  runs did not contain (its prior there; `Simulator.simulate` refuses otherwise).

  A simulator that predicts only final losses (`final_only`, e.g.
  `training.table_simulator`; its intermediate steps are NaN, not predictions)
  is scored on its final step: all_steps_mse is NaN, the others as for any.

  Returns:
    dict metric name -> float (keys of `METRICS`).
  """
  if not isinstance(held_out_trace, trace_lib.Trace):
    raise ValueError("held_out_trace: expected a simfluence_jax.Trace.")
  fitted_n = getattr(simulator, "num_train_examples", None)
  if fitted_n is not None and int(fitted_n) != held_out_trace.num_train_examples:
    raise ValueError(  # review h38: another dataset's runs were scored
        f"held_out_trace: num_train_examples={held_out_trace.num_train_examples}, but "
        f"the simulator was fitted on runs over {int(fitted_n)} train examples.")
  # A diverging rollout is scored NaN with its reason, not refused.
  pred = simulator.simulate(held_out_trace.batch_ids, held_out_trace.losses[:, 0],
                            allow_nonfinite=True,
                            allow_unfitted_ids=allow_unfitted_ids)
  if getattr(simulator, "final_only", False):
    ends = [0, -1]
    metrics = compute_metrics(np.asarray(pred)[:, ends],
                              held_out_trace.losses[:, ends])
    metrics["all_steps_mse"] = float("nan")
    return metrics
  return compute_metrics(pred, held_out_trace.losses)
