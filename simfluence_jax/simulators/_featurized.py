"""Featurized Simfluence (GPTfluence-style): A and B as linear functions of features.

Every train example i has features φ_i ∈ R^F (projected gradients, embeddings, ...),
shared by all test examples; per test example m

  A_i[m] = a₀ + φ̃_iᵀ W_A[:, m],     B_i[m] = φ̃_iᵀ W_B[:, m]

with φ̃_i = (φ_i, 1) when `intercept` (a per-test-example offset). The simulator's
α(c_t) = Σ_{i∈c_t} A_i then has the dense design row x_{t−1}·s_t, β(c_t) the row s_t,
where s_t = Σ_{i∈c_t} φ̃_i (F' = F + intercept features): a ridge regression of F'
(additive) or 2F' (linear) unknowns per test example, solved for all test examples at
once:

* "normal": the [J·F', J·F'] normal equations of every column (Cholesky), built from
  SᵀS-type products in chunks of columns bounded by the memory budget. The additive
  Gram matrix SᵀS is shared by every column (one factorisation per l2 value).
* "cg": Jacobi-preconditioned CG with dense matvecs Sθ and Sᵀr, O(P·F' + J·F') per
  column: for many features.
* "auto": "normal" (exact) when J·F' ≤ 256, else "cg" (measured faster above: F = 64,
  R·T = 10 000, M = 64 on 2 CPU cores: normal 1.65 s, CG 0.28 s, at relative
  residuals 4e-6 and 1e-5). CG's W is checked against the float64 solution where
  that costs at most `_solver.FLOAT64_CHECK_MAX_FLOPS`, and replaced by it where CG
  missed tol or a block is more than 1% off (`info["float64_check"]`).

Because W is shared through features, A and B exist for every train example with
features, including ones no fitted run contained.
"""

import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax.simulators import _solver

METHODS = ("auto", "normal", "cg")
_NORMAL_MAX_SIZE = 256  # unknowns per column; CG (dense matmuls) wins above
_DEFAULT_MEMORY_BUDGET = 1 << 28


def summed_features(ids: np.ndarray, features: np.ndarray) -> np.ndarray:
  """float32[P, F] Σ of the features of every row's valid ids (padding −1 skipped).

  Args:
    ids: int32[P, B].
    features: float32[N, F].
  """
  valid = (ids >= 0).astype(np.float32)
  return np.einsum("pb,pbf->pf", valid, features[np.maximum(ids, 0)])


def _solve_normal(summed, x, y, l2, *, linear):
  """W float32[J·F', C] from the normal equations of every column, built and
  solved in float64 on the host (`_solver.dense_float64_ridge`).

  In float32 they lose the directions the fitted rows barely constrain, which are
  those an unseen example's features read: at l2 = 1e-3 (the default grid's
  smallest; cond 1.7e9) a float32 Cholesky left W 6.5% off the ridge solution with
  a relative residual of 8e-6 (review h25). Float64 keeps cond·ε ≈ 2e-7.
  """
  return jnp.asarray(_solver.dense_float64_ridge(summed, x, y, l2, linear=linear)
                     .astype(np.float32))


def _matvec(theta, summed, x, linear):
  """X_c θ_c for every column: float32[P, C] from θ float32[J·F', C]."""
  width = summed.shape[1]
  if linear:
    return x * (summed @ theta[:width]) + summed @ theta[width:]
  return summed @ theta


def _rmatvec(residual, summed, x, linear):
  """X_cᵀ r_c for every column: float32[J·F', C]."""
  if linear:
    return jnp.concatenate([summed.T @ (x * residual), summed.T @ residual])
  return summed.T @ residual


@functools.partial(jax.jit, static_argnames=("linear",))
def _solve_cg(summed, x, y, l2, tol, theta, restart, max_iters, *, linear):
  """Jacobi-preconditioned CG on the normal equations from θ, in the columns
  `restart` (bool[C]; the others stay as they are); (W, iterations per column,
  steps run).

  Stops on CG's recursive residual; `_cg_with_restarts` checks the true one.
  """
  squares = summed * summed
  diag = (jnp.concatenate([squares.T @ (x * x), jnp.broadcast_to(
      jnp.sum(squares, 0)[:, None], (summed.shape[1], x.shape[1]))])
          if linear else jnp.broadcast_to(jnp.sum(squares, 0)[:, None],
                                          (summed.shape[1], x.shape[1])))
  inverse = 1.0 / (diag + l2)
  rhs = _rmatvec(y, summed, x, linear)
  target = tol * jnp.linalg.norm(rhs, axis=0)

  def apply(theta):
    return _rmatvec(_matvec(theta, summed, x, linear), summed, x, linear) + l2 * theta

  def cond(state):
    it, _, residual, *_ = state
    return (it < max_iters) & jnp.any(jnp.linalg.norm(residual, axis=0) > target)

  def body(state):
    it, theta, residual, direction, rz, iterations = state
    live = jnp.linalg.norm(residual, axis=0) > target
    product = apply(direction)
    curvature = jnp.sum(direction * product, 0)
    step = jnp.where(live & (curvature > 0),
                     rz / jnp.where(curvature > 0, curvature, 1.0), 0.0)
    theta = theta + step * direction
    residual = residual - step * product
    z = inverse * residual
    rz_new = jnp.sum(residual * z, 0)
    beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
    return (it + 1, theta, residual, z + beta * direction, rz_new,
            iterations + live.astype(jnp.int32))

  # The true residual at θ (rhs from θ = 0): a restart replaces CG's recursive
  # residual by it (residual replacement).
  residual = jnp.where(restart, rhs - apply(theta), 0.0)
  z = inverse * residual
  state = (jnp.int32(0), theta, residual, z, jnp.sum(residual * z, 0),
           jnp.zeros(x.shape[1], jnp.int32))
  steps, theta, _, _, _, iterations = jax.lax.while_loop(cond, body, state)
  return theta, iterations, steps


@functools.partial(jax.jit, static_argnames=("linear",))
def _relative_residual(theta, summed, x, y, l2, *, linear):
  rhs = _rmatvec(y, summed, x, linear)
  gap = _rmatvec(_matvec(theta, summed, x, linear), summed, x, linear) + l2 * theta - rhs
  den = jnp.linalg.norm(rhs, axis=0)
  return jnp.where(den > 0, jnp.linalg.norm(gap, axis=0) / jnp.where(den > 0, den, 1.0),
                   0.0)


@functools.partial(jax.jit, static_argnames=("linear",))
def _residual_floor(theta, summed, x, y, l2, *, linear):
  """float32[C] the float32 rounding bound of `_relative_residual` (as
  `_solver._residual_floor`): ε·‖|X|ᵀ|X||θ| + l2|θ| + |X|ᵀ|y|‖ / ‖Xᵀy‖."""
  abs_s, abs_x = jnp.abs(summed), jnp.abs(x)
  bound = (_rmatvec(_matvec(jnp.abs(theta), abs_s, abs_x, linear), abs_s, abs_x,
                    linear) + l2 * jnp.abs(theta)
           + _rmatvec(jnp.abs(y), abs_s, abs_x, linear))
  den = jnp.linalg.norm(_rmatvec(y, summed, x, linear), axis=0)
  eps = jnp.finfo(jnp.float32).eps
  return jnp.where(den > 0, eps * jnp.linalg.norm(bound, axis=0)
                   / jnp.where(den > 0, den, 1.0), 0.0)


_MAX_RESTARTS = 3  # as `_solver._MAX_RESTARTS`


def _cg_with_restarts(summed, x, y, l2, tol, max_iters, linear):
  """CG from W = 0, restarted from W on the true residual (residual replacement)
  in the columns where the recomputed relative residual misses max(tol, its float32
  rounding bound), up to `_MAX_RESTARTS` times while that improves them and
  iterations remain; a column a restart did not improve keeps its W from before it
  (as `_solver._solve_cg`).

  Returns (W, iterations int[C], the rounding bound float32[C] at W).
  """
  theta = jnp.zeros((summed.shape[1] * (2 if linear else 1), x.shape[1]), jnp.float32)
  restart = np.ones(x.shape[1], bool)
  iterations = np.zeros(x.shape[1], np.int64)
  done, previous = 0, None  # previous: (W, residual, bound) before the last restart
  for attempt in range(_MAX_RESTARTS + 1):
    theta, iters, steps = _solve_cg(summed, x, y, l2, jnp.float32(tol), theta,
                                    jnp.asarray(restart), jnp.int32(max_iters - done),
                                    linear=linear)
    iterations += np.asarray(iters)
    done += int(steps)
    gap = np.asarray(_relative_residual(theta, summed, x, y, l2, linear=linear))
    floor = np.asarray(_residual_floor(theta, summed, x, y, l2, linear=linear))
    floor = np.where(np.isfinite(floor), floor, 0.0)  # overflow: tol alone
    theta, gap, floor, restart, stalled = _solver.restart_outcome(
        previous, theta, gap, floor, tol, jnp.where)
    if (not restart.any() or done >= max_iters or attempt == _MAX_RESTARTS or
        stalled):
      break
    previous = (theta, gap, floor)
  return theta, iterations, floor


def _refuse_nonfinite(what: str, values, method: str, l2) -> None:
  """Raises ValueError naming `what` and its first NaN/inf (`_checks`), if any."""
  bad = _checks.first_nonfinite(values)
  if bad is not None:
    raise ValueError(
        f"featurized solve: the {method!r} solve gave non-finite {what} (first at "
        f"{list(bad)}): the features or losses overflow float32 in the normal "
        f"equations, or they are ill-conditioned at l2={float(np.min(l2)):g}; "
        "rescale the features or use a larger l2.")


def choose_method(num_features: int, linear: bool) -> str:
  return "normal" if (2 if linear else 1) * num_features <= _NORMAL_MAX_SIZE else "cg"


def solve(summed: np.ndarray, x: np.ndarray, y: np.ndarray, l2: np.ndarray, *,
          linear: bool, method: str = "auto", tol: float = 1e-5,
          max_iters: int = 2000, memory_budget_bytes: Optional[int] = None):
  """Ridge solution of every column of the featurized regression.

  Minimises Σ_p (y_pc − (X_c w_c)_p)² + l2_c‖w_c‖² with X_c = [x_c ⊙ S, S] (linear)
  or S (additive).

  Args:
    summed: float32[P, F'] summed features of every row (S).
    x: float32[P, C] previous losses.
    y: float32[P, C] targets.
    l2: float32[C] penalties, > 0.
    linear: fit (W_A, W_B) if True, else W_B only.
    method: "auto" | "normal" | "cg".
    tol, max_iters: CG stopping rule (relative residual of the normal equations).
    memory_budget_bytes: working-set bound per chunk of columns.

  Returns:
    (W float32[J·F', C] (W_A rows first), info dict: method, iterations,
    relative_residual (recomputed from W), converged (CG: every column's
    relative_residual ≤ tol, or ≤ its float32 rounding bound where larger, as in
    `_solver.solve`; "normal", solved in float64: True), residual_floor (CG
    only), chunk_size,
    num_chunks).

  Raises:
    ValueError: a bad method; NaN/inf in summed, y or (linear) x, naming it and
      the first bad entry; or a solve whose W or relative residual is not finite
      (float32 overflow of the normal equations, e.g. from huge features).
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS} for a featurized fit, got "
                     f"{method!r}.")
  summed = np.asarray(summed, np.float32)
  x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
  l2 = np.asarray(l2, np.float32)
  # As `_solver._check_problem`: a NaN row would otherwise give W = 0, "converged".
  for name, array in (("summed", summed), ("y", y)) + ((("x", x),) if linear else ()):
    bad = _checks.first_nonfinite(array)
    if bad is not None:
      row, column = bad
      raise ValueError(f"{name}: contains NaN or inf (first at row {row}, column "
                       f"{column}).")
  num_rows, width = summed.shape
  num_columns = y.shape[1]
  if method == "auto":
    method = choose_method(width, linear)
  dim = (2 if linear else 1) * width
  budget = memory_budget_bytes or _DEFAULT_MEMORY_BUDGET
  if method == "normal":  # float64 Gram accumulators, the Gram matrix and its factor
    per_column = 8 * (2 * width * width + 2 * dim * dim)
  else:  # residual, product and direction-sized vectors per row and parameter
    per_column = 4 * (4 * num_rows + 8 * dim)
  chunk = int(max(1, min(num_columns, budget // per_column)))
  summed_j = jnp.asarray(summed)
  thetas, iterations, residuals, floors, converged = [], [], [], [], True
  checks = {}  # chunk -> the float64 check's verdict (CG only)
  for start in range(0, num_columns, chunk):
    stop = min(start + chunk, num_columns)
    pad = (0, chunk - (stop - start))
    x_c = jnp.asarray(np.pad(x[:, start:stop], ((0, 0), pad)))
    y_c = jnp.asarray(np.pad(y[:, start:stop], ((0, 0), pad)))
    l2_c = jnp.asarray(np.pad(l2[start:stop], pad, constant_values=1.0))
    columns = stop - start
    if method == "normal":
      theta = _solve_normal(summed_j, x_c, y_c, l2_c, linear=linear)
    else:
      theta, iters, floor = _cg_with_restarts(summed_j, x_c, y_c, l2_c, tol,
                                              max_iters, linear)
      iterations.append(int(np.max(iters)))
    _refuse_nonfinite("W", np.asarray(theta)[:, :columns], method, l2[start:stop])
    residual = lambda theta: np.asarray(_relative_residual(
        theta, summed_j, x_c, y_c, l2_c, linear=linear))[:columns]
    gap = residual(theta)
    _refuse_nonfinite("relative residuals", gap, method, l2[start:stop])
    if method == "cg":
      # Met where the residual recomputed from W is within tol, or within float32
      # rounding where tol is below that (as `_solver.solve`); then checked
      # against the float64 solution where that is cheap.
      floor = floor[:columns]
      floors.append(float(np.max(floor)))
      theta, met, checks[len(thetas)] = _float64_check(
          theta, bool(np.all(gap <= np.maximum(tol, floor))), summed, x, y, l2,
          (start, stop), linear)
      gap = residual(theta) if checks[len(thetas)] == "replaced" else gap
      converged = converged and met
    residuals.append(float(np.max(gap)))
    thetas.append(np.asarray(theta)[:, :columns])
  info = {"method": method, "iterations": max(iterations, default=0),
          "relative_residual": max(residuals), "converged": bool(converged),
          "tol": float(tol), "chunk_size": chunk,
          "num_chunks": math.ceil(num_columns / chunk)}
  if floors:
    info["residual_floor"] = max(floors)
  if checks:
    verdicts = set(checks.values())
    info["float64_check"] = next(v for v in ("replaced", "skipped", "agreed")
                                 if v in verdicts)
  return np.concatenate(thetas, axis=1), info


def _float64_check(theta, met: bool, summed, x, y, l2, columns, linear: bool):
  """(W, met, verdict) for one chunk of CG's columns (`columns`: start, stop):
  where the dense float64 solution costs at most
  `_solver.FLOAT64_CHECK_MAX_FLOPS`, W is replaced by it if CG missed tol or a
  block (W_A, W_B) of some column is more than `_solver.UNSETTLED_LIMIT` off it
  (review h32: 15-22% off with converged True on 302 unknowns per column, and
  stopped at max_iters within a loose rounding bound). Verdicts: "agreed",
  "replaced" (met then True), "skipped" (too large)."""
  start, stop = columns
  rows, width = summed.shape
  blocks = 2 if linear else 1
  if rows * (blocks * width) ** 2 * (stop - start) > _solver.FLOAT64_CHECK_MAX_FLOPS:
    return theta, met, "skipped"
  exact = _solver.dense_float64_ridge(summed, x[:, start:stop], y[:, start:stop],
                                      l2[start:stop], linear=linear)  # [J·F', C]
  got = np.asarray(theta)[:, :stop - start]
  if met and _solver.worst_block_error(got.reshape(blocks, width, -1),
                                       exact.reshape(blocks, width, -1)
                                       ) <= _solver.UNSETTLED_LIMIT:
    return theta, met, "agreed"
  padded = np.zeros(np.shape(theta), np.float32)
  padded[:, :stop - start] = exact
  return jnp.asarray(padded), True, "replaced"


def predictions(theta: np.ndarray, summed: np.ndarray, x: np.ndarray, linear: bool
                ) -> np.ndarray:
  """float32[P, C] X_c θ_c of every column (for residuals)."""
  return np.asarray(_matvec(jnp.asarray(theta), jnp.asarray(summed), jnp.asarray(x),
                            linear))
