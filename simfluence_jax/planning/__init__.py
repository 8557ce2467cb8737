"""Planning a job without its hardware: every stage compiled for a TPU topology.

`plan(config, devices, chip)` builds the main job's meshes and shardings on a TPU
topology's compile-only devices (`devices.topology_devices("v5e:16x16")`, needs
libtpu), lowers and compiles every stage on `jax.ShapeDtypeStruct` inputs, and
reports per-chip memory against the chip's HBM, loop-counted FLOPs and bytes, a
roofline time, and for a stage that does not fit the first config change that
makes it fit. `python -m simfluence_jax.plan` is the command line.
"""

from simfluence_jax.planning import chips
from simfluence_jax.planning import costs
from simfluence_jax.planning import devices
from simfluence_jax.planning import job
from simfluence_jax.planning import report
from simfluence_jax.planning import stages
from simfluence_jax.planning.chips import CHIPS
from simfluence_jax.planning.chips import ChipSpec
from simfluence_jax.planning.devices import LibtpuMissingError
from simfluence_jax.planning.report import Plan
from simfluence_jax.planning.report import plan
from simfluence_jax.planning.report import Row
from simfluence_jax.planning.stages import STAGES

__all__ = [
    "CHIPS",
    "ChipSpec",
    "LibtpuMissingError",
    "Plan",
    "Row",
    "STAGES",
    "chips",
    "costs",
    "devices",
    "job",
    "plan",
    "report",
    "stages",
]
