"""`Simulator`: a fitted training-run simulator and its autoregressive rollout."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _io
from simfluence_jax.simulators import _solver

KINDS = ("linear", "additive")
_FORMAT_VERSION = 1
_POSTERIOR_ARRAYS = ("ids", "x", "y", "noise_var", "prior_a")


def _json_value(value):
  """numpy scalars -> Python scalars for json.dump."""
  return value.item() if isinstance(value, np.generic) else str(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Posterior:
  """What posterior sampling needs: the regression rows of the fit.

  Model: y = Xθ + ε, ε ~ N(0, σ²_m), prior θ ~ N(θ₀, σ²_m / l2 · I), so the MAP is
  the ridge solution and the posterior is N(θ_MAP, σ²_m (XᵀX + l2·I)⁻¹).

  Attributes:
    ids: int32[P, B] batch ids of every training step (row).
    x: float32[P, M] loss before the step.
    y: float32[P, M] regression target relative to the prior centre: the loss after
      the step minus a₀·|c_t|·x (linear) or minus x (additive).
    noise_var: float32[M] σ²_m, mean squared residual of the MAP fit.
    prior_a: float32[] prior centre of every A_i (0 for additive).
  """

  ids: Any
  x: Any
  y: Any
  noise_var: Any
  prior_a: Any
  l2: float = dataclasses.field(metadata=dict(static=True), default=1e-3)
  method: str = dataclasses.field(metadata=dict(static=True), default="auto")


@functools.partial(jax.jit, static_argnames=("linear",))
def _rollout(a, b, batch_ids, initial_losses, *, linear):
  """float32[R', T+1, M] rollout of L_t = α L_{t-1} + β from initial losses."""
  safe = jnp.where(batch_ids >= 0, batch_ids, 0)
  weights = (batch_ids >= 0).astype(jnp.float32)

  def run(ids, w, loss0):
    def step(loss, inputs):
      step_ids, step_w = inputs
      beta = step_w @ b[step_ids]
      alpha = step_w @ a[step_ids] if linear else 1.0
      loss = alpha * loss + beta
      return loss, loss

    _, losses = jax.lax.scan(step, loss0, (ids, w))
    return jnp.concatenate([loss0[None], losses], axis=0)

  return jax.vmap(run)(safe, weights, initial_losses)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Simulator:
  """A Simfluence simulator L_t = α(c_t)·L_{t-1} + β(c_t) (α ≡ 1 if additive).

  Attributes:
    A: float32[N, M] or None (additive); α(c_t)[m] = Σ_{i∈c_t} A[i, m].
    B: float32[N, M]; β(c_t)[m] = Σ_{i∈c_t} B[i, m].
    kind: "linear" or "additive".
    name: a label for reports.
    fit_info_items: solver diagnostics as sorted (key, value) pairs (static).
    posterior: what `simulate_with_bands` samples from, or None (e.g. scores).
  """

  A: Optional[Any]
  B: Any
  posterior: Optional[Posterior] = None
  kind: str = dataclasses.field(metadata=dict(static=True), default="additive")
  name: str = dataclasses.field(metadata=dict(static=True), default="")
  fit_info_items: tuple = dataclasses.field(metadata=dict(static=True), default=())

  @property
  def fit_info(self) -> dict:
    """Solver diagnostics: method, iterations, relative_residual, ..."""
    return dict(self.fit_info_items)

  @property
  def num_train_examples(self) -> int:
    return self.B.shape[0]

  @property
  def num_test_examples(self) -> int:
    return self.B.shape[1]

  def save(self, path: str) -> None:
    """Writes the simulator (and its posterior, if any) to directory `path` atomically.

    Layout: A.npy (linear only), B.npy, posterior_*.npy and simulator.json; read back
    with `Simulator.load`.
    """
    with _io.atomic_directory(path) as tmp:
      arrays = {"B": self.B}
      if self.A is not None:
        arrays["A"] = self.A
      if self.posterior is not None:
        for field in _POSTERIOR_ARRAYS:
          arrays["posterior_" + field] = getattr(self.posterior, field)
      for name, value in arrays.items():
        np.save(os.path.join(tmp, name + ".npy"), np.asarray(value), allow_pickle=False)
      meta = {"format_version": _FORMAT_VERSION, "kind": self.kind, "name": self.name,
              "fit_info": dict(self.fit_info_items),
              "posterior": None if self.posterior is None else {
                  "l2": self.posterior.l2, "method": self.posterior.method}}
      with open(os.path.join(tmp, "simulator.json"), "w") as f:
        json.dump(meta, f, indent=2, default=_json_value)

  @classmethod
  def load(cls, path: str) -> "Simulator":
    """Reads a simulator written by `save`.

    Raises:
      FileNotFoundError: `path` or one of its files is missing.
      ValueError: a file is corrupt, or the arrays disagree in shape.
    """
    meta_path = os.path.join(path, "simulator.json")
    if not os.path.exists(meta_path):
      raise FileNotFoundError(f"Simulator.load: {meta_path!r} is missing (not a saved "
                              "simulator, or an interrupted write).")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
      kind, name = meta["kind"], meta["name"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
      raise ValueError(f"Simulator.load: {meta_path!r} is corrupt ({e!r}).") from e
    if meta.get("format_version") != _FORMAT_VERSION or kind not in KINDS:
      raise ValueError(f"Simulator.load: {meta_path!r} has an unsupported "
                       f"format_version or kind ({meta.get('format_version')!r}, "
                       f"{kind!r}).")
    load = lambda field: _io.load_npy(os.path.join(path, field + ".npy"),
                                      "Simulator.load")
    b = load("B")
    a = load("A") if kind == "linear" else None
    if b.ndim != 2 or (a is not None and a.shape != b.shape):
      raise ValueError(f"Simulator.load: {path!r} holds A {None if a is None else a.shape}"
                       f" and B {b.shape}; expected two float32[N, M].")
    posterior = None
    if meta.get("posterior"):
      posterior = Posterior(**{field: load("posterior_" + field)
                               for field in _POSTERIOR_ARRAYS},
                            l2=float(meta["posterior"]["l2"]),
                            method=str(meta["posterior"]["method"]))
    return cls(A=None if a is None else jnp.asarray(a), B=jnp.asarray(b),
               posterior=posterior, kind=kind, name=name,
               fit_info_items=tuple(sorted(meta.get("fit_info", {}).items())))

  def _check_inputs(self, batch_ids, initial_losses):
    batch_ids = np.asarray(batch_ids)
    if batch_ids.ndim != 3 or not np.issubdtype(batch_ids.dtype, np.integer):
      raise ValueError(f"batch_ids: expected int[R', T, B], got {batch_ids.dtype} "
                       f"{batch_ids.shape}.")
    if batch_ids.size and (batch_ids.min() < -1 or
                           batch_ids.max() >= self.num_train_examples):
      raise ValueError(f"batch_ids: ids must be in [-1, {self.num_train_examples}).")
    initial_losses = np.asarray(initial_losses, np.float32)
    expected = (batch_ids.shape[0], self.num_test_examples)
    if initial_losses.shape != expected:
      raise ValueError(f"initial_losses: expected shape {expected}, got "
                       f"{initial_losses.shape}.")
    if not np.all(np.isfinite(initial_losses)):
      raise ValueError("initial_losses: contains NaN or inf.")
    return jnp.asarray(batch_ids, jnp.int32), jnp.asarray(initial_losses)

  def simulate(self, batch_ids, initial_losses) -> jax.Array:
    """Rolls the simulator out autoregressively (never teacher-forced).

    Args:
      batch_ids: int32[R', T, B] any curricula, -1 = padding.
      initial_losses: float32[R', M] losses before the first step.

    Returns:
      float32[R', T+1, M], `[:, 0]` = initial_losses.
    """
    batch_ids, initial_losses = self._check_inputs(batch_ids, initial_losses)
    linear = self.kind == "linear"
    a = self.A if linear else self.B
    return _rollout(jnp.asarray(a), jnp.asarray(self.B), batch_ids, initial_losses,
                    linear=linear)

  def sample_parameters(self, num_samples: int, rng: Any = 0):
    """Posterior samples of (A, B) by perturb-and-MAP with the fit's solver.

    Each sample solves the ridge problem with targets y + σε₁ and prior centre
    θ₀ + σ/√l2·ε₂ (ε ~ N(0, I)), an exact draw from the Gaussian posterior.

    Returns:
      (A float32[S, N, M] or None, B float32[S, N, M]).
    """
    if self.posterior is None:
      raise ValueError(f"simulator {self.name!r}: has no posterior (not fitted with "
                       "`fit`), so no bands can be sampled.")
    if not isinstance(num_samples, int) or num_samples < 1:
      raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}.")
    post = self.posterior
    key = jax.random.key(rng) if isinstance(rng, int) else rng
    linear = self.kind == "linear"
    blocks = 2 if linear else 1
    num_train, num_test = self.B.shape
    key_y, key_prior = jax.random.split(key)
    sigma = jnp.sqrt(jnp.asarray(post.noise_var))  # [M]
    x = jnp.tile(jnp.asarray(post.x), (1, num_samples))  # [P, S·M], sample-major
    sigma_cols = jnp.tile(sigma, num_samples)
    y = jnp.tile(jnp.asarray(post.y), (1, num_samples))
    y = y + sigma_cols * jax.random.normal(key_y, y.shape)
    prior_noise = (sigma_cols / np.sqrt(post.l2)) * jax.random.normal(
        key_prior, (num_train, blocks, num_samples * num_test))
    # Shift by the perturbed prior's prediction so the solver sees a zero-centred prior.
    # `post.y` is already relative to the prior centre θ₀; shift by the perturbation's
    # prediction so the solver again sees a zero-centred prior.
    y = y - _solver.jitted_forward(prior_noise, jnp.asarray(post.ids), x,
                                   linear=linear)
    theta, _ = _solver.solve(post.ids, x, y, num_train, post.l2, linear=linear,
                             method=post.method)
    theta = theta + np.asarray(prior_noise)
    theta = theta.reshape(num_train, blocks, num_samples, num_test).transpose(2, 1, 0, 3)
    if linear:
      return theta[:, 0] + float(post.prior_a), theta[:, 1]
    return None, theta[:, 0]

  def simulate_with_bands(self, batch_ids, initial_losses, num_samples: int = 32,
                          rng: Any = 0):
    """Posterior mean and std of simulated trajectories (parameter uncertainty).

    Args:
      batch_ids: int32[R', T, B].
      initial_losses: float32[R', M].
      num_samples: posterior samples of (A, B) to roll out.
      rng: int seed or PRNG key.

    Returns:
      (mean, std), each float32[R', T+1, M].
    """
    batch_ids, initial_losses = self._check_inputs(batch_ids, initial_losses)
    a_samples, b_samples = self.sample_parameters(num_samples, rng)
    linear = self.kind == "linear"
    a_samples = b_samples if a_samples is None else a_samples
    rollouts = jax.vmap(lambda a, b: _rollout(a, b, batch_ids, initial_losses,
                                              linear=linear))(
                                                  jnp.asarray(a_samples),
                                                  jnp.asarray(b_samples))
    return jnp.mean(rollouts, axis=0), jnp.std(rollouts, axis=0)
