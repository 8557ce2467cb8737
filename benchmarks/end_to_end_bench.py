r"""Whole-process TracIn-CP and EK-FAC: what a user running one attribution waits for.

Each side runs as its own fresh Python process, the way a researcher runs one
attribution from the shell: imports, building the model, loading the data and
checkpoints, compilation (ours) or set-up (theirs), and compute. The parent writes the
same data and checkpoints for both sides (an MLP 64-256-256-10, issue 16's workload),
starts each child and takes

  end_to_end_s = (the child's clock when its first result is ready) − (the parent's
                 clock just before starting the child),

so interpreter start-up counts too. Each child then calls the same computation a second
time (`second_s`, warm: compiled programs and torch's set-up reused) and reports its
import time and first call separately. Ratios are peer / ours.

  python benchmarks/end_to_end_bench.py [--quick]

Peers: `pip install -e ".[bench]"` (torch, Captum, Kronfluence). The children of one side
never import the other side's libraries.
"""

import argparse
import importlib
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

import _peers  # benchmarks/ is on sys.path when a script there runs (torch only)

SIZES = {"full": (7188, 128, 3), "quick": (2048, 32, 3), "smoke": (256, 4, 2)}  # N, Q, K
HIDDEN = (256, 256)
NUM_FEATURES, NUM_CLASSES = 64, 10
DAMPING = 1e-3  # absolute λ, the same on both sides (Kronfluence's damping_factor)
BATCH = 256
SIDES = {"tracin": ("ours", "captum"), "ekfac": ("ours", "kronfluence")}


def write_inputs(directory, size, peers=True):
  """Writes data.npz (inputs, labels, K checkpoints' weights, rates) and, with torch,
  checkpoint_<k>.pt for Captum; returns the npz path."""
  num_train, _, num_checkpoints = SIZES[size]
  rng = np.random.default_rng(0)
  arrays = {"inputs": rng.normal(size=(num_train, NUM_FEATURES)).astype(np.float32),
            "labels": rng.integers(0, NUM_CLASSES, num_train).astype(np.int64),
            "rates": np.asarray([0.1 / (k + 1) for k in range(num_checkpoints)],
                                np.float32)}
  sizes = (NUM_FEATURES, *HIDDEN, NUM_CLASSES)
  for k in range(num_checkpoints):
    for layer, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      arrays[f"ckpt{k}_w{layer}"] = (rng.normal(size=(fan_in, fan_out)) /
                                     np.sqrt(fan_in)).astype(np.float32)
      arrays[f"ckpt{k}_b{layer}"] = (0.1 * rng.normal(size=fan_out)).astype(np.float32)
  path = os.path.join(directory, "data.npz")
  np.savez(path, **arrays)
  if peers:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except ImportError:
      return path
    for k in range(num_checkpoints):
      torch.save({"state": _torch_state(arrays, k), "lr": float(arrays["rates"][k])},
                 os.path.join(directory, f"checkpoint_{k}.pt"))
  return path


def _torch_state(arrays, k):
  import torch  # pylint: disable=g-import-not-at-top
  state = {}
  for layer in range(len(HIDDEN) + 1):  # Sequential: Linear, ReLU, Linear, ReLU, Linear
    state[f"{2 * layer}.weight"] = torch.tensor(arrays[f"ckpt{k}_w{layer}"].T.copy())
    state[f"{2 * layer}.bias"] = torch.tensor(arrays[f"ckpt{k}_b{layer}"])
  return state


def _ours(workload, data, num_query):
  """() -> scores float[Q, N] with simfluence_jax (the import is timed by the caller)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from simfluence_jax import influence  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    @nn.compact
    def __call__(self, x):
      for layer, width in enumerate(HIDDEN):
        x = nn.relu(nn.Dense(width, name=f"dense_{layer}")(x))
      return nn.Dense(NUM_CLASSES, name=f"dense_{len(HIDDEN)}")(x)

  def params(k):
    return {"params": {f"dense_{layer}": {"kernel": data[f"ckpt{k}_w{layer}"],
                                          "bias": data[f"ckpt{k}_b{layer}"]}
                       for layer in range(len(HIDDEN) + 1)}}

  task = influence.ClassificationTask(MLP().apply)
  train = {"inputs": data["inputs"], "labels": data["labels"]}
  query = {name: x[:num_query] for name, x in train.items()}
  if workload == "tracin":
    checkpoints = [params(k) for k in range(len(data["rates"]))]
    return lambda: np.asarray(influence.tracin_scores(
        task, checkpoints, list(data["rates"]), query, train, chunk_size=BATCH))
  batches = [{name: x[i:i + BATCH] for name, x in train.items()}
             for i in range(0, len(train["labels"]), BATCH)]

  def run():
    factors = influence.fit_ekfac(task, params(0), batches)
    return np.asarray(jax.block_until_ready(influence.ekfac_scores(
        task, params(0), factors, query, batches, damping=DAMPING)))
  return run


def _torch_net(data, k):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)
  layers = []
  sizes = (NUM_FEATURES, *HIDDEN, NUM_CLASSES)
  for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
    layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.ReLU()]
  net = torch.nn.Sequential(*layers[:-1])
  with torch.no_grad():
    net.load_state_dict(_torch_state(data, k))
  return net


def _captum(data, num_query, directory):
  import torch  # pylint: disable=g-import-not-at-top
  from captum.influence import TracInCP  # pylint: disable=g-import-not-at-top

  def load(net, path):
    saved = torch.load(path)
    net.load_state_dict(saved["state"])
    return saved["lr"]

  paths = [os.path.join(directory, f"checkpoint_{k}.pt")
           for k in range(len(data["rates"]))]
  inputs, labels = torch.tensor(data["inputs"]), torch.tensor(data["labels"])
  tracin = TracInCP(_torch_net(data, 0), torch.utils.data.TensorDataset(inputs, labels),
                    paths, checkpoints_load_func=load,
                    loss_fn=torch.nn.CrossEntropyLoss(reduction="sum"),
                    batch_size=BATCH, sample_wise_grads_per_batch=True)
  query = (inputs[:num_query], labels[:num_query])
  return lambda: tracin.influence(query).detach().numpy()


def _kronfluence(data, num_query, directory):
  import torch  # pylint: disable=g-import-not-at-top
  inputs, labels = torch.tensor(data["inputs"]), torch.tensor(data["labels"])
  train_set = torch.utils.data.TensorDataset(inputs, labels)
  query_set = torch.utils.data.TensorDataset(inputs[:num_query], labels[:num_query])
  return _peers.kronfluence_pairwise(_torch_net(data, 0), train_set, query_set,
                                     DAMPING, BATCH,
                                     os.path.join(directory, "kronfluence"))


def child(workload, side, data_path, num_query):
  """Runs one side in this (fresh) process; returns its timings and scores' path."""
  start = time.time()
  if side == "ours":  # the kernels themselves (simfluence_jax.influence is lazy)
    from simfluence_jax.influence import fit_ekfac, tracin_scores  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
    import flax.linen  # pylint: disable=g-import-not-at-top,unused-import  # noqa: F401
  else:
    importlib.import_module("captum.influence" if side == "captum" else "kronfluence")
  import_s = time.time() - start
  data = dict(np.load(data_path))
  directory = os.path.dirname(data_path)
  if side == "ours":
    fn = _ours(workload, data, num_query)
  elif side == "captum":
    fn = _captum(data, num_query, directory)
  else:
    fn = _kronfluence(data, num_query, directory)
  first_start = time.time()
  scores = fn()
  first_done = time.time()
  second_start = time.time()
  fn()
  second_s = time.time() - second_start
  out = os.path.join(directory, f"scores_{workload}_{side}.npy")
  np.save(out, np.asarray(scores, np.float32))
  return {"import_s": import_s, "first_call_s": first_done - first_start,
          "first_done": first_done, "second_call_s": second_s, "scores": out}


def _cache_env(cache_dir):
  """JAX's persistent compilation cache in `cache_dir` (the environment variables of
  the `jax_compilation_cache_dir` and `jax_persistent_cache_*` options; the main job
  sets them from `config.compilation_cache_dir`, caching programs that took ≥ 0.5 s
  to compile; here every program is cached). None = off."""
  if cache_dir is None:
    return {"JAX_COMPILATION_CACHE_DIR": ""}
  return {"JAX_COMPILATION_CACHE_DIR": cache_dir,
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def _run_child(workload, side, data_path, num_query, timeout=1200, cache_dir=None):
  started = time.time()
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--child", f"--workload={workload}",
       f"--side={side}", f"--data={data_path}", f"--num_query={num_query}"],
      capture_output=True, text=True, timeout=timeout,
      env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", **_cache_env(cache_dir)))
  if proc.returncode != 0:
    raise RuntimeError(f"{workload}/{side} exited {proc.returncode}:\n"
                       f"{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  result["end_to_end_s"] = result.pop("first_done") - started
  result["process_s"] = time.time() - started
  return result


def _peer_available(side):
  try:
    importlib.import_module("torch")
    importlib.import_module("captum.influence" if side == "captum" else "kronfluence")
  except ImportError as e:
    return str(e)
  return None


def measure(size="full", peer=True, workloads=("tracin", "ekfac")):
  """Both workloads, each side a fresh process: {workload: {...}}.

  Ours runs twice, as a first and a repeat user: `ours` with an empty persistent
  compilation cache (cold: every program compiles), `ours_cached` with the cache the
  first process filled (what a second attribution on the same machine waits for;
  tracing still runs, XLA's compilation is read back).

  Returns:
    per workload: `ours`, `ours_cached` and (when installed and `peer`) `peer`, each
    with `end_to_end_s`, `import_s`, `first_call_s`, `second_call_s`, `process_s`;
    then `end_to_end_speedup` (cold), `cached_speedup` and `warm_speedup` (peer /
    ours), `pearson` of the scores and the sizes; `peer_missing` names the import
    error otherwise.
  """
  num_train, num_query, num_checkpoints = SIZES[size]
  out = {}
  with tempfile.TemporaryDirectory() as directory:
    data_path = write_inputs(directory, size, peers=peer)
    for workload in workloads:
      ours_side, peer_side = SIDES[workload]
      cache_dir = os.path.join(directory, f"xla_cache_{workload}")
      row = {"num_train": num_train, "num_query": num_query,
             "num_checkpoints": num_checkpoints if workload == "tracin" else 1,
             "ours": _run_child(workload, ours_side, data_path, num_query,
                                cache_dir=cache_dir),
             "ours_cached": _run_child(workload, ours_side, data_path, num_query,
                                       cache_dir=cache_dir)}
      missing = _peer_available(peer_side) if peer else "--no_peers"
      if missing:
        row["peer_missing"] = missing
      else:
        row["peer"] = _run_child(workload, peer_side, data_path, num_query)
        row["end_to_end_speedup"] = (row["peer"]["end_to_end_s"] /
                                     row["ours"]["end_to_end_s"])
        row["cached_speedup"] = (row["peer"]["end_to_end_s"] /
                                 row["ours_cached"]["end_to_end_s"])
        row["warm_speedup"] = (row["peer"]["second_call_s"] /
                               row["ours"]["second_call_s"])
        ours = np.load(row["ours"]["scores"]).ravel()
        theirs = np.load(row["peer"]["scores"]).ravel()
        row["pearson"] = float(np.corrcoef(ours, theirs)[0, 1])
      out[workload] = row
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--workload", choices=tuple(SIDES), help=argparse.SUPPRESS)
  parser.add_argument("--side", help=argparse.SUPPRESS)
  parser.add_argument("--data", help=argparse.SUPPRESS)
  parser.add_argument("--num_query", type=int, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    print(json.dumps(child(args.workload, args.side, args.data, args.num_query)))
    return
  result = measure("quick" if args.quick else "full")
  print(f"{'workload':<8}{'side':<13}{'end to end':>11}{'import':>8}{'1st call':>9}"
        f"{'2nd call':>9}")
  for workload, row in result.items():
    for key in ("ours", "ours_cached", "peer"):
      if key in row:
        r = row[key]
        name = {"ours": "ours (cold)", "ours_cached": "ours (cache)"}.get(
            key, SIDES[workload][1])
        print(f"{workload:<8}{name:<13}{r['end_to_end_s']:>10.2f}s{r['import_s']:>7.2f}s"
              f"{r['first_call_s']:>8.2f}s{r['second_call_s']:>8.2f}s")
    if "peer" in row:
      print(f"  {workload}: {row['end_to_end_speedup']:.2f}x end to end (cold), "
            f"{row['cached_speedup']:.2f}x with the compilation cache, "
            f"{row['warm_speedup']:.2f}x warm, Pearson {row['pearson']:.6f}")
    else:
      print(f"  {workload}: peer skipped ({row['peer_missing']})")


if __name__ == "__main__":
  main()
