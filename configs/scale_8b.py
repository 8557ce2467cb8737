r"""Influence scores at scale: EK-FAC and TracIn-CP on a ~7.8B-parameter decoder, v5p-128.

What it is for: the regime of Grosse et al. (2023), influence functions on a
multi-billion-parameter LM, planned on a v5p slice of 64 chips (accelerator type
v5p-128: v5p names count TensorCores, two per chip; topology v5p:4x4x4; 128 chips
would be v5p-256, v5p:4x4x8). 64 SGD fine-tuning runs (one per chip): the first 4 fitted runs
give TracIn-CP's checkpoints (`influence.tracin_num_runs`), and 16 held-out runs are what
every method is scored on; EK-FAC
factors are fitted at the base model. Data: the seqio Task `super_glue_boolq_v102`
(`pip install t5` for the main job; the plan needs no data):

  python -m simfluence_jax.plan --config=configs/scale_8b.py --topology=v5p-128

What the plan says (libtpu 0.0.52, jax 0.10.2; `docs/experiments.md`): every stage
fits v5p's 95.7 GiB. The training segment (1 run per chip, SGD) and TracIn-CP fit one
run per chip: 16 queries of 128 tokens make every layer's query side factored
(activations, not [O, I] gradients), so a chip holds the params plus one chunk's
activations. EK-FAC's factors (150 GiB in all) and the 16 dense preconditioned
queries (16 x 7.8B floats) are split over `influence.mesh_model = 64` chips. That
needs a model without Dense biases (`model.use_bias = False`, as in Llama-style
decoders): a bias makes a layer's A factor (I + 1)², which no axis of 64 divides, and
those replicated factors made the statistics' reduce need 131 GiB. Without them the
covariance pass needs 36.1 GiB per chip (30.9 before the covariances counted the
prompt tokens that carry gradient), the reduce 11.5, the eigenvalue pass 16.4,
the queries 29.5 and the scores 20.8. The eigendecompositions (n = 4096 to 32100) are
not compiled (XLA:TPU's eigh compile time grows steeply with n; the plan reports their
inputs and outputs as a lower bound). `ekfac_scores(..., query_rank=)` (Grosse et
al.'s low-rank queries) shrinks the queries, but its SVD does not compile on this
machine in reasonable time at these sizes.
"""

from simfluence_jax import config_lib


def get_config(arg=None):
  config_lib.parse_arg(arg)  # No variants: any argument (`:tiny`) is refused.
  config = config_lib.base_config()
  config.methods = ("curriculum_blind", "tracin_cp", "ekfac_if")

  config.data.name = "seqio"
  config.data.seqio_task = "super_glue_boolq_v102"
  config.data.seqio_module = "t5.data.tasks"
  config.data.seq_len = 128
  config.num_train_examples = 4096
  config.num_test_examples = 16  # Queries; more make TracIn's query side dense.
  config.subset_size = 2048

  # 64 runs = one per chip (48 fitted, 16 held out).
  config.num_runs = 48
  config.num_held_out_runs = 16
  config.batch_size = 8
  config.num_steps = 32
  config.checkpoint_every = 8
  config.record_grads = False
  config.learning_curve = ()
  config.optimizer = "sgd"  # TracIn's step size is exact for SGD.
  config.learning_rate = 1e-4

  # ~7.8B parameters: 32 blocks of width 4096 (32 heads, MLP 20480) + 2 x 32100 x 4096.
  config.model.d_model = 4096
  config.model.num_layers = 32
  config.model.num_heads = 32
  config.model.d_ff = 20480
  config.model.vocab_size = 32100  # T5's vocabulary; the job takes it from the Task.
  # No Dense biases, as in Llama-style decoders: every EK-FAC A factor is then I x I
  # (4096² or 20480²), which the 64-way model axis splits; with biases the (I + 1)²
  # factors stay replicated (about 54 GiB) and the statistics' reduce needs 131 GiB.
  config.model.use_bias = False

  config.influence.tracin_num_runs = 4
  config.influence.chunk_size = 64  # Train examples per chunk (all on the one data slot:
  # mesh_model = 64 leaves the score mesh runs 1 x data 1 x model 64).
  config.influence.mesh_model = 64  # Params, factors and dense queries over 64 chips.
  config.pretrain_steps = 0
  config.counterfactual.enabled = False
  config.distributed = True
  return config
