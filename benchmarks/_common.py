"""The model every kernel benchmark measures, and its weights as a torch state dict."""

import os

import flax.linen as nn
import numpy as np

import _peers  # the same timing rule in the peers' own processes

REPEATS = 3  # timed calls after a warm-up one; the best counts (shared, noisy CPUs)


def best_of(fn, repeats=REPEATS):
  """Calls `fn` once to warm up (compile, torch set-up), then `repeats` times.

  Returns:
    (fastest of the timed calls in seconds, first call's seconds, last result).
  """
  return _peers.best_of(fn, repeats)


class MLP(nn.Module):
  """64 -> 128 (ReLU) -> 10: the same network on both sides of every comparison."""

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Dense(128, name="hidden")(x))
    return nn.Dense(10, name="out")(x)


def torch_mlp(params):
  """`MLP` with `params`' weights as a torch `Sequential`, on every CPU core."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)  # every core, as XLA:CPU uses
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


class CNN(nn.Module):
  """The classic MNIST CNN, shrunk to 8x8x1 inputs: Conv-Conv-Dense-Dense.

  Conv(8, 3x3, SAME) -> ReLU -> 2x2 average pool -> Conv(16, 3x3, SAME) -> ReLU ->
  2x2 average pool -> flatten (H, W, C order) -> Dense(32) -> ReLU -> Dense(10).
  """

  @nn.compact
  def __call__(self, x):
    x = nn.relu(nn.Conv(8, (3, 3), name="conv1")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = nn.relu(nn.Conv(16, (3, 3), name="conv2")(x))
    x = nn.avg_pool(x, (2, 2), (2, 2))
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(32, name="hidden")(x))
    return nn.Dense(10, name="out")(x)


def cnn_data(num_examples, seed=0):
  """float32[N, 8, 8, 1] standard normal images and int64[N] labels in [0, 10)."""
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(num_examples, 8, 8, 1)).astype(np.float32),
          rng.integers(0, 10, num_examples).astype(np.int64))


def torch_cnn(params):
  """`CNN` with `params`' weights in torch (NCHW inputs), on every CPU core.

  torch's `Conv2d(padding=1)` is flax's 3x3 SAME; the feature map is permuted to
  NHWC before flattening so the first Linear sees flax's (H, W, C) order.
  """
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count() or 1)  # every core, as XLA:CPU uses

  class TorchCNN(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.conv1 = torch.nn.Conv2d(1, 8, 3, padding=1)
      self.conv2 = torch.nn.Conv2d(8, 16, 3, padding=1)
      self.hidden = torch.nn.Linear(64, 32)
      self.out = torch.nn.Linear(32, 10)

    def forward(self, x):
      x = torch.nn.functional.avg_pool2d(torch.relu(self.conv1(x)), 2)
      x = torch.nn.functional.avg_pool2d(torch.relu(self.conv2(x)), 2)
      x = torch.flatten(x.permute(0, 2, 3, 1), 1)
      return self.out(torch.relu(self.hidden(x)))

  net = TorchCNN()
  p = params["params"]
  state = {}
  for name in ("conv1", "conv2"):  # flax [kh, kw, C, F] -> torch [F, C, kh, kw]
    state[f"{name}.weight"] = torch.tensor(
        np.transpose(np.asarray(p[name]["kernel"]), (3, 2, 0, 1)).copy())
    state[f"{name}.bias"] = torch.tensor(np.asarray(p[name]["bias"]))
  for name in ("hidden", "out"):
    state[f"{name}.weight"] = torch.tensor(np.asarray(p[name]["kernel"]).T.copy())
    state[f"{name}.bias"] = torch.tensor(np.asarray(p[name]["bias"]))
  with torch.no_grad():
    net.load_state_dict(state)
  return net


def agreement(ours, theirs):
  """Pearson, max |ours − theirs| / max |theirs|, and ‖ours‖ / ‖theirs‖."""
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return {"pearson": float(np.corrcoef(ours.ravel(), theirs.ravel())[0, 1]),
          "max_rel_err": float(np.abs(ours - theirs).max() / np.abs(theirs).max()),
          "norm_ratio": float(np.linalg.norm(ours) / np.linalg.norm(theirs))}
