"""Optimizers and learning-rate schedules from a config."""

from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("sgd", "momentum", "adam")
SCHEDULES = ("constant", "linear")

# What `Trace.learning_rates` holds for each optimizer: the value of the schedule at
# the step. Only for plain SGD is that the exact step size of the update
# θ_{t+1} = θ_t − η_t ∇L; for momentum and Adam it is the nominal rate that scales
# the optimizer's direction (TracIn-style simulators then use it as an approximation).
LEARNING_RATE_MEANING = {
    "sgd": "exact SGD step size eta_t (update = -eta_t * mean batch gradient)",
    "momentum": "schedule value eta_t scaling the heavy-ball momentum buffer "
                "(effective step on a constant gradient is eta_t / (1 - momentum))",
    "adam": "schedule value eta_t scaling Adam's normalised direction m_hat / "
            "(sqrt(v_hat) + eps); not a step size on the raw gradient",
}


def config_field(config: Any, name: str, default: Any = None) -> Any:
  """Reads `name` from a ConfigDict, an attribute object or a plain dict."""
  if isinstance(config, dict) or hasattr(config, "get"):
    return config.get(name, default)
  return getattr(config, name, default)


def _number(config: Any, name: str, default: Any = None) -> float:
  """Field `name` as a float, or ValueError naming it (missing, None, not a number)."""
  value = config_field(config, name, default)
  if isinstance(value, (bool, np.bool_)) or not isinstance(
      value, (int, float, np.integer, np.floating)):
    raise ValueError(f"config.{name}={value!r}: expected a number"
                     + (" (the field is missing)" if value is None else "") + ".")
  return float(value)


# Hyperparameters each optimizer reads besides the schedule, with their defaults.
OPTIMIZER_HYPERPARAMETERS = {"sgd": {}, "momentum": {"momentum": 0.9},
                             "adam": {"b1": 0.9, "b2": 0.999, "eps": 1e-8}}

# Every config field `optimizer_settings` may read: what a stored run's fingerprint
# must cover (`pipeline.stages.OPTIMIZER_FIELDS`; `config_lib.base_config` holds
# each, so a config can set it and a rerun with another value cannot reuse runs).
CONFIG_FIELDS = ("optimizer", "learning_rate", "lr_schedule", "warmup_steps",
                 "end_learning_rate") + tuple(
                     sorted({f for h in OPTIMIZER_HYPERPARAMETERS.values() for f in h}))


def optimizer_settings(config: Any, num_steps: Optional[int] = None) -> dict:
  """Every setting `make_optimizer` builds from, read from `config` (JSON values).

  The single place the optimizer fields are read: `make_optimizer` uses nothing
  else, so the resume fingerprint of `train_runs` and the compiled programs of
  `train_runs` and `metagradients` (keyed on its structure, given its numbers as
  arguments: `split_settings`) cover exactly what shapes the updates. Fields an
  optimizer ignores (e.g. `momentum` for "sgd") are left out.

  Raises:
    ValueError: unknown optimizer or schedule, a linear schedule without a step
      count, or a number out of its range (momentum, b1, b2 in [0, 1), eps > 0,
      warmup_steps a non-negative integer), naming the config field.
  """
  name = config_field(config, "optimizer", "sgd")
  if name not in OPTIMIZER_HYPERPARAMETERS:
    raise ValueError(f"config.optimizer: unknown optimizer {name!r}; expected one of "
                     f"{OPTIMIZERS}.")
  if isinstance(config, dict):
    _check_dict_fields(config)
  schedule = config_field(config, "lr_schedule", "constant")
  if schedule not in SCHEDULES:
    raise ValueError(f"config.lr_schedule: unknown schedule {schedule!r}; expected "
                     f"one of {SCHEDULES}.")
  _check_warmup(config_field(config, "warmup_steps", 0))
  settings = {"optimizer": name,
              "learning_rate": _number(config, "learning_rate"),
              "lr_schedule": schedule,
              "warmup_steps": int(config_field(config, "warmup_steps", 0) or 0)}
  if schedule == "linear":
    num_steps = num_steps or config_field(config, "num_steps")
    if not num_steps:
      raise ValueError("config.lr_schedule='linear' needs the number of steps "
                       "(num_steps).")
    settings["num_steps"] = int(num_steps)
    settings["end_learning_rate"] = _number(config, "end_learning_rate", 0.0)
  for field, default in OPTIMIZER_HYPERPARAMETERS[name].items():
    settings[field] = _number(config, field, default)
  _check_ranges(settings)
  return settings


def _check_dict_fields(config: dict) -> None:
  """Refuses a key of a plain-dict config that no optimizer reads.

  The job's ConfigDict holds every optimizer's fields (`config_lib`; those another
  optimizer or schedule reads are left unused, as here), and `pipeline.validate`
  refuses unknown ones; a dict passed to the library (`train_runs(config={...})`)
  had no such check: `weight_decay`, `grad_clip` or `nesterov` trained plain SGD,
  bit-identical, with no error (review h20).
  """
  known = set(CONFIG_FIELDS) | {"num_steps"}
  unknown = sorted(str(key) for key in config if key not in known)
  if unknown:
    raise ValueError(f"config.{unknown[0]}: not an optimizer setting (no optimizer "
                     f"here reads it); the optimizers read {sorted(known)}.")


# The open or half-open range each optimizer number must lie in: outside it the
# optimizer trains something else than its name says without a NaN to show it
# (momentum 1 never forgets, a negative one oscillates; b1 or b2 of 1 divides by 0
# in Adam's bias correction, eps ≤ 0 divides 0 by 0 where a gradient is 0).
_RANGES = {"momentum": (0.0, 1.0, "[0, 1)"), "b1": (0.0, 1.0, "[0, 1)"),
           "b2": (0.0, 1.0, "[0, 1)")}


def _check_ranges(settings: dict) -> None:
  """Refuses an optimizer number out of its range, naming the config field."""
  for field, (low, high, text) in _RANGES.items():
    if field in settings and not low <= settings[field] < high:
      raise ValueError(f"config.{field}={settings[field]!r}: must be in {text}.")
  if "eps" in settings and not (np.isfinite(settings["eps"]) and settings["eps"] > 0):
    raise ValueError(f"config.eps={settings['eps']!r}: must be a finite positive "
                     "number.")


def _check_warmup(warmup_steps: Any) -> None:
  warmup_steps = 0 if warmup_steps is None else warmup_steps
  if (isinstance(warmup_steps, bool) or not isinstance(
      warmup_steps, (int, float, np.number)) or not warmup_steps >= 0
      or not float(warmup_steps).is_integer()):
    raise ValueError(f"config.warmup_steps={warmup_steps!r}: must be a non-negative "
                     "integer.")


# The settings that are numbers: the compiled programs of `train_runs` and
# `metagradients` take them as arguments (`split_settings`), so runs that differ only
# in these (a learning-rate sweep, a rerun with another momentum) share one program.
RUNTIME_FIELDS = ("learning_rate", "end_learning_rate", "momentum", "b1", "b2", "eps")


def split_settings(config: Any, num_steps: Optional[int] = None
                   ) -> Tuple[tuple, Dict[str, np.float32]]:
  """`optimizer_settings` split into what a compiled program is built from and what
  it takes as arguments.

  Returns:
    (structure, hyperparameters): `structure` a hashable key of the settings that
    change the program (optimizer, schedule kind, warm-up and decay steps; the key
    of the compiled-program caches of `train_runs` and `metagradients`), and
    `hyperparameters` `{field: float32 scalar}` of its `RUNTIME_FIELDS`.
    `joined_optimizer(structure, hyperparameters)` is
    `make_optimizer(config, num_steps)`, with the numbers as traced arguments
    inside a jitted function.
  """
  settings = optimizer_settings(config, num_steps)
  structure = tuple(sorted((k, v) for k, v in settings.items()
                           if k not in RUNTIME_FIELDS))
  return structure, {k: np.float32(v) for k, v in settings.items()
                     if k in RUNTIME_FIELDS}


def joined_optimizer(structure: tuple, hyperparameters: Dict[str, Any]
                     ) -> Tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """`build_optimizer` of `split_settings`' two parts joined again (the numbers may
  be traced)."""
  return build_optimizer({**dict(structure), **hyperparameters})


def make_schedule(config: Any,
                  num_steps: Optional[int] = None) -> Callable[[Any], Any]:
  """Learning-rate schedule `step -> float32[]` (step 0 = the first update).

  Args:
    config: with `learning_rate`, `lr_schedule` ("constant" | "linear"), and
      optionally `warmup_steps` (linear ramp from 0, default 0),
      `end_learning_rate` (value the linear decay reaches at `num_steps`,
      default 0) and `num_steps`.
    num_steps: total training steps T, for the linear decay; overrides
      `config.num_steps`.

  Raises:
    ValueError: unknown schedule, or a linear schedule without a step count.
  """
  return _schedule(optimizer_settings(config, num_steps))


def _schedule(settings: dict) -> Callable[[Any], Any]:
  """The schedule of `optimizer_settings`'s `settings` (numbers may be traced)."""
  learning_rate = settings["learning_rate"]
  warmup_steps = settings["warmup_steps"]
  if settings["lr_schedule"] == "constant":
    main = optax.constant_schedule(learning_rate)
  else:
    main = optax.linear_schedule(
        learning_rate, settings["end_learning_rate"],
        transition_steps=max(settings["num_steps"] - warmup_steps, 1))
  if warmup_steps <= 0:
    return main
  warmup = optax.linear_schedule(0.0, learning_rate, transition_steps=warmup_steps)
  return optax.join_schedules([warmup, main], boundaries=[warmup_steps])


def make_optimizer(config: Any, num_steps: Optional[int] = None
                   ) -> Tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """Builds the optimizer named by `config.optimizer` and its schedule.

  The schedule's value at each step is what training records as the step's
  learning rate (see `LEARNING_RATE_MEANING` for what it means per optimizer).

  Args:
    config: `optimizer` ("sgd" | "momentum" | "adam"), `learning_rate`,
      `lr_schedule`, plus optional `momentum` (default 0.9), `b1`, `b2`, `eps`
      (Adam defaults) and the schedule fields of `make_schedule`; read through
      `optimizer_settings` (a settings dict is a valid config too).
    num_steps: total training steps T (for the linear schedule).

  Returns:
    (optax transformation, schedule `step -> learning rate`).

  Raises:
    ValueError: unknown `config.optimizer` or schedule.
  """
  return build_optimizer(optimizer_settings(config, num_steps))


def build_optimizer(settings: dict
                    ) -> Tuple[optax.GradientTransformation, Callable[[Any], Any]]:
  """`make_optimizer` from a dict of `optimizer_settings`, read as is: the numbers
  (`RUNTIME_FIELDS`) may be traced float32 scalars (`split_settings`)."""
  schedule = _schedule(settings)
  name = settings["optimizer"]
  if name == "sgd":
    tx = optax.sgd(schedule)
  elif name == "momentum":
    tx = optax.sgd(schedule, momentum=settings["momentum"])
  else:
    # optax.adam's chain and state, with a square root that can be differentiated
    # where the second moment is still 0 (metagradients).
    tx = optax.chain(
        scale_by_adam(b1=settings["b1"], b2=settings["b2"], eps=settings["eps"]),
        optax.scale_by_learning_rate(schedule))
  return _state_dtypes_kept(tx), schedule


def _state_dtypes_kept(tx: optax.GradientTransformation
                       ) -> optax.GradientTransformation:
  """`tx` whose state keeps the dtypes `init` gave it. The numbers of
  `split_settings` are float32 arrays, not Python floats, and promoted a bf16
  momentum or Adam moment to float32, which a scan over steps refused (review h36);
  float32 states are unchanged (the casts are no-ops)."""

  def update_fn(updates, state, params=None):
    updates, new_state = tx.update(updates, state, params)
    return updates, jax.tree_util.tree_map(
        lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), new_state,
        state)

  return optax.GradientTransformation(tx.init, update_fn)


@jax.custom_jvp
def _sqrt(x):
  return jnp.sqrt(x)


@_sqrt.defjvp
def _sqrt_jvp(primals, tangents):
  (x,), (x_dot,) = primals, tangents
  y = jnp.sqrt(x)
  # Adam's second moment is exactly 0 where every gradient so far was 0 (padding,
  # a dead unit); there its tangent is 0 as well, and jnp.sqrt's infinite slope
  # would turn 0·∞ into a NaN metagradient. The derivative of the whole update in
  # g is finite there (eps > 0), so the 0 tangent is the exact one.
  positive = x > 0
  return y, jnp.where(positive, x_dot / (2 * jnp.where(positive, y, 1)), 0)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999,
                  eps: float = 1e-8) -> optax.GradientTransformation:
  """`optax.scale_by_adam` (same state, same arithmetic), differentiable at ν = 0."""

  def init_fn(params):
    return optax.ScaleByAdamState(count=jnp.zeros([], jnp.int32),
                                  mu=optax.tree.zeros_like(params),
                                  nu=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    nu = optax.tree.update_moment_per_elem_norm(updates, state.nu, b2, 2)
    count_inc = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count_inc)
    nu_hat = optax.tree.bias_correction(nu, b2, count_inc)
    updates = jax.tree_util.tree_map(lambda m, v: m / (_sqrt(v) + eps), mu_hat, nu_hat)
    return updates, optax.ScaleByAdamState(count=count_inc, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
