"""simfluence_jax: training-data attribution by simulating training runs, in JAX.

`pip install .` is the core: the jitted kernels (TracIn, EK-FAC), the simulators,
`Trace`, training, the pipeline and the main job on the generated default data, with
metrics.json and report.md. Everything else is an extra, named in the one-line error
a feature raises (or logs) when its extra is missing (`simfluence_jax/_optional.py`).
"""

import setuptools

INSTALL_REQUIRES = [
    # jax also brings scipy (jax.scipy is built on it); the package imports no scipy.
    "jax>=0.4.30",
    "flax>=0.8",
    "optax>=0.2",
    "orbax-checkpoint>=0.5",  # base model, training and EK-FAC factor checkpoints
    "ml-collections>=0.1.1",
    "numpy>=1.24",
    # ml_dtypes 0.7.0's extension takes 0.5 s to load (0.004 s for 0.5.3 and 0.6.0,
    # measured 2026-12-05 with numpy 2.4): half of `import jax` in every process.
    "ml_dtypes>=0.5,<0.7",
    "etils[epath]>=1.0",  # every workdir path (local or gs://)
    "absl-py>=1.0",  # flags and logging of the entry points
]

_SEQIO = ["seqio>=0.0.19", "tensorflow>=2.15", "tensorflow-datasets>=4.9"]
# Plots (matplotlib) and TensorBoard event files. tensorboard's own writer writes
# them without TensorFlow; clu's writers only where tensorboard is missing.
_REPORT = ["matplotlib>=3.7", "clu>=0.0.10", "tensorboard>=2.15"]
_DIGITS = ["scikit-learn>=1.3"]  # configs/digits_mlp.py: sklearn's bundled digits
_GRAIN = ["grain>=0.2", "array-record>=0.5"]
_TPU = ["libtpu==0.0.52"]
# gs:// workdirs: gcsfs is etils.epath's backend for gs:// where TensorFlow is not
# installed; orbax asks the GCS client whether a bucket is hierarchical.
_GCS = ["gcsfs", "google-cloud-storage"]

EXTRAS_REQUIRE = {
    # seqio Tasks and TFDS datasets (data/tasks.py, config.data.pipeline="seqio").
    "seqio": _SEQIO,
    "report": _REPORT,
    "digits": _DIGITS,
    # data.grain_source: users' own record files (ArrayRecord) without TensorFlow.
    "grain": _GRAIN,
    # TPU VMs, and `simfluence_jax.plan` (compiles for a TPU topology on a CPU
    # machine). libtpu 0.0.52 is the release jax 0.10.2 was built against.
    "tpu": _TPU,
    "gcs": _GCS,
    # PyTorch peers for benchmarks/. On a CPU-only machine install the CPU wheel of
    # torch first (e.g. `pip install torch --index-url https://download.pytorch.org/whl/cpu`).
    "bench": ["torch>=2.1", "kronfluence>=1.0", "captum>=0.7"],
    "colab": ["jupyter", "nbclient>=0.8", "nbformat>=5", "ipykernel"],
    # Everything CI needs to run every test: `pip install -e ".[test]"`.
    # nbclient / nbformat / ipykernel: tests/colabs_test.py executes colabs/*.ipynb;
    # scikit-learn: the digits data and the Ridge baseline of the solver tests;
    # libtpu: the plan tests compile for v5e:2x2 (in subprocesses only).
    # fsspec: tests/fake_bucket.py, the object-store filesystem of the gs:// tests.
    "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "chex>=0.1.85",
             "nbclient>=0.8", "nbformat>=5", "ipykernel", "ruff", "fsspec"]
            + _SEQIO + _REPORT + _DIGITS + _GRAIN + _TPU,
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
