"""The package's command-line tools run from tests, as users run them."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulate(workdir, curriculum, *flags) -> subprocess.CompletedProcess:
  """`python -m simfluence_jax.simulate --workdir=W --curriculum=C FLAGS...` on the
  CPU, from the repository root; stdout and stderr as text."""
  return subprocess.run(
      [sys.executable, "-m", "simfluence_jax.simulate", f"--workdir={workdir}",
       f"--curriculum={curriculum}", *flags], cwd=REPO, capture_output=True,
      text=True, timeout=300, env=dict(os.environ, JAX_PLATFORMS="cpu"))
