r"""The main job: flags → `pipeline.run` (stages in `simfluence_jax/pipeline/`).

  python -m simfluence_jax.main --config=configs/default.py --workdir=/tmp/sj
  python -m simfluence_jax.main --config=configs/default.py:tiny --workdir=/tmp/sj \
      --config.num_seeds=3

Re-running with the same workdir reuses every stage whose inputs are unchanged and
recomputes the others; a stage holding training runs of other settings is refused
with the changed fields named (`--overwrite` discards it instead).
"""

import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from simfluence_jax import _cli

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file (configs/*.py[:arg]).", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Where outputs and checkpoints go (local or gs://).")
_OVERWRITE = flags.DEFINE_bool(
    "overwrite", False, "Discard stored training runs whose settings differ from the "
    "config instead of refusing to run.")


def initialize_distributed() -> None:
  """`jax.distributed.initialize()`, from SJ_* variables (launch/local.sh) or auto.

  On TPU pods and SLURM clusters JAX finds the coordinator itself; the local launcher
  sets SJ_COORDINATOR, SJ_NUM_PROCESSES and SJ_PROCESS_ID, and CPU processes use gloo
  collectives.
  """
  coordinator = os.environ.get("SJ_COORDINATOR")
  if not coordinator:
    jax.distributed.initialize()
    return
  try:
    num_processes = int(os.environ["SJ_NUM_PROCESSES"])
    process_id = int(os.environ["SJ_PROCESS_ID"])
  except (KeyError, ValueError) as e:
    raise ValueError("SJ_COORDINATOR is set, so SJ_NUM_PROCESSES and SJ_PROCESS_ID "
                     f"must be integers ({e}).") from e
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)


def _quiet_orbax(record) -> bool:
  """Drops orbax's INFO chatter (several lines per checkpoint) from the job's log."""
  return record.levelno >= std_logging.WARNING or "/orbax/" not in record.pathname


def parse_flags(argv):
  """absl flag parsing, with one `error:` line instead of a traceback for a bad flag
  (an unknown `--config.field`, a value of the wrong type, a missing config file, a
  field that is a reference to another: `config_lib.TIED_DATA_FIELDS`; a flag
  setting one set both, the later of two flags won without a word, and
  `--config.data.seed` alone reseeded the model and the curricula too)."""
  from simfluence_jax import config_lib  # pylint: disable=g-import-not-at-top
  tied = {f"--config.data.{name}": f"--config.{name}"
          for name in config_lib.TIED_DATA_FIELDS}
  for arg in argv[1:]:
    name = arg.split("=", 1)[0]
    if name in tied:
      print(f"error: {name} is the same field as {tied[name]} (it follows it); "
            f"set {tied[name]} instead.", file=sys.stderr)
      sys.exit(2)
  parsed = _cli.parse_flags(argv)
  try:
    if _CONFIG.value is not None:
      _CONFIG.value.keys()  # a config file that failed to load raises only when read
  except OSError as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    print(f"error: --config: {lines[-1] if lines else type(e).__name__}",
          file=sys.stderr)
    sys.exit(2)
  return parsed


def run_main(run_fn):
  """The shared body of the CLIs: logging, distributed init, lock, one-line errors."""
  # pylint: disable=g-import-not-at-top
  from simfluence_jax import pipeline
  # pylint: enable=g-import-not-at-top
  _cli.freeze_import_heap()
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_quiet_orbax)
  # Library modules log through the standard logger; show their progress lines.
  std_logging.getLogger("simfluence_jax").setLevel(std_logging.INFO)
  if _CONFIG.value is None or _WORKDIR.value is None:
    print("error: --config and --workdir are required", file=sys.stderr)
    sys.exit(2)
  try:
    # Validated before anything touches the workdir.
    pipeline.validate_config(_CONFIG.value)
    pipeline.enable_compilation_cache(_CONFIG.value)
    if _CONFIG.value.distributed:
      initialize_distributed()
    with pipeline.workdir_lock(_WORKDIR.value):
      run_fn(_CONFIG.value, _WORKDIR.value, _OVERWRITE.value)
  except (FloatingPointError,) + _cli.RUN_ERRORS as e:
    # Bad input, a stale workdir, a diverged run, an unwritable output: one line.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  except KeyboardInterrupt:  # Ctrl-C: the lock is released, finished stages stay
    print(f"interrupted: the finished stages in {_WORKDIR.value} are kept; rerun "
          f"the same command to resume.", file=sys.stderr)
    sys.exit(130)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  from simfluence_jax import pipeline  # pylint: disable=g-import-not-at-top
  run_main(pipeline.run)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
