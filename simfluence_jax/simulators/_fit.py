"""Fitting simulators to a `Trace`, and attribution scores as additive simulators."""

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import trace as trace_lib
from simfluence_jax.simulators import _simulator
from simfluence_jax.simulators import _solver


def _check_trace(trace):
  if not isinstance(trace, trace_lib.Trace):
    raise ValueError(f"trace: expected a simfluence_jax.Trace, got {type(trace).__name__}.")


def fit(kind: str, trace: trace_lib.Trace, l2: float = 1e-3, *,
        prior_alpha: Optional[float] = None, method: str = "auto", tol: float = 1e-5,
        max_iters: int = 2000, memory_budget_bytes: Optional[int] = None,
        name: Optional[str] = None) -> _simulator.Simulator:
  """Fits Simfluence-Linear or -Additive by ridge regression on every recorded step.

  Objective, independently for every test example m (rows = all steps t of all runs r
  of `trace`, n_i = multiplicity of id i in the batch c_t, padding ids ignored):

    linear:    Σ_{r,t} (L_t − Σ_i n_i A_i·L_{t−1} − Σ_i n_i B_i)² + l2·(‖A − a₀‖² + ‖B‖²)
    additive:  Σ_{r,t} (L_t − L_{t−1} − Σ_i n_i B_i)² + l2·‖B‖²

  The prior centre of A is a₀ = prior_alpha / b̄ (b̄ = mean number of valid ids per
  batch); the default prior_alpha = 1 centres α(c_t) ≈ 1, i.e. shrinks towards the
  "nothing changes" simulator L_t = L_{t−1} (shrinking A to 0 instead would predict
  the loss collapses to β for batches of rarely seen examples). prior_alpha = 0 gives
  plain ridge.

  Args:
    kind: "linear" or "additive".
    trace: the training runs to fit on.
    l2: ridge strength, > 0.
    prior_alpha: α of a typical batch under the prior (default 1.0; linear only).
    method: solver, "auto" | "normal" | "cg" | "dual" (see `_solver`).
    tol: CG relative-residual tolerance.
    max_iters: CG iteration cap.
    memory_budget_bytes: working-set bound per chunk of test examples.
    name: label for reports (default "simfluence_<kind>").

  Returns:
    A `Simulator` with `fit_info` (method, iterations, relative_residual, ...).
  """
  if kind not in _simulator.KINDS:
    raise ValueError(f"kind: expected one of {_simulator.KINDS}, got {kind!r}.")
  _check_trace(trace)
  if (isinstance(l2, bool) or not isinstance(l2, (int, float, np.number))
      or not np.isfinite(l2) or l2 <= 0):
    raise ValueError(f"l2: expected a positive number, got {l2!r}.")
  if method not in _solver.METHODS:
    raise ValueError(f"method: expected one of {_solver.METHODS}, got {method!r}.")
  linear = kind == "linear"
  num_train = trace.num_train_examples
  ids = np.asarray(trace.batch_ids).reshape(-1, trace.batch_size)
  losses = np.asarray(trace.losses, np.float32)
  x = losses[:, :-1].reshape(-1, trace.num_test_examples)
  y = losses[:, 1:].reshape(-1, trace.num_test_examples)
  counts = np.sum(ids >= 0, axis=1).astype(np.float32)
  if linear:
    prior_alpha = 1.0 if prior_alpha is None else float(prior_alpha)
    prior_a = prior_alpha / max(float(np.mean(counts)), 1.0)
    target = y - x * (prior_a * counts[:, None])
  else:
    prior_a = 0.0
    target = y - x
  theta, info = _solver.solve(ids, x, target, num_train, l2, linear=linear,
                              method=method, tol=tol, max_iters=max_iters,
                              memory_budget_bytes=memory_budget_bytes)
  residual = np.asarray(target) - np.asarray(_solver.jitted_forward(
      jnp.asarray(theta), jnp.asarray(ids), jnp.asarray(x), linear=linear))
  noise_var = np.mean(residual ** 2, axis=0).astype(np.float32)
  info = dict(info, l2=float(l2), prior_a=float(prior_a),
              noise_std_mean=float(np.mean(np.sqrt(noise_var))))
  a = (theta[:, 0] + prior_a).astype(np.float32) if linear else None
  b = theta[:, -1].astype(np.float32)
  posterior = _simulator.Posterior(
      ids=ids, x=x, y=target, noise_var=noise_var, prior_a=np.float32(prior_a),
      l2=float(l2), method=info["method"])
  return _simulator.Simulator(
      A=None if a is None else jnp.asarray(a), B=jnp.asarray(b), posterior=posterior,
      kind=kind, name=name or f"simfluence_{kind}",
      fit_info_items=tuple(sorted(info.items())))


def additive_from_scores(B, name: str = "scores") -> _simulator.Simulator:
  """Wraps per-step loss changes as an additive simulator L_t = L_{t−1} + Σ_{i∈c_t} B_i.

  Args:
    B: float32[N, M], the loss change of test example m when i is in a batch.
    name: label for reports.
  """
  b = np.asarray(B, np.float32)
  if b.ndim != 2 or not np.all(np.isfinite(b)):
    raise ValueError(f"B: expected finite float[N, M], got shape {b.shape}.")
  return _simulator.Simulator(A=None, B=jnp.asarray(b), kind="additive", name=name)


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
  of valid ids. Train examples never seen get 0. With an adaptive optimizer η_t is
  the recorded learning rate (the preconditioner is ignored).

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
  return additive_from_scores(b.astype(np.float32), name=name)
