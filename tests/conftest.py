"""Shared fixtures: one reference run of the main job for the scale-out tests."""

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import types

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny job of the multi-process and preemption tests: 4 CPU devices in all (one
# process x 4, or 2 processes x 2), so every process-independent computation has the
# same per-device shapes and the numbers can be compared to float32 round-off. The
# counterfactual search (a second training job) is left out to keep CI short.
TINY_FLAGS = ("--config=configs/default.py:tiny", "--config.counterfactual.enabled=False")
NUM_DEVICES = 4


def job_env(local_devices: int, **extra) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}")
  env.update(extra)
  return env


def run_job(workdir: str, timeout: float = 400) -> dict:
  """Runs the tiny main job in one process with NUM_DEVICES devices; its metrics."""
  proc = subprocess.Popen(
      [sys.executable, "-X", "faulthandler", "-m", "simfluence_jax.main", *TINY_FLAGS,
       f"--workdir={workdir}"], cwd=REPO, env=job_env(NUM_DEVICES),
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    _, stderr = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
    _, stderr = proc.communicate()
    raise AssertionError(f"the tiny job took over {timeout} s:\n{stderr[-6000:]}") from None
  assert proc.returncode == 0, stderr[-4000:]
  with open(os.path.join(workdir, "metrics.json")) as f:
    return json.load(f)


@contextlib.contextmanager
def _file_lock(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def tiny_reference(tmp_path_factory, request):
  """metrics.json of one uninterrupted single-process run, shared by xdist workers.

  Under pytest-xdist the workers share the session's temp root; the first one to get
  here runs the job, the others wait on a file lock and read its metrics.
  """
  root = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):  # an xdist worker: share with the others
    root = root.parent
  workdir = os.path.join(str(root), "tiny_reference")
  with _file_lock(os.path.join(str(root), "tiny_reference.lock")):
    metrics_path = os.path.join(workdir, "metrics.json")
    if os.path.exists(metrics_path):
      with open(metrics_path) as f:
        return json.load(f)
    return run_job(workdir)


def method_metrics(metrics: dict) -> dict:
  """{(method, name): value} of every scalar per-method metric."""
  out = {}
  for method, values in metrics.items():
    if method in ("timings", "counterfactual", "stages", "cost", "summary",
                  "learning_curve") or not isinstance(values, dict):
      continue
    for name, value in values.items():
      if value is None:  # undefined metric (NaN in JSON): must agree too
        out[(method, name)] = float("nan")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[(method, name)] = float(value)
  return out


def assert_same_metrics(got: dict, want: dict, rtol: float = 1e-5) -> None:
  got, want = method_metrics(got), method_metrics(want)
  assert set(got) == set(want)
  methods = {method for method, _ in want}
  assert {"simfluence_linear", "simfluence_additive", "tracin_cp", "ekfac_if"} <= methods
  bad = {key: (got[key], want[key]) for key in want
         if not (abs(got[key] - want[key]) <= rtol * max(1.0, abs(want[key])) or
                 (got[key] != got[key] and want[key] != want[key]))}
  assert not bad, f"metrics differ beyond {rtol}: {bad}"


@pytest.fixture(scope="session")
def tiny_job():
  """The helpers above for test modules (which must not import conftest)."""
  return types.SimpleNamespace(
      repo=REPO, flags=TINY_FLAGS, num_devices=NUM_DEVICES, env=job_env,
      run=run_job, assert_same_metrics=assert_same_metrics)


# Modules whose expensive module-scoped fixture (a whole job, or one subprocess
# computing every case) must run once, not once per xdist worker: all their tests go
# to one worker (`--dist loadgroup`, pytest.ini).
_ONE_WORKER_MODULES = ("main_test", "influence_sharding_test", "multiprocess_test",
                       "preemption_test", "sharding_test", "solver_sharding_test")


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in _ONE_WORKER_MODULES:
      item.add_marker(pytest.mark.xdist_group(module))
