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


@pytest.mark.parametrize("linear", [True, False])
def test_block_preconditioner_inverts_the_gram_diagonal_blocks(linear):
  """Without repeated ids in a batch, CG's preconditioner is exactly the inverse of
  each train id's J×J diagonal block of XᵀX + l2·I (dense design)."""
  ids, x, _, num_train = _problem()
  for p in range(ids.shape[0]):  # no repeats: row p's ids are distinct
    ids[p] = np.where(ids[p] >= 0, (np.arange(ids.shape[1]) + p) % num_train, -1)
  l2 = np.array([0.1, 0.2, 0.3], np.float32)
  inverse = np.asarray(simulators._solver._block_preconditioner(
      ids, x, l2, num_train, linear))
  counts = np.zeros((ids.shape[0], num_train))
  for p, row in enumerate(ids):
    counts[p, row[row >= 0]] = 1.0
  for c in range(x.shape[1]):
    design = np.concatenate([counts * x[:, c:c + 1], counts], 1) if linear else counts
    gram = design.T @ design + l2[c] * np.eye(design.shape[1])
    for i in range(num_train):
      index = [i, num_train + i] if linear else [i]
      expected = np.linalg.inv(gram[np.ix_(index, index)])
      got = (np.array([[inverse[i, 0, c], inverse[i, 1, c]],
                       [inverse[i, 1, c], inverse[i, 2, c]]]) if linear
             else inverse[i, :, c][:, None])
      np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_block_preconditioner_positive_definite_when_x_barely_varies():
  """x = 2.7 ± 1e-4 for every row: det G of a block cancels in float32, and the
  preconditioner must stay positive definite (it went indefinite unclamped)."""
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 3, (5000, 1)).astype(np.int32)
  x = (2.7 + 1e-4 * rng.uniform(-1, 1, (5000, 1))).astype(np.float32)
  inverse = np.asarray(simulators._solver._block_preconditioner(
      ids, x, np.float32([1e-5]), 3, True))
  for i in range(3):
    block = np.array([[inverse[i, 0, 0], inverse[i, 1, 0]],
                      [inverse[i, 1, 0], inverse[i, 2, 0]]], np.float64)
    assert np.all(np.linalg.eigvalsh(block) > 0), (i, block)
