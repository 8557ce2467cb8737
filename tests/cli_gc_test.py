"""The CLIs' processes take their import heap out of the cyclic GC's reach."""

import json
import os
import subprocess
import sys
import textwrap

from simfluence_jax import _cli

_SCRIPT = textwrap.dedent("""
    import gc, json, weakref
    from absl import flags
    from simfluence_jax import main

    class Node:
      pass

    node = Node()
    node.self = node  # a cycle: only the cyclic GC frees it
    alive = weakref.ref(node)
    del node
    gc.disable()  # so that nothing but the CLI collects it
    flags.FLAGS(["main"])  # no --config: run_main stops with its error line
    try:
      main.run_main(None)
    except SystemExit as e:
      code = e.code
    print(json.dumps({"code": code, "frozen": gc.get_freeze_count(),
                      "threshold": gc.get_threshold(),
                      "garbage_left": alive() is not None}))
""")


def test_the_main_jobs_process_freezes_its_imports_after_collecting_garbage():
  out = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True,
                       text=True, check=True,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
  got = json.loads(out.stdout.strip().splitlines()[-1])
  assert got["code"] == 2  # it reached run_main's own check
  assert got["frozen"] > 10_000  # the modules JAX, Flax and the package imported
  assert got["threshold"][0] == _cli.GC_THRESHOLD0
  assert not got["garbage_left"]  # collected before the freeze, not frozen with it
