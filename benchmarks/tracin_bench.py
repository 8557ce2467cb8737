"""TracIn-CP: ours against Captum's `TracInCP` on the same MLP, data and checkpoints.

Budget (DESIGN.md §7): ≥ 5× faster, same scores. Captum multiplies each
checkpoint's gradient dot products by the learning rate its load function returns,
like ours; both use per-example CE losses and all parameters. Timings on the shared
2-core CPU are noisy.

  python benchmarks/tracin_bench.py [--quick]
"""

import argparse
import os
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
  from captum.influence import TracInCP  # pylint: disable=g-import-not-at-top
  num_train, num_query, num_checkpoints = (256, 16, 2) if args.quick else (1024, 32, 3)
  model = _common.MLP()
  inputs = np.asarray(jax.random.normal(jax.random.key(0), (num_train, 64)))
  labels = np.asarray(jax.random.randint(jax.random.key(1), (num_train,), 0, 10)).astype(np.int64)
  checkpoints = [model.init(jax.random.key(10 + k), inputs[:1])
                 for k in range(num_checkpoints)]
  rates = [0.1 / (k + 1) for k in range(num_checkpoints)]
  task = influence.ClassificationTask(model.apply)
  train = {"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels)}
  query = jax.tree_util.tree_map(lambda x: x[:num_query], train)

  ours_fn = lambda: jax.block_until_ready(
      influence.tracin_scores(task, checkpoints, rates, query, train, chunk_size=256))
  ours_fn()
  start = time.perf_counter()
  ours = np.asarray(ours_fn())
  ours_time = time.perf_counter() - start

  torch.set_num_threads(2)
  net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
  with tempfile.TemporaryDirectory() as directory:
    paths = []
    for k, params in enumerate(checkpoints):
      path = os.path.join(directory, f"checkpoint_{k}.pt")
      torch.save({"state": _common.torch_state(params), "lr": rates[k]}, path)
      paths.append(path)

    def load(net, path):
      saved = torch.load(path)
      net.load_state_dict(saved["state"])
      return saved["lr"]

    dataset = torch.utils.data.TensorDataset(torch.tensor(inputs),
                                             torch.tensor(labels))
    tracin = TracInCP(net, dataset, paths, checkpoints_load_func=load,
                      loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                      batch_size=256, sample_wise_grads_per_batch=True)
    query_inputs = (torch.tensor(inputs[:num_query]), torch.tensor(labels[:num_query]))
    start = time.perf_counter()
    theirs = tracin.influence(query_inputs).detach().numpy()
    captum_time = time.perf_counter() - start

  print(f"TracIn-CP, MLP 64-128-10, N={num_train}, Q={num_query}, "
        f"K={num_checkpoints} checkpoints (noisy shared 2-core CPU)")
  print(f"{'':10s}{'ours':>10s}{'captum':>10s}")
  print(f"{'time (s)':10s}{ours_time:10.3f}{captum_time:10.3f}")
  print(f"speed-up: {captum_time / ours_time:.1f}x (goal >= 5x)")
  print(f"Pearson: {np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]:.6f}; "
        f"max |diff| / max |score|: "
        f"{np.abs(ours - theirs).max() / np.abs(theirs).max():.2e}")


if __name__ == "__main__":
  main()
