"""`python -m simfluence_jax.plan`: per-chip memory, loop-counted costs, fixes.

The plans run in subprocesses: libtpu (the TPU compiler) must never load into the
test process, whose jax stays on the plain CPU backend. The TPU tests compile for
v5e:2x2 and are skipped when libtpu is not installed (`pip install libtpu`).
"""

import dataclasses
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from simfluence_jax import config_lib
from simfluence_jax import data
from simfluence_jax import influence
from simfluence_jax import models
from simfluence_jax import sharding
from simfluence_jax import training
from simfluence_jax.influence import _common
from simfluence_jax.planning import chips
from simfluence_jax.planning import costs
from simfluence_jax.planning import report
from simfluence_jax.planning import stages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/default.py:tiny"
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason="libtpu is not installed")


def run_plan(tmp_path, *flags, prelude=""):
  """Runs the plan CLI; (exit status, stdout, the JSON plan or None)."""
  out = tmp_path / "plan.json"
  code = (f"{prelude}import runpy, sys; sys.argv = ['plan'] + sys.argv[1:]; "
          "runpy.run_module('simfluence_jax.plan', run_name='__main__')")
  proc = subprocess.run(
      [sys.executable, "-c", code, *flags, f"--out={out}"], cwd=REPO,
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
      timeout=600)
  print(proc.stdout)
  plan = json.loads(out.read_text()) if out.exists() else None
  return proc.returncode, proc.stdout + proc.stderr, plan


def row(plan, name):
  return next(r for r in plan["rows"] if r["name"] == name)


def transformer_params(vocab, d, layers, d_ff, max_len):
  """Parameter count of `models.TransformerLM`, written out by hand."""
  per_block = (2 * 2 * d                     # two LayerNorms (scale, bias)
               + 4 * (d * d + d)             # query, key, value, out
               + d * d_ff + d_ff + d_ff * d + d)  # mlp_in, mlp_out
  return vocab * d + max_len * d + layers * per_block + 2 * d + d * vocab + vocab


@needs_libtpu
@pytest.mark.parametrize("mesh_model", [1, 2])
def test_segment_arguments_are_the_sharded_state(tmp_path, mesh_model):
  """Argument bytes of the training segment = the arithmetic of R/D runs per run
  slot (params + Adam state + batch ids), each state leaf split over `mesh_model`
  chips where a dimension divides, plus the replicated example arrays."""
  d, d_ff, seq_len = 128, 256, 128
  status, _, plan = run_plan(
      tmp_path, f"--config={TINY}", "--topology=v5e:2x2", "--stages=record_runs",
      "--config.optimizer=adam", f"--config.model.d_model={d}",
      f"--config.model.d_ff={d_ff}", f"--config.data.seq_len={seq_len}",
      f"--config.mesh_model={mesh_model}", "--nosuggest")
  assert status == 0
  segment = row(plan, "record_runs/segment")
  config = config_lib.load_config(TINY)
  num_params = transformer_params(data.BYTE_VOCAB_SIZE, d, config.model.num_layers,
                                  d_ff, seq_len)
  assert plan["num_params"] == num_params
  # Every run but the gradient-recording ones is in this call.
  unseen = config.unseen.num_runs if config.unseen.num_examples else 0
  runs = config.num_runs + config.num_held_out_runs + unseen - config.num_grad_runs
  slots = 4 // mesh_model
  assert runs % slots == 0
  # Per leaf of the params, Adam's moments and step count, and the schedule's step
  # count (the job's learning rate is a schedule): bytes on one chip, split in
  # `mesh_model` where a dimension divides (the head's 259 does not).
  model_config = config.model.copy_and_resolve_references()
  model_config.d_model, model_config.d_ff = d, d_ff
  module = models.get_model(model_config, vocab_size=data.BYTE_VOCAB_SIZE,
                            num_classes=None, max_len=seq_len)
  params = jax.eval_shape(lambda: models.init_variables(
      module, jnp.zeros((1, seq_len), jnp.int32), seed=0))
  assert models.num_params(params) == num_params
  adam = jax.eval_shape(optax.adam(optax.constant_schedule(1e-3)).init, params)

  def chip_bytes(tree):
    return sum(x.size * x.dtype.itemsize
               // (mesh_model if any(sharding.param_spec(x.shape, mesh_model)) else 1)
               for x in jax.tree_util.tree_leaves(tree))

  steps = min(config.checkpoint_every, config.num_steps)  # per segment
  # Batch ids (int32) and occurrence weights (float32) of every step, as train_runs
  # passes them.
  per_run = (chip_bytes(params) + chip_bytes(adam)
             + steps * config.batch_size * (4 + 4))
  arrays = ((config.num_train_examples + config.num_test_examples) * seq_len
            * (4 + 4 + 4))  # inputs, targets (int32), mask (float32)
  # The optimizer's numbers are arguments too (float32 scalars, replicated).
  adam_config = config.copy_and_resolve_references()
  adam_config.optimizer = "adam"
  _, numbers = training.optim.split_settings(adam_config, config.num_steps)
  assert {"learning_rate", "b1", "b2", "eps"} <= set(numbers)
  expected = (runs // slots * per_run + 4  # + the first-step scalar
              + arrays + 4 * len(numbers))
  assert segment["logical_argument_bytes"] == expected
  if mesh_model > 1:  # the state really is halved: most of it splits
    assert chip_bytes(params) < 0.55 * 4 * num_params
  # XLA's layout pads small minor dimensions to TPU tiles (here the 259-wide head),
  # but the runs are split: replicating them would be 4x the params.
  assert expected <= segment["memory"]["arguments"] <= 1.25 * expected
  assert segment["memory"]["total"] >= segment["memory"]["arguments"]
  assert segment["flops"] > 0 and segment["roofline_seconds"] > 0


@needs_libtpu
def test_too_large_is_reported_with_a_fix_that_fits(tmp_path):
  """Two runs per chip recording 196608 test losses per step (~20 GiB): named,
  with the first fix that compiles within HBM, and the other stages planned."""
  status, output, plan = run_plan(
      tmp_path, f"--config={TINY}", "--topology=v5e:2x2",
      "--stages=record_runs,simulate,metagradient",
      "--config.num_test_examples=196608", "--config.num_runs=8",
      "--compile_threads=2")  # rows keep stage order when compiled concurrently
  assert status == 3, output
  stages = [r["stage"] for r in plan["rows"]]
  assert stages == sorted(stages, key=["record_runs", "simulate",
                                       "metagradient"].index), stages
  assert "DOES NOT FIT: record_runs/segment" in output
  segment = row(plan, "record_runs/segment")
  assert segment["status"] == "out of memory"
  assert segment["needed_bytes"] > 16 * 2**30
  assert segment["suggestion"].startswith("fits with num_runs="), segment
  assert "(1 run(s) per chip)" in segment["suggestion"]
  assert row(plan, "simulate/rollout_linear")["status"] == "fits"
  assert row(plan, "metagradient/-")["status"] in ("not available", "fits")


def test_cpu_estimate_against_a_measured_run(tmp_path):
  """The roofline of the segment for this CPU (measured peak and bandwidth) vs the
  same compiled segment run on zeros; the ratio is printed, loosely bounded."""
  # A linear schedule reads the step: with a constant one XLA drops that argument.
  status, output, plan = run_plan(tmp_path, f"--config={TINY}", "--topology=cpu",
                                  "--stages=record_runs", "--measure",
                                  "--config.lr_schedule=linear")
  assert status == 0, output
  segment = row(plan, "record_runs/segment")
  ratio = segment["measured_seconds"] / segment["roofline_seconds"]
  print(f"CPU segment: measured {segment['measured_seconds'] * 1e3:.2f} ms, "
        f"roofline {segment['roofline_seconds'] * 1e3:.3f} ms, ratio {ratio:.1f}")
  assert 0.1 < ratio < 1e4
  # On CPU nothing pads: the arguments are exactly the arithmetic.
  assert segment["memory"]["arguments"] == segment["logical_argument_bytes"]


def test_ekfac_preconditions_per_layer_shape_with_the_rest_resident(tmp_path):
  """EK-FAC forms and preconditions its query gradients with one program per layer
  shape, run once per layer; each program's peak counts what the job holds beside
  it: the params, every other layer's factors, query tokens and preconditioned
  queries (arithmetic of the tiny model)."""
  status, output, plan = run_plan(tmp_path, f"--config={TINY}", "--topology=cpu",
                                  "--stages=ekfac_if", "--nosuggest")
  assert status == 0, output
  config = config_lib.load_config(TINY)
  seq_len = config.data.seq_len
  module = models.get_model(config.model, vocab_size=data.BYTE_VOCAB_SIZE,
                            num_classes=None, max_len=seq_len)
  params = jax.eval_shape(lambda: models.init_variables(
      module, jnp.zeros((1, seq_len), jnp.int32), seed=0))
  task = influence.LanguageModelingTask(module.apply)
  batch = {"inputs": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
           "targets": jax.ShapeDtypeStruct((1, seq_len), jnp.int32),
           "mask": jax.ShapeDtypeStruct((1, seq_len), jnp.float32)}
  layers = stages.traced(lambda p, b: influence.find_layers(task.loss, p, b,
                                                            warn=False),
                         params, batch)
  shapes = [(s.augmented_input_dim, s.output_dim) for s in layers]
  rows = [r for r in plan["rows"] if "/precondition_" in r["name"]]
  # Layers of one kind and shape share a program (here the attention's four).
  assert {r["name"].split("_")[2] for r in rows} == {f"{i}x{o}" for i, o in shapes}
  assert sum(r["calls"] for r in rows) == len(layers) > len(rows)
  q = config.num_test_examples
  factors = {s: 4 * (i * i + o * o + o * i) for s, (i, o) in zip(layers, shapes)}
  tokens = {s: 4 * q * seq_len * (i + o + 1) for s, (i, o) in zip(layers, shapes)}
  queries = {s: 4 * q * o * i for s, (i, o) in zip(layers, shapes)}
  params_bytes = 4 * models.num_params(params)
  query_tokens = row(plan, "ekfac_if/query_tokens")
  batch_bytes = query_tokens["logical_argument_bytes"] - params_bytes  # the queries
  assert batch_bytes == config.num_test_examples * seq_len * (4 + 4 + 4)
  all_factors, num_layers = sum(factors.values()), len(layers)
  for r in rows:
    spec = next(s for s in layers
                if r["name"].startswith(f"ekfac_if/precondition_{s.augmented_input_dim}"
                                        f"x{s.output_dim}_"))
    assert r["status"] == "fits"
    # Its own factors, tokens and λ; beside it the params, the queries, and every
    # other layer's factors, λ, tokens and preconditioned query.
    assert r["logical_argument_bytes"] == factors[spec] + tokens[spec] + 4, r["name"]
    assert r["resident_bytes"] == (
        params_bytes + batch_bytes + all_factors - factors[spec]
        + 4 * (num_layers - 1) + sum(tokens.values()) - tokens[spec]
        + sum(queries.values()) - queries[spec])
    assert r["peak_bytes"] == r["memory"]["total"] + r["resident_bytes"]
  # The factors and λ stay on the chips from the queries to the last score.
  for name in ("ekfac_if/query_tokens", "ekfac_if/scores"):
    assert row(plan, name)["status"] == "fits"
    assert row(plan, name)["resident_bytes"] == all_factors + 4 * num_layers


def test_resident_bytes_count_into_the_peak():
  """What the job holds beside a program counts into its peak and decides whether
  it fits."""
  sds = jax.ShapeDtypeStruct
  program = stages.Program("gram", jax.jit(lambda x: x @ x.T),
                           (sds((64, 32), jnp.float32),),
                           resident=(sds((256,), jnp.float32),))  # 1 KiB
  chip = chips.ChipSpec("test", 2.0**30, 1e12, 1e11, "a test")
  row = report.compile_row("s", program, chip)
  assert row.status == report.FITS and row.resident_bytes == 1024
  assert row.peak_bytes == row.memory.total + 1024
  tight = dataclasses.replace(chip, hbm_bytes=row.memory.total + 1023)
  assert report.compile_row("s", program, tight).status == report.OOM


def test_eigendecompositions_are_costed_from_their_shapes():
  """Review h23: an eigh compiles to a custom call that XLA's cost analysis counts
  as 0 FLOPs (0.12-0.42 n^3 for the ops around it, against about 9 n^3): the plan's
  eigendecompose rows read near zero work."""
  n = 96
  sds = jax.ShapeDtypeStruct
  chip = chips.ChipSpec("test", 2.0**30, 1e12, 1e11, "a test")
  eigh = jax.jit(jnp.linalg.eigh)
  counted = report.compile_row("s", stages.Program("eigh", eigh, (sds((n, n),
                                                                     jnp.float32),)),
                               chip).flops
  assert counted < 2 * n**3  # what XLA sees (the brute-force count is ~9 n^3)
  row = report.compile_row("s", stages.Program(
      "eigh", eigh, (sds((n, n), jnp.float32),),
      min_flops=stages.EIGH_FLOPS_PER_N3 * n**3), chip)
  assert row.flops == 9 * n**3 and "shape estimate" in row.cost_source
  # The EK-FAC stage sizes each layer shape's eigh from A's and S's dimensions.
  config = config_lib.load_config(TINY)
  from simfluence_jax.planning import job as job_lib  # pylint: disable=g-import-not-at-top
  programs = stages.ekfac_if(job_lib.build(config, jax.devices("cpu")[:1]))
  rows = [p for p in programs if p.name.startswith("eigendecompose_")]
  assert rows
  for program in rows:
    dim_in, dim_out = map(int, program.name.split("_")[1].split("x"))
    assert program.min_flops == 9 * (dim_in**3 + dim_out**3), program.name


def test_without_libtpu_one_line_and_nonzero(tmp_path):
  status, output, plan = run_plan(
      tmp_path, f"--config={TINY}", "--topology=v5e:2x2",
      prelude="import sys; sys.modules['libtpu'] = None; ")
  assert status == 4 and plan is None
  lines = [line for line in output.splitlines() if line.strip()]
  assert lines == ['error: the TPU compiler is not installed: pip install -e ".[tpu]" '
                   "(or pip install libtpu), then rerun."]


def test_a_bad_compile_threads_is_one_line(tmp_path):
  """Review h28: --compile_threads=-3 ran with one thread without a word."""
  status, output, plan = run_plan(tmp_path, f"--config={TINY}", "--topology=cpu",
                                  "--stages=simulate", "--compile_threads=-3")
  assert status == 1 and plan is None
  assert output.strip().splitlines()[-1] == (
      "error: --compile_threads=-3: must be a positive integer.")


def test_loop_costs_count_every_trip():
  """A scan of T matmuls inside a scan of U: T·U matmuls of 2n³ FLOPs, where XLA's
  own cost analysis counts each loop body once."""
  n, inner, outer = 64, 3, 5

  def f(x):
    def body(c, _):
      return jax.lax.scan(lambda c2, _: (jnp.tanh(c2 @ x), None), c, None,
                          length=inner)[0], None
    return jax.lax.scan(body, x, None, length=outer)[0]

  compiled = jax.jit(f).lower(jax.ShapeDtypeStruct((n, n), jnp.float32)).compile()
  counted = costs.loop_costs(compiled.as_text())
  matmuls = 2 * n ** 3 * inner * outer
  assert compiled.cost_analysis()["flops"] < 2 * 2 * n ** 3  # one body, once
  assert not counted["unknown_trips"]
  assert sorted(t for _, t in counted["loops"]) == [inner, outer]
  assert matmuls <= counted["flops"] <= 1.05 * matmuls


@pytest.mark.parametrize("chunk_size,num_train,devices", [
    (64, 200, 4), (64, 200, 256), (8, 48, 3), (300, 1000, 8), (1000, 4096, 64)])
def test_score_chunks_match_the_kernels_chunking(chunk_size, num_train, devices):
  """The plan's chunk length and count = what `iterate_padded_chunks` yields on
  the pipeline's batches of `influence.chunk_size`."""
  batches = [{"x": np.zeros((min(chunk_size, num_train - i), 1))}
             for i in range(0, num_train, chunk_size)]
  chunks = list(_common.iterate_padded_chunks(batches, 256, devices))
  assert stages.score_chunks(chunk_size, num_train, devices) == (
      len(chunks[0][0]["x"]), len(chunks))


def test_topology_names():
  assert chips.topology_name("v5e:16x16") == "v5e:16x16"
  assert chips.topology_name("v5litepod-256") == "v5e:16x16"
  assert chips.topology_name("v5p-128") == "v5p:4x4x4"  # 128 TensorCores, 64 chips
  assert chips.topology_name("v4-32") == "v4:2x2x4"
  assert chips.topology_name("v6e-8") == "v6e:2x4"
  for bad in ("v9:2x2", "v5p-6", "tpu"):
    with pytest.raises(ValueError, match="--topology"):
      chips.topology_name(bad)


def test_out_of_memory_messages():
  new = RuntimeError("RESOURCE_EXHAUSTED: E1000: CompileTimeHbmOom: Ran out of memory "
                     "on HBM, the total memory required for HLO temporaries (42.00G) "
                     "exceeds available HBM (15.75G). HLO module: jit__lambda.")
  old = RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory in memory space hbm. "
                     "Used 20.5G of 15.75G hbm.")
  assert costs.is_out_of_memory(new) and costs.is_out_of_memory(old)
  assert costs.oom_bytes(new) == (42.0 * 2**30, 15.75 * 2**30)
  assert costs.oom_bytes(old) == (20.5 * 2**30, 15.75 * 2**30)
  assert not costs.is_out_of_memory(ValueError("shapes do not match"))
  assert math.isclose(chips.CHIPS["v5e"].roofline_seconds(197e12, 0.0), 1.0)


def test_readme_table_of_plans():
  """`tables --plans`: per stage the largest program's GiB per chip per plan, NO
  where it does not fit, – where the config does not run the stage."""
  from simfluence_jax.planning import report  # pylint: disable=g-import-not-at-top
  chip = {"hbm_bytes": 16 * 2**30}
  gib = lambda x: {"total": x * 2**30}
  small = {"config": "configs/default.py", "topology": "v5e:2x2", "num_devices": 4,
           "chip": chip, "num_params": 136e3, "seconds": 60.0, "rows": [
               {"name": "record_runs/segment", "status": "fits", "memory": gib(0.5)},
               {"name": "ekfac_if/covariance", "status": "fits", "memory": gib(0.25)},
               {"name": "ekfac_if/scores", "status": "fits", "memory": gib(0.5),
                "peak_bytes": 0.75 * 2**30},  # with what the job holds beside it
               {"name": "ekfac_if/eigendecompose_259", "status": "not compiled"},
               {"name": "simfluence_fit/linear_cg_init", "status": "error"},
               # Sized, not compiled: a lower bound (review h23: it read as a
               # compiled TPU figure).
               {"name": "simulate/rollout", "status": "not compiled",
                "needed_bytes": 0.03 * 2**30}]}
  large = dict(small, config="configs/scale_1b.py", topology="v5e:16x16",
               num_devices=256, num_params=1.34e9, seconds=300.0, rows=[
                   {"name": "record_runs/segment", "status": "out of memory",
                    "needed_bytes": 18.9 * 2**30}])
  lines = report.plans_table([small, large])
  assert "`default.py` on v5e:2x2 (4 x 16 GiB, 136k params)" in lines[0]
  assert "`scale_1b.py` on v5e:16x16 (256 x 16 GiB, 1.34B params)" in lines[0]
  assert lines[2] == "| record_runs | 0.50 | **18.90 NO** |"
  assert lines[3] == "| ekfac_if | 0.75 | – |"
  assert lines[4] == "| simfluence_fit | n/a (error) | – |"
  assert lines[5] == "| simulate | ≥0.03 | – |"
  assert "1.0 min, 5.0 min" in lines[-1]


def test_cpu_plan_trains_the_runs_in_the_groups_train_runs_picks(monkeypatch):
  """Review h23: on a CPU `train_runs` trains runs that record no gradients 2 at a
  time once they hold 8 MiB of params; the plan sized the all-at-once program (16x
  the memory on the default config) instead of the job's."""
  from simfluence_jax.planning import job as job_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(TINY)
  job = job_lib.build(config, jax.devices("cpu")[:1])
  shapes = job.params  # ShapeDtypeStructs: sized from shape and dtype
  bytes_per_run = sum(math.prod(x.shape) * x.dtype.itemsize
                      for x in jax.tree_util.tree_leaves(shapes))
  monkeypatch.setattr(training.runs, "CPU_GROUP_MIN_BYTES", 3 * bytes_per_run)
  assert training.runs.default_runs_per_group(shapes, 3, platform="cpu") == 2
  assert training.runs.default_runs_per_group(shapes, 2, platform="cpu") is None
  assert training.runs.default_runs_per_group(shapes, 3, platform="tpu") is None
  plain, = stages.record_runs(job)
  assert plain.note.endswith(", trained 2 at a time"), plain.note
  recording, = stages.record_grad_runs(job)  # recording runs: all at once
  assert "at a time" not in recording.note
  # The very program train_runs builds for grouped runs (its cache hit).
  num_runs = job.plain_runs()
  mesh = sharding.runs_mesh(1, devices=job.devices)
  run_sharding, _ = training.runs_shardings(num_runs, mesh)
  params = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct((num_runs,) + x.shape, x.dtype), shapes)
  grouped = training.segment_program(
      job.loss_fn, config, config.num_steps, params, run_sharding,
      projection_dim=config.projection_dim, seed=config.seed, runs_per_group=2)
  assert plain.fn is grouped.fn
