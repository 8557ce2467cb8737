"""The plan's answers checked against references: XLA's own out-of-memory limit, the
devices sharing a chip, brute force over run counts, the job's own solver calls.

Most checks are pure (fake devices, fake compiles). The two TPU checks compile in a
subprocess (libtpu must never load into the test process) and are skipped without
libtpu.
"""

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import types

import jax
import numpy as np
import pytest

from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax import models
from simfluence_jax import trace as trace_lib
from simfluence_jax.pipeline import stages as pipeline_stages
from simfluence_jax.planning import chips
from simfluence_jax.planning import job as job_lib
from simfluence_jax.planning import report
from simfluence_jax.planning import stages
from simfluence_jax.simulators import _solver

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/default.py:tiny"
GIB = float(1 << 30)
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed")


def run_python(code, *, devices=1, timeout=600):
  """`python -c code` in the repo on CPU with `devices` local CPU devices."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                      + f" --xla_force_host_platform_device_count={devices}")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)
  return proc


def run_plan(tmp_path, *flags):
  out = tmp_path / "plan.json"
  code = ("import runpy, sys; sys.argv = ['plan'] + sys.argv[1:]; "
          "runpy.run_module('simfluence_jax.plan', run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", code, *flags, f"--out={out}"], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  plan = json.loads(out.read_text()) if out.exists() else None
  return proc.returncode, proc.stdout, proc.stderr, plan


# --- 1. devices sharing a chip; XLA's usable HBM ------------------------------------


def fake_devices(kind, coords_list):
  return [types.SimpleNamespace(device_kind=kind, coords=list(c), slice_index=0,
                                process_index=0) for c in coords_list]


@pytest.mark.parametrize("kind,generation,per_chip", [
    ("TPU v4", "v4", 2), ("TPU v5", "v5p", 1), ("TPU v5 lite", "v5e", 1)])
def test_chip_figures_are_shared_by_the_devices_on_a_chip(kind, generation,
                                                          per_chip):
  """Each device gets its chip's HBM, FLOP/s and bandwidth divided by the devices
  with its coords (libtpu's default v4 layout, without megacore: two TensorCores
  per chip)."""
  coords = [(x, y, 0) for y in range(2) for x in range(2) for _ in range(per_chip)]
  devices = fake_devices(kind, coords)
  expected = max(coords.count(c) for c in coords)  # brute force over the coords
  assert chips.devices_per_chip(devices) == expected == per_chip
  spec = chips.chip_of(devices, read_limit=False)
  chip = chips.CHIPS[generation]
  assert spec.devices_per_chip == per_chip
  assert spec.hbm_bytes == chip.hbm_bytes / per_chip
  assert spec.peak_flops == chip.peak_flops / per_chip
  assert spec.hbm_bandwidth == chip.hbm_bandwidth / per_chip
  assert chips.devices_per_chip(jax.devices("cpu")) == 1


@needs_libtpu
def test_fit_checks_use_the_hbm_xla_can_use_per_device():
  """Per topology: the devices per chip are libtpu's (same coords), `chip_of`'s HBM
  is the limit of XLA's own out-of-memory message for an independent oversized
  program, and a program whose peak lies between that limit and the chip's share
  does not fit."""
  code = r"""
import json, jax, jax.numpy as jnp
from simfluence_jax.planning import chips, costs, devices, report, stages
devices.use_cpu_runtime()
out = {}
for name in ("v4:2x2x1", "v5p:2x2x1", "v5e:2x2"):
  d = devices.topology_devices(name)
  spec = chips.chip_of(d)
  placed = jax.sharding.SingleDeviceSharding(d[0])
  big = jax.ShapeDtypeStruct((3, 1 << 38), jnp.float32, sharding=placed)  # 3 TiB
  try:
    jax.jit(lambda x: x + 1).lower(big).compile()
    limit = None
  except Exception as e:
    limit = costs.oom_bytes(e)[1]
  same = [x for x in d if list(x.coords) == list(d[0].coords)]
  share = chips.CHIPS[spec.name].hbm_bytes / len(same)
  between = (limit + share) / 2 if share > limit else None
  status = None
  if between:
    prog = stages.Program("p", jax.jit(lambda x: x * 2),
        (jax.ShapeDtypeStruct((1024,), jnp.float32, sharding=placed),),
        resident=(jax.ShapeDtypeStruct((int(between) // 4,), jnp.float32),))
    status = report.compile_row("s", prog, spec).status
  out[name] = dict(hbm=spec.hbm_bytes, limit=limit, per_chip=spec.devices_per_chip,
                   same=len(same), peak=spec.peak_flops, status=status,
                   source=spec.hbm_source)
print("RESULT" + json.dumps(out))
"""
  proc = run_python(code)
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
  assert line, proc.stderr[-3000:]
  out = json.loads(line[0][len("RESULT"):])
  for name, got in out.items():
    assert got["limit"] is not None, name
    assert got["hbm"] == got["limit"], (name, got)
    assert got["per_chip"] == got["same"], (name, got)
    assert "read from XLA" in got["source"]
  # A v4 chip is one megacore device, as on a real slice (review h23: libtpu's
  # default, a device per TensorCore with half the HBM, planned twice the devices).
  assert out["v4:2x2x1"]["per_chip"] == 1 and out["v5p:2x2x1"]["per_chip"] == 1
  assert out["v4:2x2x1"]["peak"] == chips.CHIPS["v4"].peak_flops
  assert out["v4:2x2x1"]["hbm"] == 30.75 * GIB  # below the chip's 32 GiB
  assert out["v5e:2x2"]["hbm"] == 15.75 * GIB  # below the chip's 16 GiB
  assert out["v5e:2x2"]["status"] == report.OOM  # 15.875 GiB: not usable
  assert out["v4:2x2x1"]["status"] == report.OOM  # 31.4 GiB of a 32 GiB chip


def test_header_names_the_usable_hbm_and_devices_per_chip():
  spec = dataclasses.replace(chips.CHIPS["v4"], hbm_bytes=15.25 * GIB,
                             peak_flops=137.5e12, hbm_bandwidth=600e9,
                             devices_per_chip=2,
                             hbm_source="usable per device, read from XLA")
  result = report.Plan("c", "v4:2x2x1", spec, 8, 0, [], 0.0)
  assert ("8 x v4 (2 per chip): 15.25 GiB HBM (usable per device, read from XLA), "
          "138 TFLOP/s, 600 GB/s") in report.header(result)
  line = report.plans_table([dict(result.to_json(), config="c.py")])[0]
  assert "(8 x 15.25 GiB" in line

# --- 2. --stages naming a stage the config does not run ----------------------------


def test_stage_the_config_does_not_run_is_refused(tmp_path):
  """`:tiny` has no pre-training (pretrain_steps = 0): one line, exit 1, no JSON."""
  status, stdout, stderr, plan = run_plan(
      tmp_path, f"--config={TINY}", "--topology=cpu", "--stages=pretrain,simulate")
  assert status == 1 and plan is None, stderr[-2000:]
  lines = [x for x in (stdout + stderr).splitlines() if x.startswith("error:")]
  assert len(lines) == 1
  assert lines[0].startswith("error: --stages: 'pretrain' is not run by this config (")
  assert "FITS" not in stdout


def test_a_plan_with_no_rows_never_fits():
  chip = chips.ChipSpec("t", 1e9, 1e12, 1e11, "t")
  empty = report.Plan("c", "cpu", chip, 1, 0, [], 0.0)
  assert not empty.fits
  text = report.format_text(empty)
  assert "FITS" not in text.replace("DOES NOT FIT", "")
  one = dataclasses.replace(empty, rows=[report.Row("s", "p", report.FITS)])
  assert one.fits and report.format_text(one).endswith("FITS")


# --- 3. the fix search -------------------------------------------------------------


def fake_job(config, num_devices):
  return job_lib.Job(config=config, devices=tuple(range(num_devices)), kind="lm",
                     train=None, test=None, pretrain=None, vocab_size=None,
                     num_classes=None, module=None, loss_fn=None, params=None)


def tiny_runs(num_runs, held, grad=0):
  config = config_lib.load_config(TINY)
  with config.unlocked():
    config.num_runs, config.num_held_out_runs = num_runs, held
    config.unseen.num_examples, config.record_grads = 0, bool(grad)
    config.num_grad_runs = grad
    config.influence.tracin_num_runs = 1
  return config


def test_run_count_candidates_never_add_runs():
  """Brute force over run and slot counts: every candidate k has slots·k ≤ the
  runs now and fewer per slot than now; k = floor(runs / slots) (when the runs do
  not divide) and its halvings are all there; every fix's job has no more runs."""
  for plain in range(1, 41):
    for slots in range(1, 10):
      now = plain // slots if plain % slots == 0 else plain
      base = plain // slots
      expected, k = ([base] if plain % slots and base else []), base // 2
      while k >= 1:
        expected.append(k)
        k //= 2
      expected = [k for k in dict.fromkeys(expected) if k < now]
      got = stages.run_counts_per_slot(plain, slots)
      assert got == expected, (plain, slots)
      assert all(slots * k <= plain and k < now for k in got)
  for runs, held, devices in [(6, 4, 4), (5, 3, 4), (3, 1, 4), (16, 8, 8), (7, 2, 2),
                             (2, 1, 8)]:
    job = fake_job(tiny_runs(runs, held), devices)
    for fix in stages._run_count_fixes(job):  # pylint: disable=protected-access
      changed = fake_job(report.override(job.config, fix.overrides), devices)
      assert changed.plain_runs() <= job.plain_runs(), fix.label


def test_every_fix_is_a_config_the_job_accepts():
  """A proposed fix the job then refuses would send the user round in circles:
  record_grads=False left tracin_per_step in the methods, which the job refuses."""
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_runs(8, 4, grad=4)
  config.methods = tuple(dict.fromkeys(config.methods + ("tracin_per_step",)))
  pipeline.validate_config(config)
  job = fake_job(config, 4)
  seen = set()
  for stage in stages.STAGES:
    for fix in stage.fixes(job):
      seen.add(fix.label)
      pipeline.validate_config(report.override(config, fix.overrides))
  assert "record_grads=False (no per-step TracIn)" in seen, seen


def suggest_with(monkeypatch, fixes, peak_of, hbm):
  """`report.suggest` with fake builds and compiles: `peak_of(config)` bytes."""
  monkeypatch.setattr(report.job_lib, "build",
                      lambda config, devices: fake_job(config, len(devices)))

  def fake_compile(stage, program, chip, measure=False):
    del measure
    row = report.Row(stage, program.name, report.ERROR)
    row.needed_bytes = float(peak_of(program.args[0]))
    row.status = report.FITS if row.peak_bytes <= chip.hbm_bytes else report.OOM
    return row

  monkeypatch.setattr(report, "compile_row", fake_compile)
  stage = stages.Stage("record_runs",
                       lambda job: [stages.Program("segment", None, (job.config,))],
                       lambda job: True, fixes)
  job = fake_job(tiny_runs(6, 4), 4)
  failing = report.Row("record_runs", "segment", report.OOM,
                       needed_bytes=float(peak_of(job.config)))
  chip = chips.ChipSpec("t", hbm, 1e12, 1e11, "t")
  return report.suggest(stage, job, failing, chip)


def per_slot_peak(config):
  """Bytes ∝ runs per slot over 4 slots (all of them where they do not divide)."""
  plain = config.num_runs + config.num_held_out_runs
  return 1000 * (plain // 4 if plain % 4 == 0 else plain)


def test_suggestion_is_one_run_per_chip_not_more_runs(monkeypatch):
  """dead.py's setup: 10 runs replicated over 4 slots; 1 run per slot fits, 2 do
  not. The search must reach 1 per slot (it used to try 5 per slot, 20 runs, and
  give the lever up when that raised the peak)."""
  suggestion = suggest_with(monkeypatch, stages._run_count_fixes,  # pylint: disable=protected-access
                            per_slot_peak, 1500)
  assert suggestion.startswith("fits with num_runs="), suggestion
  assert "(1 run(s) per chip)" in suggestion


@pytest.mark.parametrize("peaks,fits", [
    ({2: 2.3, 5: 5.7, 1: 1.2}, True),   # a larger setting raised it: keep going
    ({4: 5.0, 2: 5.0, 1: 1.0}, False),  # a smaller setting did not lower it: stop
])
def test_a_lever_is_given_up_only_when_a_smaller_setting_did_not_help(
    monkeypatch, peaks, fits):
  order = list(peaks)
  fixes = lambda job: [stages.Fix(f"k={k}", {"num_runs": k}, setting=k)
                       for k in order]
  suggestion = suggest_with(monkeypatch, fixes,
                            lambda c: peaks.get(c.num_runs, 10.0) * 1000, 1500)
  assert suggestion.startswith("fits with k=1") == fits, suggestion


def test_dead_setup_on_four_cpu_devices():
  """The job's own training segment compiled on 4 CPU devices (dead.py)."""
  code = r"""
from simfluence_jax import config_lib
from simfluence_jax.planning import devices, chips, report, stages, job as job_lib
devices.use_cpu_runtime()
d = devices.topology_devices("cpu")
c = config_lib.load_config("configs/default.py:tiny")
with c.unlocked():
  c.num_runs, c.num_held_out_runs, c.unseen.num_examples, c.record_grads = 6, 4, 0, False
  c.optimizer = "adam"
stage = stages.get("record_runs")
def peak(cfg):
  return report.compile_row("record_runs", stage.build(job_lib.build(cfg, d))[0],
                            chips.ChipSpec("t", 1e15, 1e12, 1e11, "t")).peak_bytes
p1 = peak(report.override(c, {"num_runs": 4, "num_held_out_runs": 0}))
p2 = peak(report.override(c, {"num_runs": 8, "num_held_out_runs": 0}))
chip = chips.ChipSpec("t", (p1 + p2) / 2, 1e12, 1e11, "t")
j = job_lib.build(c, d)
failing = report.compile_row("record_runs", stage.build(j)[0], chip)
print("STATUS", failing.status)
print("SUGGESTION", report.suggest(stage, j, failing, chip))
"""
  proc = run_python(code, devices=4)
  out = dict(line.split(" ", 1) for line in proc.stdout.splitlines()
             if line.startswith(("STATUS", "SUGGESTION")))
  assert out.get("STATUS") == report.OOM, proc.stderr[-3000:]
  assert out["SUGGESTION"].startswith("fits with num_runs="), out
  assert "(1 run(s) per chip)" in out["SUGGESTION"]


# --- 4. several CPU devices share the machine's RAM ----------------------------------


def test_cpu_devices_share_the_ram():
  """On 8 CPU devices each has RAM / 8 (and an eighth of the measured FLOP/s and
  bandwidth); a sharded program whose per-device part fits the RAM but whose total
  (8 parts) does not is reported as not fitting."""
  code = r"""
import os, jax, jax.numpy as jnp, numpy as np
from simfluence_jax.planning import devices, chips, report, stages
devices.use_cpu_runtime()
d = devices.topology_devices("cpu")
chip = chips.measure_host(d[0])
ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
mesh = jax.sharding.Mesh(np.array(d), ("x",))
s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
n = int(ram // 4 // len(d) * len(d))  # RAM in all (arguments), as much again out
prog = stages.Program("p", jax.jit(lambda x: x * 2),
                      (jax.ShapeDtypeStruct((n,), jnp.float32, sharding=s),))
row = report.compile_row("s", prog, chip)
print("RESULT", len(d), ram, chip.hbm_bytes, row.peak_bytes, row.status)
chips._best_seconds = lambda *args: 1.0  # every timing 1 s: the figures' arithmetic
fixed = chips.measure_host(d[0])
print("SPEED", fixed.peak_flops, fixed.hbm_bandwidth)
"""
  proc = run_python(code, devices=8)
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")]
  assert line, proc.stderr[-3000:]
  _, count, ram, hbm, peak, status = line[0].split(" ", 5)
  assert int(count) == 8 and float(hbm) == int(ram) / 8
  assert float(peak) < int(ram) < 8 * float(peak)  # one part fits, all do not
  assert status == report.OOM
  # ... and its cores: each device's FLOP/s and bandwidth are an eighth of what one
  # device measured running alone (review h23: each had the whole machine's).
  speed = [x for x in proc.stdout.splitlines() if x.startswith("SPEED")][0].split()
  assert float(speed[1]) == 2 * 1024**3 / 8
  assert float(speed[2]) == 2 * 4 * (16 << 20) / 8


# --- 5. the vocabulary the job uses --------------------------------------------------


def test_plan_uses_the_datasets_vocabulary():
  config = config_lib.load_config(TINY)
  dataset_vocab = data.get_dataset(config).vocab_size  # what base_model uses
  job = job_lib.build(config, jax.devices("cpu"))
  assert job.vocab_size == dataset_vocab == data.BYTE_VOCAB_SIZE
  module = models.get_model(config.model, vocab_size=dataset_vocab, num_classes=None,
                            max_len=config.data.seq_len)
  params = jax.eval_shape(lambda: models.init_variables(
      module, np.zeros((1, config.data.seq_len), np.int32), seed=0))
  assert models.num_params(job.params) == models.num_params(params)
  with config.unlocked():
    config.model.vocab_size = dataset_vocab  # agrees: kept
  assert job_lib.build(config, jax.devices("cpu")).vocab_size == dataset_vocab
  with config.unlocked():
    config.model.vocab_size = 32100
  with pytest.raises(ValueError, match=r"^config\.model\.vocab_size=32100: "):
    job_lib.build(config, jax.devices("cpu"))
  for name in ("configs/scale_1b.py", "configs/scale_8b.py"):
    scale = config_lib.load_config(name)
    assert scale.data.name == "seqio"
    assert job_lib._vocab_size(scale) == 32100  # pylint: disable=protected-access


# --- 6. accelerator names counting TensorCores ---------------------------------------


def test_odd_tensorcore_counts_are_refused():
  for name, kind, count in [("v4-7", "v4", 7), ("v5p-9", "v5p", 9)]:
    with pytest.raises(ValueError) as raised:
      chips.topology_name(name)
    assert str(raised.value) == (f"--topology={name!r}: {kind}-N counts "
                                 f"TensorCores, two per chip; {count} is odd.")
  assert chips.topology_name("v4-8") == "v4:2x2x1"
  assert chips.topology_name("v5p-8") == "v5p:2x2x1"
  assert chips.topology_name("v5litepod-4") == "v5e:2x2"


# --- 7. Simfluence solves: phases and the CV grid ------------------------------------


@pytest.mark.parametrize("num_phases", [1, 4])
@pytest.mark.parametrize("l2", [0.1, None])
def test_simfluence_rows_are_the_jobs_solves(monkeypatch, num_phases, l2):
  """The job's `fit_ridge` on a trace of the config's shapes, its `_solver.solve`
  calls recorded: (rows, unknowns, method, columns per chunk) and the chunks solved
  of each shape = the plan's programs and calls; the rollout's A, B have K phases."""
  config = config_lib.load_config(TINY)
  with config.unlocked():
    config.simulators.num_phases, config.simulators.l2 = num_phases, l2
    config.num_runs = 7  # folds of 4 and 3 runs: two fold shapes
  runs, steps, batch = config.num_runs, config.num_steps, config.batch_size
  n, m = config.num_train_examples, config.num_test_examples
  rng = np.random.default_rng(0)
  trace = trace_lib.Trace(
      batch_ids=rng.integers(0, n, (runs, steps, batch)).astype(np.int32),
      losses=(2 + rng.random((runs, steps + 1, m))).astype(np.float32),
      learning_rates=np.full((runs, steps), 0.1, np.float32), num_train_examples=n)
  original, calls = _solver.solve, []

  def spy(ids, x, y, num_train, l2, **kwargs):
    out = original(ids, x, y, num_train, l2, **kwargs)
    calls.append((ids.shape[0], num_train, out[1]["method"], out[1]["chunk_size"],
                  out[1]["num_chunks"]))
    return out

  monkeypatch.setattr(_solver, "solve", spy)
  job = job_lib.build(config, jax.devices("cpu"))
  programs = stages.simfluence_fit(job)
  for kind in ("linear", "additive"):
    calls.clear()
    sim = pipeline_stages.fit_ridge(config, kind, trace)
    expected = {}
    for rows, unknowns, method, chunk, chunks in calls:
      key = (rows, unknowns, method, chunk)
      expected[key] = expected.get(key, 0) + chunks
    planned = {}
    for p in programs:
      if not p.name.startswith(kind + "_") or p.calls is None:
        continue
      theta = jax.eval_shape(p.fn, *p.args) if not p.name.endswith("cg_init") else (
          None)
      unknowns = theta.shape[0] if theta is not None else None
      method = p.name.rsplit("_", 1)[-1] if theta is not None else "cg"
      key = (p.args[0].shape[0], unknowns, method, p.args[1].shape[1])
      planned[key] = planned.get(key, 0) + p.calls
    assert planned == expected, (kind, planned, expected)
    a, b = sim.phase_parameters()
    rollout = next(p for p in stages.simulate(job)
                   if p.name == f"rollout_{kind}")
    assert rollout.args[1].shape == np.shape(b) == (num_phases, n, m)
    if a is not None:
      assert rollout.args[0].shape == np.shape(a)
