"""Influence scoring time against the plain per-example gradient passes it needs.

Budget (docs/design.md §7): scoring ≤ 3× the time of `kernels.per_example_grads` over the
same train examples (TracIn-CP, one checkpoint; EK-FAC scores, factors fitted once).
Timings on the shared 2-core CPU are noisy.

  python benchmarks/scoring_floor_bench.py [--quick]
"""

import argparse
import time

import jax

from simfluence_jax import influence
from simfluence_jax import kernels

import _common  # benchmarks/ is on sys.path when a script there runs

SIZES = {"full": (4096, 64, 256), "quick": (512, 16, 256), "smoke": (256, 4, 256)}


def _best_of(fn, repeats=3):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return min(times)


def measure(size="full", repeats=3):
  """Times TracIn-CP and EK-FAC scoring against the per-example gradient passes.

  Returns:
    dict: `floor_s` (per-example gradients of all N train examples), `tracin_s`,
    `ekfac_s` (scoring the same N against Q queries; EK-FAC factors fitted before),
    `tracin_ratio`, `ekfac_ratio` (scoring / floor), the sizes.
  """
  num_train, num_query, chunk = SIZES[size]
  model = _common.MLP()
  inputs = jax.random.normal(jax.random.key(0), (num_train, 64))
  labels = jax.random.randint(jax.random.key(1), (num_train,), 0, 10)
  params = model.init(jax.random.key(2), inputs)
  task = influence.ClassificationTask(model.apply)
  batches = [{"inputs": inputs[i:i + chunk], "labels": labels[i:i + chunk]}
             for i in range(0, num_train, chunk)]
  query = {"inputs": inputs[:num_query], "labels": labels[:num_query]}

  # The budget's floor: `per_example_grads` alone (it held a flatten to [n, P]
  # too, about 8% of its time, in the scorers' favour).
  grads_fn = jax.jit(lambda p, b: kernels.per_example_grads(task.loss, p, b))
  floor = _best_of(lambda: [grads_fn(params, b) for b in batches], repeats)
  tracin = _best_of(lambda: influence.tracin_scores(task, [params], [1.0], query,
                                                    batches, chunk_size=chunk), repeats)
  factors = influence.fit_ekfac(task, params, batches)
  ekfac = _best_of(lambda: influence.ekfac_scores(task, params, factors, query,
                                                  batches, chunk_size=chunk), repeats)
  return {"num_train": num_train, "num_query": num_query, "chunk_size": chunk,
          "floor_s": floor, "tracin_s": tracin, "ekfac_s": ekfac,
          "tracin_ratio": tracin / floor, "ekfac_ratio": ekfac / floor}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  r = measure("quick" if args.quick else "full")
  num_train, num_query = r["num_train"], r["num_query"]
  floor, tracin, ekfac = r["floor_s"], r["tracin_s"], r["ekfac_s"]
  print(f"N={num_train} Q={num_query} MLP 64-128-10 (noisy shared 2-core CPU)")
  print(f"per-example gradient passes: {floor * 1e3:8.1f} ms")
  print(f"TracIn-CP scoring:           {tracin * 1e3:8.1f} ms  ratio {tracin / floor:.2f}x")
  print(f"EK-FAC scoring:              {ekfac * 1e3:8.1f} ms  ratio {ekfac / floor:.2f}x")


if __name__ == "__main__":
  main()
