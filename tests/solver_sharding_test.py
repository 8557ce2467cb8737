"""The solver sharded over 2 and 4 forced CPU devices: equal to 1 device and to a dense solve.

Each device count runs in its own process (XLA fixes the number of host devices at
start-up). The sharded path is requested explicitly (`devices=jax.local_devices()`),
and the script checks that the kernels really ran on that many devices and that
their compiled programs hold no cross-device collective (the design that keeps
oversubscribed CPU cores from stalling, see `_solver`).
"""

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
SCRIPT = textwrap.dedent(r"""
    import re, sys
    import numpy as np
    import jax
    sys.path.insert(0, sys.argv[2])
    import solver_sharding_test as spec
    from simfluence_jax.simulators import _solver
    devices = jax.local_devices()
    out = spec.solve_all(devices)
    # The default on CPU is one device (forced host devices share the cores).
    ids, x, y, l2 = spec.problem()
    _, info = _solver.solve(ids, x, y, 30, 0.1, linear=True, method="cg")
    assert info["num_devices"] == 1, info
    # No kernel communicates across devices, not even for the convergence test.
    kernels = _solver._kernels(_solver.column_mesh(devices), 30, True)
    cols = len(devices)
    xs, ys, l2s = x[:, :cols], y[:, :cols], l2[:cols]
    state = kernels.cg_init(ids, xs, ys, l2s, np.float32(1e-7))
    pred = kernels.forward(state[2], ids, xs)
    programs = [kernels.cg_init.lower(ids, xs, ys, l2s, np.float32(1e-7)),
                kernels.forward.lower(state[2], ids, xs),
                kernels.cg_step.lower(pred, *state[:6], ids, xs, l2s),
                kernels.normal.lower(ids, xs, ys, l2s),
                kernels.dual.lower(ids, xs, ys, l2s)]
    collectives = sum(len(re.findall(
        r"all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter",
        p.compile().as_text())) for p in programs)
    print(len(devices), collectives, file=sys.stderr)
    np.savez(sys.argv[1], **out)
""")


def problem():
  """(ids int32[120, 4], x float32[120, 10], y float32[120, 10], l2 float32[10])."""
  rng = np.random.default_rng(0)
  ids = rng.integers(-1, 30, (120, 4)).astype(np.int32)
  x = rng.uniform(0.5, 1.5, (120, 10)).astype(np.float32)
  y = rng.normal(size=(120, 10)).astype(np.float32)
  return ids, x, y, np.linspace(0.05, 0.5, 10).astype(np.float32)  # l2 per column


def solve_all(devices=None):
  """θ of every method (CG also in chunks of one column per device) on `devices`."""
  from simfluence_jax.simulators import _solver  # pylint: disable=g-import-not-at-top
  ids, x, y, l2 = problem()
  out = {}
  for method, budget in (("cg", None), ("cg", 1), ("normal", None), ("dual", None)):
    # The dual form on more rows than unknowns is a float32 Cholesky of a P×P
    # kernel of rank D + l2: its residual reaches ~6e-5 (`converged` checks it).
    theta, info = _solver.solve(ids, x, y, 30, l2, linear=True, method=method,
                                tol=1e-4 if method == "dual" else 1e-7,
                                max_iters=5000, devices=devices,
                                memory_budget_bytes=budget)
    assert info["converged"] and info["num_devices"] == len(devices or [0]), info
    out[f"{method}_{budget}"] = theta
  return out


def _dense_ridge(ids, x, y, num_train, l2):
  counts = np.zeros((ids.shape[0], num_train))
  for p, row in enumerate(ids):
    for i in row:
      if i >= 0:
        counts[p, i] += 1
  out = []
  for c in range(y.shape[1]):
    design = np.concatenate([counts * x[:, c:c + 1], counts], 1).astype(np.float64)
    gram = design.T @ design + l2[c] * np.eye(design.shape[1])
    out.append(np.linalg.solve(gram, design.T @ y[:, c].astype(np.float64)))
  return np.stack(out, -1).reshape(2, num_train, -1).transpose(1, 0, 2)


def _run(directory, devices, env):
  path = os.path.join(str(directory), f"theta_{devices}.npz")
  env.pop("SJ_SOLVER_SHARD_CPU", None)
  proc = subprocess.run([sys.executable, "-c", SCRIPT, path, TESTS], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1] == f"{devices} 0"  # devices, collectives
  return dict(np.load(path))


@pytest.fixture(scope="module")
def reference():
  ids, x, y, l2 = problem()
  return _dense_ridge(ids, x, y, 30, l2)


@pytest.fixture(scope="module")
def single():
  return solve_all()  # this process: the default, one device


@pytest.mark.parametrize("devices", [2, 4])
def test_sharded_solve_equals_single_device_and_dense(tmp_path, tiny_job, reference,
                                                      single, devices):
  sharded = _run(tmp_path, devices, tiny_job.env(devices))
  scale = np.abs(reference).max()
  for key in single:
    np.testing.assert_allclose(single[key], reference, atol=2e-4 * scale, err_msg=key)
    np.testing.assert_allclose(sharded[key], reference, atol=2e-4 * scale, err_msg=key)
    # Another device count sums in another order: float32 round-off, amplified by
    # the iterative solvers to ~3e-5 of the scale.
    np.testing.assert_allclose(sharded[key], single[key], atol=5e-5 * scale,
                               err_msg=key)
