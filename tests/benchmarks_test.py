"""benchmarks/run.py in its smoke mode: every row, finite ratios, JSON, PNG, machine."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from simfluence_jax.evaluation import _bench_tables

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_runner():
  spec = importlib.util.spec_from_file_location(
      "simfluence_bench_run", os.path.join(REPO, "benchmarks", "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_smoke_run_writes_every_row(tmp_path, monkeypatch, capsys):
  runner = _load_runner()
  # Peers absent (as in CI, which installs only .[test]): their rows must say so.
  for name in ("torch", "kronfluence", "captum"):
    monkeypatch.setitem(sys.modules, name, None)
  out = tmp_path / "bench.json"
  assert runner.main(["--smoke", "--out", str(out)]) == 0

  with open(out) as f:
    result = json.load(f)
  assert result["mode"] == "smoke"
  assert set(result["rows"]) == set(runner.ROWS)
  for name, row in result["rows"].items():
    if name in ("ekfac_vs_kronfluence", "ekfac_self_vs_kronfluence", "tracin_vs_captum"):
      assert row["status"] == runner.PEER_HINT, row
      assert row["ratio"] is None
      assert row["raw"]["ours_s"] > 0  # our side still ran
    elif name == "tracin_end_to_end":  # our side ran as a fresh process
      assert row["status"] == runner.PEER_HINT, row
      ours = row["raw"]["ours"]
      assert 0 < ours["import_s"] < ours["end_to_end_s"] < ours["process_s"], ours
      assert ours["first_call_s"] > 0 and ours["second_call_s"] > 0
      cached = row["raw"]["ours_cached"]  # the repeat process, compilation cache filled
      assert 0 < cached["import_s"] < cached["end_to_end_s"], cached
    elif name in ("main_job_tiny", "ekfac_end_to_end"):
      assert row["status"] == "skipped (--smoke)"
    else:
      assert row["status"] == "ok", row
      assert math.isfinite(row["ratio"]) and row["ratio"] > 0, row
      assert row["budget"] == runner.BUDGETS[name][0]
      # Informational rows (no budget in docs/design.md §7) neither meet nor miss.
      assert isinstance(row["met"], bool) == (row["budget"] is not None), row
  solver = result["rows"]["simfluence_linear_fit"]["raw"]
  assert solver["ours_residual"] < 1e-3 and solver["sklearn_residual"] < 1e-3
  machine = result["machine"]
  assert machine["cpu_count"] >= 1 and machine["jax_backend"] == "cpu"
  assert machine["versions"]["jax"] and machine["versions"]["torch"] is None
  assert machine["platform"]

  png = tmp_path / "bench.png"
  assert png.exists() and png.read_bytes()[:4] == b"\x89PNG"

  # The README's speed table reads this file: every row, with the run's date.
  assert result["date"].endswith(" UTC") and result["total_s"] > 0
  head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                        capture_output=True, text=True)
  if head.returncode == 0:  # a git checkout (CI's clean clone): the commit it ran
    assert result["commit"] in (head.stdout.strip(), head.stdout.strip() + "+changes")
  assert machine["cpu_model"] is None or machine["cpu_model"].strip(), machine
  result["commit"] = "0123abc"  # a checkout with local changes would be refused
  lines = _bench_tables.bench_tables([result], [str(out)])
  assert f"(`{out}`; mode smoke; {result['date']}; commit 0123abc)" in lines[0]
  for name in runner.ROWS:
    assert any(line.startswith(f"| {name}: ") for line in lines), name
  printed = capsys.readouterr().out
  assert "| benchmark | ours | peer / baseline | ratio | budget | met? |" in printed
  table = [line for line in printed.splitlines() if line.startswith("| ")]
  assert len(table) == len(runner.ROWS) + 2  # header, rule, one line per row
  assert all(line.count(" | ") == 6 for line in table), table
  assert runner.PEER_HINT in printed


def test_roofline_counts_every_loop_trip_and_divides_by_the_peak():
  spec = importlib.util.spec_from_file_location(
      "simfluence_roofline", os.path.join(REPO, "benchmarks", "roofline_bench.py"))
  roofline = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  spec.loader.exec_module(roofline)
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, trips = 16, 5
  a = jnp.ones((n, n), jnp.float32)
  assert roofline.compiled_flops(jnp.matmul, a, a) == 2 * n ** 3
  scanned = lambda x: jax.lax.scan(lambda c, _: (c @ a, None), x, None, length=trips)[0]
  # (+ the loop counter's few adds)
  assert abs(roofline.compiled_flops(scanned, a) - trips * 2 * n ** 3) <= 2 * trips
  # A loop of a trip count XLA does not state would count once: refused (h26).
  dynamic = lambda x, k: jax.lax.fori_loop(0, k, lambda _, c: c @ a, x)
  with pytest.raises(ValueError, match="unknown trip count"):
    roofline.compiled_flops(dynamic, a, jnp.int32(trips))
  row = roofline._row(8e9, 2.0, peak=8e9)  # pylint: disable=protected-access
  assert row["flop_per_s"] == 4e9 and row["fraction_of_peak"] == 0.5
  # The scoring rows count the FLOPs of the kernels they run (the EK-FAC kernel
  # does more than the gradient passes it replaces: that "effective" count read
  # 1.6% of peak where the kernel ran at a third), the solver's those XLA gives
  # its CG kernels (a count from shapes had 1.47x).
  rows = roofline.scoring_rows(256, peak=1e12, repeats=1)
  for name in ("tracin_scoring", "ekfac_scoring"):
    assert rows[name]["flops"] > 0 and 0 < rows[name]["effective_fraction"], name
  assert rows["ekfac_scoring"]["fraction_of_peak"] > (
      5 * rows["ekfac_scoring"]["effective_fraction"])
  solver = roofline.solver_row(50, 4, 8, 4, 2, peak=1e12, repeats=1)
  assert solver["flops"] > 0 and solver["iterations"] > 0, solver
  assert solver["flops_counted"].startswith("XLA's FLOPs"), solver


def test_segment_profile_reads_every_op_of_the_trace():
  spec = importlib.util.spec_from_file_location(
      "simfluence_segment_profile",
      os.path.join(REPO, "benchmarks", "segment_profile.py"))
  profile = importlib.util.module_from_spec(spec)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  spec.loader.exec_module(profile)
  wall, flops, ops = profile.profile(num_runs=2, num_steps=1)
  assert wall > 0 and flops > 0
  kinds = {kind for kind, _, _, _ in ops.values()}
  assert "matmul" in kinds and kinds <= {"matmul", "copy / transpose", "broadcast",
                                         "elementwise / reduce"}, kinds
  # Every pass of a step shows up, named from the JAX source op of its ops.
  passes = {profile._pass(source) for _, source, _, _ in ops.values()}  # pylint: disable=protected-access
  assert {"train forward", "train backward", "test-loss forward"} <= passes, passes
  assert all(micros >= 0 and calls >= 1 for _, _, micros, calls in ops.values())
  assert profile._pass("jit(segment)/while/body/vmap(transpose(jvp(TransformerLM)))/x") == (  # pylint: disable=protected-access
      "train backward")
