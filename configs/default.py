r"""Default workload: a byte-level Transformer fine-tuned on synthetic facts.

  python -m simfluence_jax.main --config=configs/default.py --workdir=/tmp/sj
  python -m simfluence_jax.main --config=configs/default.py:tiny --workdir=/tmp/sj_tiny

Every field and its comment: `simfluence_jax/config_lib.py`.
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, tiny=False)
  config = config_lib.base_config()
  if args.tiny:
    config = config_lib.apply_tiny(config)
  return config
