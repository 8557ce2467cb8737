r"""Plan a job from a laptop: every stage compiled for a TPU topology, what fits.

  python -m simfluence_jax.plan --config=configs/scale_1b.py --topology=v5e:16x16
  python -m simfluence_jax.plan --config=configs/default.py --topology=v5litepod-4 \
      --out=plan.json --markdown

Takes the main job's `--config` flags. Builds the job's meshes on the topology's
compile-only devices (needs libtpu: `pip install -e ".[tpu]"`), lowers and compiles
every stage on abstract inputs (nothing is allocated), and prints per stage the
per-chip memory (arguments, temporaries, outputs, total) against the chip's HBM,
FLOPs and bytes per chip (XLA's cost analysis, loops counted), a roofline time and
the compile time. For a stage that does not fit it recompiles candidate config
changes (fewer runs per chip, a smaller chunk, ...) and names the first that fits.
`--topology=cpu` plans for this machine instead (`--measure` then also runs each
program on zeros and prints the measured time beside the roofline).

Exit status: 0 every stage fits, 3 a stage does not fit (or failed to compile),
4 libtpu is missing, 1 a bad config, 2 a bad flag.
"""

import logging as std_logging
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from simfluence_jax import _cli
from simfluence_jax import config_lib
from simfluence_jax import main as main_lib

_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "TPU topology (v5e:16x16, v5p:4x4x4) or accelerator type "
    "(v5litepod-256, v5p-128, v4-32), or 'cpu' for this machine.")
_OUT = flags.DEFINE_string("out", None, "Also write the plan as JSON here.")
_MARKDOWN = flags.DEFINE_bool("markdown", False, "Print the table as markdown.")
_STAGES = flags.DEFINE_list("stages", None, "Plan only these stages (default: every "
                            "stage the config runs).")
_SUGGEST = flags.DEFINE_bool("suggest", True, "Recompile candidate fixes of a stage "
                             "that does not fit.")
_THREADS = flags.DEFINE_integer(
    "compile_threads", None, "Programs compiled at once (default 1; each compile of "
    "a large program holds GiB of host memory: 2 ran the 8B plan out of 24 GiB).")
_MEASURE = flags.DEFINE_bool("measure", False, "With --topology=cpu: run every "
                             "program on zeros and report its measured time.")

EXIT_DOES_NOT_FIT = 3
EXIT_NO_LIBTPU = 4


def _config_name() -> str:
  try:
    return config_flags.get_config_filename(flags.FLAGS["config"])
  except (AttributeError, KeyError, TypeError):
    return ""


def run(config, topology: str) -> int:
  """The plan of `config` on `topology`, printed; the exit status."""
  # pylint: disable=g-import-not-at-top
  from simfluence_jax import pipeline
  from simfluence_jax import planning
  # pylint: enable=g-import-not-at-top
  planning.devices.use_cpu_runtime()
  name = "cpu" if topology == "cpu" else planning.chips.topology_name(topology)
  pipeline.validate_config(config)
  if _MEASURE.value and name != "cpu":
    raise ValueError("--measure: programs can only run with --topology=cpu.")
  devices = planning.devices.topology_devices(name)
  config_lib.mesh_model_sizes(config, len(devices))  # one line naming the field
  chip = (planning.chips.measure_host(devices[0]) if name == "cpu" else
          planning.chips.chip_of(devices))
  if chip is None:
    raise ValueError(f"--topology={topology!r}: no chip spec for "
                     f"{devices[0].device_kind!r} (known: {sorted(planning.CHIPS)}).")
  result = planning.plan(config, devices, chip, topology=name,
                         config_name=_config_name(), stage_names=_STAGES.value,
                         find_fixes=_SUGGEST.value, measure=_MEASURE.value,
                         compile_threads=_THREADS.value)
  text = (planning.report.format_markdown(result) if _MARKDOWN.value else
          planning.report.format_text(result))
  print(text, flush=True)
  if _OUT.value:
    planning.report.write_json(result, _OUT.value)
  return 0 if result.fits else EXIT_DOES_NOT_FIT


def main(argv):
  if len(argv) > 1:
    raise app.UsageError("Too many command-line arguments.")
  from simfluence_jax.planning import devices  # pylint: disable=g-import-not-at-top
  _cli.freeze_import_heap()
  logging.set_verbosity(logging.INFO)
  # Progress lines of the library's loggers ("plan: compiling ...").
  std_logging.getLogger("simfluence_jax").setLevel(std_logging.INFO)
  config = flags.FLAGS.config
  if config is None or _TOPOLOGY.value is None:
    print("error: --config and --topology are required", file=sys.stderr)
    sys.exit(2)
  if _TOPOLOGY.value != "cpu" and not devices.libtpu_available():
    print(f"error: {devices.INSTALL_HINT}", file=sys.stderr)
    sys.exit(EXIT_NO_LIBTPU)
  try:
    status = run(config, _TOPOLOGY.value)
  except devices.LibtpuMissingError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(EXIT_NO_LIBTPU)
  except _cli.RUN_ERRORS as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  sys.exit(status)


if __name__ == "__main__":
  app.run(main, flags_parser=main_lib.parse_flags)
