r"""Fine-tuning on TFDS `glue/rte` (needs the dataset under `--config.data.data_dir`).

  python -m simfluence_jax.main --config=configs/glue_rte.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir=DIR
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.base_config()
  config.data.name = "glue_rte"
  config.data.seq_len = 128  # Prompts are long; truncated from the left, answer kept.
  config.num_train_examples = 400
  config.num_test_examples = 64
  config.subset_size = 256
  config.num_steps = 64
  config.pretrain_steps = 0
  config.learning_rate = 0.05
  if args.tiny:
    config = config_lib.apply_tiny(config)
  return config
