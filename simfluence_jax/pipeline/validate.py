"""Checks of a main-job config, run before anything is written to the workdir."""

from simfluence_jax import _checks
from simfluence_jax import models
from simfluence_jax.data import dataset as data_lib
from simfluence_jax.training import optim

METHODS = ("curriculum_blind", "simfluence_linear", "simfluence_additive",
           "simfluence_featurized", "tracin_cp", "tracin_per_step", "ekfac_if",
           "metagradient", "simfluence_hybrid")


def _positive_int(config, name: str, allow_zero: bool = False,
                  allow_none: bool = False) -> None:
  value = config
  for part in name.split("."):
    value = value[part]
  if value is None and allow_none:
    return
  low = 0 if allow_zero else 1
  if not _checks.is_int(value) or value < low:
    kind = "a non-negative" if allow_zero else "a positive"
    raise ValueError(f"config.{name}={value!r}: must be {kind} integer.")


def _positive_float(config, name: str, allow_none: bool = False) -> None:
  value = config
  for part in name.split("."):
    value = value[part]
  if value is None and allow_none:
    return
  if (isinstance(value, bool) or not isinstance(value, (int, float))
      or not value > 0 or value != value or value == float("inf")):
    raise ValueError(f"config.{name}={value!r}: must be a finite positive number.")


def _no_duplicates(config, name: str) -> None:
  """Refuses a tuple field naming a method twice (`--config.methods=...` given twice
  on the command line joins the two tuples)."""
  value = config
  for part in name.split("."):
    value = value[part]
  repeated = sorted({m for m in value if list(value).count(m) > 1})
  if repeated:
    raise ValueError(f"config.{name}={tuple(value)!r}: {repeated} listed more than "
                     "once (was the flag given twice?).")


def _removal(config) -> None:
  """Some removal sets, each fraction in (0, 1), removing a number of examples no
  other one removes (k = max(1, round(f·N)); two with the same k would be one
  benchmark twice under two labels, and two equal labels overwrite each other), at
  most the reference run's subset."""
  _positive_int(config, "removal.num_removals")
  fractions = tuple(config.removal.fractions)
  if not fractions:
    raise ValueError("config.removal.fractions=(): no removal set with "
                     "config.removal.enabled=True; give shares in (0, 1), or set "
                     "enabled=False.")
  sizes = {}
  for f in fractions:
    if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f < 1:
      raise ValueError(f"config.removal.fractions={fractions!r}: each must be in "
                       "(0, 1).")
    k = max(1, int(round(f * config.num_train_examples)))
    if k > config.subset_size:
      # The sets are drawn from the reference run's ids (its subset).
      raise ValueError(
          f"config.removal.fractions={fractions!r}: {f:g} of num_train_examples="
          f"{config.num_train_examples} removes {k} examples, more than the "
          f"reference run's config.subset_size={config.subset_size}.")
    if k in sizes:
      raise ValueError(
          f"config.removal.fractions={fractions!r}: {sizes[k]:g} and {f:g} both remove "
          f"{k} of the num_train_examples={config.num_train_examples} examples; choose "
          "shares that remove different counts (or config.removal.enabled=False).")
    sizes[k] = f


def _unknown_fields(config, base, prefix: str = "") -> list:
  """Dotted fields of `config` that `base` (the job's full config) does not have.

  `model` (a factory model reads fields of its own; `models.get_model` checks the
  built-in models') and `data` (`data.get_dataset` checks it, per source) are
  left to their owners.
  """
  unknown = []
  for key in config.keys():
    if not prefix and key in ("model", "data"):
      continue
    if key not in base:
      unknown.append(prefix + key)
    elif isinstance(config[key], type(config)) and isinstance(base[key], type(config)):
      unknown += _unknown_fields(config[key], base[key], f"{prefix}{key}.")
  return unknown


# JAX keys keep a seed's low 32 bits: seed 2**32 would train seed 0's model.
_MAX_SEED = 2**32 - 1


def _values_used_as_asked(config) -> None:
  """Refuses values the job would not use as asked: clamped, ignored, or failing
  only after training with a message naming no field (review h28)."""
  last_seed = config.seed + config.num_seeds - 1
  if last_seed > _MAX_SEED:
    raise ValueError(f"config.seed={config.seed}: seeds up to seed + num_seeds - 1 = "
                     f"{last_seed} must be at most 2**32 - 1 (JAX keeps a seed's low "
                     "32 bits: a larger one trains the model of another seed).")
  if config.simulators.l2 is None and not (
      2 <= config.simulators.cv_folds <= config.num_runs):
    raise ValueError(f"config.simulators.cv_folds={config.simulators.cv_folds}: "
                     f"cross-validation over runs needs 2 to config.num_runs="
                     f"{config.num_runs} folds (or set config.simulators.l2).")
  if config.simulators.num_phases > config.num_steps:
    raise ValueError(f"config.simulators.num_phases={config.simulators.num_phases}: "
                     f"more phases than the config.num_steps={config.num_steps} steps.")
  if _checks.is_int(config.warmup_steps) and config.warmup_steps > config.num_steps:
    raise ValueError(f"config.warmup_steps={config.warmup_steps}: more than the "
                     f"config.num_steps={config.num_steps} steps (the ramp would never "
                     "reach the learning rate).")
  if config.unseen.num_examples and not config.unseen.num_runs:
    raise ValueError(
        f"config.unseen.num_examples={config.unseen.num_examples} with "
        "config.unseen.num_runs=0: the examples would be held out of every fitted "
        "run and never evaluated; give runs that train on them, or set "
        "unseen.num_examples=0 (which turns the unseen-example evaluation off).")


def validate_config(config) -> None:
  """Raises ValueError naming the first bad field of `config`."""
  from simfluence_jax import config_lib  # pylint: disable=g-import-not-at-top
  unknown = _unknown_fields(config, config_lib.base_config())
  if unknown:
    # A config file's typo (`config.num_step = 64`) kept the default without a word
    # (the command line refuses unknown fields itself).
    raise ValueError(f"config.{unknown[0]}: not a field of the main job (a typo?); "
                     "`python -m simfluence_jax.config_lib CONFIG` lists them all.")
  # config.data's own fields, per source (`data.get_dataset` checks them again).
  data_lib.check_data_config(config)
  for field in config_lib.TIED_DATA_FIELDS:
    if config.data.get(field) != config[field]:
      # Tied in base_config (one value); a config file that rebuilt config.data
      # untied them, and the runs would draw ids the dataset does not index alike.
      raise ValueError(f"config.data.{field}={config.data.get(field)!r}: must equal "
                       f"config.{field}={config[field]!r} (set config.{field}; "
                       f"config.data.{field} follows it).")
  for name in ("num_train_examples", "num_test_examples", "subset_size", "num_runs",
               "num_held_out_runs", "batch_size", "num_steps", "checkpoint_every",
               "projection_dim", "num_seeds", "influence.tracin_num_runs",
               "influence.chunk_size", "simulators.num_band_samples",
               "simulators.cv_folds", "simulators.num_phases",
               "simulators.feature_dim", "mesh_model",
               "metagradient.cotangents_at_once", "metagradient.chunk_size"):
    _positive_int(config, name)
  for name in ("num_grad_runs", "pretrain_steps", "unseen.num_examples",
               "unseen.num_runs", "seed", "metagradient.reference_batch_size"):
    _positive_int(config, name, allow_zero=True)
  _positive_float(config, "learning_rate")
  _positive_float(config, "pretrain_learning_rate")
  _values_used_as_asked(config)
  _positive_float(config, "simulators.l2", allow_none=True)
  if config.simulators.l2 is None and not len(config.simulators.l2_grid):
    raise ValueError("config.simulators.l2_grid=(): empty, and config.simulators.l2 "
                     "is None, so cross-validation has no l2 to choose; give "
                     "positive numbers, or set config.simulators.l2.")
  for l2 in config.simulators.l2_grid:
    if (isinstance(l2, bool) or not isinstance(l2, (int, float)) or not l2 > 0
        or l2 == float("inf")):
      raise ValueError(f"config.simulators.l2_grid={tuple(config.simulators.l2_grid)!r}"
                       ": must be finite positive numbers.")
  _positive_float(config, "influence.damping", allow_none=True)
  for name in ("influence.query_rank", "influence.mesh_model"):
    _positive_int(config, name, allow_none=True)
  if config.optimizer not in optim.OPTIMIZERS:
    raise ValueError(f"config.optimizer={config.optimizer!r}: must be one of "
                     f"{optim.OPTIMIZERS}.")
  if config.lr_schedule not in optim.SCHEDULES:
    raise ValueError(f"config.lr_schedule={config.lr_schedule!r}: must be one of "
                     f"{optim.SCHEDULES}.")
  # The optimizer's numbers (momentum, b1, b2, eps, warmup_steps), as training reads them.
  optim.optimizer_settings(config, config.num_steps)
  if not config.model.factory:
    if config.model.name not in models.MODEL_NAMES:
      raise ValueError(f"config.model.name={config.model.name!r}: must be one of "
                       f"{models.MODEL_NAMES}.")
    # The built-in model each built-in source's data is for (grain's kind is known
    # once its files are read). A mismatch failed in the base_model stage naming a
    # size (num_classes, vocab_size) that was not the problem (review h28).
    model_for = dict.fromkeys(data_lib.CLASSIFICATION_SOURCES, "mlp")
    model_for.update(dict.fromkeys(data_lib.LM_SOURCES, "transformer"))
    if model_for.get(config.data.name, config.model.name) != config.model.name:
      raise ValueError(
          f"config.model.name={config.model.name!r}: config.data.name="
          f"{config.data.name!r} is data for model.name="
          f"{model_for[config.data.name]!r}.")
    # The built-in model's fields (typos, sizes, dropout), before the data stage: the
    # sizes the dataset gives are stood in for by valid ones (the base_model stage
    # checks the real ones).
    models.get_model(config.model, vocab_size=config.model.get("vocab_size") or 2,
                     num_classes=config.model.get("num_classes") or 2,
                     max_len=config.data.seq_len)
    dropout = config.model.get("dropout") or 0
    if dropout > 0 and ("metagradient" in config.methods or config.removal.enabled):
      # Each run's dropout keys follow its index in the call, and the first-order
      # expansion gives a curriculum's own slots other keys than the reference's: a
      # removal's retrained change and the metagradient's predictions would mix in
      # key noise (a copy of the reference run already differs from it).
      raise ValueError(
          f"config.model.dropout={dropout}: the metagradient method and the removal "
          "benchmark need runs that differ only in their weights, and dropout draws "
          "other masks per run; leave out 'metagradient' and set "
          "removal.enabled=False, or set config.model.dropout=0.")
  unknown = sorted(set(config.methods) - set(METHODS))
  if unknown or not config.methods:
    raise ValueError(f"config.methods={tuple(config.methods)!r}: unknown {unknown}; "
                     f"known: {METHODS}.")
  _no_duplicates(config, "methods")
  if "simfluence_hybrid" in config.methods and not {
      "metagradient", "simfluence_linear"} <= set(config.methods):
    raise ValueError("config.methods: simfluence_hybrid averages metagradient and "
                     "simfluence_linear; list both.")
  if "tracin_per_step" in config.methods and not (config.record_grads and
                                                  config.num_grad_runs):
    # It scores the projected gradients of the runs that record them: without any
    # it would be left out of every output without a word.
    raise ValueError(
        f"config.methods: tracin_per_step needs recorded gradients "
        f"(config.record_grads={config.record_grads}, config.num_grad_runs="
        f"{config.num_grad_runs}); set record_grads=True and num_grad_runs >= 1, or "
        "leave it out.")
  if config.counterfactual.enabled:
    if not len(config.counterfactual.methods):
      raise ValueError("config.counterfactual.methods=(): nothing to search with "
                       "config.counterfactual.enabled=True; name simulators, or set "
                       "enabled=False.")
    for name in ("num_searched", "num_targets", "num_iters", "num_proposals"):
      _positive_int(config, "counterfactual." + name)
    if config.counterfactual.num_targets > config.num_test_examples:
      raise ValueError(f"config.counterfactual.num_targets="
                       f"{config.counterfactual.num_targets}: more than the "
                       f"config.num_test_examples={config.num_test_examples}.")
    _no_duplicates(config, "counterfactual.methods")
    # Searched: those of these that config.methods computes.
    searchable = set(METHODS) - {"curriculum_blind", "simfluence_hybrid"}
    bad = sorted(set(config.counterfactual.methods) - searchable)
    if bad:
      raise ValueError(f"config.counterfactual.methods: {bad} cannot be searched; "
                       f"known simulators: {sorted(searchable)} (curriculum_blind and "
                       "simfluence_hybrid are not simulators).")
    reference = config.metagradient.reference_batch_size
    if ("metagradient" in config.counterfactual.methods and
        "metagradient" in config.methods and reference and
        reference < config.num_train_examples):
      raise ValueError(f"config.metagradient.reference_batch_size={reference}: the "
                       "counterfactual search on the metagradient needs the "
                       "full-batch reference (0), whose table holds every example "
                       "at every step.")
    if ("metagradient" in config.counterfactual.methods and
        "metagradient" in config.methods and
        config.subset_size % config.batch_size):
      # The table simulator predicts full batches only (its additive step effects
      # are per example of a batch of B); a partial last batch of an epoch is
      # refused there, after every run is trained.
      raise ValueError(
          f"config.subset_size={config.subset_size}: the counterfactual search on "
          f"the metagradient needs whole batches, a multiple of config.batch_size="
          f"{config.batch_size} (or leave metagradient out of "
          "config.counterfactual.methods).")
  if config.removal.enabled:
    _removal(config)
  if config.num_held_out_runs > config.num_runs:
    raise ValueError(f"config.num_held_out_runs={config.num_held_out_runs}: more "
                     f"held-out runs than the config.num_runs={config.num_runs} fitted "
                     "on.")
  pool = config.num_train_examples - config.unseen.num_examples
  if config.subset_size > pool:
    raise ValueError(f"config.subset_size={config.subset_size}: larger than the "
                     f"{pool} train examples fitted runs draw from "
                     f"(num_train_examples={config.num_train_examples} minus "
                     f"unseen.num_examples={config.unseen.num_examples}).")
  if config.batch_size > config.subset_size:
    raise ValueError(f"config.batch_size={config.batch_size}: larger than "
                     f"config.subset_size={config.subset_size}.")
  if config.metagradient.space not in ("loss", "log"):
    raise ValueError(f"config.metagradient.space={config.metagradient.space!r}: must "
                     "be 'loss' or 'log'.")
  if config.influence.fisher not in ("empirical", "true"):
    raise ValueError(f"config.influence.fisher={config.influence.fisher!r}: must be "
                     "'empirical' or 'true'.")
  if config.influence.tracin_num_runs > config.num_runs:
    raise ValueError(f"config.influence.tracin_num_runs="
                     f"{config.influence.tracin_num_runs}: must be in [1, num_runs].")
  for k in config.learning_curve:
    if not _checks.is_int(k) or k <= 0:
      raise ValueError(f"config.learning_curve={tuple(config.learning_curve)!r}: "
                       "must be positive run counts.")
