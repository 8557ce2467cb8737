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

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence

import _common  # benchmarks/ is on sys.path when a script there runs

SIZES = {"full": (2048, 64), "quick": (512, 16), "smoke": (256, 4)}  # N, Q


def measure(size="full", peer=True, repeats=2):
  """Times our EK-FAC factors + pairwise scores, and Kronfluence's if `peer`.

  Returns:
    dict: `ours_s` (best warm call); with the peer installed and `peer`, `peer_s`
    (best warm call), `peer_first_call_s`, `speedup`,
    `pearson` (of the two score matrices) and `norm_ratio` (ours / theirs);
    without it, `peer_missing` (the import error).
  """
  num_train, num_query = SIZES[size]
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
  ours_time, _, ours = _common.best_of(ours_fn)
  ours = np.asarray(ours)
  result = {"num_train": num_train, "num_query": num_query, "ours_s": ours_time}
  if not peer:
    return result
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import kronfluence  # pylint: disable=g-import-not-at-top
    from kronfluence import arguments  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return dict(result, peer_missing=str(e))
  logging.disable(logging.WARNING)

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
    def kron_fn():
      analyzer.fit_all_factors("factors", train_set, per_device_batch_size=256,
                               factor_args=factor_args, overwrite_output_dir=True)
      analyzer.compute_pairwise_scores(
          "scores", "factors", query_set, train_set,
          per_device_query_batch_size=num_query, per_device_train_batch_size=256,
          overwrite_output_dir=True)
      return analyzer.load_pairwise_scores("scores")["all_modules"].numpy()
    # Both sides timed warm (best of `repeats` after a first call: our compile,
    # torch's one-time set-up); the first call is kept as peer_first_call_s.
    kron_time, first, theirs = _common.best_of(kron_fn, repeats)
  logging.disable(logging.NOTSET)
  return dict(result, peer_s=kron_time, peer_first_call_s=first,
              speedup=kron_time / ours_time,
              pearson=float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
              norm_ratio=float(np.linalg.norm(ours) / np.linalg.norm(theirs)))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  r = measure("quick" if args.quick else "full")
  if "peer_missing" in r:
    raise SystemExit(f"kronfluence/torch missing ({r['peer_missing']}): "
                     "pip install -e .[bench]")
  num_train, num_query = r["num_train"], r["num_query"]
  ours_time, kron_time = r["ours_s"], r["peer_s"]
  print(f"EK-FAC factors + pairwise scores, MLP 64-128-10, N={num_train}, "
        f"Q={num_query} (noisy shared 2-core CPU)")
  print(f"{'':10s}{'ours':>10s}{'kronfluence':>13s}")
  print(f"{'time (s)':10s}{ours_time:10.3f}{kron_time:13.3f}")
  print(f"speed-up: {kron_time / ours_time:.1f}x (goal >= 2x)")
  print(f"Pearson: {r['pearson']:.6f}; ratio of norms ours/theirs: "
        f"{r['norm_ratio']:.4f}")


if __name__ == "__main__":
  main()
