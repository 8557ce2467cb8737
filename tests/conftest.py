"""Shared fixtures: the tiny main job and its one uninterrupted reference run.

multiprocess_test.py and preemption_test.py each compare a job run another way (two
processes; killed and resumed) with the same job run once, uninterrupted, in one
process. That reference run is computed once per test session and shared.
"""

import contextlib
import fcntl
import gc
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import types

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Test programs are small, so compiling them is most of their CPU time: compile them
# less optimised (LLVM at -O0: about -25% on the suite), and with XLA:CPU's older
# loop emitters instead of its MLIR fusion emitters (the same 56 tests of
# training_test, metagradients_test and curvature_blocks_test: 117 s -> 55-62 s with
# -n 2 on 2 cores, 2026-12-06), each program's LLVM module in one piece rather than
# split for parallel code generation (training_test + metagradients_test, one
# process: 56.9-59.4 -> 52.4-54.2 s of CPU, 2026-12-07). Every test process gets
# them (this runs before any test module imports jax), and so do the subprocesses
# started with `job_env`.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false "
                  "--xla_cpu_parallel_codegen_split_count=1")
if TEST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):  # xdist workers inherit it
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()
# The suite runs on CPU. The `test` extra installs libtpu (for the plan's TPU
# compiles, tests/plan_test.py, in subprocesses that load it explicitly); without
# this every test process would also try to start a TPU runtime.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests compile the same small programs (in both xdist workers, and in the
# subprocesses they start): one persistent compilation cache for the whole session,
# every program in it (-25% wall time on the training and metagradient tests). Fresh
# per session, like a CI machine's: made by the first process (xdist's controller),
# inherited by the workers through the environment, removed at the end.
if "SJ_TEST_XLA_CACHE" not in os.environ:
  os.environ["SJ_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sj_test_xla_cache_")
  _OWNS_XLA_CACHE = True
else:
  _OWNS_XLA_CACHE = False
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["SJ_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"


# Python's cyclic GC in the test processes. A worker's heap grows to millions of
# objects (modules, JAX's caches, each module's fixtures), and every full collection
# walked all of them: 73.8 s of the two workers' time on the whole suite, most of it
# in the Kronfluence parity tests (Kronfluence collects several times per fit), and
# pytest collects five times more at the end of a session. Each test's collections
# now see only what the test made (what was there before is frozen until it ends;
# `gc.unfreeze` hands it back to the oldest generation, so nothing leaks), the
# youngest generation is collected every 10,000 allocations (as the CLIs do,
# `_cli.freeze_import_heap`), and the heap is frozen before pytest's final
# collections: 7.3 s on the whole suite (docs/experiments.md).
gc.set_threshold(10_000, *gc.get_threshold()[1:])


@pytest.fixture(autouse=True)
def _gc_sees_only_this_tests_objects():
  gc.freeze()
  yield
  gc.unfreeze()


def pytest_sessionfinish(session, exitstatus):
  del session, exitstatus
  gc.freeze()


def pytest_unconfigure(config):
  del config
  if _OWNS_XLA_CACHE:
    shutil.rmtree(os.environ["SJ_TEST_XLA_CACHE"], ignore_errors=True)


# The tiny job without what neither scale-out nor resuming changes: no counterfactual
# search, removal benchmark, learning curve or unseen-example runs, a fixed ridge
# penalty (no CV). 8 fitted + 4 held-out runs, 8 steps, checkpoints at 4 and 8; the
# first 4 fitted runs record projected gradients (runs/grads), the others do not
# (runs/plain). 4 CPU devices in all (one process x 4, or 2 processes x 2), so every
# process-independent computation has the same per-device shapes and the numbers can
# be compared to float32 round-off.
TINY_FLAGS = (
    "--config=configs/default.py:tiny",
    "--config.methods=('curriculum_blind','simfluence_linear','tracin_cp','ekfac_if')",
    "--config.counterfactual.enabled=False",
    "--config.removal.enabled=False",
    "--config.learning_curve=()",
    "--config.unseen.num_examples=0",
    "--config.unseen.num_runs=0",
    "--config.num_grad_runs=4",
    "--config.simulators.l2=0.1",
    "--config.simulators.num_band_samples=2",
)
TINY_METHODS = ("curriculum_blind", "simfluence_linear", "tracin_cp", "ekfac_if")
NUM_DEVICES = 4


def job_env(local_devices: int, **extra) -> dict:
  """The environment of a CPU subprocess with `local_devices` forced host devices.

  It keeps this process's XLA_FLAGS (the suite's own flags above, and any of the
  user's) after the device count.
  """
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      f"--xla_force_host_platform_device_count={local_devices} "
      f"{os.environ['XLA_FLAGS']}"))
  env.update(extra)
  return env


def start_job(workdir, log_path) -> subprocess.Popen:
  """Starts the tiny job in one process with NUM_DEVICES devices, logging to a file."""
  with open(log_path, "w") as log:
    return subprocess.Popen(
        [sys.executable, "-X", "faulthandler", "-m", "simfluence_jax.main", *TINY_FLAGS,
         f"--workdir={workdir}"], cwd=REPO, env=job_env(NUM_DEVICES),
        stdout=log, stderr=subprocess.STDOUT)


def finish_job(proc, log_path, timeout: float = 400) -> str:
  """Waits for a job started by start_job; its log. Fails naming what it printed."""
  try:
    proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    proc.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
    proc.wait()
    raise AssertionError(f"the job took over {timeout} s:\n"
                         f"{open(log_path).read()[-6000:]}") from None
  text = open(log_path).read()
  assert proc.returncode == 0, text[-4000:]
  return text


def method_metrics(metrics: dict) -> dict:
  """{(method, metric): value} of every number the tiny job reports per method."""
  out = {}
  for method in TINY_METHODS:
    for name, value in metrics[method].items():
      if value is None:  # undefined (NaN in JSON): must be undefined in both
        out[(method, name)] = float("nan")
      elif isinstance(value, (int, float)) and not isinstance(value, bool):
        out[(method, name)] = float(value)
  return out


def assert_same_metrics(got: dict, want: dict, rtol: float = 1e-5) -> None:
  got, want = method_metrics(got), method_metrics(want)
  assert set(got) == set(want)
  assert {"all_steps_mse", "final_step_mse", "spearman"} <= {n for _, n in want}
  bad = {key: (got[key], want[key]) for key in want
         if not (abs(got[key] - want[key]) <= rtol * max(1.0, abs(want[key])) or
                 (np.isnan(got[key]) and np.isnan(want[key])))}
  assert not bad, f"metrics differ beyond {rtol}: {bad}"


@contextlib.contextmanager
def _file_lock(path):
  with open(path, "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory, request):
  """`(workdir, metrics)` of the tiny job run once, uninterrupted, in one process.

  Computed when the fixture is set up, before the module starts its own jobs: those
  then reuse the reference's compiled programs (the session's compilation cache)
  instead of compiling the same programs alongside it. The first module to get here
  runs the job (under pytest-xdist the workers share the session's temp root; the
  modules using it share one worker, `_GROUPS`), the others wait on a file lock and
  read its outputs. Keyed by the flags.
  """
  root = tmp_path_factory.getbasetemp()
  if hasattr(request.config, "workerinput"):  # an xdist worker: share with the others
    root = root.parent
  key = hashlib.sha1("\n".join(TINY_FLAGS).encode()).hexdigest()[:12]
  workdir, done = root / f"reference_{key}", root / f"reference_{key}.done"
  with _file_lock(str(root / f"reference_{key}.lock")):
    if not done.exists():
      shutil.rmtree(workdir, ignore_errors=True)  # left by a run that failed
      log = root / f"reference_{key}.log"
      finish_job(start_job(str(workdir), log), log)
      done.touch()
  with open(workdir / "metrics.json") as f:
    return str(workdir), json.load(f)


@pytest.fixture(scope="session")
def tiny_job():
  """The helpers above for test modules (which must not import conftest); `env` is
  also the environment of any forced-host-devices subprocess."""
  return types.SimpleNamespace(
      repo=REPO, flags=TINY_FLAGS, num_devices=NUM_DEVICES, env=job_env,
      start=start_job, finish=finish_job, assert_same_metrics=assert_same_metrics)


# Modules whose expensive module-scoped fixture (a whole job, or one subprocess
# computing every case) must run once, not once per xdist worker: all their tests go
# to one worker (`--dist loadgroup`, pytest.ini), by group. Modules that read another
# module's fixture (`main_tiny_run`) go to its worker; those comparing with the tiny
# reference job share one worker, so it runs once, before any of their own jobs.
_GROUPS = {"main_test": "main_test", "pipeline_test": "main_test",
           "multiprocess_test": "tiny_reference", "preemption_test": "tiny_reference",
           "remote_workdir_test": "tiny_reference",
           "influence_sharding_test": "influence_sharding_test",
           "sharding_test": "sharding_test",
           "solver_sharding_test": "solver_sharding_test"}


@pytest.hookimpl(tryfirst=True)  # before xdist's loadgroup reads the marks
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    if module in _GROUPS:
      item.add_marker(pytest.mark.xdist_group(_GROUPS[module]))


# main_test's tiny job (configs/default.py:tiny, every stage), `(config, workdir)`,
# once its `tiny_run` fixture has run in this process.
_MAIN_TINY_RUN = []


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):
  del request
  value = yield
  if (fixturedef.argname == "tiny_run" and
      os.path.basename(fixturedef.baseid) == "main_test.py"):
    _MAIN_TINY_RUN[:] = [tuple(value[:2])]
  return value


@pytest.fixture(scope="session")
def main_tiny_run():
  """`[(config, workdir)]` of main_test's finished tiny job when it ran earlier in
  this process (tests/pipeline_test.py reads its stage records), else `[]`."""
  return _MAIN_TINY_RUN
