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
  step, Xᵀr a scatter-add of the P·B occurrences. The preconditioner is the exact
  2×2 block of each train id (A_i and B_i are nearly collinear because x varies
  slowly, which is what makes plain Jacobi slow). Memory O((P·B + N)·J·C).
  The iteration loop runs on the host over jitted halves (see `_solve_cg`).
* "normal": the D×D Gram matrix (D = J·N) per column built by scatter-add of the
  (B·J)² feature pairs of every row, solved by Cholesky. Memory O(D²·C): small N.
* "dual": θ = Xᵀ(XXᵀ + l2·I)⁻¹y with the P×P kernel
  K_c = S ∘ (x_c x_cᵀ + 1) (linear) or S (additive), S_pq = Σ_i n_pi n_qi the
  batch-overlap counts shared by all columns; Cholesky. Memory O(P²·C): few rows.
* "auto": the exact Cholesky solver with the smaller system when min(D, P) ≤ 512,
  else "cg".

Columns are processed in chunks sized so that one chunk's working set stays under
`memory_budget_bytes` (the last chunk is zero-padded so every chunk has the same
shape and compiles once).
"""

import functools
import math
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("auto", "normal", "cg", "dual")
_EXACT_MAX_SIZE = 512
_DEFAULT_MEMORY_BUDGET = 1 << 28  # bytes of float32 working set per chunk


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
  # One row gather per batch slot: XLA:CPU runs B gathers of [P, J·C] rows ~10x
  # faster than one gather of a [P, B, J·C] block.
  num_train, blocks, columns = theta.shape
  # A zero row at index N serves the padding ids, so every index is in bounds and
  # the gathers need no bounds checks.
  flat = jnp.concatenate([theta.reshape(num_train, blocks * columns),
                          jnp.zeros((1, blocks * columns), theta.dtype)])
  slots = jnp.transpose(_padding_to_end(ids, num_train))  # [B, P]: contiguous slots
  summed = flat.at[slots[0]].get(mode="promise_in_bounds")
  for k in range(1, ids.shape[1]):
    summed = summed + flat.at[slots[k]].get(mode="promise_in_bounds")
  summed = summed.reshape(-1, blocks, columns)
  # Explicit combination: a features-product-and-reduce makes XLA fuse the gathers
  # into the reduction, which is ~30x slower on CPU.
  return summed[:, 0] * x + summed[:, 1] if linear else summed[:, 0]


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
  blocks, columns = (2 if linear else 1), residual.shape[1]
  # [P, J·C] rows, A part first, as in θ's [N, J, C] layout.
  per_row = jnp.concatenate([x * residual, residual], axis=1) if linear else residual
  # Materialise the rows once: fused into the B scatters' updates, the producer
  # (often `forward`'s gathers) would be recomputed per slot, ~10x slower on CPU.
  per_row = jax.lax.optimization_barrier(per_row)
  slots = jnp.transpose(_padding_to_end(ids, num_train))  # [B, P]
  # One scatter per batch slot (see `forward`); padding lands in a spare row N.
  out = jnp.zeros((num_train + 1, blocks * columns), jnp.float32)
  for k in range(ids.shape[1]):
    out = out.at[slots[k]].add(per_row, mode="promise_in_bounds")
  return out[:num_train].reshape(num_train, blocks, columns)


def _gram_matvec(theta, ids, x, l2, linear):
  num_train = theta.shape[0]
  return transpose(forward(theta, ids, x, linear), ids, x, num_train, linear) + l2 * theta


def _block_preconditioner(ids, x, l2, num_train, linear):
  """Inverse of the per-train-id J×J diagonal blocks of XᵀX + l2·I.

  Feature i of row p has value n_pi·f_p (n_pi = multiplicity of i in the batch), so
  the block is Σ_p n_pi² f_p f_pᵀ. Σ_p n_pi² is a scatter-add over occurrences of
  each occurrence's multiplicity within its batch.

  Returns:
    The block inverses: float32[N, 1, C] (additive) or the symmetric 2×2 inverse
    entries (0,0), (0,1), (1,1) as float32[N, 3, C] (linear).
  """
  safe, weights = _occurrence_weights(ids)
  same = (safe[:, :, None] == safe[:, None, :]).astype(jnp.float32)
  multiplicity = jnp.einsum("pab,pa,pb->pa", same, weights, weights)  # [P, B]
  feats = _features(x, linear)  # [P, J, C]
  products = feats[:, :, None, :] * feats[:, None, :, :]  # [P, J, J, C]
  shape = products.shape[1:]
  products = products.reshape(products.shape[0], -1)
  slots = jnp.transpose(_padding_to_end(ids, num_train))  # [B, P]
  blocks = jnp.zeros((num_train + 1, products.shape[1]), jnp.float32)
  for k in range(ids.shape[1]):  # per-slot scatters, as in `transpose`
    blocks = blocks.at[slots[k]].add(multiplicity[:, k, None] * products,
                                     mode="promise_in_bounds")
  blocks = blocks[:num_train].reshape((num_train,) + shape)
  blocks = blocks + l2 * jnp.eye(shape[0], dtype=jnp.float32)[:, :, None]
  if not linear:
    return 1.0 / blocks[:, 0]  # [N, 1, C]
  a, b, d = blocks[:, 0, 0], blocks[:, 0, 1], blocks[:, 1, 1]
  det = a * d - b * b  # > 0: a PSD block plus l2·I with l2 > 0
  return jnp.stack([d / det, -b / det, a / det], axis=1)  # [N, 3, C]


def _apply_preconditioner(inverse, r):
  """Applies the block inverses of `_block_preconditioner` to r: float32[N, J, C]."""
  if inverse.shape[1] == 1:
    return inverse * r
  return jnp.stack([inverse[:, 0] * r[:, 0] + inverse[:, 1] * r[:, 1],
                    inverse[:, 1] * r[:, 0] + inverse[:, 2] * r[:, 1]], axis=1)


def _dot(u, v):
  return jnp.sum(u * v, axis=(0, 1))


@functools.partial(jax.jit, static_argnames=("num_train", "linear"))
def _cg_init(ids, x, y, l2, tol, *, num_train, linear):
  rhs = transpose(y, ids, x, num_train, linear)
  inverse = _block_preconditioner(ids, x, l2, num_train, linear)
  target = tol * jnp.sqrt(_dot(rhs, rhs))
  z = _apply_preconditioner(inverse, rhs)
  return jnp.zeros_like(rhs), rhs, z, _dot(rhs, z), target, inverse


@functools.partial(jax.jit, static_argnames=("linear",))
def jitted_forward(theta, ids, x, *, linear):
  """`forward`, compiled on its own (see `_solve_cg` for why that matters)."""
  return forward(theta, ids, x, linear)


@functools.partial(jax.jit, static_argnames=("linear",))
def _cg_step(predicted, theta, residual, direction, rz, target, inverse, ids, x, l2, *,
             linear):
  """One PCG update given X·direction; frozen columns (converged) get step 0."""
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
  direction = z + beta * direction
  still_live = jnp.sqrt(_dot(residual, residual)) > target
  return theta, residual, direction, rz_new, jnp.any(still_live), live


def _solve_cg(ids, x, y, l2, tol, *, num_train, linear, max_iters):
  """Block-Jacobi preconditioned CG, all columns at once.

  The loop runs on the host over two jitted halves (X·d, then Xᵀ(·) and the
  update): compiled as one program (e.g. a `lax.while_loop`), XLA:CPU fuses the
  gathers of X·d into the scatters of Xᵀ and the matvec is ~15x slower.

  Returns:
    (θ float32[N, J, C], iterations int32[C]).
  """
  theta, residual, direction, rz, target, inverse = _cg_init(ids, x, y, l2, tol,
                                                    num_train=num_train, linear=linear)
  iterations = jnp.zeros(y.shape[1], jnp.int32)
  any_live = bool(jnp.any(jnp.sqrt(_dot(residual, residual)) > target))
  for it in range(max_iters):
    if not any_live:
      break
    predicted = jitted_forward(direction, ids, x, linear=linear)
    theta, residual, direction, rz, live_after, live = _cg_step(
        predicted, theta, residual, direction, rz, target, inverse, ids, x, l2,
        linear=linear)
    iterations = iterations + live.astype(jnp.int32)
    # Sync with the host only every few steps to keep dispatch asynchronous;
    # converged columns are frozen (step 0), so extra steps change nothing.
    if it % 4 == 3:
      any_live = bool(live_after)
  return theta, iterations


@functools.partial(jax.jit, static_argnames=("num_train", "linear"))
def _solve_normal(ids, x, y, l2, *, num_train, linear):
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

  def gram_of_column(column_values):
    pairs = column_values[:, :, None] * column_values[:, None, :]
    gram = jnp.zeros((dim, dim), jnp.float32).at[rows, cols].add(pairs.reshape(-1))
    return gram + l2 * jnp.eye(dim, dtype=jnp.float32)

  grams = jax.vmap(gram_of_column, in_axes=2)(values)  # [C, D, D]
  rhs = transpose(y, ids, x, num_train, linear)  # [N, J, C]
  rhs = jnp.transpose(rhs, (2, 1, 0)).reshape(rhs.shape[-1], dim)  # [C, D]
  factor = jnp.linalg.cholesky(grams)
  solution = jax.vmap(lambda f, b: jax.scipy.linalg.cho_solve((f, True), b))(factor, rhs)
  return jnp.transpose(solution.reshape(-1, num_blocks, num_train), (2, 1, 0))


@functools.partial(jax.jit, static_argnames=("num_train", "linear"))
def _solve_dual(ids, x, y, l2, *, num_train, linear):
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

  def solve_column(x_c, y_c):
    kernel = overlap * (jnp.outer(x_c, x_c) + 1.0) if linear else overlap
    kernel = kernel + l2 * jnp.eye(num_rows, dtype=jnp.float32)
    return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(kernel), True), y_c)

  dual = jax.vmap(solve_column, in_axes=(1, 1), out_axes=1)(x, y)  # [P, C]
  return transpose(dual, ids, x, num_train, linear)


@functools.partial(jax.jit, static_argnames=("linear",))
def _normal_equation_gap(predicted, theta, ids, x, y, l2, *, linear):
  num_train = theta.shape[0]
  rhs = transpose(y, ids, x, num_train, linear)
  gap = transpose(predicted, ids, x, num_train, linear) + l2 * theta - rhs
  num = jnp.sqrt(jnp.sum(gap * gap, axis=(0, 1)))
  den = jnp.sqrt(jnp.sum(rhs * rhs, axis=(0, 1)))
  return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def relative_residual(theta, ids, x, y, l2, *, linear):
  """‖(XᵀX + l2·I)θ − Xᵀy‖ / ‖Xᵀy‖ per column: float32[C] (0 where Xᵀy = 0)."""
  predicted = jitted_forward(theta, ids, x, linear=linear)
  return _normal_equation_gap(predicted, theta, ids, x, y, l2, linear=linear)


def choose_method(num_train: int, num_rows: int, linear: bool) -> str:
  """The solver "auto" picks: exact Cholesky on the smaller system when it is small."""
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


def _column_sharding():
  """Shards the column (test-example) axis over this process's devices, if several.

  Columns are independent problems, so XLA partitions every solver op along them with
  no communication but the scalar convergence checks.
  """
  devices = jax.local_devices()
  if len(devices) == 1:
    return None
  if jax.default_backend() == "cpu" and (
      jax.process_count() > 1 or os.environ.get("SJ_SOLVER_SHARD_CPU") != "1"):
    # CPU "devices" (forced host devices) share the same cores, so sharding buys
    # nothing, and its collectives are fragile: gloo (multi-process) deadlocks on a
    # mesh of one process's devices, and on an oversubscribed machine XLA's in-process
    # rendezvous can hit its termination timeout and abort. Solve on one device
    # unless SJ_SOLVER_SHARD_CPU=1 (tests of the sharded path); accelerators shard.
    return None
  mesh = jax.sharding.Mesh(np.array(devices), ("columns",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "columns"))


def solve(ids: np.ndarray, x: np.ndarray, y: np.ndarray, num_train: int, l2: float, *,
          linear: bool, method: str = "auto", tol: float = 1e-5, max_iters: int = 2000,
          memory_budget_bytes: Optional[int] = None):
  """Solves the ridge problem of every column.

  Args:
    ids: int32[P, B] train ids of every row, -1 = padding.
    x: float32[P, C] previous losses (the A features' scale; ignored if additive).
    y: float32[P, C] targets.
    num_train: N.
    l2: ridge strength, > 0.
    linear: fit (A, B) if True, else B only.
    method: "auto" | "normal" | "cg" | "dual".
    tol: CG stopping rule, relative residual of the normal equations per column.
    max_iters: CG iteration cap.
    memory_budget_bytes: working-set bound per chunk of columns.

  With several local accelerator devices, each chunk's columns are sharded over them
  (a mesh axis named "columns"; on CPU only with SJ_SOLVER_SHARD_CPU=1, see
  `_column_sharding`); the result does not depend on the number of devices.

  Returns:
    (θ float32[N, J, C] as a numpy array, info dict with "method", "iterations"
    (max over columns, 0 for exact methods), "relative_residual" (max over
    columns), "chunk_size").
  """
  if method not in METHODS:
    raise ValueError(f"method: expected one of {METHODS}, got {method!r}.")
  ids = jnp.asarray(ids, jnp.int32)
  x = np.asarray(x, np.float32)
  y = np.asarray(y, np.float32)
  num_rows, batch = ids.shape
  num_columns = y.shape[1]
  if method == "auto":
    method = choose_method(num_train, num_rows, linear)
  budget = memory_budget_bytes or _DEFAULT_MEMORY_BUDGET
  chunk = _chunk_size(method, num_train, num_rows, batch, num_columns, linear, budget)
  sharding = _column_sharding()
  if sharding is not None:  # Every device gets the same number of columns.
    num_devices = len(jax.local_devices())
    chunk = -(-chunk // num_devices) * num_devices
  place = (jnp.asarray if sharding is None else
           lambda a: jax.device_put(a, sharding))
  l2 = jnp.float32(l2)
  thetas, iterations, residuals = [], [], []
  for start in range(0, num_columns, chunk):
    stop = min(start + chunk, num_columns)
    # Zero-pad the last chunk: a zero column has θ = 0 and costs no recompile.
    pad = ((0, 0), (0, chunk - (stop - start)))
    x_chunk = place(np.pad(x[:, start:stop], pad))
    y_chunk = place(np.pad(y[:, start:stop], pad))
    if method == "cg":
      theta, iters = _solve_cg(ids, x_chunk, y_chunk, l2, jnp.float32(tol),
                               num_train=num_train, linear=linear, max_iters=max_iters)
      iterations.append(int(jnp.max(iters)))
    elif method == "normal":
      theta = _solve_normal(ids, x_chunk, y_chunk, l2, num_train=num_train,
                            linear=linear)
    else:
      theta = _solve_dual(ids, x_chunk, y_chunk, l2, num_train=num_train, linear=linear)
    residuals.append(float(jnp.max(
        relative_residual(theta, ids, x_chunk, y_chunk, l2, linear=linear))))
    thetas.append(np.asarray(theta)[:, :, :stop - start])
  info = {"method": method, "iterations": max(iterations, default=0),
          "relative_residual": max(residuals), "chunk_size": chunk,
          "num_chunks": math.ceil(num_columns / chunk)}
  return np.concatenate(thetas, axis=-1), info
