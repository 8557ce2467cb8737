r"""Where the training segment's time goes: a per-op profile of its compiled program.

  python benchmarks/segment_profile.py [--runs=8] [--steps=8] [--top=12]

Builds the roofline benchmark's training segment (`roofline_bench.training_segment`:
the default model, batch 32, R runs × S steps), runs it once under `jax.profiler`
and reads the per-op events of the XLA:CPU thunks from the trace. Prints the wall
time, the ops' summed time by kind (matmuls: dots and the library fusions built
around them; layout copies and transposes; materialised broadcasts; other
elementwise and reduction work), the matmul FLOP/s within their ops (XLA's FLOP
count of the whole program over the matmul ops' time, so an upper bound) and the
`--top` most expensive ops with the source op they come from.

Ops on the 2 cores can overlap, so the summed op time can exceed the wall time.
The numbers are in docs/experiments.md ("The training segment against the matmul
peak").
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

from simfluence_jax.planning import costs

import roofline_bench

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.-]+) = (.*)$", re.MULTILINE)
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _kind(name: str, text: str) -> str:
  if name.startswith(("ynn_fusion", "xnn_fusion", "dot")) or " dot(" in text:
    return "matmul"
  if "copy" in name or "transpose" in name:
    return "copy / transpose"
  if "broadcast" in name:
    return "broadcast"
  return "elementwise / reduce"


def _pass(source: str) -> str:
  """Which pass of a step an op belongs to, from its JAX source op name."""
  if "transpose(jvp(" in source:
    return "train backward"
  if "jvp(" in source:
    return "train forward"
  if "vmap(" in source and "Transformer" in source:
    return "test-loss forward"
  return "update, glue"


def op_times(trace_dir: str, hlo_text: str):
  """{instruction name: (kind, source op, summed µs, calls)} from a profiler trace."""
  instructions = {m.group(1): m.group(2) for m in _INSTRUCTION.finditer(hlo_text)}
  path = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
  if not path:
    raise RuntimeError(f"no *.trace.json.gz under {trace_dir}: the profiler wrote none")
  with gzip.open(path[0]) as f:
    events = json.load(f)["traceEvents"]
  totals = collections.defaultdict(lambda: [0.0, 0])
  for event in events:
    if event.get("ph") == "X" and event["name"] in instructions:
      totals[event["name"]][0] += event.get("dur", 0.0)
      totals[event["name"]][1] += 1
  out = {}
  for name, (micros, calls) in totals.items():
    text = instructions[name]
    source = _OP_NAME.search(text)
    out[name] = (_kind(name, text), source.group(1) if source else "", micros, calls)
  return out


def profile(num_runs: int = 8, num_steps: int = 8):
  """Returns (wall seconds, program FLOPs, op_times) of one warm segment call."""
  segment, args, fresh, *_ = roofline_bench.training_segment(num_runs, num_steps)
  lowered = segment.lower(*fresh(), *args)
  compiled = lowered.compile()  # one compile: its HLO names the ops, its costs the FLOPs
  flops = float(costs.program_costs(compiled, lowered)["flops"])
  for _ in range(2):
    jax.block_until_ready(segment(*fresh(), *args))
  state = fresh()
  jax.block_until_ready(state)
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      start = time.perf_counter()
      jax.block_until_ready(segment(*state, *args))
      wall = time.perf_counter() - start
    ops = op_times(trace_dir, compiled.as_text())
  return wall, flops, ops


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=8)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--top", type=int, default=12)
  flags = parser.parse_args()
  wall, flops, ops = profile(flags.runs, flags.steps)
  by_kind = collections.Counter()
  for kind, _, micros, _ in ops.values():
    by_kind[kind] += micros / 1e6
  total = sum(by_kind.values())
  print(f"training segment, {flags.runs} runs × {flags.steps} steps: wall {wall:.3f} s "
        f"under the profiler, {flops / 1e9:.1f} GFLOP (XLA), summed op time "
        f"{total:.3f} s")
  for kind, seconds in by_kind.most_common():
    print(f"  {kind:22s} {seconds:7.3f} s  {seconds / total:6.1%}")
  by_pass = collections.Counter()
  for _, source, micros, _ in ops.values():
    by_pass[_pass(source)] += micros / 1e6
  for name, seconds in by_pass.most_common():
    print(f"  {name:22s} {seconds:7.3f} s  {seconds / total:6.1%}")
  print(f"  matmul FLOP/s within their ops ≤ {flops / by_kind['matmul'] / 1e9:.0f} "
        f"GFLOP/s")
  print(f"top {flags.top} ops (summed over calls):")
  for name, (kind, source, micros, calls) in sorted(
      ops.items(), key=lambda item: -item[1][2])[:flags.top]:
    print(f"  {micros / 1e3:8.1f} ms {calls:4d}× {name:28s} {kind:20s} "
          f"{source[-70:]}")


if __name__ == "__main__":
  main()
