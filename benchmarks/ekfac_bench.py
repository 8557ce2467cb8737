"""EK-FAC factors + pairwise scores: ours against Kronfluence on the same MLP and data.

Budget (DESIGN.md §7): ≥ 2× faster, same scores. Conventions matched: empirical
Fisher (`use_empirical_fisher=True`), summed per-example CE losses, loss as the
measurement, damping left at both libraries' default heuristic 0.1 × mean(Λ) per
layer, all float32. Timings on the shared 2-core CPU are noisy.

  python benchmarks/ekfac_bench.py [--quick]
"""

import argparse
import logging
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from simfluence_jax import influence

import _common  # benchmarks/ is on sys.path when a script there runs




def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  logging.disable(logging.WARNING)
  import kronfluence  # pylint: disable=g-import-not-at-top
  from kronfluence import arguments  # pylint: disable=g-import-not-at-top
  num_train, num_query = (512, 16) if args.quick else (2048, 64)
  model = _common.MLP()
  inputs = np.asarray(jax.random.normal(jax.random.key(0), (num_train, 64)))
  labels = np.asarray(jax.random.randint(jax.random.key(1), (num_train,), 0, 10))
  params = model.init(jax.random.key(2), inputs[:1])
  task = influence.ClassificationTask(model.apply)
  batches = [{"inputs": jnp.asarray(inputs[i:i + 256]),
              "labels": jnp.asarray(labels[i:i + 256])}
             for i in range(0, num_train, 256)]
  query = {"inputs": jnp.asarray(inputs[:num_query]),
           "labels": jnp.asarray(labels[:num_query])}

  def ours_fn():
    factors = influence.fit_ekfac(task, params, batches)
    return jax.block_until_ready(
        influence.ekfac_scores(task, params, factors, query, batches))
  ours_fn()
  start = time.perf_counter()
  ours = np.asarray(ours_fn())
  ours_time = time.perf_counter() - start

  net = _common.torch_mlp(params)

  class _Task(kronfluence.Task):

    def compute_train_loss(self, batch, model, sample=False):
      x, y = batch
      logits = model(x)
      if sample:
        with torch.no_grad():
          y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
      return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
      return self.compute_train_loss(batch, model)

  kf_task = _Task()
  net = kronfluence.prepare_model(net, kf_task)
  train_set = torch.utils.data.TensorDataset(torch.tensor(inputs),
                                             torch.tensor(labels, dtype=torch.long))
  query_set = torch.utils.data.TensorDataset(
      torch.tensor(inputs[:num_query]), torch.tensor(labels[:num_query],
                                                     dtype=torch.long))
  with tempfile.TemporaryDirectory() as directory:
    analyzer = kronfluence.Analyzer("bench", net, kf_task, cpu=True,
                                    disable_tqdm=True, output_dir=directory)
    factor_args = arguments.FactorArguments(strategy="ekfac",
                                            use_empirical_fisher=True)
    start = time.perf_counter()
    analyzer.fit_all_factors("factors", train_set, per_device_batch_size=256,
                             factor_args=factor_args, overwrite_output_dir=True)
    analyzer.compute_pairwise_scores(
        "scores", "factors", query_set, train_set, per_device_query_batch_size=num_query,
        per_device_train_batch_size=256, overwrite_output_dir=True)
    theirs = analyzer.load_pairwise_scores("scores")["all_modules"].numpy()
    kron_time = time.perf_counter() - start

  print(f"EK-FAC factors + pairwise scores, MLP 64-128-10, N={num_train}, "
        f"Q={num_query} (noisy shared 2-core CPU)")
  print(f"{'':10s}{'ours':>10s}{'kronfluence':>13s}")
  print(f"{'time (s)':10s}{ours_time:10.3f}{kron_time:13.3f}")
  print(f"speed-up: {kron_time / ours_time:.1f}x (goal >= 2x)")
  print(f"Pearson: {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.6f}; "
        f"ratio of norms ours/theirs: {np.linalg.norm(ours) / np.linalg.norm(theirs):.4f}")


if __name__ == "__main__":
  main()
