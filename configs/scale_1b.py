r"""Simfluence at scale: a ~1.3B-parameter decoder fine-tuned in 128 runs on v5e-256.

What it is for: many fine-tuning runs of a 1B-class model that differ only in their
curriculum (the data Simfluence-Linear and -Additive are fitted on), on a v5e pod
slice of 256 chips, one Adam run per 2 chips. The data is the seqio Task
`super_glue_boolq_v102` (BoolQ, registered by `t5.data.tasks`, T5's 32100-token
SentencePiece vocabulary), so the main job needs `pip install t5`; the plan needs no
data at all:

  python -m simfluence_jax.plan --config=configs/scale_1b.py --topology=v5e:16x16
  python -m simfluence_jax.plan --config=configs/scale_1b.py:sgd --topology=v5e:16x16

What the plan says (libtpu 0.0.52, jax 0.10.2): with Adam (the default here, as
users fine-tune with it) a run does NOT fit one per chip: 1.34B float32 params with
Adam's two moments are 15 GiB of state alone, and the compiler asks for 18.9 GiB
against the 15.75 GiB it has. So each run's params and Adam state are split over 2
chips by the `model` mesh axis (`mesh_model = 2`, FSDP-style): 128 runs on 128 run
slots, 11.3 GiB per chip (7.5 GiB arguments, 3.3 GiB temporaries), 235 TFLOP per
chip per 8-step segment, 2.6 s roofline (segment compiled in 259 s on 2 cores).
`:sgd` keeps one run per chip (256 runs, 11.2 GiB per chip). The Simfluence
solver's kernels fail to compile on v5e:16x16: they run over one process's 4
chips, and XLA:TPU refuses a program on a subset of a v5e slice ("device
assignment should include all slice devices"). Per-step TracIn (per-example
gradients of 1.3B params) and EK-FAC (the 32100² vocabulary factor alone is 3.8
GiB) are off at this size; `configs/scale_8b.py` plans those on v5p.
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  args = config_lib.parse_arg(arg, sgd=False)
  config = config_lib.base_config()
  config.methods = ("curriculum_blind", "simfluence_linear", "simfluence_additive")

  # BoolQ through seqio (prompt: question + passage; answer: "True" / "False").
  config.data.name = "seqio"
  config.data.seqio_task = "super_glue_boolq_v102"
  config.data.seqio_module = "t5.data.tasks"
  config.data.seq_len = 256  # Passages truncated in the middle, the answer kept.
  config.num_train_examples = 4096
  config.num_test_examples = 64
  config.subset_size = 2048

  # Adam: 128 runs = one per 2 chips of v5e-256 (96 fitted + 32 held out), each
  # run's state split over its 2 chips. SGD: 256 runs = one per chip (224 + 32). A
  # run count that does not divide the run slots would be replicated on every slot.
  config.mesh_model = 1 if args.sgd else 2
  config.num_runs = 224 if args.sgd else 96
  config.num_held_out_runs = 32
  config.batch_size = 8
  config.num_steps = 64
  config.checkpoint_every = 8
  config.record_grads = False  # Per-example gradients of 1.3B params do not fit.
  config.learning_curve = (56, 112, 224) if args.sgd else (24, 48, 96)

  # ~1.34B parameters: 24 blocks of width 2048 (16 heads, MLP 8192) + 2 x 32100 x 2048
  # embedding and head.
  config.model.d_model = 2048
  config.model.num_layers = 24
  config.model.num_heads = 16
  config.model.d_ff = 8192
  config.model.vocab_size = 32100  # T5's vocabulary; the job takes it from the Task.

  config.pretrain_steps = 0  # A pre-trained checkpoint would be loaded instead.
  config.optimizer = "sgd" if args.sgd else "adam"
  config.learning_rate = 1e-4 if args.sgd else 1e-5
  config.counterfactual.enabled = False
  config.distributed = True
  return config
