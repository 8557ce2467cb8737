r"""Fine-tuning on TFDS `glue/rte` (needs the dataset under `--config.data.data_dir`).

  python -m simfluence_jax.main --config=configs/glue_rte.py \
      --config.data.data_dir=gs://BUCKET/tensorflow_datasets --workdir=DIR
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.tfds_task_config("glue_rte")
  if args.tiny:
    config = config_lib.apply_tiny(config)
  return config
