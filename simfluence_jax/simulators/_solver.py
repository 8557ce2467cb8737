"""Sparse ridge solvers for Simfluence, vectorised over test examples ("columns").

Every step t of every run r is one regression row p = (r, t). Its features are a
sparse count vector over the N train ids of the step's batch (B entries, `-1` =
padding), scaled by the previous loss for the A part:

  linear:    y_p = x_p · Σ_k A[ids_pk] + Σ_k B[ids_pk]      (θ = (A, B), J = 2)
  additive:  y_p = Σ_k B[ids_pk]                            (θ = B,      J = 1)

with one independent θ per column c (test example, or test example × posterior
sample); `x: float32[P, C]` and `y: float32[P, C]` hold the columns. All solvers
minimise the same plain ridge objective (a prior centre is handled by the caller
by shifting the targets, see `_fit.py`):

  Σ_p (y_pc − (X_c θ_c)_p)² + l2 · ‖θ_c‖²        for every column c.

Internally θ is laid out as `float32[N, J, C]` so that a row gather `θ[ids[:, k]]`
and a row scatter-add per batch slot k serve every column at once. Solvers:

* "cg": preconditioned conjugate gradients on the normal equations
  (XᵀX + l2·I)θ = Xᵀy with matrix-free matvecs: Xθ is a gather of B rows per
  step, Xᵀr a scatter-add of the P·B occurrences. The preconditioner inverts the
  2×2 block of each train id (exact unless a batch repeats an id; A_i and B_i are
  nearly collinear because x varies slowly, which is what makes plain Jacobi
  slow). Memory O((P·B + N)·J·C).
  The iteration loop runs on the host over jitted halves (see `_solve_cg`). CG
  stops on its recursive residual, which drifts from the true one in float32, so
  the true residual is recomputed at the end: columns that miss tol restart from
  their solution on it (residual replacement), and `converged` is read from it.
* "normal": the D×D Gram matrix (D = J·N) per column built by scatter-add of the
  (B·J)² feature pairs of every row, solved by Cholesky. Memory O(D²·C): small N.
* "dual": θ = Xᵀ(XXᵀ + l2·I)⁻¹y with the P×P kernel
  K_c = S ∘ (x_c x_cᵀ + 1) (linear) or S (additive), S_pq = Σ_i n_pi n_qi the
  batch-overlap counts shared by all columns; Cholesky. Memory O(P²·C): few rows.
* "auto": the exact Cholesky solver with the smaller system when min(D, P) ≤ 128,
  else "cg".

Columns are processed in chunks sized so that one chunk's working set stays under
`memory_budget_bytes` (the last chunk is zero-padded so every chunk has the same
shape and compiles once). `l2` may differ per column (cross-validation solves a grid
of penalties as extra columns).

Sharding: one code path. Every chunk is laid out on a mesh with one axis, "columns"
(one device by default on CPU, every local accelerator otherwise), and every solver
kernel is a `shard_map` over it: each device solves its own columns with no
cross-device communication at all, not even for the convergence test (each shard
reports its own "still running" flag, the host reads them). Partitioning the plain
jitted kernels with `NamedSharding` instead made XLA insert ~20 all-gathers /
all-to-alls per CG iteration (the [N, J, C] -> [N, J·C] reshapes of the gathers cross
the sharded axis), and on oversubscribed CPU cores those rendezvous stalled or hit
XLA's 40 s collective timeout.
"""

import functools
import math
import os
from typing import Any, Optional, Sequence
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks

METHODS = ("auto", "normal", "cg", "dual")
_EXACT_MAX_SIZE = 128
_DEFAULT_MEMORY_BUDGET = 1 << 28  # bytes of float32 working set per chunk
COLUMNS_AXIS = "columns"
_REPLICATED = jax.sharding.PartitionSpec()
_PER_COLUMN = jax.sharding.PartitionSpec(COLUMNS_AXIS)  # [C]
_ROWS_BY_COLUMN = jax.sharding.PartitionSpec(None, COLUMNS_AXIS)  # [P, C]
_THETA = jax.sharding.PartitionSpec(None, None, COLUMNS_AXIS)  # [N, J, C]


def _occurrence_weights(ids: jax.Array):
  """Returns (safe ids with padding mapped to 0, float32 validity weights)."""
  valid = ids >= 0
  return jnp.where(valid, ids, 0), valid.astype(jnp.float32)


def _padding_to_end(ids: jax.Array, num_train: int) -> jax.Array:
  return jnp.where(ids >= 0, ids, num_train)


def _features(x: jax.Array, linear: bool) -> jax.Array:
  """float32[P, J, C]: the per-row feature scale of each parameter block."""
  if linear:
    return jnp.stack([x, jnp.ones_like(x)], axis=1)
  return jnp.ones_like(x)[:, None, :]


def forward(theta: jax.Array, ids: jax.Array, x: jax.Array, linear: bool) -> jax.Array:
  """Computes Xθ for every column.

  Args:
    theta: float32[N, J, C].
    ids: int32[P, B], -1 = padding.
    x: float32[P, C], previous losses (unused when not `linear`).
    linear: whether θ holds (A, B) or only B.

  Returns:
    float32[P, C].
  """
  # One row gather per batch slot and parameter block, from a [N + 1, C] table:
  # XLA:CPU runs B gathers of [P, C] rows ~10x faster than one gather of a
  # [P, B, C] block, and gathering A's and B's tables apart ~5x faster than
  # [P, J·C] rows of both (0.56 vs 3.0 ms for N = 2000, P = 10k, C = 64).
  num_train, _, columns = theta.shape
  slots = jnp.transpose(_padding_to_end(ids, num_train))  # [B, P]: contiguous slots

  def summed(block):
    # A zero row at index N serves the padding ids, so every index is in bounds
    # and the gathers need no bounds checks.
    table = jnp.concatenate([theta[:, block],
                             jnp.zeros((1, columns), theta.dtype)])
    total = table.at[slots[0]].get(mode="promise_in_bounds")
    for k in range(1, ids.shape[1]):
      total = total + table.at[slots[k]].get(mode="promise_in_bounds")
    return total

  # Explicit combination: a features-product-and-reduce makes XLA fuse the gathers
  # into the reduction, which is ~30x slower on CPU.
  return summed(0) * x + summed(1) if linear else summed(0)


def transpose(residual: jax.Array, ids: jax.Array, x: jax.Array, num_train: int,
              linear: bool) -> jax.Array:
  """Computes Xᵀr for every column by a scatter-add over batch occurrences.

  Args:
    residual: float32[P, C].
    ids: int32[P, B], -1 = padding.
    x: float32[P, C].
    num_train: N.
    linear: whether θ holds (A, B) or only B.

  Returns:
    float32[N, J, C].
  """
  # Per parameter block its [P, C] rows: A's x·r, B's r.
  return _scatter_rows([x * residual, residual] if linear else [residual], ids,
                       num_train)


def _scatter_rows(rows, ids, num_train: int) -> jax.Array:
  """float32[N, K, C]: out[i, k] = Σ over the occurrences (p, b) of id i of rows[k][p].

  Each of the K [P, C] arrays is scattered on its own (as `forward` gathers, 25%
  faster than [P, K·C] rows of all), one scatter per batch slot, padding into a
  spare row N. The rows are materialised once: fused into the B scatters' updates,
  their producer (often `forward`'s gathers) would be recomputed per slot, ~10x
  slower on CPU.
  """
  rows = jax.lax.optimization_barrier(list(rows))
  slots = jnp.transpose(_padding_to_end(ids, num_train))  # [B, P]
  out = []
  for per_row in rows:
    table = jnp.zeros((num_train + 1, per_row.shape[1]), jnp.float32)
    for k in range(ids.shape[1]):
      table = table.at[slots[k]].add(per_row, mode="promise_in_bounds")
    out.append(table[:num_train])
  return jnp.stack(out, axis=1)


def _gram_matvec(theta, ids, x, l2, linear):
  num_train = theta.shape[0]
  return transpose(forward(theta, ids, x, linear), ids, x, num_train, linear) + l2 * theta


def _block_preconditioner(ids, x, l2, num_train, linear):
  """Inverse of (nearly) the per-train-id J×J diagonal blocks of XᵀX + l2·I.

  Feature i of row p has value n_pi·f_p (n_pi = multiplicity of i in the batch), so
  the block is Σ_p n_pi² f_p f_pᵀ. Here every occurrence counts once, Σ_occurrences
  f_p f_pᵀ: exact when no batch repeats an example, a slightly smaller positive
  definite block otherwise, and CG's solution does not depend on the preconditioner.
  The entries (x², x, 1) of f_p f_pᵀ are scattered like `transpose`'s rows: with a
  weight n_pi per occurrence (per-slot updates) XLA:CPU's scatters took 46 ms
  instead of 5 for N = 2000, P = 10k, C = 64.

  Returns:
    The block inverses: float32[N, 1, C] (additive) or the symmetric 2×2 inverse
    entries (0,0), (0,1), (1,1) as float32[N, 3, C] (linear).
  """
  ones = jnp.ones_like(x)
  blocks = _scatter_rows([x * x, x, ones] if linear else [ones], ids, num_train)
  if not linear:
    return 1.0 / (blocks + l2)  # [N, 1, C]
  a, b, d = blocks[:, 0] + l2, blocks[:, 1], blocks[:, 2] + l2
  # Exactly, b² < a·d (Cauchy–Schwarz plus l2 > 0); float32 sums can break that
  # where x barely varies for an id (x = 2.7 ± 1e-4 over 5000 rows gave an
  # indefinite preconditioner), so |b| is kept a hair below √(a·d): a positive
  # definite preconditioner, unchanged wherever the block is not near-singular.
  limit = jnp.sqrt((1.0 - 1e-5) * a * d)
  b = jnp.clip(b, -limit, limit)
  det = a * d - b * b
  return jnp.stack([d / det, -b / det, a / det], axis=1)  # [N, 3, C]


def _apply_preconditioner(inverse, r):
  """Applies the block inverses of `_block_preconditioner` to r: float32[N, J, C]."""
  if inverse.shape[1] == 1:
    return inverse * r
  return jnp.stack([inverse[:, 0] * r[:, 0] + inverse[:, 1] * r[:, 1],
                    inverse[:, 1] * r[:, 0] + inverse[:, 2] * r[:, 1]], axis=1)


def _dot(u, v):
  return jnp.sum(u * v, axis=(0, 1))


def _cg_init(ids, x, y, l2, tol, *, num_train, linear):
  rhs = transpose(y, ids, x, num_train, linear)
  inverse = _block_preconditioner(ids, x, l2, num_train, linear)
  target = tol * jnp.sqrt(_dot(rhs, rhs))
  z = _apply_preconditioner(inverse, rhs)
  live = jnp.sqrt(_dot(rhs, rhs)) > target
  return (jnp.zeros_like(rhs), rhs, z, _dot(rhs, z), target, inverse,
          jnp.any(live)[None])


@functools.partial(jax.jit, static_argnames=("linear",))
def jitted_forward(theta, ids, x, *, linear):
  """`forward`, compiled on its own (see `_solve_cg` for why that matters)."""
  return forward(theta, ids, x, linear)


def _cg_step(predicted, theta, residual, direction, rz, target, inverse, ids, x, l2, *,
             linear):
  """One PCG update given X·direction; frozen columns (converged) get step 0.

  Returns the new (θ, residual, direction, rzᵀ), whether any column of this shard is
  still live (bool[1]) and which columns took a step (bool[C]).
  """
  num_train = theta.shape[0]
  product = transpose(predicted, ids, x, num_train, linear) + l2 * direction
  live = jnp.sqrt(_dot(residual, residual)) > target
  curvature = _dot(direction, product)
  step = jnp.where(live & (curvature > 0),
                   rz / jnp.where(curvature > 0, curvature, 1.0), 0.0)
  theta = theta + step * direction
  residual = residual - step * product
  z = _apply_preconditioner(inverse, residual)
  rz_new = _dot(residual, z)
  beta = jnp.where(rz > 0, rz_new / jnp.where(rz > 0, rz, 1.0), 0.0)
  # A frozen column keeps its direction and rzᵀ: lowering the target (`_solve_cg`
  # settling θ) resumes its CG where it stopped.
  direction = jnp.where(live, z + beta * direction, direction)
  rz_new = jnp.where(live, rz_new, rz)
  still_live = jnp.sqrt(_dot(residual, residual)) > target
  return theta, residual, direction, rz_new, jnp.any(still_live)[None], live


def _cg_restart(predicted, theta, restart, inverse, target, ids, x, y, l2, *,
                num_train, linear):
  """Residual replacement: CG's state restarted at θ from its true residual
  Xᵀy − (XᵀX + l2·I)θ (`predicted` = Xθ) in the columns `restart` (bool[C]); the
  others get residual 0, i.e. stay frozen.

  Returns (residual, direction, rzᵀ, bool[1] whether any column of this shard is
  live), as `_cg_init`.
  """
  del num_train  # the layout of `_cg_init`'s arguments
  rhs = transpose(y, ids, x, theta.shape[0], linear)
  residual = rhs - transpose(predicted, ids, x, theta.shape[0], linear) - l2 * theta
  residual = jnp.where(restart, residual, 0.0)
  z = _apply_preconditioner(inverse, residual)
  live = jnp.sqrt(_dot(residual, residual)) > target
  return residual, z, _dot(residual, z), jnp.any(live)[None]


# Residual replacements after CG's recursive residual met tol but the recomputed one
# did not (see `_solve_cg`).
_MAX_RESTARTS = 3


def restart_outcome(previous, theta, gap, floor, tol: float, select):
  """Where CG stands after a run (shared with the featurized CG).

  `previous`: None, or (θ, gap, floor) before the last restart: every column
  keeps its better θ (`select(bool[C] keep_old, old, new)`). Returns (θ, gap,
  floor, unmet bool[C]: the recomputed relative residual misses max(tol, its float32
  rounding bound), NaN never meets it; stalled: the restart improved no unmet
  column).
  """
  revert = None
  if previous is not None:
    revert = ~(gap < previous[1])
    theta = select(revert, previous[0], theta)
    gap, floor = (np.where(revert, old, new) for old, new in
                  zip(previous[1:], (gap, floor)))
  unmet = ~(gap <= np.maximum(tol, floor))
  stalled = revert is not None and bool(np.all(revert[unmet]))
  return theta, gap, floor, unmet, stalled


def _rounding_bound(kernels, theta, ids, x, y, l2):
  """float32[C] `_residual_floor` of θ on the host (0 where it overflows: tol alone)."""
  floor = np.asarray(kernels.floor(kernels.forward(jnp.abs(theta), ids, jnp.abs(x)),
                                   theta, ids, x, y, l2))
  return np.where(np.isfinite(floor), floor, 0.0)


def _true_residual(kernels, theta, ids, x, y, l2):
  """(relative residual, float32 rounding bound) float32[C] of θ, on the host."""
  predicted = kernels.forward(theta, ids, x)
  gap = np.asarray(kernels.gap(predicted, theta, ids, x, y, l2))
  return gap, _rounding_bound(kernels, theta, ids, x, y, l2)


# After CG meets tol it goes on a decade of residual at a time, up to _MAX_DECADES,
# until θ moves by at most UNSETTLED_LIMIT of its size in one (`_solve_cg`); the
# last decade's move decides `converged`.
_MAX_DECADES = 3
UNSETTLED_LIMIT = 0.01


def _solve_cg(kernels, ids, x, y, l2, tol, *, max_iters, restart_sharding=None,
              settle=True):
  """Block-Jacobi preconditioned CG, all columns at once.

  The loop runs on the host over two jitted halves (X·d, then Xᵀ(·) and the
  update): compiled as one program (e.g. a `lax.while_loop`), XLA:CPU fuses the
  gathers of X·d into the scatters of Xᵀ and the matvec is ~15x slower. Each shard
  reports its own liveness flag (bool[num_devices]); the host stops when all are
  down, so no step needs a cross-device reduction.

  A residual within tol does not make θ accurate where the normal equations are
  ill-conditioned: runs sharing a curriculum leave directions with eigenvalues
  near l2, which block-preconditioned CG resolves last (a review measured θ 62%
  off the float64 ridge solution at relative residual 7e-6, the fitted runs'
  rollouts right to 2e-6). So with `settle`, once every column meets tol CG goes
  on, the same run with its target a tenth as large (frozen columns keep their
  state, so this costs only the extra iterations), a decade at a time up to
  `_MAX_DECADES`, until θ moved by at most `UNSETTLED_LIMIT` of its size in the
  last decade: 1e-5–9e-4 in one decade on the default's, the rough regime's and
  the sweep's fits (+15–30% iterations) and on 22 random designs of review h19;
  0.02–0.3 on the review's runs of one curriculum (θ 0.5–14% off, flagged), and
  going on also makes θ more accurate there (62% → 14% off at l2 = 1e-3). A target
  never goes below twice the column's float32 rounding bound (there CG only
  wanders and the true residual grows: the learning curve's 8-run folds hit
  max_iters); a column with no room left is not checked, so a fit whose tol is
  within rounding can still be off unflagged (measured: 8 runs of the default,
  l2 = 1e-3, 6%). A limit of 0.1% also flagged fits right to 0.05%. Tried first
  and dropped: a Lanczos estimate of the condition number from CG's coefficients
  (it sees only the directions CG explored: 474 where the error was 62%), and a
  random perturbation of θ that CG must pull back (it flagged exact solutions:
  ids that always share a batch differ only in directions l2 decides, which CG
  from 0 never enters; review h19).

  CG stops on its recursive residual, which in float32 drifts from the true
  Xᵀy − (XᵀX + l2·I)θ. So the true residual is then recomputed (`_true_residual`);
  in columns where it misses max(tol, its float32 rounding bound) CG restarts
  from θ on the true residual (the others stay frozen), up to `_MAX_RESTARTS`
  times, while that improves them and iterations remain; a column a restart did
  not improve keeps its θ from before it.

  Returns:
    (θ float32[N, J, C], iterations int[C], relative residual float32[C] and its
    float32 rounding bound float32[C], both recomputed from θ, and float[C] how far
    θ moved in the last decade relative to its size: inf where no decade could
    run (out of iterations), 0 without `settle`).
  """
  theta, residual, direction, rz, target, inverse, live_shards = kernels.cg_init(
      ids, x, y, l2, tol)
  iterations = np.zeros(y.shape[1], np.int64)
  moved = np.full(y.shape[1], np.inf) if settle else np.zeros(y.shape[1])
  done, previous = 0, None  # previous: (θ, residual, bound) before the last restart

  def run(any_live):
    nonlocal theta, residual, direction, rz, live_shards, done, iterations
    steps = []
    while any_live and done < max_iters:
      predicted = kernels.forward(direction, ids, x)
      theta, residual, direction, rz, live_shards, live = kernels.cg_step(
          predicted, theta, residual, direction, rz, target, inverse, ids, x, l2)
      steps.append(live)
      done += 1
      # Sync with the host only every few steps to keep dispatch asynchronous;
      # converged columns are frozen (step 0), so extra steps change nothing.
      if len(steps) == 4:
        any_live = bool(np.any(np.asarray(live_shards)))
        iterations += np.sum([np.asarray(s) for s in steps], axis=0, dtype=np.int64)
        steps = []
    if steps:
      iterations += np.sum([np.asarray(s) for s in steps], axis=0, dtype=np.int64)

  run(bool(np.any(np.asarray(live_shards))))
  scale = np.asarray(target, np.float64) / max(float(np.asarray(tol)), 1e-30)  # ‖b‖
  level = np.full(y.shape[1], float(np.asarray(tol)))  # each column's relative target
  for _ in range(_MAX_DECADES if settle else 0):
    if done >= max_iters:
      break
    # A decade lower, but not into float32 rounding (there CG only wanders and
    # the true residual grows): a column with no room left counts as settled.
    floor = _rounding_bound(kernels, theta, ids, x, y, l2)
    lower = np.maximum(level / 10.0, 2.0 * floor)
    room = lower < level / 1.5
    if not room.any():
      moved = np.where(np.isinf(moved), 0.0, moved)
      break
    level = np.where(room, lower, level)
    target = jax.device_put((level * scale).astype(np.float32), restart_sharding)
    before = np.asarray(theta)
    run(True)
    if done >= max_iters and bool(np.any(np.asarray(live_shards))):
      moved = np.full(y.shape[1], np.inf)  # cut short: not measured
      break
    after = np.asarray(theta)
    size = np.linalg.norm(after, axis=(0, 1))
    moved = np.where(room & (size > 0), np.linalg.norm(after - before, axis=(0, 1))
                     / np.where(size > 0, size, 1.0), 0.0)
    if np.all(moved <= UNSETTLED_LIMIT):
      break
  for attempt in range(_MAX_RESTARTS + 1):
    if attempt:
      run(bool(np.any(np.asarray(live_shards))))
    gap, floor = _true_residual(kernels, theta, ids, x, y, l2)
    theta, gap, floor, unmet, stalled = restart_outcome(
        previous, theta, gap, floor, float(np.asarray(tol)),
        lambda keep, old, new: kernels.select(
            jax.device_put(keep, restart_sharding), old, new))
    if (not unmet.any() or done >= max_iters or attempt == _MAX_RESTARTS or
        stalled):
      break
    previous = (theta, gap, floor)
    restart = jax.device_put(unmet, restart_sharding)
    residual, direction, rz, live_shards = kernels.cg_restart(
        kernels.forward(theta, ids, x), theta, restart, inverse, target, ids, x, y,
        l2)
  return theta, iterations, gap, floor, moved


def _map_columns(fn, args, serial):
  """fn over the columns of `args` (each [..., C] on its last axis), stacked last.

  `serial` runs the columns one by one (`lax.map`) instead of as one batch (`vmap`):
  jaxlib's CPU LAPACK kernels (Cholesky here) split a batch into tasks on XLA:CPU's
  intra-op thread pool and block until they finish; when as many device programs as
  the pool has threads do that at once (several forced host devices on few cores),
  every pool thread waits for tasks no thread is free to run, a deadlock. Batch-1
  calls run inline.
  """
  moved = [jnp.moveaxis(a, -1, 0) for a in args]
  if serial:
    out = jax.lax.map(lambda a: fn(*a), tuple(moved))
  else:
    out = jax.vmap(fn)(*moved)
  return jnp.moveaxis(out, 0, -1)


def _solve_normal(ids, x, y, l2, *, num_train, linear, serial=False):
  """Dense Gram per column (scatter-add of feature pairs) + Cholesky.

  Returns:
    θ float32[N, J, C].
  """
  safe, weights = _occurrence_weights(ids)
  feats = _features(x, linear)  # [P, J, C]
  num_blocks = feats.shape[1]
  dim = num_blocks * num_train
  # Parameter index of occurrence k in block j: j·N + id; value w_k · f_j.
  index = (safe[:, :, None] + num_train * jnp.arange(num_blocks)[None, None, :])
  index = index.reshape(index.shape[0], -1)  # [P, B·J]
  values = weights[:, :, None, None] * feats[:, None]  # [P, B, J, C]
  values = values.reshape(values.shape[0], -1, values.shape[-1])  # [P, B·J, C]
  rows = jnp.broadcast_to(index[:, :, None], index.shape + index.shape[1:]).reshape(-1)
  cols = jnp.broadcast_to(index[:, None, :], index.shape + index.shape[1:]).reshape(-1)

  def solve_column(column_values, column_rhs, column_l2):
    pairs = column_values[:, :, None] * column_values[:, None, :]
    gram = jnp.zeros((dim, dim), jnp.float32).at[rows, cols].add(pairs.reshape(-1))
    gram = gram + column_l2 * jnp.eye(dim, dtype=jnp.float32)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(gram), True), column_rhs)

  rhs = transpose(y, ids, x, num_train, linear)  # [N, J, C]
  rhs = jnp.transpose(rhs, (1, 0, 2)).reshape(dim, rhs.shape[-1])  # [D, C], block-major
  solution = _map_columns(solve_column, (values, rhs, l2), serial)  # [D, C]
  return jnp.transpose(solution.reshape(num_blocks, num_train, -1), (1, 0, 2))


def _solve_dual(ids, x, y, l2, *, num_train, linear, serial=False):
  """θ = Xᵀ(XXᵀ + l2·I)⁻¹y with the P×P kernel per column + Cholesky.

  Returns:
    θ float32[N, J, C].
  """
  safe, weights = _occurrence_weights(ids)
  num_rows, batch = ids.shape
  overlap = jnp.zeros((num_rows, num_rows), jnp.float32)
  # S_pq = Σ_{k,k'} w_pk w_qk' [id_pk = id_qk']: B passes of P×P×B keep memory O(P²B).
  for k in range(batch):
    match = safe[:, None, :] == safe[None, :, k, None]  # [P, Q, B]
    overlap = overlap + jnp.einsum("pqb,pb,q->pq", match.astype(jnp.float32), weights,
                                   weights[:, k])

  def solve_column(x_c, y_c, l2_c):
    kernel = overlap * (jnp.outer(x_c, x_c) + 1.0) if linear else overlap
    kernel = kernel + l2_c * jnp.eye(num_rows, dtype=jnp.float32)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(kernel), True), y_c)

  dual = _map_columns(solve_column, (x, y, l2), serial)  # [P, C]
  return transpose(dual, ids, x, num_train, linear)


def _normal_equation_gap(predicted, theta, ids, x, y, l2, *, linear):
  num_train = theta.shape[0]
  rhs = transpose(y, ids, x, num_train, linear)
  gap = transpose(predicted, ids, x, num_train, linear) + l2 * theta - rhs
  num = jnp.sqrt(jnp.sum(gap * gap, axis=(0, 1)))
  den = jnp.sqrt(jnp.sum(rhs * rhs, axis=(0, 1)))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def _residual_floor(magnitude, theta, ids, x, y, l2, *, linear):
  """float32[C] how far float32 rounding alone can move the relative residual
  `_normal_equation_gap` of θ: ε·‖|X|ᵀ|X||θ| + l2|θ| + |X|ᵀ|y|‖ / ‖Xᵀy‖.

  The entries of (XᵀX + l2·I)θ − Xᵀy are sums of terms bounded by those of
  |X|ᵀ|X||θ| + l2|θ| + |X|ᵀ|y| (the usual bound of rounded dot products, ε the
  float32 machine epsilon): even the exact ridge solution, rounded to float32,
  measures up to about this (0.06–0.25 of it on dense tests), so a `tol` below it
  cannot be verified. `magnitude` is `forward(|θ|, ids, |x|)`, computed apart like
  `predicted` (see `_solve_cg`).
  """
  num_train = theta.shape[0]
  abs_x = jnp.abs(x)
  bound = (transpose(magnitude, ids, abs_x, num_train, linear) + l2 * jnp.abs(theta)
           + transpose(jnp.abs(y), ids, abs_x, num_train, linear))
  rhs = transpose(y, ids, x, num_train, linear)
  num = jnp.sqrt(jnp.sum(bound * bound, axis=(0, 1)))
  den = jnp.sqrt(jnp.sum(rhs * rhs, axis=(0, 1)))
  eps = jnp.finfo(jnp.float32).eps
  return jnp.where(den > 0, eps * num / jnp.where(den > 0, den, 1.0), 0.0)


def relative_residual(theta, ids, x, y, l2, *, linear):
  """‖(XᵀX + l2·I)θ − Xᵀy‖ / ‖Xᵀy‖ per column: float32[C] (0 where Xᵀy = 0).

  Single-device helper (l2: a scalar or float32[C]); `solve` uses the sharded kernels.
  """
  theta = jnp.asarray(theta, jnp.float32)
  l2 = jnp.broadcast_to(jnp.asarray(l2, jnp.float32), (theta.shape[-1],))
  predicted = jitted_forward(theta, jnp.asarray(ids, jnp.int32), jnp.asarray(x),
                             linear=linear)
  return jax.jit(functools.partial(_normal_equation_gap, linear=linear))(
      predicted, theta, jnp.asarray(ids, jnp.int32), jnp.asarray(x), jnp.asarray(y), l2)


def choose_method(num_train: int, num_rows: int, linear: bool,
                  batch_size: int = 8) -> str:
  """The solver "auto" picks: CG, unless the problem is tiny.

  Measured on the 2-core CPU (N = 200, P = 1536, M = 32): CG 0.02 s (B = 8) and
  0.3 s (B = 32), the normal equations 2–14 s and 23 s (their Gram matrices are built
  by P·(B·J)² scatter-adds, slow on CPU), the dual form 35 s and 155 s. The exact
  solvers win only below ~128 unknowns or rows, where CG's per-iteration host
  round trips dominate.
  """
  del batch_size  # the measurements favour CG at every batch size
  dim = (2 if linear else 1) * num_train
  if min(dim, num_rows) <= _EXACT_MAX_SIZE:
    return "normal" if dim <= num_rows else "dual"
  return "cg"


def _chunk_size(method, num_train, num_rows, batch, num_columns, linear, budget):
  blocks = 2 if linear else 1
  if method == "cg":
    # theta, residual, direction, z, product, rhs: ~8 [N, J] plus ~3 [P, B, J] per column.
    per_column = 4 * (8 * num_train * blocks + 3 * num_rows * batch * blocks)
  elif method == "normal":
    dim = blocks * num_train
    per_column = 4 * (2 * dim * dim + num_rows * (batch * blocks) ** 2)
  else:
    per_column = 4 * 2 * num_rows * num_rows
  return int(max(1, min(num_columns, budget // max(per_column, 1))))


def default_devices() -> list:
  """The devices `solve` shards columns over unless told otherwise.

  Every local device on accelerators; on CPU only the first, because forced host
  devices share the same cores (sharding buys nothing there), unless the environment
  sets SJ_SOLVER_SHARD_CPU=1. Only this process's devices: columns never cross
  processes, so a multi-process job solves the same problem on every process — on
  the host CPU, because XLA:TPU refuses a program on part of a slice ("device
  assignment should include all slice devices"), found by `simfluence_jax.plan`.
  """
  if jax.process_count() > 1:
    return jax.local_devices(backend="cpu")[:1]
  devices = jax.local_devices()
  if jax.default_backend() == "cpu" and os.environ.get("SJ_SOLVER_SHARD_CPU") != "1":
    return devices[:1]
  return devices


def column_mesh(devices: Optional[Sequence[Any]] = None) -> jax.sharding.Mesh:
  """A one-axis ("columns") mesh over `devices` (default `default_devices()`)."""
  if devices is not None and not isinstance(devices, (list, tuple)):
    raise ValueError(f"devices: expected a list of jax devices, got "
                     f"{type(devices).__name__} (pass [device] for one).")
  devices = default_devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("devices: expected at least one device, got none.")
  if not all(isinstance(d, jax.Device) for d in devices):
    raise ValueError(f"devices: expected jax devices (jax.devices()), got "
                     f"{[type(d).__name__ for d in devices]}.")
  if len(set(devices)) != len(devices):
    raise ValueError(f"devices: {devices} lists a device more than once.")
  return jax.sharding.Mesh(np.array(devices), (COLUMNS_AXIS,))


class _Kernels:
  """The solver's jitted kernels as `shard_map`s over one column mesh.

  Every input and output is either replicated (ids, tol) or split along its column
  axis; no kernel communicates between devices.
  """

  def __init__(self, mesh, num_train, linear, serial):
    def sharded(fn, in_specs, out_specs):
      return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs,
                                   out_specs=out_specs))
    rep, col, rows, theta = _REPLICATED, _PER_COLUMN, _ROWS_BY_COLUMN, _THETA
    static = dict(num_train=num_train, linear=linear)
    self.mesh = mesh
    self.cg_init = sharded(functools.partial(_cg_init, **static),
                           (rep, rows, rows, col, rep),
                           (theta, theta, theta, col, col, theta, col))
    self.forward = sharded(functools.partial(forward, linear=linear),
                           (theta, rep, rows), rows)
    self.cg_step = sharded(functools.partial(_cg_step, linear=linear),
                           (rows, theta, theta, theta, col, col, theta, rep, rows, col),
                           (theta, theta, theta, col, col, col))
    self.normal = sharded(functools.partial(_solve_normal, serial=serial, **static),
                          (rep, rows, rows, col), theta)
    self.dual = sharded(functools.partial(_solve_dual, serial=serial, **static),
                        (rep, rows, rows, col), theta)
    self.gap = sharded(functools.partial(_normal_equation_gap, linear=linear),
                       (rows, theta, rep, rows, rows, col), col)
    self.floor = sharded(functools.partial(_residual_floor, linear=linear),
                         (rows, theta, rep, rows, rows, col), col)
    self.select = sharded(lambda keep, a, b: jnp.where(keep, a, b),
                          (col, theta, theta), theta)
    self.cg_restart = sharded(functools.partial(_cg_restart, **static),
                              (rows, theta, col, theta, col, rep, rows, rows, col),
                              (theta, theta, col, col))


@functools.lru_cache(maxsize=32)
def _kernels(mesh, num_train, linear, serial=None):
  if serial is None:  # see `_map_columns`: only several CPU devices can deadlock
    serial = mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu"
  return _Kernels(mesh, num_train, linear, serial)


def _check_l2(l2, num_columns):
  """float32[C] penalties from a positive scalar or one per column."""
  values = np.asarray(l2, np.float64)
  if values.ndim == 0:
    values = np.full(num_columns, float(values))
  if values.shape != (num_columns,) or not np.all(np.isfinite(values)) or np.any(
      values <= 0):
    raise ValueError(f"l2: expected a positive number or {num_columns} positive values "
                     f"(one per column), got {np.asarray(l2).ravel()[:8].tolist()} "
                     f"of shape {np.shape(l2)}.")
  return values.astype(np.float32)


def _check_problem(ids, x, y, num_train, linear):
  """(ids int32[P, B], x float32[P, C], y float32[P, C]) of `solve`, validated.

  Host side, before anything is placed or compiled: every solver would otherwise
  drop or clamp out-of-range ids, truncate float ids, broadcast a short x (CG) or
  answer θ = 0, "converged", for a NaN row (CG's residual test is false for NaN).
  """
  if not _checks.is_int(num_train) or num_train < 1:
    raise ValueError(f"num_train: expected a positive integer, got {num_train!r}.")
  ids = np.asarray(ids)
  if ids.ndim != 2 or 0 in ids.shape or not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"ids: expected int[P, B] with P, B ≥ 1, got {ids.dtype} "
                     f"{list(ids.shape)}.")
  low, high = int(ids.min()), int(ids.max())
  if low < -1 or high >= num_train:
    raise ValueError(f"ids: must be in [-1, num_train={num_train}), found "
                     f"[{low}, {high}].")
  arrays = {}
  for name, value in (("y", y), ("x", x)):
    array = np.asarray(value)
    if not (np.issubdtype(array.dtype, np.floating) or
            np.issubdtype(array.dtype, np.integer)) or array.ndim != 2:
      raise ValueError(f"{name}: expected float32[P, C], got {array.dtype} "
                       f"{list(array.shape)}.")
    arrays[name] = array.astype(np.float32)
  x, y = arrays["x"], arrays["y"]
  if y.shape[0] != ids.shape[0] or y.shape[1] == 0:
    raise ValueError(f"y: expected float32[P={ids.shape[0]}, C ≥ 1] (one row per row "
                     f"of ids), got {list(y.shape)}.")
  if x.shape != y.shape:
    raise ValueError(f"x: expected float32{list(y.shape)} like y, got "
                     f"{list(x.shape)}.")
  for name, array in (("y", y), ("x", x)) if linear else (("y", y),):
    bad = _checks.first_nonfinite(array)
    if bad is not None:
      row, column = bad
      raise ValueError(f"{name}: contains NaN or inf (first at row {row}, column "
                       f"{column}).")
  return ids.astype(np.int32), x, y


def solve(ids: np.ndarray, x: np.ndarray, y: np.ndarray, num_train: int, l2: Any, *,
          linear: bool, method: str = "auto", tol: float = 1e-5, max_iters: int = 2000,
          memory_budget_bytes: Optional[int] = None,
          devices: Optional[Sequence[Any]] = None, warn: bool = True):
  """Solves the ridge problem of every column.

  Args:
    ids: int32[P, B] train ids of every row, in [-1, N), -1 = padding.
    x: float32[P, C] previous losses (the A features' scale; its values are ignored
      if additive, its shape is not).
    y: float32[P, C] targets, finite (x too when `linear`).
    num_train: N ≥ 1.
    l2: ridge strength, > 0: a scalar, or float32[C], one per column.
    linear: fit (A, B) if True, else B only.
    method: "auto" | "normal" | "cg" | "dual".
    tol: CG stopping rule, relative residual of the normal equations per column.
    max_iters: CG iteration cap.
    memory_budget_bytes: working-set bound per chunk of columns.
    devices: the devices the columns of each chunk are split over (a one-axis mesh
      "columns"); default `default_devices()`. The result does not depend on them.
    warn: `warnings.warn` when CG ends unconverged (see "converged" below).

  Returns:
    (θ float32[N, J, C] as a numpy array, info dict with "method", "iterations"
    (max over columns, 0 for exact methods), "relative_residual" (max over columns of
    the float32 residual recomputed from the returned θ), "converged" (every
    column's recomputed relative residual is ≤ `tol`, or ≤ its float32 rounding
    bound where that is larger (`_residual_floor`): CG's own stopping test reads
    its recursive residual, which can drift below tol while the true one stays
    above, and a float32 Cholesky of an ill-conditioned system can miss tol too),
    "residual_floor" (max over columns of that bound), "tol", "chunk_size",
    "num_chunks", "num_devices").
    Once CG meets tol it goes on a decade of residual at a time until θ settles
    (`_solve_cg`) and reports "unsettled" (max over columns of how far θ moved,
    relative to its size, in the last decade; None if it ran out of iterations
    first); above `UNSETTLED_LIMIT` θ is not determined to tol (runs sharing a
    curriculum leave directions CG resolves last) and `converged` is False.

  Raises:
    ValueError: naming the argument: ids not integer or out of [-1, N), x or y not
      float[P, C] of the same shape with P = the rows of ids, NaN/inf in y (or in x
      when `linear`), N < 1, a bad l2, method, tol or max_iters.
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}.")
  if not _checks.is_int(max_iters) or max_iters < 0:
    raise ValueError(f"max_iters: expected a non-negative integer, got {max_iters!r}.")
  if not np.isfinite(tol) or tol < 0:
    raise ValueError(f"tol: expected a non-negative number, got {tol!r}.")
  ids, x, y = _check_problem(ids, x, y, num_train, linear)
  num_rows, batch = ids.shape
  num_columns = y.shape[1]
  l2 = _check_l2(l2, num_columns)
  if method == "auto":
    method = choose_method(num_train, num_rows, linear, batch)
  mesh = column_mesh(devices)
  num_devices = mesh.devices.size
  kernels = _kernels(mesh, num_train, linear)
  budget = memory_budget_bytes or _DEFAULT_MEMORY_BUDGET
  chunk = _chunk_size(method, num_train, num_rows, batch, num_columns, linear, budget)
  chunk = -(-chunk // num_devices) * num_devices  # every device gets as many columns
  by_column = jax.sharding.NamedSharding(mesh, _ROWS_BY_COLUMN)
  per_column = jax.sharding.NamedSharding(mesh, _PER_COLUMN)
  ids_placed = jax.device_put(ids, jax.sharding.NamedSharding(mesh, _REPLICATED))
  tol_placed = jax.device_put(np.float32(tol),
                              jax.sharding.NamedSharding(mesh, _REPLICATED))
  thetas, iterations, residuals, floors, converged = [], [], [], [], True
  unsettled = []
  for start in range(0, num_columns, chunk):
    stop = min(start + chunk, num_columns)
    # Zero-pad the last chunk: a zero column has θ = 0 and costs no recompile.
    pad = (0, chunk - (stop - start))
    x_chunk = jax.device_put(np.pad(x[:, start:stop], ((0, 0), pad)), by_column)
    y_chunk = jax.device_put(np.pad(y[:, start:stop], ((0, 0), pad)), by_column)
    l2_chunk = jax.device_put(np.pad(l2[start:stop], pad, constant_values=1.0),
                              per_column)
    columns = stop - start
    if method == "cg":
      # `converged` reads the residual recomputed from θ (CG's own stopping test
      # reads its recursive one, which drifts from it in float32): met where it
      # is within tol, or within float32 rounding where tol is below that.
      theta, iters, gap, floor, moved = _solve_cg(
          kernels, ids_placed, x_chunk, y_chunk, l2_chunk, tol_placed,
          max_iters=max_iters, restart_sharding=per_column, settle=tol > 0)
      unsettled.append(float(np.max(moved[:columns])))
      converged = converged and unsettled[-1] <= UNSETTLED_LIMIT
      iterations.append(int(np.max(iters)))
    else:
      theta = (kernels.normal if method == "normal" else kernels.dual)(
          ids_placed, x_chunk, y_chunk, l2_chunk)
      # The same test as CG's: a float32 Cholesky of an ill-conditioned system
      # misses tol (a review's 'dual' solve: 9e-4 with tol 1e-5, θ 2% off).
      gap, floor = _true_residual(kernels, theta, ids_placed, x_chunk, y_chunk,
                                  l2_chunk)
    gap, floor = gap[:columns], floor[:columns]
    floors.append(float(np.max(floor)))
    converged = converged and bool(np.all(gap <= np.maximum(tol, floor)))
    residuals.append(float(np.max(gap)))
    thetas.append(np.asarray(theta)[:, :, :columns])
    if not np.all(np.isfinite(thetas[-1])):
      # float32 Cholesky of an ill-conditioned system: never hand back NaN θ.
      raise ValueError(
          f"simulators.solve: the {method!r} solve returned non-finite parameters "
          f"(ill-conditioned at l2={float(np.min(l2[start:stop])):g}); use a larger "
          "l2 or method='cg'.")
  info = {"method": method, "iterations": max(iterations, default=0),
          "relative_residual": max(residuals), "converged": bool(converged),
          "tol": float(tol), "chunk_size": chunk,
          "num_chunks": math.ceil(num_columns / chunk), "num_devices": num_devices,
          "residual_floor": max(floors)}
  theta = np.concatenate(thetas, axis=-1)
  if unsettled:
    # None: CG ran out of iterations before θ's settling could be measured.
    info["unsettled"] = max(unsettled) if np.isfinite(max(unsettled)) else None
  theta = _float64_check(theta, info, ids, x, y, l2, num_train, linear)
  if not info["converged"] and warn:
    warnings.warn(f"simulators.solve: {unconverged_message(info, max_iters)}.",
                  RuntimeWarning, stacklevel=2)
  return theta, info


# The float64 check (`_float64_check`): problems it is charged at most this many
# multiply-adds for (`_float64_check_cost`) are solved again on the host in
# float64; the default job's Linear CV (1536 rows × 400² × 160 columns: 32
# test examples × 5 l2 values, 4 folds and the final fit) took about 8 s of it
# before the Grams were summed from the rows' nonzeros (one such solve 1.37 →
# 0.63 s, 0.4 s of it `np.linalg.solve`; `_weighted_grams`).
FLOAT64_CHECK_MAX_FLOPS = 1e11


def worst_block_error(got, exact) -> float:
  """The largest relative error of a parameter block of some column,
  ‖got − exact‖ / ‖exact‖ over each block's rows; got, exact: float[J, W, C]
  (blocks, their rows, columns); 0 for blocks that are 0 in `exact`."""
  exact = np.asarray(exact, np.float64)
  size = np.linalg.norm(exact, axis=1)  # [J, C]
  off = np.linalg.norm(np.asarray(got, np.float64) - exact, axis=1) / np.where(
      size > 0, size, 1.0)
  return float(np.max(np.where(size > 0, off, 0.0)))


_FLOAT64_BYTES = 1 << 28  # working set of one chunk of columns' float64 solve


def _weighted_grams(s: np.ndarray, w: np.ndarray) -> np.ndarray:
  """float64[C, W, W]: Sᵀ diag(w_c) S for each column c of `w` float[P, C], S =
  `s` float64[P, W].

  Rows with at most K nonzeros, K² · 64 ≤ W² (occurrence counts: K is the batch
  size): summed as the K² products of each row's nonzeros (`np.bincount`, P·K² a
  column); else GEMMs of the w-scaled Sᵀ against S, a few columns at a time (their
  [C', W, P] copies within `_FLOAT64_BYTES`). At P = 2000, W = 400, C = 16 (8
  occurrences a row), both Grams of `dense_float64_ridge`: 5.6 s accumulating every
  row's outer product s_p s_pᵀ (P·W² floats written), 0.5 s as GEMMs, 0.07 s from
  the nonzeros (2-core CPU; the whole float64 solve 5.6 → 0.3 s).
  """
  num_rows, width = s.shape
  columns = w.shape[1]
  nonzero = s != 0
  k = max(1, int(nonzero.sum(1).max(initial=0)))
  if k * k * 64 <= width * width:
    # Rows in blocks: their [rows, K, K] pairs and products (and their argsort over
    # [rows, W]) within _FLOAT64_BYTES (review h81: 5.7 GB at P = 83000, K = 50).
    out = np.zeros((columns, width * width))
    block = max(1, _FLOAT64_BYTES // (8 * (3 * k * k + 2 * width)))
    for start in range(0, num_rows, block):
      idx = np.argsort(~nonzero[start:start + block], axis=1,
                       kind="stable")[:, :k]  # nonzeros first
      vals = np.take_along_axis(s[start:start + block], idx, axis=1)  # 0 past them
      pairs = (idx[:, :, None] * width + idx[:, None, :]).reshape(len(idx), -1)
      products = (vals[:, :, None] * vals[:, None, :]).reshape(len(idx), -1)
      for c in range(columns):
        out[c] += np.bincount(pairs.ravel(), minlength=width * width,
                              weights=(products * w[start:start + block, c, None]).ravel())
    return out.reshape(columns, width, width)
  out = np.empty((columns, width, width))
  step = max(1, _FLOAT64_BYTES // (8 * width * num_rows))
  for start in range(0, columns, step):
    out[start:start + step] = (s.T[None] * w[:, start:start + step].T[:, None, :]) @ s
  return out


def dense_float64_ridge(rows, x, y, l2, *, linear: bool) -> np.ndarray:
  """The ridge problem of every column with design [x_c ⊙ S, S] (linear) or S,
  S = `rows` float[P, W] (occurrence counts, or a featurized fit's summed
  features), solved on the host in float64 from the dense normal equations.

  Returns:
    float64[J·W, C] (the x-scaled block's rows first).
  """
  s = np.asarray(rows, np.float64)
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  l2 = np.asarray(l2, np.float64)
  width, columns = s.shape[1], y.shape[1]
  plain = s.T @ s  # [W, W]
  if not linear:
    grams = plain[None] + l2[:, None, None] * np.eye(width)[None]
    rhs = (s.T @ y).T  # [C, W]
  else:
    # Per column c: [[Sᵀ diag(x_c²) S, Sᵀ diag(x_c) S], [·ᵀ, SᵀS]].
    # Both from one call: the nonzeros' pairs and products are found once.
    squared, weighted = np.split(_weighted_grams(s, np.concatenate([x * x, x], 1)), 2)
    grams = np.block([[squared, weighted],
                      [weighted.transpose(0, 2, 1),
                       np.broadcast_to(plain, (columns, width, width))]])
    grams += l2[:, None, None] * np.eye(2 * width)[None]
    rhs = np.concatenate([s.T @ (x * y), s.T @ y]).T  # [C, 2W]
  return np.linalg.solve(grams, rhs[..., None])[..., 0].T


def _float64_solution(ids, x, y, l2, num_train: int, linear: bool):
  """θ float64[N, J, C]: `dense_float64_ridge` of the occurrence counts, in chunks
  of columns whose float64 working set stays within `_FLOAT64_BYTES`."""
  num_rows, batch = ids.shape
  counts = np.zeros((num_rows, num_train + 1))
  np.add.at(counts, (np.repeat(np.arange(num_rows), batch),
                     np.where(ids >= 0, ids, num_train).ravel()), 1.0)
  counts = counts[:, :num_train]
  per_column = 8 * 10 * num_train ** 2  # Gram blocks, Gram matrix and its solve
  step = max(1, _FLOAT64_BYTES // per_column)
  theta = np.concatenate([
      dense_float64_ridge(counts, x[:, c:c + step], y[:, c:c + step], l2[c:c + step],
                          linear=linear)
      for c in range(0, y.shape[1], step)], axis=1)  # [J·N, C]
  return theta.reshape(-1, num_train, y.shape[1]).transpose(1, 0, 2)


# What one scatter-add of `np.bincount` costs in multiply-adds of a GEMM, as the
# float64 check's budget counts them (review h81: ≈ 5 ns an element on the 2-core
# CPU, against ≈ 0.05 ns a multiply-add in a float64 GEMM).
_SCATTER_COST = 100


def _float64_check_cost(ids_shape, num_train: int, columns: int,
                        linear: bool) -> float:
  """Multiply-adds that `_float64_check` is charged for a problem of `ids_shape`
  (rows, batch): the dense normal equations' rows × unknowns² × columns, the budget's
  measure since review h32; or, where that is more, what the check costs since
  `_weighted_grams` sums occurrence counts from each row's nonzeros: the columns'
  solves (unknowns³ / 3 each), rows × batch² scatter-adds a column (`_SCATTER_COST`
  each; all rows × unknowns² multiply-adds when the counts are too dense for that),
  and SᵀS (rows × num_train²) once per chunk of columns `_float64_solution` solves
  together. The lesser of the two, so that no problem the budget checked before goes
  unchecked (a problem with few rows keeps being charged less than its solves cost):
  6144 rows × 400² × 160 columns (the default job's CV at 192 fitted runs, 1.6e11)
  was skipped, and is charged 1.0e10 now (measured: about 1 s)."""
  rows, batch = ids_shape
  unknowns = (2 if linear else 1) * num_train
  dense = rows * unknowns ** 2 * columns
  per_row = (_SCATTER_COST * batch ** 2 if batch * batch * 64 <= num_train ** 2
             else num_train ** 2)
  chunks = -(-columns // max(1, _FLOAT64_BYTES // (8 * 10 * num_train ** 2)))
  return min(dense, columns * (unknowns ** 3 / 3 + rows * per_row)
             + chunks * rows * num_train ** 2)


def _float64_check(theta, info, ids, x, y, l2, num_train: int, linear: bool):
  """θ checked against the float64 solution where that is cheap
  (`FLOAT64_CHECK_MAX_FLOPS`): replaced by it (rounded to float32) where the solve
  did not converge or a parameter block (A or B) of some column is more than
  `UNSETTLED_LIMIT` off it. Review h32: at losses ~100 with runs sharing
  curricula, A's block is 100× smaller than B's, so the residual and settling
  tests, over both blocks, passed with A 15-120% off (CG and the float32
  Cholesky alike). Records info["float64_check"]: "agreed", "replaced" (then
  `converged` True, "relative_residual" that of the float64 solution rounded to
  float32, "replaced_off" the largest block error) or "skipped" (too large).
  """
  if (_float64_check_cost(ids.shape, num_train, y.shape[1], linear)
      > FLOAT64_CHECK_MAX_FLOPS
      or 8 * ids.shape[0] * (num_train + 1) > _FLOAT64_BYTES):  # the dense counts
    info["float64_check"] = "skipped"
    return theta
  exact = _float64_solution(ids, x, y, l2, num_train, linear)
  worst = worst_block_error(np.transpose(theta, (1, 0, 2)),
                            np.transpose(exact, (1, 0, 2)))
  if info["converged"] and worst <= UNSETTLED_LIMIT:
    info["float64_check"] = "agreed"
    return theta
  theta = exact.astype(np.float32)
  info.update(float64_check="replaced", converged=True, replaced_off=worst,
              relative_residual=float(np.max(relative_residual(
                  theta, ids, x, y, l2, linear=linear))))
  return theta


def unconverged_message(info: dict, max_iters: int) -> str:
  """Why a solve's `info` has converged False, and what to do: CG ran out of
  iterations, or its recursive residual met tol while the recomputed one did not
  (float32 drift that restarting from its solution did not cure); an exact
  method's float32 Cholesky solution missed tol (an ill-conditioned system)."""
  found = (f"relative residual {info['relative_residual']:.3g}, tol={info['tol']:g}"
           + (f" (float32 rounding: {info['residual_floor']:.2g})"
              if "residual_floor" in info else ""))
  if info.get("method") in ("normal", "dual"):
    return (f"the float32 Cholesky solution of method={info['method']!r} misses "
            f"tol: {found}; the system is ill-conditioned (raise l2, or use "
            "method='cg')")
  if info.get("iterations", max_iters) >= max_iters:
    return (f"CG stopped at max_iters={max_iters} before every column converged: "
            f"{found} (raise max_iters or l2, or pick method='normal'/'dual' for "
            "small problems)")
  if "unsettled" in info and info["unsettled"] is None:
    return (f"CG met tol ({found}) but ran out of iterations (max_iters="
            f"{max_iters}) while checking that θ had settled (raise max_iters or "
            "l2)")
  if (info.get("unsettled") or 0.0) > UNSETTLED_LIMIT:
    return (f"the residual meets tol ({found}) but θ has not settled: it still "
            f"moved by {info['unsettled']:.2g} of its size while CG took the "
            f"residual another decade down (limit {UNSETTLED_LIMIT:g}), so it can "
            "be off by more in directions the runs barely determine (fewer rows "
            "than parameters, runs sharing a curriculum); lower tol, raise l2, fit "
            "on more runs with more varied curricula, or pick method='normal'/"
            "'dual' for small problems")
  return (f"CG's recursive residual met tol after {info['iterations']} iterations "
          f"but the residual recomputed from its solution did not, nor after "
          f"restarts from it: {found} (raise l2 or tol, or pick method='normal'/"
          "'dual' for small problems)")
