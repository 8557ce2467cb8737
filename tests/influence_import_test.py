"""Importing simfluence_jax.influence stays light: no orbax, scipy, matplotlib, TF."""

import subprocess
import sys

HEAVY = ("orbax", "scipy", "matplotlib", "tensorflow")


def test_import_does_not_load_heavy_modules():
  code = ("import sys; import simfluence_jax.influence; "
          f"print(sorted({{m.split('.')[0] for m in sys.modules if m.startswith({HEAVY!r})}}))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120, check=True).stdout.strip()
  assert out == "[]", out
