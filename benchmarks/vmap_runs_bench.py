"""R runs trained together (vmap) vs the same R runs one after another.

No budget any more (docs/design.md §7: the roofline replaced the old ">= 3x faster per
run together than one after another", which a compute-bound CPU cannot show); the
ratio is still printed. Both sides use the same jitted segment function
of `simfluence_jax.training.runs` (scan over steps of the vmapped pure train step),
the together side with all R runs, the sequential side with R=1 called R times (and,
for reference, a plain loop calling the jitted single-run step once per step); the
model is the 2-layer d=64 byte Transformer (sequence 32, batch 8, 32 test examples
whose losses are recorded after every step). Compilation is excluded (one warm-up
call per side); each side reports the best of `--repeats` timings.

  python benchmarks/vmap_runs_bench.py [--runs 16] [--steps 4] [--repeats 3] [--sweep]

`--sweep` also prints the per-run step time for vmapped groups of 1, 2, 4, ... runs,
which shows where vmapping stops paying off on the machine at hand (on a 2-core CPU
a single run is already compute-bound, so the gain there is small; on accelerators
a single small run leaves the chip mostly idle).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import models
from simfluence_jax import training
from simfluence_jax.training import runs as runs_lib

VOCAB, SEQ_LEN, BATCH, NUM_TEST, NUM_TRAIN = 259, 32, 8, 32, 256


def _lm_arrays(rng, n):
  tokens = rng.integers(0, 256, (n, SEQ_LEN + 1)).astype(np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
          "mask": np.ones((n, SEQ_LEN), np.float32)}


def _time(fn, repeats):
  fn()  # warm-up: compile
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - start)
  return best


def _setup(num_runs, num_steps, **model_kwargs):
  """The model, data and jitted runners both sides use."""
  rng = np.random.default_rng(0)
  train, test = _lm_arrays(rng, NUM_TRAIN), _lm_arrays(rng, NUM_TEST)
  model = models.TransformerLM(vocab_size=VOCAB, max_len=SEQ_LEN, **model_kwargs)
  params0 = models.init_variables(model, train["inputs"])
  loss_fn = training.make_loss_fn(model, "lm")
  optimizer, schedule = training.make_optimizer(
      {"optimizer": "sgd", "learning_rate": 0.1, "lr_schedule": "constant"})
  train_step = training.make_train_step(loss_fn, optimizer, schedule)
  batch_ids = rng.integers(0, NUM_TRAIN, (num_runs, num_steps, BATCH)).astype(np.int32)
  train_dev, test_dev = jax.device_put(train), jax.device_put(test)

  def runner(group):
    run_sharding, _ = runs_lib.runs_shardings(group)
    segment = runs_lib.make_segment_fn(train_step, run_sharding)
    stack = lambda x: jnp.repeat(x[None], group, axis=0)

    def run(ids):
      params = jax.tree_util.tree_map(stack, params0)
      opt_state = jax.vmap(optimizer.init)(params)
      out = segment(params, opt_state, jnp.int32(0), ids, train_dev, test_dev)
      jax.block_until_ready(out)
    return run

  # What a plain training loop does: one jitted call of the single-run step per step.
  jitted_step = jax.jit(train_step)

  def stepwise(ids):
    params, opt_state = params0, optimizer.init(params0)
    for t in range(ids.shape[0]):
      params, opt_state, test_losses, _ = jitted_step(
          params, opt_state, jnp.int32(t), ids[t], train_dev, test_dev)
    jax.block_until_ready(test_losses)

  return params0, batch_ids, runner, stepwise


def measure(num_runs=16, num_steps=4, repeats=3, stepwise=True, **model_kwargs):
  """Times R runs vmapped against the same R runs one by one.

  Returns:
    dict with `together_s`, `sequential_s` (and `stepwise_s` if `stepwise`): best
    total seconds for all R runs of T steps; `speedup` = sequential / together;
    the sizes. `model_kwargs` override the TransformerLM's (default d=64, 2 layers).
  """
  params0, batch_ids, runner, stepwise_fn = _setup(num_runs, num_steps, **model_kwargs)
  together, alone = runner(num_runs), runner(1)
  ids_dev = jnp.asarray(batch_ids)
  per_run_ids = [jnp.asarray(batch_ids[r:r + 1]) for r in range(num_runs)]
  result = {
      "num_runs": num_runs, "num_steps": num_steps, "batch_size": BATCH,
      "seq_len": SEQ_LEN, "num_test": NUM_TEST, "num_params": models.num_params(params0),
      "together_s": _time(lambda: together(ids_dev), repeats),
      "sequential_s": _time(lambda: [alone(ids) for ids in per_run_ids], repeats)}
  if stepwise:
    result["stepwise_s"] = _time(lambda: [stepwise_fn(ids[0]) for ids in per_run_ids],
                                 repeats)
  result["speedup"] = result["sequential_s"] / result["together_s"]
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=16)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--sweep", action="store_true")
  args = parser.parse_args()
  result = measure(args.runs, args.steps, args.repeats)
  together_s, sequential_s = result["together_s"], result["sequential_s"]
  stepwise_s = result["stepwise_s"]

  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"params: {result['num_params']:,}  R={args.runs} T={args.steps} "
        f"B={BATCH} L={SEQ_LEN} M={NUM_TEST}")
  print(f"{'':26s}{'total s':>10s}{'per run s':>12s}{'per step s':>12s}")
  for name, seconds in (("vmapped (together)", together_s),
                        ("sequential (one by one)", sequential_s),
                        ("sequential, step by step", stepwise_s)):
    print(f"{name:26s}{seconds:10.3f}{seconds / args.runs:12.4f}"
          f"{seconds / args.steps:12.4f}")
  print(f"speed-up per run: {sequential_s / together_s:.2f}x vs the same scanned "
        f"single-run function, {stepwise_s / together_s:.2f}x vs per-step calls "
        "(budget >= 3x); timings on a shared machine are noisy.")
  if args.sweep:
    _, batch_ids, runner, _ = _setup(args.runs, args.steps)
    ids_dev = jnp.asarray(batch_ids)
    group = 1
    while group <= args.runs:
      run_group, group_ids = runner(group), ids_dev[:group]
      # The lambda runs before the loop variables change.
      seconds = _time(lambda: run_group(group_ids), args.repeats)
      print(f"  {group:3d} runs vmapped: {seconds / group / args.steps:.4f} s per "
            "run-step")
      group *= 2


if __name__ == "__main__":
  main()
