"""TracIn-CP: ours against Captum's `TracInCP` on the same models, data and checkpoints.

Budget (docs/design.md §7): ≥ 20× faster warm (≥ 5× as whole processes is
end_to_end_bench's), same scores. Captum multiplies each
checkpoint's gradient dot products by the learning rate its load function returns,
like ours; both use per-example CE losses and all parameters. Ours uses factored
inner products `(δ_q·δ_i)(a_q·a_i)` on the dense layers (never forming per-example
weight gradients); the MLP is timed, the CNN of `_common.CNN` (Conv-Conv-Dense-Dense,
where the convolutions keep materialised gradients, cheaper for 64 positions) is
compared for agreement only. Timings on the shared 2-core CPU are noisy.

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
CNN_SIZES = {"full": (256, 16, 2), "quick": (128, 8, 2), "smoke": (64, 4, 2)}  # N, Q, K


def _captum_scores(net, checkpoints, rates, state_fn, inputs, labels, num_query,
                   directory, batch_size=256):
  """Captum TracInCP scores [Q, N]: `run()` after the one-time set-up."""
  import torch  # pylint: disable=g-import-not-at-top  # noqa: F401
  from captum.influence import TracInCP  # pylint: disable=g-import-not-at-top
  paths = []
  for k, params in enumerate(checkpoints):
    path = os.path.join(directory, f"checkpoint_{k}.pt")
    torch.save({"state": state_fn(params), "lr": rates[k]}, path)
    paths.append(path)

  def load(net, path):
    saved = torch.load(path)
    net.load_state_dict(saved["state"])
    return saved["lr"]

  dataset = torch.utils.data.TensorDataset(torch.tensor(inputs), torch.tensor(labels))
  tracin = TracInCP(net, dataset, paths, checkpoints_load_func=load,
                    loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                    batch_size=batch_size, sample_wise_grads_per_batch=True)
  query_inputs = (torch.tensor(inputs[:num_query]), torch.tensor(labels[:num_query]))
  return lambda: tracin.influence(query_inputs).detach().numpy()


def cnn_agreement(num_train=64, num_query=4, num_checkpoints=2):
  """Ours vs Captum TracInCP on `_common.CNN`, all parameters, K checkpoints.

  Returns:
    dict of `_common.agreement` and the sizes; raises ImportError without captum.
  """
  import captum.influence  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  inputs, labels = _common.cnn_data(num_train)
  model = _common.CNN()
  init = jax.jit(model.init)  # one program (eagerly, one per initialiser op)
  checkpoints = [init(jax.random.key(20 + k), inputs[:1])
                 for k in range(num_checkpoints)]
  rates = [0.1 / (k + 1) for k in range(num_checkpoints)]
  task = influence.ClassificationTask(model.apply)
  train = {"inputs": jnp.asarray(inputs), "labels": jnp.asarray(labels)}
  query = jax.tree_util.tree_map(lambda x: x[:num_query], train)
  ours = np.asarray(influence.tracin_scores(task, checkpoints, rates, query, train))
  net = _common.torch_cnn(checkpoints[0])
  state_fn = lambda params: _common.torch_cnn(params).state_dict()
  with tempfile.TemporaryDirectory() as directory:
    theirs = _captum_scores(net, checkpoints, rates, state_fn,
                            np.transpose(inputs, (0, 3, 1, 2)), labels, num_query,
                            directory)()
  return dict(_common.agreement(ours, theirs), num_train=num_train,
              num_query=num_query, num_checkpoints=num_checkpoints)


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
  init = jax.jit(model.init)  # one program (eagerly, one per initialiser op)
  checkpoints = [init(jax.random.key(10 + k), inputs[:1])
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
    import torch  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    import captum.influence  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  except ImportError as e:
    return dict(result, peer_missing=str(e))

  net = _common.torch_mlp(checkpoints[0])
  with tempfile.TemporaryDirectory() as directory:
    run = _captum_scores(net, checkpoints, rates, _common.torch_state, inputs, labels,
                         num_query, directory)
    # Both sides timed warm (best of REPEATS after a first call: our compile, torch's
    # one-time set-up); the first call is kept as peer_first_call_s.
    captum_time, first, theirs = _common.best_of(run)
  cnn = cnn_agreement(*CNN_SIZES[size])
  agree = _common.agreement(ours, theirs)
  return dict(result, peer_s=captum_time, peer_first_call_s=first,
              speedup=captum_time / ours_time, pearson=agree["pearson"],
              max_rel_diff=agree["max_rel_err"],
              **{f"cnn_{k}": cnn[k] for k in ("pearson", "max_rel_err", "norm_ratio")})


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
  print(f"MLP: Pearson {r['pearson']:.6f}; max |diff| / max |score| "
        f"{r['max_rel_diff']:.2e}")
  print(f"CNN (Conv-Conv-Dense-Dense): Pearson {r['cnn_pearson']:.6f}; max |diff| / "
        f"max |score| {r['cnn_max_rel_err']:.2e}")


if __name__ == "__main__":
  main()
