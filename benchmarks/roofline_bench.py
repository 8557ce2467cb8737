r"""How close each hot loop gets to this machine's matmul peak (docs/design.md §7).

  python benchmarks/roofline_bench.py [--quick]

Measures the peak once: the best FLOP/s of a jitted float32 matmul (n x n, 2n³ FLOPs).
Then, for each hot loop, the FLOPs of its compiled program as XLA counts them, every
loop trip included (`simfluence_jax.planning.costs.program_costs`), over its best warm
time, as a fraction of that peak:

* `train_segment`: the main job's vmapped, scanned training segment
  (`training.runs.make_segment_fn`, grouped as `train_runs` would group runs
  that record no gradients, `runs.default_runs_per_group`) on the default model
  (d=64, 2 layers), batch 32, R runs x T steps;
* `per_example_grads`: `kernels.per_example_grads` of the same model on a chunk;
* `tracin_scoring`, `ekfac_scoring`: TracIn-CP and EK-FAC scores of N train examples
  (MLP 64-128-10). Their Python loops over chunks call several programs; their FLOPs
  are those of the per-chunk score kernel, times the chunks (the query side, done
  once, is left out). `effective_fraction` also counts, as before 2026-12-06, the
  FLOPs of materialised per-example gradient passes over the same N examples (the
  work a plain implementation would do): the EK-FAC kernel executes about 20 times
  those, so that rate read 1.6% where the kernel runs at about a third of peak;
* `solver`: the Simfluence-Linear fit (CG): XLA's FLOPs of its init and, per
  iteration, of its two kernels (X·d and the PCG update), times the iterations (a
  count from shapes had 1.47 times XLA's).

A fraction well below 1 on a CPU is expected for small, memory-bound programs; what
it shows is where the time goes and which loop to work on.
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # _common

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

import _common
from simfluence_jax import influence
from simfluence_jax import kernels
from simfluence_jax import models
from simfluence_jax import simulators
from simfluence_jax import trace as trace_lib
from simfluence_jax import training
from simfluence_jax.influence import _common as influence_common
from simfluence_jax.influence import _ekfac
from simfluence_jax.influence import _tracin
from simfluence_jax.planning import costs
from simfluence_jax.simulators import _solver
from simfluence_jax.training import runs as runs_lib

SIZES = {  # matmul n, (runs, steps), scoring N, solver (N, M, R, T, B)
    "quick": dict(matmul=1024, runs=(4, 4), scoring=1024, solver=(500, 32, 64, 32, 8)),
    "full": dict(matmul=2048, runs=(8, 8), scoring=4096, solver=(2000, 64, 312, 32, 8)),
}
SEQ_LEN, VOCAB, BATCH, NUM_TEST = 32, 259, 32, 32


def best_of(fn, repeats):
  """Best wall time of `fn()` (its result blocked on) after one warm-up call."""
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best


def compiled_flops(fn, *args) -> float:
  """FLOPs of `jax.jit(fn)(*args)` with every loop trip counted.

  Raises:
    ValueError: a loop whose trip count XLA does not state (it would count once).
  """
  lowered = jax.jit(fn).lower(*args)
  program = costs.program_costs(lowered.compile(), lowered)
  if program["unknown_trips"]:
    raise ValueError(f"compiled_flops: {getattr(fn, '__name__', fn)} has a loop of "
                     f"unknown trip count ({program['loops']}): its FLOPs would count "
                     "one trip.")
  return float(program["flops"])


def matmul_peak(n: int, repeats: int) -> dict:
  """The best float32 matmul rate over sizes n/2, n and 2n, each the best of at
  least 5 calls (review h26: one size, best of 3, read 117–160 GFLOP/s on a loaded
  machine, ±20% on every fraction of it)."""
  matmul = jax.jit(jnp.matmul)
  best = None
  for size in (n // 2, n, 2 * n):
    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    seconds = best_of(lambda: matmul(a, b), max(repeats, 5))  # pylint: disable=cell-var-from-loop
    rate = 2.0 * size ** 3 / seconds
    if best is None or rate > best["flop_per_s"]:
      best = {"n": size, "seconds": seconds, "flop_per_s": rate}
  return best


def _row(flops, seconds, peak, **extra):
  achieved = flops / seconds
  return {"flops": flops, "seconds": seconds, "flop_per_s": achieved,
          "fraction_of_peak": achieved / peak, **extra}


def _lm_arrays(rng, n):
  tokens = rng.integers(3, VOCAB, (n, SEQ_LEN + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((n, SEQ_LEN), np.float32)}


def training_segment(num_runs, num_steps):
  """The default model's jitted training segment and what it needs.

  Returns:
    (segment, args, fresh, params0, loss_fn, train): call
    `segment(*fresh(), *args)`; `fresh()` gives new copies of the donated params
    and optimizer state [R, ...] for every call.
  """
  rng = np.random.default_rng(0)
  train, test = _lm_arrays(rng, 256), _lm_arrays(rng, NUM_TEST)
  model = models.TransformerLM(vocab_size=VOCAB, max_len=SEQ_LEN)
  params0 = models.init_variables(model, train["inputs"])
  loss_fn = training.make_loss_fn(model, "lm")
  optimizer, schedule = training.make_optimizer(
      {"optimizer": "sgd", "learning_rate": 0.001, "lr_schedule": "constant"})
  train_step = training.make_train_step(loss_fn, optimizer, schedule)
  run_sharding, _ = runs_lib.runs_shardings(num_runs)
  segment = runs_lib.make_segment_fn(
      train_step, run_sharding,
      runs_per_group=runs_lib.default_runs_per_group(params0, num_runs))
  ids = jnp.asarray(rng.integers(0, 256, (num_runs, num_steps, BATCH)).astype(np.int32))
  stack = lambda x: jnp.repeat(x[None], num_runs, axis=0)
  params = jax.tree_util.tree_map(stack, params0)
  opt_state = jax.vmap(optimizer.init)(params)
  args = (jnp.int32(0), ids, jax.device_put(train), jax.device_put(test))
  # The segment donates params / opt_state: fresh copies for every call.
  fresh = lambda: jax.tree_util.tree_map(jnp.copy, (params, opt_state))
  return segment, args, fresh, params0, loss_fn, train


def transformer_rows(num_runs, num_steps, peak, repeats):
  """The training segment and per-example gradients of the default model."""
  segment, args, fresh, params0, loss_fn, train = training_segment(num_runs,
                                                                    num_steps)
  flops = compiled_flops(segment.__wrapped__ if hasattr(segment, "__wrapped__")
                         else segment, *fresh(), *args)
  seconds = best_of(lambda: segment(*fresh(), *args), repeats)
  rows = {"train_segment": _row(flops, seconds, peak, runs=num_runs, steps=num_steps,
                                batch=BATCH, num_params=models.num_params(params0))}
  chunk = {k: v[:BATCH] for k, v in train.items()}
  grads = lambda p, b: kernels.per_example_grads(
      lambda p_, ex: loss_fn(p_, ex), p, b)
  try:
    flops = compiled_flops(grads, params0, chunk)
    seconds = best_of(lambda: jax.jit(grads)(params0, chunk), repeats)
    rows["per_example_grads"] = _row(flops, seconds, peak, chunk=BATCH)
  except Exception as e:  # pylint: disable=broad-except
    rows["per_example_grads"] = {"status": f"failed: {str(e).splitlines()[0]}"}
  return rows


def scoring_rows(num_train, peak, repeats):
  """TracIn-CP and EK-FAC scoring; effective FLOPs (materialised gradient passes)."""
  chunk, num_query = 256, 32
  model = _common.MLP()
  inputs = jax.random.normal(jax.random.key(0), (num_train, 64))
  labels = jax.random.randint(jax.random.key(1), (num_train,), 0, 10)
  params = model.init(jax.random.key(2), inputs)
  task = influence.ClassificationTask(model.apply)
  batches = [{"inputs": inputs[i:i + chunk], "labels": labels[i:i + chunk]}
             for i in range(0, num_train, chunk)]
  query = {"inputs": inputs[:num_query], "labels": labels[:num_query]}
  grads = lambda p, b: kernels.flatten_per_example(kernels.per_example_grads(
      task.loss, p, b))
  pass_flops = compiled_flops(grads, params, batches[0]) * len(batches)
  tracin = best_of(lambda: influence.tracin_scores(
      task, [params], [1.0], query, batches, chunk_size=chunk), repeats)
  factors = influence.fit_ekfac(task, params, batches)
  ekfac = best_of(lambda: influence.ekfac_scores(
      task, params, factors, query, batches, chunk_size=chunk), repeats)
  # The per-chunk kernels the two scorers run (private: a benchmark's business).
  plan = _tracin._cached_plan(task, params, query, batches[0], num_query)  # pylint: disable=protected-access
  tracin_query = _tracin._query_kernel(task, plan)(params, query)  # pylint: disable=protected-access
  tracin_flops = compiled_flops(functools.partial(
      _tracin._chunk_scores, task, plan), params, tracin_query, jnp.float32(1.0),  # pylint: disable=protected-access
      batches[0]) * len(batches)
  lambdas = _ekfac.layer_damping(factors, None)
  ekfac_query = _ekfac._preconditioned_queries(  # pylint: disable=protected-access
      task, factors.layers, None, influence_common.resolve_mesh(None), params,
      factors.factors, query, lambdas)
  ekfac_flops = compiled_flops(functools.partial(
      _ekfac._train_scores, task, factors.layers, "total"), params, ekfac_query,  # pylint: disable=protected-access
      batches[0]) * len(batches)
  # Over the whole call's time: its input checks, query side, transfers and loop
  # too (review h26: the chunk kernels alone ran 3.4x (TracIn) and 1.6x (EK-FAC)
  # faster), which is the rate a caller gets.
  note = ("XLA's FLOPs of the per-chunk score kernel x chunks, over the whole "
          "call's time")
  return {name: _row(flops, seconds, peak, num_train=num_train, num_query=num_query,
                     flops_counted=note,
                     effective_fraction=pass_flops / seconds / peak)
          for name, flops, seconds in (("tracin_scoring", tracin_flops, tracin),
                                       ("ekfac_scoring", ekfac_flops, ekfac))}


def solver_row(num_train, num_test, num_runs, num_steps, batch, peak, repeats):
  rng = np.random.default_rng(0)
  batch_ids = rng.integers(0, num_train, (num_runs, num_steps, batch)).astype(np.int32)
  losses = rng.uniform(1.0, 3.0, (num_runs, num_steps + 1, num_test)).astype(np.float32)
  trace = trace_lib.Trace(batch_ids=batch_ids, losses=losses,
                          learning_rates=np.full((num_runs, num_steps), 0.1, np.float32),
                          num_train_examples=num_train)
  fit = lambda: simulators.fit("linear", trace, l2=1.0, method="cg")
  seconds = best_of(lambda: fit().A, repeats)
  iterations = int(fit().fit_info["iterations"])
  # XLA's FLOPs of the CG kernels on the fit's own problem: the init once, then per
  # iteration X·direction (`forward`) and the PCG update (`_cg_step`).
  ids = jnp.asarray(batch_ids.reshape(-1, batch))
  x = jnp.asarray(losses[:, :-1].reshape(-1, num_test))
  y = jnp.asarray(losses[:, 1:].reshape(-1, num_test))
  l2 = jnp.full((num_test,), 1.0, jnp.float32)
  init = functools.partial(_solver._cg_init, num_train=num_train, linear=True)  # pylint: disable=protected-access
  state = jax.jit(init)(ids, x, y, l2, jnp.float32(1e-5))
  theta, residual, direction, rz, target, inverse = state[:6]
  forward = functools.partial(_solver.forward, linear=True)
  predicted = jax.jit(forward)(direction, ids, x)
  step_flops = (compiled_flops(forward, direction, ids, x) + compiled_flops(
      functools.partial(_solver._cg_step, linear=True), predicted, theta, residual,  # pylint: disable=protected-access
      direction, rz, target, inverse, ids, x, l2))
  flops = compiled_flops(init, ids, x, y, l2, jnp.float32(1e-5)) + (
      iterations * step_flops)
  return _row(float(flops), seconds, peak, iterations=iterations,
              sizes=dict(N=num_train, M=num_test, R=num_runs, T=num_steps, B=batch),
              flops_counted="XLA's FLOPs of the CG init + iterations x (forward, "
                            "PCG step); a lower bound: the steps run past the "
                            "last host check and the settling checks are not "
                            "counted (1.3-1.4x more ran, review h26)")


def measure(size="full", repeats=3):
  """Every row: {name: {flops, seconds, flop_per_s, fraction_of_peak, ...}}."""
  sizes = SIZES[size]
  peak = matmul_peak(sizes["matmul"], repeats)
  rows = {}
  rows.update(transformer_rows(*sizes["runs"], peak["flop_per_s"], repeats))
  rows.update(scoring_rows(sizes["scoring"], peak["flop_per_s"], repeats))
  rows["solver"] = solver_row(*sizes["solver"], peak["flop_per_s"], repeats)
  return {"peak": peak, "rows": rows}


def table(result) -> str:
  peak = result["peak"]
  lines = [f"matmul peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s "
           f"(float32 {peak['n']}x{peak['n']}, {jax.default_backend()})",
           "| hot loop | GFLOP | seconds | GFLOP/s | fraction of peak |",
           "|---|---|---|---|---|"]
  for name, row in result["rows"].items():
    if "flops" not in row:
      lines.append(f"| {name} | – | – | – | {row.get('status')} |")
      continue
    lines.append(f"| {name} | {row['flops'] / 1e9:.2f} | {row['seconds']:.4f} | "
                 f"{row['flop_per_s'] / 1e9:.1f} | {row['fraction_of_peak']:.1%} |")
  return "\n".join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  result = measure("quick" if args.quick else "full", args.repeats)
  print(table(result))
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)


if __name__ == "__main__":
  main()
