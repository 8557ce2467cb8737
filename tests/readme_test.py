"""The README's self-contained Python examples run and return what they claim."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_kernel_example_runs():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  example = next(b for b in blocks if "fit_ekfac" in b)
  scope = {}
  exec(compile(example, "README.md", "exec"), scope)  # pylint: disable=exec-used
  assert scope["if_scores"].shape == (4, 64)
  assert scope["tracin"].shape == (4, 64)
