"""The experiment pipeline: named stages with fingerprints, shared by every entry point.

`run(config, workdir)` runs the main job (`python -m simfluence_jax.main`); the
stage functions (`stages.py`) can be called one by one from a colab; `Workdir` and
`fingerprint` decide what a rerun may reuse.
"""

from simfluence_jax.pipeline import experiment
from simfluence_jax.pipeline import fingerprint
from simfluence_jax.pipeline import stages
from simfluence_jax.pipeline import validate
from simfluence_jax.pipeline import workdir
from simfluence_jax.pipeline.experiment import enable_compilation_cache
from simfluence_jax.pipeline.experiment import run
from simfluence_jax.pipeline.experiment import run_seed
from simfluence_jax.pipeline.fingerprint import StaleWorkdirError
from simfluence_jax.pipeline.validate import METHODS
from simfluence_jax.pipeline.validate import validate_config
from simfluence_jax.pipeline.workdir import Workdir
from simfluence_jax.pipeline.workdir import workdir_lock

__all__ = [
    "METHODS",
    "StaleWorkdirError",
    "Workdir",
    "enable_compilation_cache",
    "experiment",
    "fingerprint",
    "run",
    "run_seed",
    "stages",
    "validate",
    "validate_config",
    "workdir",
    "workdir_lock",
]
