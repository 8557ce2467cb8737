"""Every Python example of the README runs and returns what it claims."""

import pathlib
import re

import numpy as np
import pytest

import simfluence_jax as sj
from simfluence_jax import data as data_lib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


REPO = README.parent
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
# Each library family has a runnable example: name -> a string its block contains.
FAMILIES = {
    "training runs": "training.train_runs(", "Trace": "Trace", "simulators":
    "simulators.fit(", "evaluation": "sj.evaluation.", "TracIn": "tracin_scores(",
    "EK-FAC": "fit_ekfac(", "metagradients": "training.metagradients(",
    "NNX": "nnx.state(",
}
# What a block (found by a string it contains) must have computed.
CHECKS = {
    "fit_ekfac(": lambda scope: (scope["if_scores"].shape == (4, 64)
                                 and scope["tracin"].shape == (4, 64)),
    "training.train_runs(": lambda scope: (
        scope["result"].trace.losses.shape == (16, 9, 8)),
    "simulators.fit(": lambda scope: (
        scope["pred"].shape == scope["held_out"].losses.shape),
    "training.metagradients(": lambda scope: scope["grads"].shape == (2, 8, 4, 8),
    "nnx.state(": lambda scope: scope["nnx_scores"].shape == (4, 64),
}


def _block_id(index):
  families = [name for name, marker in FAMILIES.items() if marker in BLOCKS[index]]
  return f"block{index}-" + "+".join(families or ["other"]).replace(" ", "_")


@pytest.fixture
def quickstart_trace(tmp_path):
  """A trace in the layout the Quickstart command writes (88 runs), made up quickly.

  Losses follow a Simfluence-Linear recurrence with random per-example A, B, so the
  README's simulator example fits something real; the path is where the example
  looks once `/tmp/` is moved to `tmp_path`.
  """
  rng = np.random.default_rng(0)
  num_train, num_test, batch = 40, 6, 4
  batch_ids = data_lib.make_curricula(88, num_train, 32, 1, batch, seed=0)  # [88, 8, 4]
  a = 1.0 / batch - rng.uniform(0.0, 0.02, (num_train, num_test))
  b = rng.normal(0.0, 0.05, (num_train, num_test))
  losses = [np.broadcast_to(rng.uniform(2.0, 4.0, num_test), (88, num_test))]
  for t in range(batch_ids.shape[1]):
    ids = batch_ids[:, t]
    losses.append(a[ids].sum(1) * losses[-1] + b[ids].sum(1))
  trace = sj.Trace(batch_ids=batch_ids.astype(np.int32),
                   losses=np.stack(losses, 1).astype(np.float32),
                   learning_rates=np.full(batch_ids.shape[:2], 0.1, np.float32),
                   num_train_examples=num_train)
  trace.save(str(tmp_path / "simfluence_default" / "trace"))


def test_every_family_has_an_example():
  for family, marker in FAMILIES.items():
    assert any(marker in block for block in BLOCKS), (
        f"README.md has no ```python example of {family} (containing {marker!r}).")


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=_block_id)
def test_example_runs(index, tmp_path, monkeypatch, quickstart_trace):
  """Runs the block as written, from the repo root, with /tmp/ moved to tmp_path."""
  del quickstart_trace  # used for its files
  monkeypatch.chdir(REPO)
  code = re.sub(r"""(["'])/tmp/""", lambda m: f"{m.group(1)}{tmp_path}/", BLOCKS[index])
  scope = {"__name__": "__readme__"}
  compiled = compile(code, f"README.md (python block {index})", "exec")
  exec(compiled, scope)  # pylint: disable=exec-used
  for marker, check in CHECKS.items():
    if marker in BLOCKS[index]:
      assert check(scope), f"README python block {index}: {marker} check failed."
