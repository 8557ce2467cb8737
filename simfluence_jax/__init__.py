"""simfluence_jax: which training examples made my model do this?

Training-run simulators (Simfluence-Linear / -Additive), TracIn and EK-FAC influence
functions as jitted JAX kernels, compared by how well they simulate held-out runs.
"""

from simfluence_jax import evaluation
from simfluence_jax import influence
from simfluence_jax import kernels
from simfluence_jax import simulators
from simfluence_jax.trace import Trace

__version__ = "0.1.0"
__all__ = ["Trace", "evaluation", "influence", "kernels", "simulators"]
