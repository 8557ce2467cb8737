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

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import influence

import _common  # benchmarks/ is on sys.path when a script there runs

SIZES = {"full": (1024, 32, 3), "quick": (256, 16, 2), "smoke": (256, 4, 2)}  # N, Q, K


def measure(size="full", peer=True):
  """Times our TracIn-CP scores, and Captum's `TracInCP` if `peer`.

  Returns:
    dict: `ours_s` (best warm call); with the peer installed and `peer`, `peer_s`
    (best warm call), `peer_first_call_s`, `speedup`,
    `pearson` and `max_rel_diff` (max |ours − theirs| / max |theirs|); without it,
    `peer_missing` (the import error).
  """
  num_train, num_query, num_checkpoints = SIZES[size]
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
  ours_time, _, ours = _common.best_of(ours_fn)
  ours = np.asarray(ours)
  result = {"num_train": num_train, "num_query": num_query,
            "num_checkpoints": num_checkpoints, "ours_s": ours_time}
  if not peer:
    return result
  try:
    import torch  # pylint: disable=g-import-not-at-top
    from captum.influence import TracInCP  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    return dict(result, peer_missing=str(e))

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
    # Both sides timed warm (best of REPEATS after a first call: our compile, torch's
    # one-time set-up); the first call is kept as peer_first_call_s.
    captum_time, first, theirs = _common.best_of(
        lambda: tracin.influence(query_inputs).detach().numpy())
  return dict(result, peer_s=captum_time, peer_first_call_s=first,
              speedup=captum_time / ours_time,
              pearson=float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
              max_rel_diff=float(np.abs(ours - theirs).max() / np.abs(theirs).max()))


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args()
  r = measure("quick" if args.quick else "full")
  if "peer_missing" in r:
    raise SystemExit(f"captum/torch missing ({r['peer_missing']}): "
                     "pip install -e .[bench]")
  num_train, num_query, num_checkpoints = (r["num_train"], r["num_query"],
                                           r["num_checkpoints"])
  ours_time, captum_time = r["ours_s"], r["peer_s"]
  print(f"TracIn-CP, MLP 64-128-10, N={num_train}, Q={num_query}, "
        f"K={num_checkpoints} checkpoints (noisy shared 2-core CPU)")
  print(f"{'':10s}{'ours':>10s}{'captum':>10s}")
  print(f"{'time (s)':10s}{ours_time:10.3f}{captum_time:10.3f}")
  print(f"speed-up: {captum_time / ours_time:.1f}x (goal >= 5x)")
  print(f"Pearson: {r['pearson']:.6f}; max |diff| / max |score|: "
        f"{r['max_rel_diff']:.2e}")


if __name__ == "__main__":
  main()
