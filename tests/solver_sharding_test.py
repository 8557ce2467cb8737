"""The solver sharded over 4 forced CPU devices equals the single-device solve."""

import os
import subprocess
import sys
import textwrap

import numpy as np

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import jax
    from simfluence_jax.simulators import _solver
    rng = np.random.default_rng(0)
    ids = rng.integers(-1, 30, (120, 4)).astype(np.int32)
    x = rng.random((120, 10)).astype(np.float32)
    y = rng.normal(size=(120, 10)).astype(np.float32)
    out = {}
    for method in ("cg", "normal", "dual"):
      theta, info = _solver.solve(ids, x, y, 30, 0.1, linear=True, method=method,
                                  tol=1e-7)
      out[method] = theta
    print(len(jax.local_devices()), file=sys.stderr)
    np.savez(sys.argv[1], **out)
""")


def _run(tmp_path, devices):
  path = str(tmp_path / f"theta_{devices}.npz")
  env = dict(os.environ,
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", SCRIPT, path], env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == str(devices)
  return np.load(path)


def test_sharded_solve_equals_single_device(tmp_path):
  single, sharded = _run(tmp_path, 1), _run(tmp_path, 4)
  for method in ("cg", "normal", "dual"):
    scale = np.abs(single[method]).max()
    np.testing.assert_allclose(sharded[method], single[method], atol=1e-4 * scale,
                               err_msg=method)
