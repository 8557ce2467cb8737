"""Optimizers and learning-rate schedules from a config."""

from typing import Any, Callable, Optional, Tuple

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
  learning_rate = float(config_field(config, "learning_rate"))
  name = config_field(config, "lr_schedule", "constant")
  warmup_steps = int(config_field(config, "warmup_steps", 0) or 0)
  num_steps = num_steps or config_field(config, "num_steps")
  if name == "constant":
    main = optax.constant_schedule(learning_rate)
  elif name == "linear":
    if not num_steps:
      raise ValueError("config.lr_schedule='linear' needs the number of steps "
                       "(num_steps).")
    main = optax.linear_schedule(
        learning_rate, float(config_field(config, "end_learning_rate", 0.0)),
        transition_steps=max(int(num_steps) - warmup_steps, 1))
  else:
    raise ValueError(f"config.lr_schedule: unknown schedule {name!r}; expected one "
                     f"of {SCHEDULES}.")
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
      (Adam defaults) and the schedule fields of `make_schedule`.
    num_steps: total training steps T (for the linear schedule).

  Returns:
    (optax transformation, schedule `step -> learning rate`).

  Raises:
    ValueError: unknown `config.optimizer` or schedule.
  """
  schedule = make_schedule(config, num_steps)
  name = config_field(config, "optimizer", "sgd")
  if name == "sgd":
    tx = optax.sgd(schedule)
  elif name == "momentum":
    tx = optax.sgd(schedule, momentum=float(config_field(config, "momentum", 0.9)))
  elif name == "adam":
    tx = optax.adam(schedule, b1=float(config_field(config, "b1", 0.9)),
                    b2=float(config_field(config, "b2", 0.999)),
                    eps=float(config_field(config, "eps", 1e-8)))
  else:
    raise ValueError(f"config.optimizer: unknown optimizer {name!r}; expected one of "
                     f"{OPTIMIZERS}.")
  return tx, schedule
