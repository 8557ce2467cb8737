"""What the PyTorch peers of the benchmarks share; imports only torch and the peers.

(`_common.py` imports flax and jax: a peer's whole-process timing must not pay for
them.) `time_in_child` times Kronfluence in a process of its own: it calls
`gc.collect()` about ten times per call, and in the benchmark's process each
collection also walks every object JAX and flax made (1.3-1.6x its time).

  python benchmarks/_peers.py DIR   (the child; `time_in_child` writes DIR)
"""

import json
import os
import subprocess
import sys
import tempfile
import time


def kronfluence_classification_task():
  """A `kronfluence.Task`: summed cross-entropy, the true Fisher's sampled labels."""
  import torch  # pylint: disable=g-import-not-at-top
  import kronfluence  # pylint: disable=g-import-not-at-top

  class Task(kronfluence.Task):

    def compute_train_loss(self, batch, model, sample=False):
      x, y = batch
      logits = model(x)
      if sample:
        with torch.no_grad():
          y = torch.multinomial(torch.softmax(logits, -1), 1).flatten()
      return torch.nn.functional.cross_entropy(logits, y, reduction="sum")

    def compute_measurement(self, batch, model):
      return self.compute_train_loss(batch, model)

  return Task()


class KronfluenceEKFAC:
  """Kronfluence's EK-FAC on one model: `fit(train_set)`, then `pairwise(...)` and
  `self_scores(...)` from the fitted factors (empirical Fisher, absolute damping)."""

  def __init__(self, net, damping, batch_size, output_dir):
    import kronfluence  # pylint: disable=g-import-not-at-top
    from kronfluence import arguments  # pylint: disable=g-import-not-at-top
    task = kronfluence_classification_task()
    self.analyzer = kronfluence.Analyzer(
        "bench", kronfluence.prepare_model(net, task), task, cpu=True,
        disable_tqdm=True, output_dir=output_dir)
    self.factor_args = arguments.FactorArguments(strategy="ekfac",
                                                 use_empirical_fisher=True)
    self.score_args = arguments.ScoreArguments(damping_factor=damping)
    self.batch_size = batch_size

  def fit(self, train_set):
    self.analyzer.fit_all_factors("factors", train_set,
                                  per_device_batch_size=self.batch_size,
                                  factor_args=self.factor_args,
                                  overwrite_output_dir=True)

  def pairwise(self, query_set, train_set):
    """float[Q, N] from the fitted factors."""
    self.analyzer.compute_pairwise_scores(
        "scores", "factors", query_set, train_set,
        per_device_query_batch_size=len(query_set),
        per_device_train_batch_size=self.batch_size, score_args=self.score_args,
        overwrite_output_dir=True)
    return self.analyzer.load_pairwise_scores("scores")["all_modules"].numpy()

  def self_scores(self, train_set):
    """float[N] self-influence from the fitted factors."""
    self.analyzer.compute_self_scores(
        "self", "factors", train_set, per_device_train_batch_size=self.batch_size,
        score_args=self.score_args, overwrite_output_dir=True)
    return self.analyzer.load_self_scores("self")["all_modules"].numpy()


def kronfluence_pairwise(net, train_set, query_set, damping, batch_size, output_dir):
  """`() -> float[Q, N]`: Kronfluence's EK-FAC factors on `train_set`, then pairwise
  scores of `query_set` (every call refits, like one whole attribution)."""
  peer = KronfluenceEKFAC(net, damping, batch_size, output_dir)

  def run():
    peer.fit(train_set)
    return peer.pairwise(query_set, train_set)
  return run


def best_of(fn, repeats):
  """(fastest of `repeats` timed calls after one warm-up call, first call's
  seconds, last result). `_common.best_of` is this one; it lives here so that a
  peer's own process (`time_in_child`) need not import jax to use it."""
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, first, result


def time_in_child(kind, state, inputs, labels, num_query, damping, repeats,
                  batch_size=256):
  """Times Kronfluence on the MLP 64-128-10 with torch `state` (numpy arrays of
  `_common.torch_state`) in a fresh process that imports only numpy, torch and
  Kronfluence, as a user's would.

  Args:
    kind: "pairwise" (factors + pairwise scores of the first `num_query` examples,
      refitted every call) or "self" (self-influence from factors fitted once,
      untimed).

  Returns:
    (best warm seconds, first call's seconds, scores: float[Q, N] or float[N]).
  """
  import numpy as np  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as directory:
    np.savez(os.path.join(directory, "inputs.npz"), inputs=inputs, labels=labels,
             **{f"state/{k}": v for k, v in state.items()})
    with open(os.path.join(directory, "job.json"), "w") as f:
      json.dump({"kind": kind, "num_query": int(num_query), "damping": damping,
                 "repeats": int(repeats), "batch_size": int(batch_size)}, f)
    subprocess.run([sys.executable, os.path.abspath(__file__), directory],
                   check=True, env=dict(os.environ, PYTHONWARNINGS="ignore"))
    with open(os.path.join(directory, "timing.json")) as f:
      timing = json.load(f)
    scores = np.load(os.path.join(directory, "scores.npy"))
  return timing["best"], timing["first"], scores


def _child(directory):
  import logging  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  logging.disable(logging.WARNING)
  with open(os.path.join(directory, "job.json")) as f:
    job = json.load(f)
  arrays = np.load(os.path.join(directory, "inputs.npz"))
  torch.set_num_threads(os.cpu_count() or 1)  # every core, as XLA:CPU uses
  net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
  with torch.no_grad():
    net.load_state_dict({k[len("state/"):]: torch.tensor(arrays[k])
                         for k in arrays.files if k.startswith("state/")})
  inputs, labels = arrays["inputs"], arrays["labels"]
  train_set = torch.utils.data.TensorDataset(torch.tensor(inputs),
                                             torch.tensor(labels, dtype=torch.long))
  query_set = torch.utils.data.TensorDataset(
      torch.tensor(inputs[:job["num_query"]]),
      torch.tensor(labels[:job["num_query"]], dtype=torch.long))
  output = os.path.join(directory, "kronfluence")
  if job["kind"] == "pairwise":
    run = kronfluence_pairwise(net, train_set, query_set, job["damping"],
                               job["batch_size"], output)
  else:
    peer = KronfluenceEKFAC(net, job["damping"], job["batch_size"], output)
    peer.fit(train_set)
    run = lambda: peer.self_scores(train_set)
  best, first, scores = best_of(run, job["repeats"])
  np.save(os.path.join(directory, "scores.npy"), np.asarray(scores))
  with open(os.path.join(directory, "timing.json"), "w") as f:
    json.dump({"best": best, "first": first}, f)


if __name__ == "__main__":
  _child(sys.argv[1])
