"""simfluence_jax: which training examples made my model do this?

Training-run simulators (Simfluence-Linear / -Additive), TracIn and EK-FAC influence
functions as jitted JAX kernels, compared by how well they simulate held-out runs.

Subpackages load on first use (PEP 562): `import simfluence_jax` imports nothing
heavy, `sj.influence.fit_ekfac` loads the kernels and what they need, never the
pipeline, the report writers or an optional package.
"""

from simfluence_jax import _optional

__version__ = "0.1.0"
__all__ = ["Trace", "evaluation", "influence", "kernels", "simulators"]

__getattr__, __dir__ = _optional.lazy_exports(
    globals(),
    {
        "Trace": "trace",
    },
    submodules=(
        "config_lib",
        "data",
        "evaluation",
        "influence",
        "kernels",
        "models",
        "pipeline",
        "planning",
        "sharding",
        "simulators",
        "trace",
        "training",
    ))
