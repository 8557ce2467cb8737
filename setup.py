"""simfluence_jax: training-data attribution by simulating training runs, in JAX."""

import setuptools

INSTALL_REQUIRES = [
    "jax>=0.4.30",
    "flax>=0.8",
    "optax>=0.2",
    "orbax-checkpoint>=0.5",
    "ml-collections>=0.1.1",
    "numpy>=1.24",
    "scipy>=1.10",
    "seqio>=0.0.19",
    "tensorflow-datasets>=4.9",
    "tensorflow>=2.15",
    "scikit-learn>=1.3",  # bundled digits data and the Ridge baseline
    "matplotlib>=3.7",  # report plots
    "absl-py>=1.0",
    "clu>=0.0.10",  # TensorBoard metrics (clu.metric_writers)
    "tensorboard>=2.15",  # clu's summary writer imports it
]

EXTRAS_REQUIRE = {
    # nbclient / nbformat / ipykernel: tests/colabs_test.py executes colabs/*.ipynb.
    "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "chex>=0.1.85",
             "nbclient>=0.8", "nbformat>=5", "ipykernel"],
    # PyTorch peers for benchmarks/. On a CPU-only machine install the CPU wheel of
    # torch first (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu`).
    "bench": ["torch>=2.1", "kronfluence>=1.0", "captum>=0.7"],
    "colab": ["jupyter", "nbclient>=0.8", "nbformat>=5", "ipykernel"],
}

setuptools.setup(
    name="simfluence_jax",
    version="0.1.0",
    description="Training-run simulators (Simfluence), TracIn and EK-FAC influence in JAX.",
    packages=setuptools.find_packages(include=["simfluence_jax", "simfluence_jax.*"]),
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
