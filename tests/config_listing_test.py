"""`python -m simfluence_jax.config_lib CONFIG`: every field, its value and comment."""

import pathlib
import subprocess
import sys

import pytest

from simfluence_jax import config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def _fields(config, prefix=""):
  for key in config.keys():
    if hasattr(config[key], "keys"):
      yield from _fields(config[key], f"{prefix}{key}.")
    else:
      yield prefix + key


@pytest.mark.parametrize("name", ["default", "digits_mlp", "glue_rte",
                                  "super_glue_copa"])
@pytest.mark.parametrize("arg", ["", ":tiny"])
def test_every_field_listed_with_a_comment(name, arg):
  spec = f"{REPO / 'configs' / name}.py{arg}"
  rows = config_lib.describe_config(spec)
  fields = [field for field, _, _ in rows]
  assert sorted(fields) == sorted(_fields(config_lib.base_config()))
  assert len(set(fields)) == len(fields)
  missing = [field for field, _, comment in rows if not comment.strip()]
  assert not missing, f"fields without a comment: {missing}"
  config = config_lib.load_config(spec)
  for field, value, _ in rows:
    node = config
    for part in field.split("."):
      node = node[part]
    assert node == value, field


def test_comments_come_from_the_source():
  rows = {field: comment for field, _, comment in
          config_lib.describe_config(f"{REPO / 'configs' / 'default.py'}:tiny")}
  assert rows["num_runs"] == "R: runs the simulators are fitted on."
  assert rows["data.seq_len"].startswith("L: tokens per LM example")  # data config
  # A variant that changes a field adds its reason after the base comment.
  assert rows["pretrain_steps"].endswith(
      "[Compiling a pre-training loop costs more than it teaches.]")
  plain = {field: comment for field, _, comment in
           config_lib.describe_config(str(REPO / "configs" / "default.py"))}
  assert "[" not in plain["pretrain_steps"]


def test_command_line():
  out = subprocess.run(
      [sys.executable, "-m", "simfluence_jax.config_lib",
       str(REPO / "configs" / "default.py:tiny")],
      capture_output=True, text=True, check=True, cwd=REPO).stdout
  lines = out.splitlines()
  assert len(lines) == len(list(_fields(config_lib.base_config())))
  assert any(line.startswith("num_runs = 8 ") and line.endswith(
      "# R: runs the simulators are fitted on.") for line in lines), lines
  bad = subprocess.run([sys.executable, "-m", "simfluence_jax.config_lib", "nope.py"],
                       capture_output=True, text=True, cwd=REPO)
  assert bad.returncode == 1 and "error: config file 'nope.py'" in bad.stderr
