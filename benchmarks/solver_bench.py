"""Simfluence-Linear fit vs scikit-learn `Ridge` on a sparse design (docs/design.md §7).

Synthetic trace from the linear model (N train examples, M test examples, R·T
steps, batch B, small noise). Both sides minimise the same objective
Σ (y − Xθ)² + l2‖θ − θ₀‖² (fit's default prior, applied to sklearn by shifting the
targets exactly as `fit` does). sklearn fits one test example at a time on a
scipy CSR design (indices built once, only the A-column values change per
example): what a careful user would write. Relative residuals of the normal
equations ‖(XᵀX + l2 I)θ − Xᵀy‖ / ‖Xᵀy‖ are printed side by side, computed in
float64 for both. The ratio is taken at equal residual: `fit` goes on past tol until
θ settles, so sklearn is asked for the residual ours reached (its time at tol itself
is printed too).

  python benchmarks/solver_bench.py            # N=2000, M=64, R·T=10 000, B=8
  python benchmarks/solver_bench.py --quick    # smaller
  python benchmarks/solver_bench.py --quick --cv  # also: fit_cv vs a loop of fits

`--cv` times `simulators.fit_cv` (every l2 of the grid solved as extra columns of one
solve per fold) against the brute-force loop of one `fit` per fold and l2, both warm.
"""

import argparse
import time

import numpy as np
import scipy.sparse
import sklearn.linear_model

import simfluence_jax as sj


def make_trace(num_train, num_test, runs, steps, batch, seed=0):
  rng = np.random.default_rng(seed)
  a = 1.0 / batch + rng.uniform(-0.002, 0.002, (num_train, num_test))
  b = rng.uniform(-0.01, 0.005, (num_train, num_test))
  ids = rng.integers(0, num_train, (runs, steps, batch)).astype(np.int32)
  losses = np.zeros((runs, steps + 1, num_test))
  losses[:, 0] = rng.uniform(2.0, 3.0, (runs, num_test))
  for t in range(steps):
    alpha = a[ids[:, t]].sum(1)
    beta = b[ids[:, t]].sum(1)
    losses[:, t + 1] = alpha * losses[:, t] + beta + 1e-3 * rng.normal(
        size=(runs, num_test))
  return sj.Trace(batch_ids=ids, losses=losses.astype(np.float32),
                  learning_rates=np.full((runs, steps), 0.1, np.float32),
                  num_train_examples=num_train)


def sklearn_fit(trace, l2, prior_a, tol, num_examples):
  """Returns (θ float64[2N, m], seconds) for the first `num_examples` test examples."""
  n = trace.num_train_examples
  ids = trace.batch_ids.reshape(-1, trace.batch_size)
  rows = ids.shape[0]
  x = trace.losses[:, :-1].reshape(rows, -1).astype(np.float64)
  y = trace.losses[:, 1:].reshape(rows, -1).astype(np.float64)
  counts = np.sum(ids >= 0, 1)
  row_index = np.repeat(np.arange(rows), ids.shape[1])
  flat = ids.reshape(-1)
  start = time.perf_counter()
  design_b = scipy.sparse.csr_matrix((np.ones(flat.size), (row_index, flat)),
                                     shape=(rows, n))
  thetas = []
  for m in range(num_examples):
    design_a = design_b.multiply(x[:, m:m + 1]).tocsr()
    design = scipy.sparse.hstack([design_a, design_b], format="csr")
    target = y[:, m] - prior_a * counts * x[:, m]
    model = sklearn.linear_model.Ridge(alpha=l2, fit_intercept=False,
                                       solver="sparse_cg", tol=tol)
    model.fit(design, target)
    thetas.append(model.coef_)
  return np.stack(thetas, 1), time.perf_counter() - start


def sklearn_best_of_3(trace, l2, prior_a, tol, num_examples):
  """`sklearn_fit` three times: (θ, the best of the three times)."""
  runs = [sklearn_fit(trace, l2, prior_a, tol, num_examples) for _ in range(3)]
  return runs[0][0], min(seconds for _, seconds in runs)


def residual(theta, trace, l2, prior_a, m):
  """float64 relative residual of the normal equations of test example m."""
  n = trace.num_train_examples
  ids = trace.batch_ids.reshape(-1, trace.batch_size)
  rows = ids.shape[0]
  x = trace.losses[:, :-1].reshape(rows, -1).astype(np.float64)[:, m]
  y = trace.losses[:, 1:].reshape(rows, -1).astype(np.float64)[:, m]
  row_index = np.repeat(np.arange(rows), ids.shape[1])
  design_b = scipy.sparse.csr_matrix(
      (np.ones(ids.size), (row_index, ids.reshape(-1))), shape=(rows, n))
  design = scipy.sparse.hstack([design_b.multiply(x[:, None]), design_b], format="csr")
  target = y - prior_a * np.sum(ids >= 0, 1) * x
  rhs = design.T @ target
  gap = design.T @ (design @ theta) + l2 * theta - rhs
  return float(np.linalg.norm(gap) / np.linalg.norm(rhs))


SIZES = {"full": (2000, 64, 10, 1000, 8), "quick": (400, 16, 10, 200, 8),
         "smoke": (100, 4, 4, 25, 4)}  # N, M, R, T, B


def measure(size="full", l2=1e-3, tol=1e-5, sklearn_examples=None):
  """Times `simulators.fit("linear")` and sklearn `Ridge` on one synthetic trace.

  Args:
    size: a key of SIZES.
    l2, tol: the ridge penalty and the CG tolerance of both sides.
    sklearn_examples: fit sklearn on this many test examples and extrapolate its
      time to all M (None: all).

  Returns:
    dict: `ours_s` (best of 3), `sklearn_s` (best of 3; all M test examples, at
    the residual ours reached: `sklearn_tol`), `speedup`, `sklearn_at_tol_s` and
    `speedup_at_tol` (sklearn at `tol` itself), `ours_residual` /
    `sklearn_residual` (max float64 relative residual of the normal equations over
    the first 8 test examples), `max_rel_diff` (max |θ_ours − θ_sklearn| / max|θ|),
    `iterations`, the sizes.
  """
  num_train, num_test, runs, steps, batch = SIZES[size]
  trace = make_trace(num_train, num_test, runs, steps, batch)
  sj.simulators.fit("linear", trace, l2=l2, method="cg", tol=tol)  # compile
  ours = np.inf
  for _ in range(3):  # best of 3, like the peers' warm timings
    start = time.perf_counter()
    sim = sj.simulators.fit("linear", trace, l2=l2, method="cg", tol=tol)
    ours = min(ours, time.perf_counter() - start)
  prior_a = sim.fit_info["prior_a"]

  num_sk = min(sklearn_examples or num_test, num_test)
  a = np.asarray(sim.A, np.float64) - prior_a
  b = np.asarray(sim.B, np.float64)
  checked = range(min(num_sk, 8))
  ours_res = max(residual(np.concatenate([a[:, m], b[:, m]]), trace, l2, prior_a, m)
                 for m in checked)
  # Equal residual: `fit` goes on past tol until θ settles (a decade lower, see
  # simulators._solver._solve_cg), so sklearn is asked for the residual ours
  # reached; its time at `tol` itself is kept as `sklearn_at_tol_s`.
  sk_tol = min(tol, ours_res)
  # Best of 3 like ours (review h26: one sklearn call against our best of 3 moved
  # the ratio toward us by up to 0.84 / 0.68 on a loaded machine).
  theta_sk, sk_time = sklearn_best_of_3(trace, l2, prior_a, sk_tol, num_sk)
  sk_total = sk_time * num_test / num_sk
  if sk_tol < tol:
    _, at_tol = sklearn_best_of_3(trace, l2, prior_a, tol, num_sk)
    at_tol *= num_test / num_sk
  else:
    at_tol = sk_total
  sk_res = max(residual(theta_sk[:, m], trace, l2, prior_a, m) for m in checked)
  diff = np.max(np.abs(np.concatenate([a, b])[:, :num_sk] - theta_sk)) / np.max(
      np.abs(theta_sk))
  return {"num_train": num_train, "num_test": num_test, "rows": runs * steps,
          "batch_size": batch, "l2": l2, "tol": tol, "sklearn_examples": num_sk,
          "ours_s": ours, "sklearn_s": sk_total, "speedup": sk_total / ours,
          "sklearn_tol": sk_tol, "sklearn_at_tol_s": at_tol,
          "speedup_at_tol": at_tol / ours,
          "iterations": int(np.max(sim.fit_info["iterations"])),
          "ours_residual": ours_res, "sklearn_residual": sk_res,
          "max_rel_diff": float(diff)}


def measure_cv(size="quick", grid=(1e-4, 1e-3, 1e-2, 1e-1, 1.0), folds=5,
               method="cg"):
  """Times `fit_cv` against a loop of `fit` per fold and l2 (both after a warm-up).

  Returns:
    dict: `cv_s`, `loop_s`, `speedup`, `chosen_l2` of both (they must agree), sizes.
  """
  num_train, num_test, runs, steps, batch = SIZES[size]
  trace = make_trace(num_train, num_test, runs, steps, batch)
  fold_of_run = np.arange(trace.num_runs) % folds

  def loop():
    scores = np.zeros((folds, len(grid)))
    for k in range(folds):
      train = trace.select_runs(np.flatnonzero(fold_of_run != k))
      held = trace.select_runs(np.flatnonzero(fold_of_run == k))
      for g, l2 in enumerate(grid):
        sim = sj.simulators.fit("linear", train, l2=l2, method=method)
        pred = np.asarray(sim.simulate(held.batch_ids, held.losses[:, 0]))
        scores[k, g] = np.mean((pred[:, 1:] - held.losses[:, 1:]) ** 2)
    return grid[int(np.argmin(scores.mean(0)))]

  cv = lambda: sj.simulators.fit_cv("linear", trace, grid, num_folds=folds,
                                    method=method).fit_info["cv"]["chosen_l2"]
  cv(), loop()  # compile
  start = time.perf_counter()
  chosen_cv = cv()
  cv_s = time.perf_counter() - start
  start = time.perf_counter()
  chosen_loop = loop()
  loop_s = time.perf_counter() - start
  return {"num_train": num_train, "num_test": num_test, "rows": runs * steps,
          "grid": list(grid), "folds": folds, "cv_s": cv_s, "loop_s": loop_s,
          "speedup": loop_s / cv_s, "chosen_l2_cv": chosen_cv,
          "chosen_l2_loop": chosen_loop}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--l2", type=float, default=1e-3)
  parser.add_argument("--tol", type=float, default=1e-5)
  parser.add_argument("--sklearn_examples", type=int, default=None,
                      help="fit sklearn on this many test examples and extrapolate")
  parser.add_argument("--cv", action="store_true",
                      help="also time fit_cv against a loop of fits")
  args = parser.parse_args()
  size = "quick" if args.quick else "full"
  num_train, num_test, runs, steps, batch = SIZES[size]
  print(f"N={num_train} M={num_test} R·T={runs * steps} B={batch} l2={args.l2} "
        f"tol={args.tol}")
  r = measure(size, args.l2, args.tol, args.sklearn_examples)
  num_sk = r["sklearn_examples"]
  print(f"simfluence_jax fit (cg): {r['ours_s']:8.2f} s  iterations={r['iterations']}"
        f"  rel. residual (float64 check) {r['ours_residual']:.2e}")
  print(f"sklearn Ridge sparse_cg: {r['sklearn_s']:8.2f} s  "
        f"({'measured' if num_sk == num_test else f'{num_sk} examples, extrapolated'})"
        f"  rel. residual {r['sklearn_residual']:.2e} (tol {r['sklearn_tol']:.2e}: the "
        f"residual ours reached); at tol {args.tol:g}: {r['sklearn_at_tol_s']:.2f} s")
  print(f"speed-up at equal residual: {r['speedup']:.1f}x (goal >= 20x; "
        f"{r['speedup_at_tol']:.1f}x against sklearn at tol); max |θ_ours − θ_sklearn| / "
        f"max|θ| = {r['max_rel_diff']:.1e}")
  if args.cv:
    c = measure_cv(size)
    print(f"fit_cv ({len(c['grid'])} l2 x {c['folds']} folds, grid as columns): "
          f"{c['cv_s']:.2f} s; loop of fits: {c['loop_s']:.2f} s; speed-up "
          f"{c['speedup']:.1f}x; chosen l2 {c['chosen_l2_cv']:g} / "
          f"{c['chosen_l2_loop']:g}")


if __name__ == "__main__":
  main()
