"""The model every kernel benchmark measures, and its weights as a torch state dict."""

import time

import flax.linen as nn
import numpy as np

REPEATS = 3  # timed calls after a warm-up one; the best counts (shared, noisy CPUs)


def best_of(fn, repeats=REPEATS):
  """Calls `fn` once to warm up (compile, torch set-up), then `repeats` times.

  Returns:
    (fastest of the timed calls in seconds, first call's seconds, last result).
  """
  start = time.perf_counter()
  result = fn()
  first = time.perf_counter() - start
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return best, first, result


class MLP(nn.Module):
  """64 -> 128 (ReLU) -> 10: the same network on both sides of every comparison."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, name="hidden")(x))
    return nn.Dense(10, name="out")(x)


def torch_mlp(params):
  """`MLP` with `params`' weights as a torch `Sequential`, on 2 CPU threads."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(2)
  net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(),
                            torch.nn.Linear(128, 10))
  with torch.no_grad():
    net.load_state_dict(torch_state(params))
  return net


def torch_state(params):
  """Flax variables of `MLP` -> state dict of torch `Sequential(Linear, ReLU, Linear)`."""
  import torch  # pylint: disable=g-import-not-at-top
  p = params["params"]
  return {"0.weight": torch.tensor(np.asarray(p["hidden"]["kernel"]).T.copy()),
          "0.bias": torch.tensor(np.asarray(p["hidden"]["bias"])),
          "2.weight": torch.tensor(np.asarray(p["out"]["kernel"]).T.copy()),
          "2.bias": torch.tensor(np.asarray(p["out"]["bias"]))}
