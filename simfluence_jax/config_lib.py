"""Shared pieces of the `configs/*.py` files (big_vision style `get_config(arg)`).

`base_config()` holds every field with its default and a comment; each file under
`configs/` starts from it and overrides what its workload needs. Variants come from the
config argument (`--config=configs/default.py:tiny`; each file lists its own); any
field is set on the command line, e.g. `--config.num_runs=8`.

Every field of a config with its value and comment:

  python -m simfluence_jax.config_lib configs/default.py:tiny
"""

import ast
import importlib.util
import inspect
import io
import os
import sys
import tokenize
from typing import Any, Tuple

import ml_collections

from simfluence_jax import data

# Where the main job keeps JAX's persistent compilation cache unless
# $JAX_COMPILATION_CACHE_DIR (JAX's own setting, which every JAX program reads) says
# otherwise; `--config.compilation_cache_dir=` turns it off.
DEFAULT_COMPILATION_CACHE_DIR = "~/.cache/simfluence_jax/xla"


# config.data's fields that are references to the top-level ones of the same name
# (`base_config`): one value each, set at the top (`main` refuses the data flags,
# `validate_config` a config file that untied them).
TIED_DATA_FIELDS = ("num_train_examples", "num_test_examples", "seed")


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `"tiny,num_runs=8"` into a ConfigDict, with `defaults` for missing keys.

  A bare word sets a boolean flag (`tiny` -> tiny=True); `key=value` is converted to
  the type of the default (bool from "true"/"false", int, float, str).

  Raises:
    ValueError: unknown key or a value that does not convert.
  """
  result = ml_collections.ConfigDict(dict(defaults))
  for item in filter(None, (arg or "").split(",")):
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"config argument {key!r} is unknown; known: {sorted(defaults)}.")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...).")
      result[key] = True
      continue
    try:
      if isinstance(default, bool):
        if value.lower() not in ("true", "false", "1", "0"):
          raise ValueError(value)
        result[key] = value.lower() in ("true", "1")
      else:
        result[key] = type(default)(value)
    except ValueError as e:
      raise ValueError(f"config argument {key}={value!r}: expected a "
                       f"{type(default).__name__}.") from e
  return result


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads `"configs/default.py:tiny"` the way `--config=` does.

  Raises:
    FileNotFoundError: the config file does not exist.
  """
  path, _, arg = spec.partition(":")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config file {path!r} does not exist.")
  module_spec = importlib.util.spec_from_file_location(
      os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def base_config() -> ml_collections.ConfigDict:
  """Every field of the main job, with its default (the LM fine-tuning workload)."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds the data, the base model, the curricula and every projection.
  config.num_seeds = 1  # K > 1: repeat for seeds seed..seed+K-1 in WORKDIR/seed_<k>/; report mean ± std.
  config.methods = ("curriculum_blind", "simfluence_linear", "simfluence_additive",
                    "tracin_cp", "tracin_per_step", "ekfac_if")  # Methods to fit and score.

  # --- Experiment sizes -----------------------------------------------------------
  config.num_train_examples = 200  # N: the pool of train examples runs draw from.
  config.num_test_examples = 32  # M: test examples whose loss is recorded every step.
  config.subset_size = 128  # Train examples each run draws from the pool.
  config.num_runs = 48  # R: runs the simulators are fitted on.
  config.num_held_out_runs = 16  # Runs only used to evaluate every method.
  config.batch_size = 8  # B: train examples per step.
  config.num_steps = 32  # T: steps per run (subset reshuffled every epoch).

  # --- Data (fields and comments: data.default_data_config) ----------------------
  config.data = data.default_data_config()
  for name in TIED_DATA_FIELDS:
    config.data[name] = config.get_ref(name)

  # --- Model ----------------------------------------------------------------------
  config.model = ml_collections.ConfigDict()
  config.model.name = "transformer"  # transformer | mlp (ignored with a factory)
  config.model.factory = ""  # "pkg.module:fn": your linen model, fn(config.model, vocab_size=, num_classes=, max_len=).
  config.model.checkpoint = ""  # Orbax checkpoint of your model's variables: the base model (no init; pretrain_steps must be 0).
  config.model.d_model = 64  # Transformer width.
  config.model.num_layers = 2  # Transformer blocks.
  config.model.num_heads = 4  # Attention heads.
  config.model.d_ff = 256  # MLP hidden width inside a block.
  config.model.use_bias = True  # Transformer Dense biases (False: Llama-style; EK-FAC's A factors I x I).
  config.model.hidden_sizes = (64,)  # MLP classifier hidden layers.

  # --- Base model (initialised, briefly pre-trained once, saved with orbax) ---------
  config.pretrain_steps = 300  # Steps of Adam on the task's pre-training split; 0 = none.
  config.pretrain_batch_size = 32  # Examples per pre-training step.
  config.pretrain_learning_rate = 3e-3  # Adam step size of pre-training.

  # --- Fine-tuning runs -------------------------------------------------------------
  config.optimizer = "sgd"  # sgd | momentum | adam (SGD makes TracIn's step size exact).
  config.learning_rate = 0.003  # Peak step size (losses are summed over tokens; 0.03 diverges).
  config.lr_schedule = "constant"  # constant | linear (decay to end_learning_rate).
  config.warmup_steps = 0  # Steps of linear ramp from 0 to learning_rate before the schedule.
  config.end_learning_rate = 0.0  # Where the linear schedule ends at num_steps.
  config.momentum = 0.9  # Heavy-ball coefficient (optimizer "momentum" only).
  config.b1 = 0.9  # Adam's first-moment decay (optimizer "adam" only).
  config.b2 = 0.999  # Adam's second-moment decay (optimizer "adam" only).
  config.eps = 1e-8  # Adam's denominator offset (optimizer "adam" only).
  config.checkpoint_every = 8  # Steps between orbax checkpoints (resume + TracIn-CP).
  config.record_grads = True  # Record per-step projected gradients (per-step TracIn).
  # The first min(num_grad_runs, num_runs) fitted runs record them (each costs about
  # 8 plain runs); the default's 8 stays valid when num_runs is lowered.
  config.num_grad_runs = 8
  config.projection_dim = 256  # K: dimension of the recorded gradient projections.

  # --- Simulators -----------------------------------------------------------------
  config.simulators = ml_collections.ConfigDict()
  config.simulators.l2 = ml_collections.config_dict.placeholder(float)  # Ridge penalty; None: chosen from l2_grid by CV.
  config.simulators.l2_grid = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # Candidates of the K-fold CV (runs as folds).
  config.simulators.cv_folds = 4  # K of that CV.
  config.simulators.num_phases = 1  # Step bins with their own A, B (2 helps with many runs).
  config.simulators.feature_dim = 32  # F: projected base-model gradients per example (featurized).
  config.simulators.featurized_corrections = True  # Featurized: per-example A, B corrections centred on the feature model (False: features only, GPTfluence).
  config.simulators.num_band_samples = 32  # Posterior samples for uncertainty bands.
  config.learning_curve = (8, 16, 32)  # Fitted-run counts of the Simfluence-Linear learning curve.

  # --- Train examples no fitted run contains (scores simulators on new examples) -----
  config.unseen = ml_collections.ConfigDict()
  config.unseen.num_examples = 0  # U: train ids kept out of every fitted and held-out run.
  config.unseen.num_runs = 0  # Extra held-out runs drawn from all N ids (so containing them).

  # --- Influence kernels --------------------------------------------------------------
  config.influence = ml_collections.ConfigDict()
  config.influence.tracin_num_runs = 4  # Training runs whose checkpoints TracIn-CP uses.
  config.influence.fisher = "empirical"  # empirical | true (labels sampled from the model).
  config.influence.damping = ml_collections.config_dict.placeholder(float)  # None: 0.1 x mean eigenvalue.
  config.influence.query_rank = ml_collections.config_dict.placeholder(int)  # EK-FAC queries kept rank-r per layer (Grosse et al.); None: dense [O, I].
  config.influence.chunk_size = 64  # Train examples per gradient chunk (bounds memory).
  config.influence.mesh_model = ml_collections.config_dict.placeholder(int)  # `model` axis of the score kernels (factors, dense queries need more than training); None: mesh_model.

  # --- Metagradients (first-order expansion of the training run; no fitted runs) ------
  config.metagradient = ml_collections.ConfigDict()
  config.metagradient.reference_batch_size = 0  # 0: full-batch reference; B' > 0: B' ids per step.
  config.metagradient.chunk_size = 8  # Curricula per vmapped jvp (bounds memory).
  config.metagradient.space = "loss"  # Expand L ("loss") or log L ("log": same ranks, L > 0, but exp blows up large first-order changes: thousands of times blind's MSE on one default seed, docs/experiments.md) in its held-out predictions; the counterfactual search reads the loss-space table either way.
  config.metagradient.cotangents_at_once = 8  # Test examples per reverse pass of the removal metagradients (8: 1.45x faster than 1, measured).

  # --- MAGIC's removal benchmark around fitted run 0 ------------------------------
  config.removal = ml_collections.ConfigDict()
  config.removal.enabled = False  # Retrain the reference run without random removal sets.
  config.removal.fractions = (0.01, 0.05)  # Share of the N train examples each set removes.
  config.removal.num_removals = 32  # S: removal sets (retrained runs) per fraction.

  # --- Counterfactual curricula (search on each simulator, verify by retraining) -----
  config.counterfactual = ml_collections.ConfigDict()
  config.counterfactual.enabled = True  # Search curricula and really retrain them.
  config.counterfactual.methods = ("simfluence_linear", "simfluence_additive",
                                   "tracin_cp", "ekfac_if", "metagradient")  # Simulators to search on (those config.methods computes); "metagradient": on its table of the targets' final losses (one reverse pass per 8 targets; 85 s a seed on the default, where its curricula beat every other method's on 3 of 3 seeds).
  config.counterfactual.num_searched = 4  # Curricula searched and retrained per method.
  config.counterfactual.num_targets = 8  # Targets: test examples whose final loss varies most.
  config.counterfactual.num_iters = 300  # Local-search iterations per curriculum.
  config.counterfactual.num_proposals = 64  # Moves simulated in parallel per iteration.

  # --- Scale-out --------------------------------------------------------------------
  config.distributed = False  # Call jax.distributed.initialize() (multi-host).
  config.mesh_model = 1  # Devices sharing one run's (and the scores') params, FSDP-style: the `model` mesh axis.
  config.compilation_cache_dir = os.environ.get(
      "JAX_COMPILATION_CACHE_DIR", DEFAULT_COMPILATION_CACHE_DIR)  # Persistent XLA cache ($JAX_COMPILATION_CACHE_DIR when set); "" = off.
  config.compile_optimizations = True  # False: XLA skips most optimisations: compiles ~1/4 faster, runs ~2× slower (toy sizes, where compiling is most of the time: :tiny).
  return config


def mesh_model_sizes(config, num_devices: int) -> Tuple[int, int]:
  """(`model` axis of the training runs, of the score kernels) on `num_devices`.

  The score kernels' is `influence.mesh_model`, else `mesh_model`.

  Raises:
    ValueError: naming the field whose size does not divide `num_devices`.
  """
  scores = config.influence.get("mesh_model")
  for field, size in (("mesh_model", config.mesh_model),
                      ("influence.mesh_model", scores)):
    if size and num_devices % size:
      raise ValueError(f"config.{field}={size}: must divide the job's {num_devices} "
                       "devices.")
  return config.mesh_model, scores or config.mesh_model


def tfds_task_config(name: str) -> ml_collections.ConfigDict:
  """Fine-tuning the Transformer on a TFDS classification task read through seqio."""
  config = base_config()
  config.data.name = name
  config.data.seq_len = 128  # Prompts are long; truncated in the middle, answer kept.
  config.num_train_examples = 400
  config.num_test_examples = 64
  config.subset_size = 256
  config.num_steps = 64
  config.pretrain_steps = 0
  return config


def apply_tiny(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config so the whole main job runs in well under a minute on 2 CPUs."""
  config.num_train_examples = min(config.num_train_examples, 48)
  config.num_test_examples = min(config.num_test_examples, 8)
  config.subset_size = min(config.subset_size, 32)
  config.num_runs = 8
  config.num_held_out_runs = 4
  config.batch_size = 4
  config.num_steps = 8
  config.pretrain_steps = 0  # Compiling a pre-training loop costs more than it teaches.
  # Compiling is most of a toy job's time: 53.9 → 40.3 s cold (docs/experiments.md).
  config.compile_optimizations = False
  config.data.num_pretrain_examples = 0
  config.checkpoint_every = 4
  config.projection_dim = 32
  config.simulators.num_band_samples = 8
  config.influence.tracin_num_runs = 2
  config.counterfactual.num_searched = 2
  config.counterfactual.num_targets = 4
  config.counterfactual.num_iters = 100
  # The metagradient's table compiles for about 16 s (cold), more than the toy
  # search can show; tests/main_test.py searches on it.
  config.counterfactual.methods = tuple(m for m in config.counterfactual.methods
                                        if m != "metagradient")
  config.learning_curve = (4,)
  config.unseen.num_examples = min(config.unseen.num_examples, 8)
  config.unseen.num_runs = min(config.unseen.num_runs, 4)
  config.removal.num_removals = 8
  config.simulators.l2_grid = (0.1, 10.0)
  config.simulators.cv_folds = 2
  if config.model.name == "transformer":
    config.model.d_model = 32
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.d_ff = 64
  return config


def _field_comments(source: str, functions: tuple[str, ...] | None = None,
                    prefix: str = "") -> dict[str, str]:
  """`{dotted field: comment}` of every `config.a.b = ...` assignment in `source`.

  In source order; fields assigned without a comment map to "".

  The comment of an assignment is the one ending its last line, else the block of
  comment lines right above it (section rules `# --- ... ---` excluded). Only the
  functions named in `functions` are read (None: the whole source); `prefix` is put
  before every field (`"data."` for the function that builds `config.data`).
  """
  comments, code_lines = {}, set()
  for token in tokenize.generate_tokens(io.StringIO(source).readline):
    if token.type == tokenize.COMMENT:
      comments[token.start[0]] = token.string.lstrip("#").strip()
    elif token.type not in (tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
                            tokenize.DEDENT, tokenize.ENDMARKER):
      code_lines.add(token.start[0])
  roots = [node for node in ast.parse(source).body if functions is None or (
      isinstance(node, ast.FunctionDef) and node.name in functions)]
  found = {}
  for root in roots:
    for node in ast.walk(root):
      if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
        continue
      parts, target = [], node.targets[0]
      while isinstance(target, ast.Attribute):
        parts.append(target.attr)
        target = target.value
      if not (isinstance(target, ast.Name) and target.id == "config" and parts):
        continue
      text = comments.get(node.end_lineno, "")
      line = node.lineno - 1
      above = []
      while not text and line in comments and line not in code_lines:
        if not comments[line].startswith("---"):
          above.insert(0, comments[line])
        line -= 1
      text = text or " ".join(above)
      field = prefix + ".".join(reversed(parts))
      if not found.get(field):
        found[field] = text
  return found


def _flatten(config, prefix=""):
  for key in config.keys():
    value = config[key]
    if isinstance(value, ml_collections.ConfigDict):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield prefix + key, value


def describe_config(spec: str) -> list[tuple[str, Any, str]]:
  """`(field, value, comment)` of every field of the config `spec` loads.

  Comments come from `base_config()` and `data.default_data_config()` (parsed with
  `ast` and `tokenize`); where the config file or a variant changes a field and says
  why, that comment is added after the base one. Fields are listed in the order
  `base_config()` defines them.

  Raises:
    FileNotFoundError: the config file does not exist.
  """
  config = load_config(spec)
  module_source = inspect.getsource(sys.modules[__name__])
  base = _field_comments(module_source, ("base_config",))
  data_comments = _field_comments(inspect.getsource(data.default_data_config),
                                  prefix="data.")
  comments = {**data_comments, **{k: v for k, v in base.items() if v}}
  # base_config's order; config.data's fields where base_config sets config.data.
  order = {field: (i, 0) for i, field in enumerate(base)}
  order.update({field: (order.get("data", (0,))[0], j + 1)
                for j, field in enumerate(data_comments)})
  path, _, arg = spec.partition(":")
  with open(path) as f:
    file_source = f.read()
  # The variants that changed fields, in the order they ran (the last one's reason wins).
  overrides = {}
  if "tfds_task_config" in file_source:
    overrides.update(_field_comments(module_source, ("tfds_task_config",)))
  overrides.update(_field_comments(file_source))
  if "tiny" in arg:
    overrides.update(_field_comments(module_source, ("apply_tiny",)))
  overrides = {field: text for field, text in overrides.items() if text}
  defaults = dict(_flatten(base_config()))
  rows = []
  for field, value in _flatten(config):
    comment = comments.get(field, "")
    note = overrides.get(field)
    if note and note != comment and value != defaults.get(field):
      comment = f"{comment} [{note}]" if comment else note
    rows.append((field, value, comment))
  rows.sort(key=lambda row: order.get(row[0], (len(order), 0)))
  return rows


def format_config(spec: str) -> str:
  """`field = value  # comment` lines for every field of the config `spec` loads."""
  rows = describe_config(spec)
  assignments = [f"{field} = {value!r}" for field, value, _ in rows]
  width = min(max(map(len, assignments)), 48)
  return "\n".join(f"{text:<{width}}  # {comment}" if comment else text
                   for text, (_, _, comment) in zip(assignments, rows))


def _main(argv: list[str]) -> int:
  if len(argv) != 1 or argv[0].startswith("-"):
    print("usage: python -m simfluence_jax.config_lib CONFIG_FILE[:ARG]\n"
          "  prints `field = value  # comment` for every field of the config.",
          file=sys.stderr)
    return 2
  try:
    print(format_config(argv[0]))
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
