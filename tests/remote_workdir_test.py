"""A gs:// workdir end to end, on a bucket with object-store semantics (no network).

`fake_bucket.FakeBucket` serves gs:// to etils.epath (so to our code and orbax's)
as a bucket does: prefixes instead of directories, whole-object writes, no append,
no atomic rename, no file locks. The tiny main job runs on it from a working
directory it must leave empty (a stray `os.makedirs("gs://...")` would land there),
gives the metrics of the same job run on a local disk, and a rerun reuses every
stage from the bucket. The lease that keeps a bucket workdir to one job, and EK-FAC
factors (orbax) in a bucket, are tested on it too.
"""

import importlib.util
import json
import logging
import os
import subprocess
import sys
import time
import types

import fake_bucket
from etils import epath
import numpy as np
import pytest

from simfluence_jax import _io
from simfluence_jax import pipeline
from simfluence_jax.pipeline import workdir as workdir_lib

WORKDIR = "gs://bucket/job"
# Stages whose outputs a rerun loads ("data" is read again every time).
STORED_STAGES = ("base_model", "record_runs", "tracin_cp_scores", "ekfac_scores",
                 "fit_simfluence_linear", "fit_tracin_cp", "fit_ekfac_if", "evaluate")


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
  """The local root holding the fake bucket's objects (`<root>/bucket/...`)."""
  root = tmp_path_factory.mktemp("objects")
  (root / "bucket").mkdir()
  return str(root)


@pytest.fixture
def bucket(objects, monkeypatch):
  """gs://bucket/ served from `objects` in this process, for one test."""
  fake_bucket.install(objects, setitem=monkeypatch.setitem,
                      setattr_=monkeypatch.setattr)
  yield objects
  monkeypatch.undo()
  fake_bucket.uninstall()


def _run_job(tiny_job, objects, cwd, log_path):
  """The tiny main job (conftest's flags and devices) with --workdir=gs://..."""
  flags = [f"--config={os.path.join(tiny_job.repo, 'configs', 'default.py')}:tiny"
           if flag == "--config=configs/default.py:tiny" else flag
           for flag in tiny_job.flags]
  assert flags != list(tiny_job.flags)
  with open(log_path, "w") as log:
    proc = subprocess.Popen(
        [sys.executable, "-X", "faulthandler",
         os.path.join(tiny_job.repo, "tests", "fake_bucket.py"), objects, *flags,
         f"--workdir={WORKDIR}"], cwd=cwd, env=tiny_job.env(tiny_job.num_devices),
        stdout=log, stderr=subprocess.STDOUT)
  return tiny_job.finish(proc, log_path)


@pytest.fixture(scope="module")
def bucket_job(tiny_job, tiny_reference, objects, tmp_path_factory):
  """The tiny job run twice on gs://bucket/job: (first log, rerun log, cwd)."""
  cwd = tmp_path_factory.mktemp("cwd")
  logs = tmp_path_factory.mktemp("logs")
  first = _run_job(tiny_job, objects, str(cwd), str(logs / "first.log"))
  rerun = _run_job(tiny_job, objects, str(cwd), str(logs / "rerun.log"))
  return first, rerun, str(cwd)


def _metrics():
  return json.loads(epath.Path(WORKDIR, "metrics.json").read_text())


def test_main_job_in_a_bucket_matches_a_local_run(bucket_job, bucket, tiny_job,
                                                  tiny_reference):
  first, rerun, cwd = bucket_job
  assert "is on an object store, which has no file locks" in first
  # Nothing went to local paths named gs:/... (os.path on a gs:// path does that).
  assert os.listdir(cwd) == []
  root = epath.Path(WORKDIR)
  metrics = _metrics()
  _, reference = tiny_reference
  tiny_job.assert_same_metrics(metrics, reference)
  report = (root / "report.md").read_text()
  assert "| curriculum_blind |" in report and "| ekfac_if |" in report
  plots = {p.name for p in (root / "plots").iterdir()}
  assert "metrics_bars.png" in plots and "final_loss_scatter.png" in plots
  events = [p.name for p in (root / "tensorboard").iterdir()]
  assert any(name.startswith("events.out.tfevents") for name in events)
  assert len(list((root / "tensorboard" / "runs").iterdir())) == 12
  # Orbax checkpoints (committed the way orbax commits on GCS: no rename).
  assert (root / "base" / "commit_success.txt").exists()
  assert {p.name for p in (root / "runs" / "plain" / "tracin_ckpt").iterdir()} == {
      "0", "4", "8"}
  # The lease is gone once the job ended.
  assert not (root / ".lock").exists()


def test_rerun_reuses_every_stage_from_the_bucket(bucket_job, bucket, tiny_job,
                                                  tiny_reference):
  _, rerun, _ = bucket_job
  for stage in STORED_STAGES:
    assert f"stage {stage}: reusing its outputs" in rerun, stage
  stages = _metrics()["stages"]
  assert all(stages[name]["reused"] for name in STORED_STAGES), stages
  _, reference = tiny_reference
  tiny_job.assert_same_metrics(_metrics(), reference)


def test_simulate_reads_the_bucket_workdir(bucket_job, bucket, tmp_path, monkeypatch):
  from simfluence_jax import simulate  # pylint: disable=g-import-not-at-top
  monkeypatch.chdir(tmp_path)  # where stray local writes to gs:/... would land
  curriculum = "gs://bucket/curricula/mine.json"
  _io.write_json(curriculum, {"batch_ids": [[0, 1, 2, 3]] * 8})
  result = simulate.run(WORKDIR, curriculum, methods=["simfluence_linear"],
                        num_band_samples=2)
  assert result["output_dir"] == f"{WORKDIR}/simulated/mine"
  payload = json.loads(epath.Path(WORKDIR, "simulated", "mine",
                                  "trajectories.json").read_text())
  assert payload["curriculum"] == curriculum
  assert epath.Path(WORKDIR, "simulated", "mine", "trajectories.png").exists()
  assert os.listdir(tmp_path) == []


# -- the fake bucket is no POSIX filesystem ----------------------------------------


def test_the_fake_bucket_has_object_store_semantics(bucket):
  directory = epath.Path("gs://bucket/semantics/dir")
  directory.mkdir(parents=True)
  assert not directory.exists()  # a prefix exists only while it holds objects
  (directory / "a.txt").write_text("a")
  assert directory.is_dir() and [p.name for p in directory.iterdir()] == ["a.txt"]
  with pytest.raises(NotImplementedError):
    (directory / "a.txt").open("a")  # no appends
  (directory / "a.txt").unlink()
  assert not directory.exists()
  assert not os.path.exists(os.fspath(directory))  # no local path either


# -- the lease of a bucket workdir -------------------------------------------------


@pytest.fixture
def lease(bucket, monkeypatch, request):
  """The lease file of a bucket workdir of this test's own."""
  monkeypatch.setattr(workdir_lib, "_SETTLE_SECONDS", 0.0)
  return epath.Path(f"gs://bucket/leased/{request.node.name}/.lock")


def test_lease_keeps_a_bucket_workdir_to_one_job(lease, caplog):
  workdir = os.fspath(lease.parent)
  with caplog.at_level(logging.INFO, "simfluence_jax.pipeline"):
    with pipeline.workdir_lock(workdir):
      holder = lease.read_text()
      assert f"pid {os.getpid()}" in holder
      with pytest.raises(ValueError, match="in use by another job.*one job at a time"):
        with pipeline.workdir_lock(workdir):
          pass
  assert "single-writer rule" in caplog.text
  assert not lease.exists()
  with pipeline.workdir_lock(workdir):  # released: can be taken again
    assert lease.read_text() != holder  # a new token


def test_a_stale_lease_is_taken_over(lease, caplog):
  lease.write_text(f"dead-host pid 7 0123abcd {time.time() - 400}")
  with caplog.at_level(logging.WARNING, "simfluence_jax.pipeline"):
    with pipeline.workdir_lock(os.fspath(lease.parent)):
      assert "dead-host" not in lease.read_text()
  assert "taking over the stale lease of dead-host pid 7" in caplog.text


def test_two_jobs_starting_together_one_goes_on(lease, monkeypatch):
  # The other job writes its lease while this one waits to read its own back.
  clock = types.SimpleNamespace(
      time=time.time, strftime=time.strftime, perf_counter=time.perf_counter,
      sleep=lambda _: lease.write_text(f"other-host pid 9 feedf00d {time.time()}"))
  monkeypatch.setattr(workdir_lib, "time", clock)
  with pytest.raises(ValueError, match="another job .*other-host.* at the same time"):
    with pipeline.workdir_lock(os.fspath(lease.parent)):
      pass
  assert "other-host" in lease.read_text()  # the winner's lease is left alone


def test_lease_is_renewed(lease, monkeypatch):
  monkeypatch.setattr(workdir_lib, "_REFRESH_SECONDS", 0.05)
  with pipeline.workdir_lock(os.fspath(lease.parent)):
    first = float(lease.read_text().split()[-1])
    deadline = time.time() + 30
    while float(lease.read_text().split()[-1]) == first:
      assert time.time() < deadline, "the lease was not renewed"
      time.sleep(0.05)


def test_a_lease_another_job_took_over_is_left_to_it(lease):
  # This job stalled past _LEASE_SECONDS and another took the workdir over.
  with pipeline.workdir_lock(os.fspath(lease.parent)):
    lease.write_text(f"other-host pid 9 feedf00d {time.time()}")
  assert "other-host" in lease.read_text()


def test_a_job_whose_lease_was_taken_over_stops_writing(lease, monkeypatch):
  # It only logged an error and went on writing stage records beside the job that
  # took the workdir over (a review's reproduction).
  from simfluence_jax import config_lib  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(workdir_lib, "_REFRESH_SECONDS", 0.05)
  workdir = os.fspath(lease.parent)
  config = config_lib.load_config(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "default.py:tiny"))
  with pipeline.workdir_lock(workdir):
    wd = workdir_lib.Workdir(workdir + "/seed_0", config)
    wd.stage("before", fields=("seed",), compute=lambda: None)
    lease.write_text(f"other-host pid 9 feedf00d {time.time()}")
    deadline = time.time() + 30
    while not workdir_lib._LOST_LEASES:  # pylint: disable=protected-access
      assert time.time() < deadline, "the takeover was not noticed"
      time.sleep(0.05)
    with pytest.raises(ValueError, match=r"another job \(other-host pid 9 feedf00d\) "
                       r"took over this job's lease"):
      wd.stage("after", fields=("seed",), compute=lambda: None)
  assert not (lease.parent / "seed_0" / "stages" / "after.json").exists()
  assert not workdir_lib._LOST_LEASES  # pylint: disable=protected-access


def test_a_job_that_stalls_in_a_stage_saves_nothing_once_its_lease_is_taken(lease):
  _stall_in_a_stage(lease, "another lease")


def test_a_job_that_stalls_in_a_stage_saves_nothing_once_its_lease_is_gone(lease):
  _stall_in_a_stage(lease, "lease gone")  # (no brackets in the path: fsspec globs)


def _stall_in_a_stage(lease, takeover):
  """Review h24: the lease was checked when a stage started and when its record was
  written, so a job that stalled in compute() past the lease woke and saved its
  outputs over those of the job that had taken the workdir over, whose record then
  vouched for them; and a lease file gone (that job finished) was written again."""
  from simfluence_jax import config_lib  # pylint: disable=g-import-not-at-top
  workdir = os.fspath(lease.parent)
  config = config_lib.load_config(os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
      "default.py:tiny"))
  saved = []

  def stall():  # meanwhile another job takes the workdir over (and maybe finishes)
    if takeover == "another lease":
      lease.write_text(f"other-host pid 9 feedf00d {time.time()}")
    else:
      lease.unlink()
    return 1

  with pipeline.workdir_lock(workdir):
    wd = workdir_lib.Workdir(workdir + "/seed_0", config)
    with pytest.raises(ValueError, match=r"took over this job's lease"):
      wd.stage("stalled", fields=("seed",), compute=stall, save=saved.append,
               outputs=("stalled",))
  assert not saved
  assert takeover == "another lease" or not lease.exists()  # not taken back
  assert not workdir_lib._LOST_LEASES  # pylint: disable=protected-access


def test_a_workdir_in_another_kind_of_bucket_is_refused():
  with pytest.raises(ValueError, match="gs:// bucket"):
    with pipeline.workdir_lock("s3://bucket/job"):
      pass
  with pytest.raises(ValueError, match="gs:// bucket"):
    pipeline.Workdir("s3://bucket/job", config=None)


def test_a_bucket_without_its_filesystem_names_the_extra(monkeypatch):
  if importlib.util.find_spec("gcsfs"):
    pytest.skip("gcsfs is installed: the bucket would be asked for real")
  monkeypatch.setenv("EPATH_USE_TF", "false")  # as where TensorFlow is not installed
  fake_bucket.uninstall()
  try:
    with pytest.raises(ValueError, match=r"gcsfs.*simfluence_jax\[gcs\]"):
      with pipeline.workdir_lock("gs://bucket/job"):
        pass
  finally:
    monkeypatch.undo()
    fake_bucket.uninstall()


# -- EK-FAC factors (orbax) in a bucket --------------------------------------------


def test_ekfac_factors_round_trip_in_a_bucket(bucket):
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from simfluence_jax import influence  # pylint: disable=g-import-not-at-top

  inputs = jax.random.normal(jax.random.key(0), (8, 3))
  model = nn.Dense(2)
  params = model.init(jax.random.key(1), inputs)
  task = influence.ClassificationTask(model.apply)
  factors = influence.fit_ekfac(task, params,
                                [{"inputs": inputs, "labels": jnp.arange(8) % 2}])
  path = "gs://bucket/factors"
  influence.save_factors(path, factors)
  assert epath.Path(path, "factors.json").exists()
  with pytest.raises(FileExistsError):
    influence.save_factors(path, factors)
  loaded = influence.load_factors(path)
  assert loaded.layers == factors.layers
  for name, original in factors.factors.items():
    for got, expected in zip(loaded.factors[name], original):
      np.testing.assert_array_equal(got, expected)
