"""Fitting simulators to a `Trace`, and attribution scores as additive simulators.

Entry points:

* `fit(kind, trace, l2, ...)`: Simfluence-Linear / -Additive by ridge regression
  (optionally shrunk towards prior centres from another method, with phase-dependent
  A, B), or the featurized (GPTfluence-style) simulator.
* `fit_cv(kind, trace, l2_grid, num_folds, metric, ...)`: picks l2 by K-fold
  cross-validation with runs as folds, then refits on every run.
* `additive_from_scores(B, ...)`, `tracin_per_step(trace)`: scores as simulators.
"""

import dataclasses
from typing import Any, Callable, Optional, Sequence, Union
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import trace as trace_lib
from simfluence_jax.evaluation import _metrics as metrics_lib
from simfluence_jax.simulators import _featurized
from simfluence_jax.simulators import _simulator
from simfluence_jax.simulators import _solver

FIT_KINDS = ("linear", "additive", "featurized")
BASES = ("linear", "additive")
CV_METRICS = ("all_steps_mse", "final_step_mse", "spearman_across_runs")
DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def _check_trace(trace):
  if not isinstance(trace, trace_lib.Trace):
    raise ValueError(f"trace: expected a simfluence_jax.Trace, got {type(trace).__name__}.")


def _is_number(value):
  return not isinstance(value, bool) and isinstance(value, (int, float, np.number))


def _check_l2(l2, name="l2"):
  if not _is_number(l2) or not np.isfinite(l2) or l2 <= 0:
    raise ValueError(f"{name}: expected a positive number, got {l2!r}.")
  return float(l2)


def _check_matrix(name, value, shape):
  array = np.asarray(value, np.float32) if value is not None else None
  if array is None:
    return None
  if array.shape != shape or not np.all(np.isfinite(array)):
    raise ValueError(f"{name}: expected finite float32{list(shape)}, got shape "
                     f"{list(np.shape(value))}"
                     f"{'' if array.shape != shape else ' with NaN or inf'}.")
  return array


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Validated settings of one fit (everything but the trace and l2)."""

  kind: str  # "linear" | "additive" | "featurized"
  linear: bool  # the rollout form
  prior_alpha: float
  prior_A: Optional[np.ndarray]
  prior_B: Optional[np.ndarray]
  features: Optional[np.ndarray]  # with the intercept column appended
  num_phases: int
  method: str
  tol: float
  max_iters: int
  memory_budget_bytes: Optional[int]
  devices: Optional[Sequence[Any]]


def _spec(kind, trace, *, prior_alpha, prior_A, prior_B, features, base, intercept,
          num_phases, method, tol, max_iters, memory_budget_bytes, devices) -> _Spec:
  if kind not in FIT_KINDS:
    raise ValueError(f"kind: expected one of {FIT_KINDS}, got {kind!r}.")
  _check_trace(trace)
  featurized = kind == "featurized"
  if featurized and base not in BASES:
    raise ValueError(f"base: expected one of {BASES}, got {base!r}.")
  linear = (base if featurized else kind) == "linear"
  methods = _featurized.METHODS if featurized else _solver.METHODS
  if method not in methods:
    raise ValueError(f"method: expected one of {methods}, got {method!r}.")
  if prior_alpha is not None:
    if not linear:
      raise ValueError(f"prior_alpha={prior_alpha!r}: only for linear simulators (an "
                       "additive one has α ≡ 1).")
    if not _is_number(prior_alpha) or not np.isfinite(prior_alpha):
      raise ValueError(f"prior_alpha: expected a finite number, got {prior_alpha!r}.")
  shape = (trace.num_train_examples, trace.num_test_examples)
  if featurized and devices is not None:
    raise ValueError("devices: the featurized simulator's normal equations (F' x F' "
                     "per test example) are solved on one device; leave devices=None.")
  if featurized and (prior_A is not None or prior_B is not None):
    raise ValueError("prior_A/prior_B: not supported by the featurized simulator (its "
                     "parameters are W, not per-example A, B).")
  if prior_A is not None and not linear:
    raise ValueError("prior_A: only for linear simulators (an additive one has no A).")
  if prior_A is not None and prior_alpha is not None:
    raise ValueError("prior_alpha/prior_A: give one prior centre for A, not both.")
  prior_A = _check_matrix("prior_A", prior_A, shape)
  prior_B = _check_matrix("prior_B", prior_B, shape)
  if featurized:
    if features is None:
      raise ValueError("features: the featurized simulator needs features "
                       f"float32[N={shape[0]}, F].")
    features = np.asarray(features, np.float32)
    if (features.ndim != 2 or features.shape[0] != shape[0] or features.shape[1] == 0
        or not np.all(np.isfinite(features))):
      raise ValueError(f"features: expected finite float32[N={shape[0]}, F>0], got "
                       f"shape {list(features.shape)}.")
    if intercept:
      features = np.concatenate([features, np.ones((shape[0], 1), np.float32)], 1)
  elif features is not None:
    raise ValueError(f"features: only for kind='featurized', got kind={kind!r}.")
  if not _checks.is_int(num_phases) or not 1 <= num_phases <= trace.num_steps:
    raise ValueError(f"num_phases: expected an integer in [1, T={trace.num_steps}], "
                     f"got {num_phases!r}.")
  if featurized and num_phases != 1:
    raise ValueError("num_phases: the featurized simulator has one phase.")
  if not _checks.is_int(max_iters) or max_iters < 0:
    raise ValueError(f"max_iters: expected a non-negative integer, got {max_iters!r}.")
  if not _is_number(tol) or not np.isfinite(tol) or tol < 0:
    raise ValueError(f"tol: expected a non-negative number, got {tol!r}.")
  return _Spec(kind=kind, linear=linear,
               prior_alpha=1.0 if prior_alpha is None else float(prior_alpha),
               prior_A=prior_A, prior_B=prior_B, features=features,
               num_phases=int(num_phases), method=method, tol=float(tol),
               max_iters=int(max_iters), memory_budget_bytes=memory_budget_bytes,
               devices=devices)


def phase_starts(num_steps: int, num_phases: int) -> tuple:
  """First step of each of `num_phases` contiguous, near-equal bins of T steps."""
  return tuple(int(s) for s in np.round(np.arange(num_phases) * num_steps / num_phases))


@dataclasses.dataclass(frozen=True)
class _Problem:
  """The regression rows of one trace, relative to the prior centre θ₀.

  Attributes:
    ids: int32[P, B] batch ids of the non-empty steps (see `_problem`); with phases,
      id i of a step in phase k is k·N + i.
    x: float32[P, M] losses before each step.
    target: float32[P, M] loss after each step minus X·θ₀.
    prior_a: a₀ (scalar A centre; 0 if additive).
    centre_a, centre_b: float32[K, N, M] per-phase prior centres of A and B (None:
      scalar a₀ and 0).
    null_a: 1/b̄, the A of a removed occurrence.
    summed: featurized only: float32[P, F'] summed features per row.
    phase_starts: first step of each phase (() for one phase).
  """

  ids: np.ndarray
  x: np.ndarray
  target: np.ndarray
  prior_a: float
  centre_a: Optional[np.ndarray]
  centre_b: Optional[np.ndarray]
  null_a: float
  summed: Optional[np.ndarray]
  phase_starts: tuple


def _problem(spec: _Spec, trace: trace_lib.Trace) -> _Problem:
  """The regression rows of `trace`: one per non-empty step of every run.

  An empty step (every slot padding) has no row: the simulators roll it out as a
  no-op (α = 1, β = 0; see `_simulator`), its features are all zero so it carries
  nothing to learn, and its "residual" L_t would only inflate the noise estimate of
  the posterior. b̄ (hence a₀ = 1/b̄) is the mean over the kept, non-empty batches.
  """
  num_train, num_test = trace.num_train_examples, trace.num_test_examples
  ids = np.asarray(trace.batch_ids).reshape(-1, trace.batch_size)
  losses = np.asarray(trace.losses, np.float32)
  x = losses[:, :-1].reshape(-1, num_test)
  y = losses[:, 1:].reshape(-1, num_test)
  counts = np.sum(ids >= 0, axis=1).astype(np.float32)
  keep = counts > 0
  if not np.any(keep):  # e.g. a trace of control runs only (padding everywhere)
    raise ValueError("trace: every step of every run is padding (-1); nothing to fit.")
  row_phase = np.zeros(len(ids), np.int32)
  starts = ()
  if spec.num_phases > 1:
    starts = phase_starts(trace.num_steps, spec.num_phases)
    step_phase = _simulator.phase_of_steps(starts, trace.num_steps)
    row_phase = np.tile(step_phase, trace.num_runs)
  ids, x, y, counts, row_phase = (v[keep] for v in (ids, x, y, counts, row_phase))
  null_a = 1.0 / max(float(np.mean(counts)), 1.0)
  prior_a = spec.prior_alpha * null_a if spec.linear else 0.0
  summed = centre_a = centre_b = None
  if spec.num_phases > 1:
    ids = np.where(ids >= 0, ids + row_phase[:, None] * num_train, -1).astype(np.int32)
  if spec.kind == "featurized":
    summed = _featurized.summed_features(ids, spec.features)
  if spec.prior_A is not None or spec.prior_B is not None:
    tile = lambda v: np.broadcast_to(v, (spec.num_phases, num_train, num_test))
    centre_a = tile(prior_a if spec.prior_A is None else spec.prior_A)
    centre_b = tile(0.0 if spec.prior_B is None else spec.prior_B)
    theta0 = (np.stack([centre_a, centre_b], 2) if spec.linear else centre_b[:, :, None])
    theta0 = theta0.reshape(spec.num_phases * num_train, -1, num_test)
    shift = np.asarray(_solver.jitted_forward(
        jnp.asarray(theta0, jnp.float32), jnp.asarray(ids), jnp.asarray(x),
        linear=spec.linear))
    target = y - shift - (0.0 if spec.linear else x)
  elif spec.linear:
    target = y - x * (prior_a * counts[:, None])
  else:
    target = y - x
  return _Problem(ids=ids.astype(np.int32), x=x, target=target.astype(np.float32),
                  prior_a=float(prior_a), centre_a=centre_a, centre_b=centre_b,
                  null_a=null_a, summed=summed, phase_starts=starts)


def _solve(spec: _Spec, problem: _Problem, l2_values: np.ndarray, num_train: int):
  """Parameters for every l2 of the grid, all solved as columns of one problem.

  Returns:
    (A float32[G, K, N, M] or None, B float32[G, K, N, M], raw solution (θ' relative
    to θ₀: float32[K·N, J, G·M], or featurized W float32[J·F', G·M]), info).
  """
  num_test = problem.x.shape[1]
  grid = len(l2_values)
  x = np.tile(problem.x, (1, grid))
  y = np.tile(problem.target, (1, grid))
  l2 = np.repeat(np.asarray(l2_values, np.float32), num_test)
  if spec.kind == "featurized":
    # Its normal equations are F' x F' per test example: one device solves them.
    raw, info = _featurized.solve(problem.summed, x, y, l2, linear=spec.linear,
                                  method=spec.method, tol=spec.tol,
                                  max_iters=spec.max_iters,
                                  memory_budget_bytes=spec.memory_budget_bytes)
    width = spec.features.shape[1]
    weights = raw.reshape(-1, width, grid, num_test)  # [J, F', G, M]
    effects = np.einsum("nf,jfgm->gjnm", spec.features, weights)[:, :, None]
    bad = _checks.first_nonfinite(effects)
    if bad is not None:  # finite W, features too large: A, B = features·W overflow
      raise ValueError(
          f"features: the fitted {'AB'[bad[1]] if spec.linear else 'B'} = features·W "
          f"is not finite (first at train id {bad[3]}, test example {bad[4]}): the "
          "features overflow float32; rescale them.")
    b = effects[:, -1]
    a = effects[:, 0] + problem.prior_a if spec.linear else None
    return a, b, raw, info
  raw, info = _solver.solve(problem.ids, x, y, spec.num_phases * num_train, l2,
                            linear=spec.linear, method=spec.method, tol=spec.tol,
                            max_iters=spec.max_iters,
                            memory_budget_bytes=spec.memory_budget_bytes,
                            devices=spec.devices, warn=False)
  theta = raw.reshape(spec.num_phases, num_train, -1, grid, num_test)
  theta = theta.transpose(3, 2, 0, 1, 4)  # [G, J, K, N, M]
  centre_b = 0.0 if problem.centre_b is None else problem.centre_b
  b = theta[:, -1] + centre_b
  a = None
  if spec.linear:
    a = theta[:, 0] + (problem.prior_a if problem.centre_a is None else problem.centre_a)
  return a, b, raw, info


def _warn_unconverged(kind, info, max_iters, stacklevel=3):
  """Warns when the solve's `converged` is False (decided on the recomputed
  residual: `_solver.unconverged_message` says whether CG ran out of iterations,
  its recursive residual drifted below tol while the true one did not, or an
  exact method's float32 Cholesky missed tol)."""
  if not info["converged"]:
    why = _solver.unconverged_message(info, max_iters)
    warnings.warn(f"simulators.fit({kind!r}): {why}; fit_info['converged'] is False.",
                  RuntimeWarning, stacklevel=stacklevel)


def fit(kind: str, trace: trace_lib.Trace, l2: float = 1e-3, *,
        prior_alpha: Optional[float] = None, prior_A: Optional[Any] = None,
        prior_B: Optional[Any] = None, features: Optional[Any] = None,
        base: str = "linear", intercept: bool = True, num_phases: int = 1,
        method: str = "auto", tol: float = 1e-5, max_iters: int = 2000,
        memory_budget_bytes: Optional[int] = None,
        devices: Optional[Sequence[Any]] = None,
        name: Optional[str] = None) -> _simulator.Simulator:
  """Fits a simulator by ridge regression on every recorded step of `trace`.

  Objective, independently for every test example m (rows = all steps t of all runs r
  of `trace` except empty ones, n_i = multiplicity of id i in the batch c_t, padding
  ids ignored; an all-padding step is a no-op of every simulator, so it has no row):

    linear:    Σ_{r,t} (L_t − Σ_i n_i A_i·L_{t−1} − Σ_i n_i B_i)²
                   + l2·(‖A − A₀‖² + ‖B − B₀‖²)
    additive:  Σ_{r,t} (L_t − L_{t−1} − Σ_i n_i B_i)² + l2·‖B − B₀‖²
    featurized (base linear): A_i = a₀ + φ̃_iᵀW_A, B_i = φ̃_iᵀW_B, penalty l2·‖W‖²
      (φ̃_i = (φ_i, 1) with `intercept`; see `_featurized`); base additive: B only.

  The prior centre of A is A₀ = a₀ = prior_alpha / b̄ (b̄ = mean number of valid ids
  per non-empty batch); the default prior_alpha = 1 centres α(c_t) ≈ 1, i.e. shrinks
  towards the "nothing changes" simulator L_t = L_{t−1} (shrinking A to 0 instead
  would predict the loss collapses to β for batches of rarely seen examples).
  prior_alpha = 0 gives plain ridge. `prior_A` / `prior_B` replace the centres by per-example
  ones from another method (e.g. metagradient- or TracIn-derived effects), so the
  runs correct them where they have evidence and keep them where they have none.

  With `num_phases = P > 1` the T steps are cut into P contiguous near-equal bins
  (`phase_starts`), each with its own A, B (same prior centres); the simulator rolls
  out step t with the parameters of its bin.

  Args:
    kind: "linear", "additive" or "featurized".
    trace: the training runs to fit on.
    l2: ridge strength, > 0.
    prior_alpha: α of a typical batch under the prior (default 1.0; linear only).
    prior_A: optional float32[N, M] prior centres of A (linear only; not with
      prior_alpha).
    prior_B: optional float32[N, M] prior centres of B.
    features: featurized only: float32[N, F] features of every train example.
    base: featurized only: "linear" (A and B) or "additive" (B only).
    intercept: featurized only: add a constant feature (per-test-example offsets).
    num_phases: P, bins of steps with their own A, B (not featurized).
    method: solver, "auto" | "normal" | "cg" | "dual" (see `_solver`); featurized:
      "auto" | "normal" | "cg" (see `_featurized`).
    tol: CG relative-residual tolerance, checked on the residual recomputed from
      the solution (float32 rounding allowed where it exceeds tol; see
      `_solver.solve`).
    max_iters: CG iteration cap. A CG fit whose recomputed residual misses tol
      (stopped at max_iters, or its recursive residual drifted below tol while the
      true one did not) warns (RuntimeWarning) and records fit_info["converged"] =
      False.
    memory_budget_bytes: working-set bound per chunk of test examples.
    devices: devices the solver shards test examples over (default: one on CPU, all
      local accelerators otherwise); not for "featurized" (one device).
    name: label for reports (default "simfluence_<kind>").

  Returns:
    A `Simulator` (kind "linear"/"additive": the rollout form; a featurized one has
    A, B for every train example with features) that knows the trace's batch size
    and number of steps, with `fit_info` (method, iterations, relative_residual,
    converged, tol, l2, prior_a, null_a, noise_std_mean, num_phases, ...). Featurized
    simulators have no posterior (no bands). A linear / additive fit without
    per-example prior centres records `fitted_ids`, the ids the trace's runs contain:
    for any other id it holds only the prior (A = a₀, B = 0), so `simulate` refuses
    curricula holding one unless `allow_unfitted_ids=True`. With phases it records
    `phase_fitted_ids`, per phase the ids of the trace's steps in that phase (every
    other id has only the prior there), and `fitted_ids` is the ids of every
    phase. With `prior_A` / `prior_B` (e.g. the featurized corrections) or kind
    "featurized" every id has a prediction (the centre or the features'):
    `fitted_ids` is None.

  Raises:
    ValueError: naming the bad argument (kind, l2, prior_alpha NaN/inf, prior shapes,
      features, num_phases, method, ...).
  """
  spec = _spec(kind, trace, prior_alpha=prior_alpha, prior_A=prior_A, prior_B=prior_B,
               features=features, base=base, intercept=intercept,
               num_phases=num_phases, method=method, tol=tol, max_iters=max_iters,
               memory_budget_bytes=memory_budget_bytes, devices=devices)
  l2 = _check_l2(l2)
  problem = _problem(spec, trace)
  a, b, raw, info = _solve(spec, problem, np.array([l2]), trace.num_train_examples)
  _warn_unconverged(kind, info, spec.max_iters)
  if spec.kind == "featurized":
    predicted = _featurized.predictions(raw, problem.summed, problem.x, spec.linear)
  else:
    predicted = np.asarray(_solver.jitted_forward(
        jnp.asarray(raw), jnp.asarray(problem.ids), jnp.asarray(problem.x),
        linear=spec.linear))
  residual = problem.target - predicted
  noise_var = np.mean(residual ** 2, axis=0).astype(np.float32)
  info = dict(info, l2=l2, prior_a=problem.prior_a, null_a=problem.null_a,
              noise_std_mean=float(np.mean(np.sqrt(noise_var))),
              num_phases=spec.num_phases)
  if spec.kind == "featurized":
    info.update(featurized=True, base=base, intercept=bool(intercept),
                num_features=int(spec.features.shape[1] - bool(intercept)))
  if spec.prior_A is not None or spec.prior_B is not None:
    info.update(prior_A=spec.prior_A is not None, prior_B=spec.prior_B is not None)
  posterior = None
  if spec.kind != "featurized":
    flat = lambda c: None if c is None else np.ascontiguousarray(
        c.reshape(-1, trace.num_test_examples), np.float32)
    posterior = _simulator.Posterior(
        ids=problem.ids, x=problem.x, y=problem.target, noise_var=noise_var,
        prior_a=np.float32(problem.prior_a),
        prior_A=flat(problem.centre_a) if spec.linear else None,
        prior_B=flat(problem.centre_b), l2=l2, method=info["method"])
  a = None if a is None else a[0].astype(np.float32)  # [K, N, M]
  b = b[0].astype(np.float32)
  phased = spec.num_phases > 1
  if phased:
    starts = np.asarray(problem.phase_starts + (trace.num_steps,))
    share = (np.diff(starts) / trace.num_steps).astype(np.float32)[:, None, None]
    mean_a = None if a is None else np.sum(share * a, 0)
    mean_b = np.sum(share * b, 0)
  else:
    mean_a, mean_b = (None if a is None else a[0]), b[0]
  # Ids no run contains keep the prior centre: the "no change" prior is no
  # prediction (refused by `simulate`), per-example centres or features are one.
  covers_all = (spec.kind == "featurized" or spec.prior_A is not None or
                spec.prior_B is not None)
  return _simulator.Simulator(
      A=None if mean_a is None else jnp.asarray(mean_a), B=jnp.asarray(mean_b),
      posterior=posterior, kind="linear" if spec.linear else "additive",
      name=name or f"simfluence_{kind}",
      fit_info_items=_simulator.fit_info_items(info),
      batch_size=trace.batch_size, num_steps=trace.num_steps, null_a=problem.null_a,
      phase_A=jnp.asarray(a) if phased and a is not None else None,
      phase_B=jnp.asarray(b) if phased else None,
      phase_starts=problem.phase_starts,
      fitted_ids=None if covers_all or phased else _trace_ids(trace.batch_ids),
      phase_fitted_ids=(None if covers_all or not phased else
                        _phase_ids(np.asarray(trace.batch_ids),
                                   problem.phase_starts)))


def _trace_ids(batch_ids: np.ndarray) -> tuple:
  """The sorted distinct train ids (no padding) of batches `batch_ids`."""
  ids = np.unique(np.asarray(batch_ids))
  return tuple(int(i) for i in ids[ids >= 0])


def _phase_ids(batch_ids: np.ndarray, starts: tuple) -> tuple:
  """Per phase, the sorted distinct train ids of the steps of `batch_ids`
  int[R, T, B] in that phase: the ids whose parameter row k·N + i the fit had data
  for (`phase_fitted_ids`)."""
  step_phase = _simulator.phase_of_steps(starts, batch_ids.shape[1])
  return tuple(_trace_ids(batch_ids[:, step_phase == k]) for k in range(len(starts)))


def fitted_ids_of(batch_ids, num_phases: int = 1) -> tuple:
  """The `fitted_ids` that `fit` records for runs of these batch ids
  int[R, T, B] (without prior centres): their distinct train ids, with phases the
  ids of every phase. The main job checks a curriculum search's pool with it
  before training any run."""
  batch_ids = np.asarray(batch_ids)
  if num_phases == 1:
    return _trace_ids(batch_ids)
  return _simulator._common_ids(_phase_ids(  # pylint: disable=protected-access
      batch_ids, phase_starts(batch_ids.shape[1], num_phases)))


# -- cross-validation ------------------------------------------------------------------

def cv_score(metric: Union[str, Callable], pred: np.ndarray, actual: np.ndarray
             ) -> float:
  """The CV loss of `pred` vs `actual` float[R', T+1, M] (lower is better).

  "all_steps_mse" / "final_step_mse" as in `evaluation` (steps 1..T / step T);
  "spearman_across_runs" is `evaluation.spearman_across_runs` negated (per test
  example, Spearman ρ across the runs of the final loss, averaged over test
  examples with a defined ρ, rows equal to float rounding skipped as the held-out
  evaluation skips them; NaN, i.e. no information, with fewer than 3 runs or no
  defined ρ). A prediction that is not finite (a diverging rollout) scores +inf,
  the worst. A callable is used as is.
  """
  pred = np.asarray(pred, np.float64)
  actual = np.asarray(actual, np.float64)
  if not np.all(np.isfinite(pred)):
    return float("inf")
  if callable(metric):
    return float(metric(pred, actual))
  if metric == "all_steps_mse":
    return float(np.mean((pred[:, 1:] - actual[:, 1:]) ** 2))
  if metric == "final_step_mse":
    return float(np.mean((pred[:, -1] - actual[:, -1]) ** 2))
  return -metrics_lib.spearman_across_runs(pred, actual)


def fit_cv(kind: str, trace: trace_lib.Trace,
           l2_grid: Sequence[float] = DEFAULT_L2_GRID, *, num_folds: int = 5,
           metric: Union[str, Callable] = "all_steps_mse",
           priors: Optional[Callable] = None,
           **fit_kwargs) -> _simulator.Simulator:
  """Picks l2 by K-fold cross-validation with runs as folds, then fits on all runs.

  Run r belongs to fold r mod K. For every fold, every l2 of the grid is fitted on
  the other folds' runs (the whole grid in one solve: each l2 is another set of
  columns of the column-vectorised solver) and the fold's runs are simulated from
  their initial losses; the chosen l2 has the lowest mean over folds of the metric
  (first of the grid on ties; a fold where the metric is undefined, NaN, is skipped
  for that l2; a diverging rollout scores +inf).

  Args:
    kind: as in `fit`.
    trace: the runs; at least `num_folds` of them.
    l2_grid: candidate penalties, each > 0.
    num_folds: K ≥ 2.
    metric: "all_steps_mse" | "final_step_mse" | "spearman_across_runs" (higher
      is better; scored negated), or a callable (pred, actual: float[R', T+1, M]) ->
      float, lower is better.
    priors: None, or `(trace) -> (prior_A, prior_B)`: prior centres fitted on the
      runs given (e.g. a featurized model's A and B), refitted on each fold's
      fitting runs and, for the final fit, on all runs; priors fitted on every run
      would have seen each fold's held-out runs (review h32: the CV then favoured
      the prior, l2 = 100 where nested CV chose 1e-3). Not with `prior_A` /
      `prior_B`.
    **fit_kwargs: every other keyword of `fit` (prior_alpha, features, num_phases,
      method, name, ...), used for the fold fits and the final fit.

  Returns:
    `fit(kind, trace, l2=chosen, **fit_kwargs)` with fit_info["cv"] = {"metric",
    "num_folds", "l2_grid" [G], "fold_scores" [K][G] (lower is better),
    "mean_scores" [G], "chosen_l2"}.
  """
  if "l2" in fit_kwargs:
    raise ValueError("l2: fit_cv chooses l2 from l2_grid; do not pass l2.")
  _check_trace(trace)
  grid = list(l2_grid) if isinstance(l2_grid, (list, tuple, np.ndarray)) else None
  if not grid:
    raise ValueError(f"l2_grid: expected a non-empty sequence of positive numbers, got "
                     f"{l2_grid!r}.")
  grid = [_check_l2(v, "l2_grid") for v in grid]
  if not _checks.is_int(num_folds) or not 2 <= num_folds <= trace.num_runs:
    raise ValueError(f"num_folds: expected an integer in [2, R={trace.num_runs}], got "
                     f"{num_folds!r}.")
  if not callable(metric) and metric not in CV_METRICS:
    raise ValueError(f"metric: expected one of {CV_METRICS} or a callable, got "
                     f"{metric!r}.")
  name = fit_kwargs.pop("name", None)
  spec_kwargs = {k: fit_kwargs.get(k, v) for k, v in dict(
      prior_alpha=None, prior_A=None, prior_B=None, features=None, base="linear",
      intercept=True, num_phases=1, method="auto", tol=1e-5, max_iters=2000,
      memory_budget_bytes=None, devices=None).items()}
  unknown = sorted(set(fit_kwargs) - set(spec_kwargs))
  if unknown:
    raise ValueError(f"fit_kwargs: unknown keyword(s) {unknown} for simulators.fit.")
  if priors is not None and (fit_kwargs.get("prior_A") is not None
                             or fit_kwargs.get("prior_B") is not None):
    raise ValueError("priors: pass either priors (refitted per fold) or prior_A / "
                     "prior_B, not both.")

  def spec_of(runs):
    if priors is None:
      return _spec(kind, runs, **spec_kwargs)
    prior_a, prior_b = priors(runs)
    return _spec(kind, runs, **dict(spec_kwargs, prior_A=prior_a, prior_B=prior_b))

  fold_of_run = np.arange(trace.num_runs) % num_folds
  scores = np.zeros((num_folds, len(grid)))
  unconverged = []  # (relative residual, iterations) of folds that did not converge
  for fold in range(num_folds):
    train = trace.select_runs(np.flatnonzero(fold_of_run != fold))
    held = trace.select_runs(np.flatnonzero(fold_of_run == fold))
    if np.all(np.asarray(train.batch_ids) < 0):
      raise ValueError(f"num_folds={num_folds}: fold {fold}'s fitting runs (every run "
                       f"r with r % {num_folds} != {fold}) are all padding (-1), so "
                       "it has nothing to fit; use fewer folds or order the runs "
                       "so that each fold's complement trains.")
    spec = spec_of(train)
    problem = _problem(spec, train)
    a, b, _, info = _solve(spec, problem, np.asarray(grid), trace.num_train_examples)
    if not info["converged"]:
      unconverged.append(info)
    phases = _simulator.phase_of_steps(problem.phase_starts, held.num_steps)
    for g in range(len(grid)):
      pred = _simulator._rollout(  # pylint: disable=protected-access
          jnp.asarray(b[g] if a is None else a[g]), jnp.asarray(b[g]),
          jnp.asarray(held.batch_ids), jnp.ones(held.batch_ids.shape, jnp.float32),
          jnp.asarray(phases), jnp.asarray(held.losses[:, 0]),
          jnp.float32(problem.null_a), linear=spec.linear)
      scores[fold, g] = cv_score(metric, np.asarray(pred), held.losses)
  if unconverged:
    worst = {key: max(info.get(key) or 0 for info in unconverged)
             for key in ("relative_residual", "iterations", "unsettled")}
    _warn_unconverged(f"{kind}, cv folds", dict(
        worst, converged=False, tol=spec.tol, method=unconverged[0]["method"]),
                      spec.max_iters, stacklevel=2)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns
    mean = np.nanmean(scores, axis=0)  # NaN folds carry no information; inf stays
  if not np.any(np.isfinite(mean)):
    raise ValueError(f"metric: {metric!r} is undefined or infinite on every fold for "
                     f"every l2 of l2_grid={grid}; use another metric, more runs per "
                     "fold, or larger l2.")
  choice = int(np.nanargmin(mean))
  if priors is not None:
    prior_a, prior_b = priors(trace)
    fit_kwargs = dict(fit_kwargs, prior_A=prior_a, prior_B=prior_b)
  sim = fit(kind, trace, l2=grid[choice], name=name, **fit_kwargs)
  info = dict(sim.fit_info, cv={
      "metric": metric if isinstance(metric, str) else getattr(metric, "__name__",
                                                               "callable"),
      "num_folds": int(num_folds), "l2_grid": grid,
      "fold_scores": [[float(v) for v in row] for row in scores],
      "mean_scores": [float(v) for v in mean], "chosen_l2": grid[choice]})
  return dataclasses.replace(sim, fit_info_items=_simulator.fit_info_items(info))


# -- scores as simulators -----------------------------------------------------------

def additive_from_scores(B, name: str = "scores", *, batch_size: Optional[int] = None,
                         num_steps: Optional[int] = None,
                         fitted_ids: Optional[Sequence[int]] = None,
                         batch_mean: bool = False) -> _simulator.Simulator:
  """Wraps per-step loss changes as an additive simulator L_t = L_{t−1} + Σ_{i∈c_t} B_i.

  Args:
    B: float32[N, M], the loss change of test example m when i is in a batch.
    name: label for reports.
    batch_size: the batch size the scores' per-step scale assumes (e.g. the η/|c_t|
      of TracIn); when given, curricula of another width are refused.
    num_steps: the number of steps the scores are meant for; when given, longer
      curricula need `allow_extrapolation=True`.
    fitted_ids: None when the scores cover every train id (e.g. influence scores
      of all N examples), else the ids they were computed for: curricula holding
      another id are refused by `simulate` unless `allow_unfitted_ids=True`.
    batch_mean: B is each example's effect within a full batch of `batch_size`
      (TracIn's −(η/B)·score): a step with v valid ids scales its sum by B/v, as
      training divides a step by its valid ids (`Simulator.batch_mean`).
  """
  b = np.asarray(B, np.float32)
  if b.ndim != 2 or not np.all(np.isfinite(b)):
    raise ValueError(f"B: expected finite float[N, M], got shape {b.shape}.")
  return _simulator.Simulator(A=None, B=jnp.asarray(b), kind="additive", name=name,
                              batch_size=batch_size, num_steps=num_steps,
                              fitted_ids=fitted_ids,
                              batch_mean=batch_mean).check_shapes()


@jax.jit
def _tracin_sums(batch_ids, train_grads, test_grads, learning_rates):
  """float32[T, B, M] TracIn term of every occurrence of one run (0 at padding)."""
  valid = (batch_ids >= 0).astype(jnp.float32)  # [T, B]
  batch_counts = jnp.maximum(jnp.sum(valid, axis=1), 1.0)
  dots = jnp.einsum("tbk,tmk->tbm", train_grads, test_grads)
  return -(learning_rates / batch_counts)[:, None, None] * dots * valid[:, :, None]


def tracin_per_step(trace: trace_lib.Trace, name: str = "tracin_per_step"
                    ) -> _simulator.Simulator:
  """Per-step TracIn from the trace's projected gradients, as an additive simulator.

  B[i, m] = mean over all occurrences (r, t, k) of i in the trace's batches of
  −(η_{r,t} / |c_{r,t}|)·⟨g_{r,t,k}, g^test_{r,t,m}⟩: the first-order loss change of
  test example m from one SGD step on the batch-mean loss when i is in the batch,
  with both gradients taken at the parameters before step t and |c_{r,t}| the number
  of valid ids. Train examples never seen get 0, which is no prediction: the
  simulator records the ids seen (`fitted_ids`) and `simulate` refuses others unless
  `allow_unfitted_ids=True`. With an adaptive optimizer η_t is the recorded
  learning rate (the preconditioner is ignored). The simulator knows the trace's
  batch size and number of steps.

  Args:
    trace: a trace with `train_grads` / `test_grads`.
    name: label for reports.
  """
  _check_trace(trace)
  if not trace.has_grads:
    raise ValueError("trace: has no train_grads/test_grads for per-step TracIn.")
  num_train, num_test = trace.num_train_examples, trace.num_test_examples
  sums = np.zeros((num_train, num_test), np.float64)
  counts = np.zeros(num_train, np.float64)
  for r in range(trace.num_runs):  # one run at a time bounds memory to T·B·M
    terms = np.asarray(_tracin_sums(
        jnp.asarray(trace.batch_ids[r]), jnp.asarray(trace.train_grads[r]),
        jnp.asarray(trace.test_grads[r]), jnp.asarray(trace.learning_rates[r])))
    ids = trace.batch_ids[r].reshape(-1)
    keep = ids >= 0
    np.add.at(sums, ids[keep], terms.reshape(-1, num_test)[keep])
    np.add.at(counts, ids[keep], 1.0)
  b = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1.0)[:, None], 0.0)
  return additive_from_scores(b.astype(np.float32), name=name,
                              batch_size=trace.batch_size, num_steps=trace.num_steps,
                              fitted_ids=np.flatnonzero(counts > 0))
