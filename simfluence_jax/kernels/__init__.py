"""Low-level jitted building blocks shared by training and the influence kernels."""

from simfluence_jax.kernels import per_example
from simfluence_jax.kernels import projection
from simfluence_jax.kernels.per_example import per_example_grads
from simfluence_jax.kernels.projection import flatten_per_example
from simfluence_jax.kernels.projection import project
from simfluence_jax.kernels.projection import project_pytree

__all__ = ["per_example", "projection", "per_example_grads", "flatten_per_example",
           "project", "project_pytree"]
