r"""An MLP classifier fine-tuned on scikit-learn's bundled 8x8 digits.

  python -m simfluence_jax.main --config=configs/digits_mlp.py --workdir=/tmp/sj_digits
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.base_config()
  config.data.name = "digits"
  config.model.name = "mlp"
  config.model.hidden_sizes = (64,)
  config.num_train_examples = 300
  config.num_test_examples = 64
  config.subset_size = 192
  config.batch_size = 16
  config.num_steps = 36
  config.pretrain_steps = 0  # Fine-tune from a random init: digits are learnt fast.
  config.learning_rate = 0.2
  if args.tiny:
    config = config_lib.apply_tiny(config)
  return config
