"""Every solver method equals a dense numpy ridge solve per test example."""

import numpy as np
import pytest

from simfluence_jax import simulators


def _problem(seed=0, rows=60, batch=4, num_train=12, columns=3):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, num_train, (rows, batch)).astype(np.int32)
  ids[::5, -1] = -1  # padding
  ids[::7, 1] = ids[::7, 0]  # repeated ids count twice
  x = rng.uniform(1.0, 3.0, (rows, columns)).astype(np.float32)
  y = rng.normal(size=(rows, columns)).astype(np.float32)
  return ids, x, y, num_train


def _dense_ridge(ids, x, y, num_train, l2, linear):
  rows = ids.shape[0]
  counts = np.zeros((rows, num_train))
  for p in range(rows):
    for i in ids[p]:
      if i >= 0:
        counts[p, i] += 1
  out = []
  for c in range(y.shape[1]):
    design = np.concatenate([counts * x[:, c:c + 1], counts], 1) if linear else counts
    gram = design.T @ design + l2 * np.eye(design.shape[1])
    out.append(np.linalg.solve(gram, design.T @ y[:, c].astype(np.float64)))
  theta = np.stack(out, -1)  # [J·N, C]
  return theta.reshape(-1, num_train, y.shape[1]).transpose(1, 0, 2)


@pytest.mark.parametrize("linear", [True, False])
@pytest.mark.parametrize("method", ["normal", "cg", "dual", "auto"])
def test_matches_dense_ridge(linear, method):
  ids, x, y, num_train = _problem()
  l2 = 0.1
  theta, info = simulators.solve(ids, x, y, num_train, l2, linear=linear, method=method,
                                 tol=1e-7, max_iters=5000)
  expected = _dense_ridge(ids, x, y, num_train, l2, linear)
  scale = np.max(np.abs(expected))
  np.testing.assert_allclose(theta, expected, atol=1e-4 * scale)
  assert info["relative_residual"] < 1e-3  # float32 evaluation of the residual


def test_chunking_gives_same_answer():
  ids, x, y, num_train = _problem(columns=5)
  full, _ = simulators.solve(ids, x, y, num_train, 0.1, linear=True, method="cg",
                             tol=1e-7)
  chunked, info = simulators.solve(ids, x, y, num_train, 0.1, linear=True, method="cg",
                                   tol=1e-7, memory_budget_bytes=1)
  assert info["chunk_size"] == 1 and info["num_chunks"] == 5
  np.testing.assert_allclose(chunked, full, atol=1e-5)


def test_auto_picks_by_size():
  assert simulators._solver.choose_method(40, 10_000, True) == "normal"
  assert simulators._solver.choose_method(5000, 100, True) == "dual"
  assert simulators._solver.choose_method(200, 1536, True, 32) == "cg"
  assert simulators._solver.choose_method(2000, 10_000, True) == "cg"


def test_bad_method():
  ids, x, y, num_train = _problem()
  with pytest.raises(ValueError, match="method"):
    simulators.solve(ids, x, y, num_train, 0.1, linear=True, method="qr")


def test_cg_reports_and_warns_when_it_stops_unconverged():
  ids, x, y, num_train = _problem()
  with pytest.warns(RuntimeWarning, match=r"max_iters=1 .*relative residual"):
    _, info = simulators.solve(ids, x, y, num_train, 0.1, linear=True, method="cg",
                               tol=1e-7, max_iters=1)
  assert info["converged"] is False and info["relative_residual"] > 1e-3
  _, info = simulators.solve(ids, x, y, num_train, 0.1, linear=True, method="cg",
                             tol=1e-7, max_iters=5000)
  assert info["converged"] is True and info["relative_residual"] < 1e-4
  for method in ("normal", "dual"):
    assert simulators.solve(ids, x, y, num_train, 0.1, linear=True,
                            method=method)[1]["converged"] is True
  with pytest.raises(ValueError, match="max_iters"):
    simulators.solve(ids, x, y, num_train, 0.1, linear=True, max_iters=-1)
