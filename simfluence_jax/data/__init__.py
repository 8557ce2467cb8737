"""Data: seqio tasks, TFDS tasks, bundled digits, curricula.

`get_dataset(config)` gives a `Dataset` whose row i is example id i;
`make_curricula(...)` gives the batch ids of training runs over those ids.
seqio / TensorFlow are imported only when an LM dataset is built.
"""

from simfluence_jax.data.curricula import load_curriculum
from simfluence_jax.data.curricula import make_curricula
from simfluence_jax.data.curricula import PADDING_ID
from simfluence_jax.data.curricula import steps_per_epoch
from simfluence_jax.data.dataset import BYTE_VOCAB_SIZE
from simfluence_jax.data.dataset import Dataset
from simfluence_jax.data.dataset import default_data_config
from simfluence_jax.data.dataset import get_dataset
from simfluence_jax.data.dataset import SOURCES

__all__ = [
    "BYTE_VOCAB_SIZE", "Dataset", "PADDING_ID", "SOURCES", "default_data_config",
    "get_dataset", "load_curriculum", "make_curricula", "steps_per_epoch",
]
