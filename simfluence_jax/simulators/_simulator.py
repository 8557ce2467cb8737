"""`Simulator`: a fitted training-run simulator and its autoregressive rollout.

A simulator knows what it was fitted on (batch size B, number of steps T, N train and
M test examples) and refuses what it cannot simulate:

* curricula of another batch width (its A, B are per-step effects at batch size B:
  one example's share of a batch-mean gradient step changes with B);
* curricula longer than T steps unless the caller passes `allow_extrapolation=True`
  (a linear simulator compounds α over every extra step; no fitted run says how).
  Shorter curricula are fine: they are prefixes of the fitted regime.

Scores-based simulators (`additive_from_scores`) know B and T only when the caller
says; without them nothing is checked.

Weighted occurrences (MAGIC-style removals): `weights[r, t, k]` scales occurrence k of
step t (1 = present, 0 = removed). A removed slot of Simfluence-Linear keeps a "null"
term a₀ in α (a₀ = 1/b̄, the A of an example that changes nothing, b̄ the mean number
of valid ids per fitted batch), so removing an example does not also shrink the batch:

  α(c_t) = Σ_k [w_k A[i_k] + (1 − w_k) a₀],   β(c_t) = Σ_k w_k B[i_k]

(padding ids −1 contribute to neither, as without weights). Additive: β likewise,
α ≡ 1.

Empty steps (every slot padding) are no-ops, α = 1 and β = 0 (L_t = L_{t−1}), in
both kinds: `train_runs` takes such a step with a zero gradient (its objective is a
sum over no slot, divided by max(0, 1)), so with SGD neither the parameters nor the
test losses move (momentum or Adam still apply their state, which no simulator
models); Σ_{i∈c_t} A_i over no example would instead predict L_t = 0. `fit` drops
such steps' regression rows (zero features: there is nothing to learn from them).

Weights must be ≥ 0 (1 = present, 0 = removed, in between partly removed, > 1
repeated); a negative weight, gradient ascent on an example, is refused.

Phase-dependent simulators (`fit(..., num_phases=P)`) hold one (A, B) per contiguous
bin of steps; step t uses the phase whose bin contains t (steps past the fitted T
use the last phase).

Fitted coverage (`fitted_ids`): a simulator whose per-example parameters are fitted
from recorded runs (`fit("linear" | "additive")` without per-example prior centres,
`tracin_per_step`) records the sorted train ids those runs contained. For any other id
it holds only its prior (Linear: A = a₀, B = 0; Additive and per-step TracIn: B = 0),
which is no prediction: `simulate` and `simulate_with_bands` refuse curricula holding
such ids unless `allow_unfitted_ids=True` (the main job's unseen-example evaluation
passes it, to measure exactly that). Simulators whose parameters cover every id by
construction (influence scores of all N examples: TracIn-CP, EK-FAC, the
metagradient's table; the featurized simulator, whose features cover every id) have
`fitted_ids = None`: nothing is checked. Simulators saved before coverage was recorded
load with `fitted_ids = None` too (unknown: unchecked).

With phases the coverage is per (phase, id): `phase_fitted_ids[k]` holds the ids the
fitted runs contained in steps of phase k (an id phase k never saw keeps phase k's
prior, however often other phases saw it). A curriculum's id is checked against the
phase of each step holding it (`phase_of_steps`; steps past T: the last phase), and
the refusal names the ids and the phases. `fitted_ids` is then the ids fitted in
every phase: ids without a step (a search pool, which may go to any step) are
checked against it. A phased simulator saved before per-phase coverage was recorded
(no `num_phase_fitted_ids` in simulator.json) loads as before: `phase_fitted_ids =
None`, and its `fitted_ids` (ids fitted in any phase) is checked per id over all
phases (an id a phase never saw is not caught).

Final-only simulators (`final_only=True`, e.g. `training.table_simulator`, the
metagradient's first-order expansion with one phase per step) predict only the loss
after exactly T full, unweighted batches from the base model's losses
(`fit_info["initial_losses"]`): their intermediate rollout is not a prediction, so
`simulate` returns NaN at steps 1..T−1 and refuses anything else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from simfluence_jax import _checks
from simfluence_jax import _closures
from simfluence_jax import _io
from simfluence_jax.simulators import _solver

KINDS = ("linear", "additive")
_FORMAT_VERSION = 2
_READABLE_VERSIONS = (1, 2)
_POSTERIOR_ARRAYS = ("ids", "x", "y", "noise_var", "prior_a")
_POSTERIOR_OPTIONAL = ("prior_A", "prior_B")


def _json_value(value):
  """numpy scalars -> Python scalars for json.dump."""
  return value.item() if isinstance(value, np.generic) else str(value)


class _FrozenDict(tuple):
  """A dict stored as sorted (key, value) pairs, hashable (static pytree metadata)."""


def freeze(value):
  """Makes a JSON-like value hashable: dicts -> `_FrozenDict`, lists -> tuples."""
  if isinstance(value, dict):
    return _FrozenDict(sorted((k, freeze(v)) for k, v in value.items()))
  if isinstance(value, (list, tuple)):
    return tuple(freeze(v) for v in value)
  if isinstance(value, np.generic):
    return value.item()
  return value


def _thaw(value):
  if isinstance(value, _FrozenDict):
    return {k: _thaw(v) for k, v in value}
  if isinstance(value, tuple):
    return [_thaw(v) for v in value]
  return value


def fit_info_items(info: dict) -> tuple:
  """The `Simulator.fit_info_items` of a diagnostics dict (nested dicts allowed)."""
  return tuple(sorted((k, freeze(v)) for k, v in info.items()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Posterior:
  """What posterior sampling needs: the regression rows of the fit.

  Model: y = Xθ + ε, ε ~ N(0, σ²_m), prior θ ~ N(θ₀, σ²_m / l2 · I), so the MAP is
  the ridge solution and the posterior is N(θ_MAP, σ²_m (XᵀX + l2·I)⁻¹).

  Attributes:
    ids: int32[P, B] batch ids of every training step (row); with phases, id i of a
      step in phase k is stored as k·N + i (one parameter row per phase and id).
    x: float32[P, M] loss before the step.
    y: float32[P, M] regression target relative to the prior centre θ₀: the loss
      after the step minus X·θ₀ (linear: θ₀ = (a₀ or prior_A, 0 or prior_B);
      additive: the loss before the step plus X·prior_B).
    noise_var: float32[M] σ²_m, mean squared residual of the MAP fit.
    prior_a: float32[] prior centre of every A_i (0 for additive) when `prior_A` is
      None.
    prior_A: optional float32[P·N, M] per-example prior centres of A (replaces
      prior_a).
    prior_B: optional float32[P·N, M] prior centres of B (default 0).
  """

  ids: Any
  x: Any
  y: Any
  noise_var: Any
  prior_a: Any
  prior_A: Optional[Any] = None
  prior_B: Optional[Any] = None
  l2: float = dataclasses.field(metadata=dict(static=True), default=1e-3)
  method: str = dataclasses.field(metadata=dict(static=True), default="auto")


def _step_effects(a, b, step_ids, step_w, step_valid, phase, null_a, linear,
                  batch_mean=False):
  """(α float32[M], β float32[M]) of one step.

  a, b: float32[P, N, M]; step_ids int32[B] (padding mapped to 0); step_w float32[B]
  occurrence weights; step_valid float32[B] (0 at padding); phase: int32[];
  batch_mean: β scaled by B / (the step's valid slots), see `Simulator.batch_mean`.
  """
  present = step_w * step_valid
  beta = present @ b[phase, step_ids]
  if batch_mean:
    beta = beta * (step_valid.shape[0] / jnp.maximum(jnp.sum(step_valid), 1.0))
  if not linear:
    return 1.0, beta
  alpha = present @ a[phase, step_ids] + null_a * jnp.sum((1.0 - step_w) * step_valid)
  # An empty step (no valid slot) is a no-op, as in training (a zero gradient) and in
  # the additive form: α = 1 (β is already 0), not Σ over no example = 0, which
  # would predict the loss drops to 0. See the module docstring.
  return jnp.where(jnp.sum(step_valid) > 0, alpha, 1.0), beta


def final_losses(a, b, ids, loss0, *, linear, null_a=0.0, weights=None, phases=None,
                 floor=None, floor_each_step=True, batch_mean=False):
  """float32[M] loss after the last step of one curriculum ids int32[T, B].

  Shared by `search_curriculum`; `floor` clips every step's loss, or only the final
  one when not `floor_each_step` (None: no clip).
  """
  valid = (ids >= 0).astype(jnp.float32)
  safe = jnp.maximum(ids, 0)
  weights = jnp.ones_like(valid) if weights is None else weights
  phases = jnp.zeros(ids.shape[0], jnp.int32) if phases is None else phases

  def step(loss, inputs):
    alpha, beta = _step_effects(a, b, *inputs, null_a, linear, batch_mean)
    loss = alpha * loss + beta
    clip = floor is not None and floor_each_step
    return (jnp.maximum(loss, floor) if clip else loss), None

  loss, _ = jax.lax.scan(step, loss0, (safe, weights, valid, phases))
  return loss if floor is None or floor_each_step else jnp.maximum(loss, floor)


@functools.partial(jax.jit, static_argnames=("linear", "batch_mean"))
def _rollout(a, b, batch_ids, weights, phases, initial_losses, null_a, *, linear,
             batch_mean=False):
  """float32[R', T+1, M] rollout of L_t = α L_{t-1} + β from initial losses.

  a, b: float32[P, N, M]; batch_ids int32[R', T, B]; weights float32[R', T, B];
  phases int32[T]; initial_losses float32[R', M].
  """
  valid = (batch_ids >= 0).astype(jnp.float32)
  safe = jnp.where(batch_ids >= 0, batch_ids, 0)

  def run(ids, w, v, loss0):
    def step(loss, inputs):
      alpha, beta = _step_effects(a, b, *inputs, null_a, linear, batch_mean)
      loss = alpha * loss + beta
      return loss, loss

    _, losses = jax.lax.scan(step, loss0, (ids, w, v, phases))
    return jnp.concatenate([loss0[None], losses], axis=0)

  return jax.vmap(run)(safe, weights, valid, initial_losses)


def phase_of_steps(phase_starts: tuple, num_steps: int) -> np.ndarray:
  """int32[T'] the phase of steps 0..T'−1 given each phase's first step (() = one)."""
  if not phase_starts:
    return np.zeros(num_steps, np.int32)
  return (np.searchsorted(np.asarray(phase_starts), np.arange(num_steps),
                          side="right") - 1).astype(np.int32)


def _id_tuple(ids, name: str = "fitted_ids") -> tuple:
  """Sorted distinct ints of a sequence of train ids (`Simulator.fitted_ids`)."""
  ids = np.asarray(ids)
  if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
    raise ValueError(f"{name}: expected a sequence of integer train ids, got "
                     f"{ids.dtype} of shape {list(ids.shape)}.")
  return tuple(int(i) for i in np.unique(ids))


def _phase_id_tuples(per_phase) -> tuple:
  """`Simulator.phase_fitted_ids`: one sorted tuple of distinct train ids per phase."""
  if isinstance(per_phase, tuple) and all(
      isinstance(ids, tuple) and all(a < b for a, b in zip(ids, ids[1:]))
      for ids in per_phase):
    return per_phase  # already normalised (e.g. rebuilt from a pytree)
  if isinstance(per_phase, np.ndarray) or not isinstance(per_phase, (list, tuple)):
    raise ValueError("phase_fitted_ids: expected one sequence of train ids per phase, "
                     f"got {type(per_phase).__name__}.")
  return tuple(_id_tuple(ids, f"phase_fitted_ids[{k}]")
               for k, ids in enumerate(per_phase))


@functools.lru_cache(maxsize=64)
def _common_ids(per_phase: tuple) -> tuple:
  """The ids of every phase's tuple (`fitted_ids` of a phased simulator)."""
  common = set(per_phase[0])
  for ids in per_phase[1:]:
    common.intersection_update(ids)
  return tuple(sorted(common))


def format_ids(ids, shown: int = 10) -> str:
  """`[2, 5, ...]`: the first `shown` of sorted ids."""
  ids = [int(i) for i in ids]
  return "[" + ", ".join(map(str, ids[:shown])) + (", ...]" if len(ids) > shown
                                                   else "]")


def _outside(ids, fitted: tuple) -> np.ndarray:
  """int32[k] the sorted distinct ids of `ids` (any shape, -1 = padding) not in
  `fitted`."""
  used = np.unique(np.asarray(ids))
  used = used[used >= 0]
  return used[~np.isin(used, np.asarray(fitted, np.int64))].astype(np.int32)


def _phase_id_rows(per_phase: tuple) -> np.ndarray:
  """int32[K, 2] the (phase, id) rows of `Simulator.phase_fitted_ids` (as saved)."""
  rows = [(k, i) for k, ids in enumerate(per_phase) for i in ids]
  return np.asarray(rows, np.int32).reshape(-1, 2)


# Methods whose parameters cover every train id (named by the refusal).
COVERING_METHODS = "simfluence_featurized, tracin_cp, ekfac_if and metagradient"


def _is_real(value):
  return not isinstance(value, bool) and isinstance(value, (int, float, np.number))


def _positive_int_or_none(value, name):
  if value is None:
    return None
  if not _checks.is_int(value) or value < 1:
    raise ValueError(f"{name}: expected a positive integer or None, got {value!r}.")
  return int(value)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Simulator:
  """A Simfluence simulator L_t = α(c_t)·L_{t-1} + β(c_t) (α ≡ 1 if additive).

  Attributes:
    A: float32[N, M] or None (additive); α(c_t)[m] = Σ_{i∈c_t} A[i, m]. With phases,
      the step-weighted mean of `phase_A` over the fitted steps (a summary; the
      rollout uses `phase_A`).
    B: float32[N, M]; β(c_t)[m] = Σ_{i∈c_t} B[i, m] (with phases: the mean, as A).
    posterior: what `simulate_with_bands` samples from, or None (e.g. scores).
    kind: "linear" or "additive" (the form of the rollout).
    name: a label for reports.
    fit_info_items: fit diagnostics as sorted (key, value) pairs (static; read them
      as the dict `fit_info`).
    batch_size: B of the fitted curricula, or None (unknown: widths not checked).
    num_steps: T of the fitted curricula, or None (unknown: lengths not checked).
    null_a: a₀, the A of a removed occurrence (weights < 1); None: 1/batch_size if
      known, else 1/(batch width of the simulated curricula).
    phase_A: None, or float32[P, N, M] the A of every phase (linear only).
    phase_B: None, or float32[P, N, M] the B of every phase.
    phase_starts: () for one phase, else the first step of every phase (P ints,
      starting with 0).
    final_only: the simulator predicts only the final loss of curricula of exactly
      `num_steps` full batches of `batch_size`, unweighted, from the initial losses
      `fit_info["initial_losses"]` (see the module docstring).
    fitted_ids: None (every id is predicted, or unknown: not checked), or the sorted
      distinct train ids (a tuple of ints in [0, N)) the fitted runs contained; for
      the others the simulator has only its prior, and `simulate` refuses them
      unless `allow_unfitted_ids=True` (see the module docstring). With
      `phase_fitted_ids`: the ids fitted in every phase (derived from it when
      None; any other value is refused).
    phase_fitted_ids: None (no per-phase coverage: one phase, coverage unknown or
      not checked, or a phased simulator saved before it was recorded, checked
      per id over all phases by `fitted_ids`), or with phases, for every phase k
      the sorted train ids the fitted runs contained in steps of phase k (a tuple
      of P tuples): curricula are checked per step against its phase.
    batch_mean: additive only: β of a step is scaled by B / v (B the batch width,
      v its valid ids): B holds the effects of a full batch of a mean loss (e.g.
      TracIn's −(η/B)·score), and training divides a step by its v valid ids, so a
      padded step's examples each move the loss more. False: Σ_{i∈c_t} B_i as is.
  """

  A: Optional[Any]
  B: Any
  posterior: Optional[Posterior] = None
  kind: str = dataclasses.field(metadata=dict(static=True), default="additive")
  name: str = dataclasses.field(metadata=dict(static=True), default="")
  fit_info_items: tuple = dataclasses.field(metadata=dict(static=True), default=())
  batch_size: Optional[int] = dataclasses.field(metadata=dict(static=True),
                                                default=None)
  num_steps: Optional[int] = dataclasses.field(metadata=dict(static=True),
                                               default=None)
  null_a: Optional[float] = dataclasses.field(metadata=dict(static=True), default=None)
  phase_A: Optional[Any] = None
  phase_B: Optional[Any] = None
  phase_starts: tuple = dataclasses.field(metadata=dict(static=True), default=())
  final_only: bool = dataclasses.field(metadata=dict(static=True), default=False)
  fitted_ids: Optional[tuple] = dataclasses.field(metadata=dict(static=True),
                                                  default=None)
  phase_fitted_ids: Optional[tuple] = dataclasses.field(metadata=dict(static=True),
                                                        default=None)
  batch_mean: bool = dataclasses.field(metadata=dict(static=True), default=False)

  def __post_init__(self):
    # Only what transforms cannot change: pytree leaves may legitimately be tracers,
    # stacked or sliced arrays (tree_map, vmap over simulators); shapes are checked
    # where arrays enter (`fit`, `load`, `check_shapes`).
    if self.kind not in KINDS:
      raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}.")
    if self.batch_mean and self.kind != "additive":
      raise ValueError("batch_mean: only for kind='additive'.")
    _positive_int_or_none(self.batch_size, "batch_size")
    _positive_int_or_none(self.num_steps, "num_steps")
    if self.null_a is not None and (not _is_real(self.null_a) or
                                    not np.isfinite(self.null_a)):
      raise ValueError(f"null_a: expected a finite number or None, got {self.null_a!r}.")
    starts = tuple(self.phase_starts)
    if starts and (list(starts) != sorted(set(starts)) or starts[0] != 0):
      raise ValueError(f"phase_starts: expected increasing steps from 0, got {starts}.")
    if (self.phase_B is None) != (not starts) or (
        self.kind == "linear" and (self.phase_A is None) != (self.phase_B is None)):
      raise ValueError("phase_A/phase_B/phase_starts: give all of them (phases) or "
                       "none.")
    if self.final_only and (self.batch_size is None or self.num_steps is None or
                            "initial_losses" not in self.fit_info):
      raise ValueError("final_only: needs batch_size, num_steps and "
                       "fit_info['initial_losses'].")
    if self.fitted_ids is not None and not isinstance(self.fitted_ids, tuple):
      # Static metadata must be hashable: any sequence of ids becomes a sorted tuple.
      object.__setattr__(self, "fitted_ids", _id_tuple(self.fitted_ids))
    if self.phase_fitted_ids is not None:
      per_phase = _phase_id_tuples(self.phase_fitted_ids)
      if len(per_phase) != len(starts) or not starts:
        raise ValueError(f"phase_fitted_ids: expected one sequence of ids per phase "
                         f"({len(starts)} phases), got {len(per_phase)}"
                         f"{'' if starts else '; without phases use fitted_ids'}.")
      common = _common_ids(per_phase)
      if self.fitted_ids is not None and tuple(self.fitted_ids) != common:
        raise ValueError("fitted_ids: with phase_fitted_ids it is the ids fitted in "
                         "every phase (leave it None to derive it); got other ids.")
      object.__setattr__(self, "phase_fitted_ids", per_phase)
      object.__setattr__(self, "fitted_ids", common)

  def check_shapes(self) -> "Simulator":
    """Raises ValueError unless A, B (and the phase arrays) have consistent shapes."""
    shape = tuple(np.shape(self.B))
    if len(shape) != 2:
      raise ValueError(f"B: expected float32[N, M], got shape {shape}.")
    if self.kind == "linear" and (self.A is None or tuple(np.shape(self.A)) != shape):
      raise ValueError(f"A: a linear simulator needs A of B's shape {shape}, got "
                       f"{None if self.A is None else tuple(np.shape(self.A))}.")
    if self.phase_B is not None:
      expected = (len(self.phase_starts),) + shape
      for name in ("phase_A", "phase_B"):
        value = getattr(self, name)
        if value is not None and tuple(np.shape(value)) != expected:
          raise ValueError(f"{name}: expected shape {expected}, got "
                           f"{tuple(np.shape(value))}.")
    named = [("fitted_ids", self.fitted_ids)] + [
        (f"phase_fitted_ids[{k}]", ids)
        for k, ids in enumerate(self.phase_fitted_ids or ())]
    for name, ids in named:
      if ids is not None and ids and (ids[0] < 0 or ids[-1] >= shape[0]):
        raise ValueError(f"{name}: expected train ids in [0, N={shape[0]}), found "
                         f"[{ids[0]}, {ids[-1]}].")
    return self

  @property
  def fit_info(self) -> dict:
    """Fit diagnostics: method, iterations, relative_residual, converged, cv, ..."""
    return {k: _thaw(v) for k, v in self.fit_info_items}

  @property
  def num_train_examples(self) -> int:
    return self.B.shape[0]

  @property
  def num_test_examples(self) -> int:
    return self.B.shape[1]

  @property
  def num_phases(self) -> int:
    return max(len(self.phase_starts), 1)

  # -- persistence -------------------------------------------------------------------
  def save(self, path: str) -> None:
    """Writes the simulator (and its posterior, if any) to directory `path` atomically.

    Layout: A.npy (linear only), B.npy, phase_A.npy / phase_B.npy (phases only),
    fitted_ids.npy (int32[K], with `fitted_ids` only), phase_fitted_ids.npy
    (int32[K', 2] rows (phase, id), with `phase_fitted_ids` only), posterior_*.npy
    and simulator.json (format 2: kind, name, fit_info, batch_size, num_steps, N, M,
    null_a, phase_starts, num_fitted_ids: K or null, num_phase_fitted_ids: K' or
    null); read back with `Simulator.load`.
    """
    with _io.atomic_directory(path) as tmp:
      arrays = {"B": self.B}
      if self.fitted_ids is not None:
        arrays["fitted_ids"] = np.asarray(self.fitted_ids, np.int32)
      if self.phase_fitted_ids is not None:
        arrays["phase_fitted_ids"] = _phase_id_rows(self.phase_fitted_ids)
      for name in ("A", "phase_A", "phase_B"):
        if getattr(self, name) is not None:
          arrays[name] = getattr(self, name)
      if self.posterior is not None:
        for field in _POSTERIOR_ARRAYS + _POSTERIOR_OPTIONAL:
          if getattr(self.posterior, field) is not None:
            arrays["posterior_" + field] = getattr(self.posterior, field)
      for name, value in arrays.items():
        np.save(os.path.join(tmp, name + ".npy"), np.asarray(value), allow_pickle=False)
      meta = {"format_version": _FORMAT_VERSION, "kind": self.kind, "name": self.name,
              "fit_info": self.fit_info, "batch_size": self.batch_size,
              "num_steps": self.num_steps, "num_train_examples": self.num_train_examples,
              "num_test_examples": self.num_test_examples, "null_a": self.null_a,
              "phase_starts": list(self.phase_starts),
              "final_only": self.final_only, "batch_mean": self.batch_mean,
              "num_fitted_ids": (None if self.fitted_ids is None else
                                 len(self.fitted_ids)),
              "num_phase_fitted_ids": (
                  None if self.phase_fitted_ids is None else
                  len(arrays["phase_fitted_ids"])),
              "posterior": None if self.posterior is None else {
                  "l2": self.posterior.l2, "method": self.posterior.method,
                  # The optional arrays it holds: `load` then refuses a copy that
                  # lost one instead of sampling around the wrong centres.
                  "optional_arrays": [field for field in _POSTERIOR_OPTIONAL if
                                      getattr(self.posterior, field) is not None]}}
      with open(os.path.join(tmp, "simulator.json"), "w") as f:
        json.dump(meta, f, indent=2, default=_json_value)

  @classmethod
  def load(cls, path: str) -> "Simulator":
    """Reads a simulator written by `save` (format 2, or format 1 of older versions).

    A format-1 simulator did not record its number of steps (not checked after
    loading) nor its null term (weights use 1/batch_size); its batch size is read
    from its posterior's rows when it has one. One saved before `fitted_ids` was
    recorded (no `num_fitted_ids` in simulator.json) loads with `fitted_ids = None`:
    its curricula's ids are not checked against its fitted runs. A phased one saved
    before per-phase coverage was recorded (no `num_phase_fitted_ids`) loads with
    `phase_fitted_ids = None`: its ids are checked as before, per id over all phases
    (see the module docstring).

    Raises:
      FileNotFoundError: `path` or one of its files is missing.
      ValueError: a file is corrupt, or the arrays disagree in shape.
    """
    meta_path = os.path.join(path, "simulator.json")
    if not _io.exists(meta_path):
      raise FileNotFoundError(f"Simulator.load: {meta_path!r} is missing (not a saved "
                              "simulator, or an interrupted write).")
    try:
      meta = _io.read_json(meta_path, "Simulator.load")
      kind, name = meta["kind"], meta["name"]
    except (KeyError, TypeError) as e:
      raise ValueError(f"Simulator.load: {meta_path!r} is corrupt ({e!r}).") from e
    version = meta.get("format_version")
    if version not in _READABLE_VERSIONS or kind not in KINDS:
      raise ValueError(f"Simulator.load: {meta_path!r} has an unsupported "
                       f"format_version or kind ({version!r}, {kind!r}).")
    load = lambda field: _io.load_npy(os.path.join(path, field + ".npy"),
                                      "Simulator.load")
    optional = lambda field: (load(field) if _io.exists(
        os.path.join(path, field + ".npy")) else None)
    b = load("B")
    a = load("A") if kind == "linear" else None
    if b.ndim != 2 or (a is not None and a.shape != b.shape):
      raise ValueError(f"Simulator.load: {path!r} holds A {None if a is None else a.shape}"
                       f" and B {b.shape}; expected two float32[N, M].")
    expected = (meta.get("num_train_examples", b.shape[0]),
                meta.get("num_test_examples", b.shape[1]))
    if tuple(b.shape) != tuple(expected):
      raise ValueError(f"Simulator.load: {path!r} holds B {b.shape} but simulator.json "
                       f"says N, M = {tuple(expected)}.")
    posterior = None
    if meta.get("posterior"):
      fields = {field: load("posterior_" + field) for field in _POSTERIOR_ARRAYS}
      held = meta["posterior"].get("optional_arrays")
      if held is None:  # saved before the list was recorded: the fit's own flags
        fit_info = meta.get("fit_info") or {}
        held = [field for field in _POSTERIOR_OPTIONAL if fit_info.get(field)]
      fields.update({field: load("posterior_" + field) if field in held
                     else optional("posterior_" + field)
                     for field in _POSTERIOR_OPTIONAL})
      posterior = Posterior(**fields, l2=float(meta["posterior"]["l2"]),
                            method=str(meta["posterior"]["method"]))
    batch_size = meta.get("batch_size")
    if version == 1 and posterior is not None:
      batch_size = int(posterior.ids.shape[1])
    phase_starts = tuple(int(s) for s in meta.get("phase_starts") or ())
    fitted_ids = None
    if meta.get("num_fitted_ids") is not None:
      ids = load("fitted_ids")
      if ids.ndim != 1 or len(ids) != meta["num_fitted_ids"] or (
          ids.size and not np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"Simulator.load: {path!r} holds fitted_ids {ids.dtype} "
                         f"{list(ids.shape)} but simulator.json says "
                         f"{meta['num_fitted_ids']} ids.")
      fitted_ids = _id_tuple(ids)
    phase_fitted_ids = None
    if meta.get("num_phase_fitted_ids") is not None:
      rows = load("phase_fitted_ids")
      well_formed = (rows.ndim == 2 and rows.shape[1] == 2 and
                     len(rows) == meta["num_phase_fitted_ids"])
      if well_formed and rows.size:
        well_formed = (np.issubdtype(rows.dtype, np.integer) and
                       rows[:, 0].min() >= 0 and rows[:, 0].max() < len(phase_starts))
      if not well_formed:
        raise ValueError(f"Simulator.load: {path!r} holds phase_fitted_ids "
                         f"{rows.dtype} {list(rows.shape)} but simulator.json says "
                         f"{meta['num_phase_fitted_ids']} (phase, id) rows of "
                         f"{len(phase_starts)} phases.")
      phase_fitted_ids = tuple(_id_tuple(rows[rows[:, 0] == k, 1])
                               for k in range(len(phase_starts)))
    to_jax = lambda v: None if v is None else jnp.asarray(v)
    try:
      return cls(A=to_jax(a), B=jnp.asarray(b), posterior=posterior, kind=kind,
                 name=name, fit_info_items=fit_info_items(meta.get("fit_info") or {}),
                 batch_size=batch_size, num_steps=meta.get("num_steps"),
                 null_a=meta.get("null_a"),
                 phase_A=to_jax(optional("phase_A")) if phase_starts else None,
                 phase_B=to_jax(optional("phase_B")) if phase_starts else None,
                 phase_starts=phase_starts,
                 final_only=bool(meta.get("final_only", False)),
                 batch_mean=bool(meta.get("batch_mean", False)),
                 fitted_ids=fitted_ids,
                 phase_fitted_ids=phase_fitted_ids).check_shapes()
    except ValueError as e:
      raise ValueError(f"Simulator.load: {path!r} is inconsistent ({e})") from e

  # -- simulation --------------------------------------------------------------------
  def check_curricula(self, batch_ids, *, allow_extrapolation: bool = False,
                      who: str = "batch_ids") -> np.ndarray:
    """Validates curricula int[R', T', B'] against what this simulator was fitted on.

    Returns the ids as int32. Raises ValueError naming `who` for a bad rank or dtype,
    ids out of [-1, N), a batch width ≠ the fitted batch size, or T' > the fitted
    number of steps without `allow_extrapolation` (and naming A / B / phase_* when
    the simulator's own arrays disagree in shape); a final-only simulator also
    refuses padding and T' ≠ T.
    """
    self.check_shapes()
    batch_ids = np.asarray(batch_ids)
    if batch_ids.ndim != 3 or not np.issubdtype(batch_ids.dtype, np.integer):
      raise ValueError(f"{who}: expected int[R', T, B], got {batch_ids.dtype} "
                       f"{batch_ids.shape}.")
    if batch_ids.size and (batch_ids.min() < -1 or
                           batch_ids.max() >= self.num_train_examples):
      raise ValueError(f"{who}: ids must be in [-1, {self.num_train_examples}), found "
                       f"[{batch_ids.min()}, {batch_ids.max()}].")
    _, num_steps, width = batch_ids.shape
    if self.batch_size is not None and width != self.batch_size:
      raise ValueError(
          f"{who}: batch width {width} differs from the batch size {self.batch_size} "
          f"that simulator {self.name!r} was fitted on (its A, B are per-step effects "
          f"at batch size {self.batch_size}).")
    if (self.num_steps is not None and num_steps > self.num_steps and
        not allow_extrapolation):
      raise ValueError(
          f"{who}: {num_steps} steps, more than the {self.num_steps} that simulator "
          f"{self.name!r} was fitted on; pass allow_extrapolation=True (the "
          "simulate command: --allow_extrapolation) to roll out past them.")
    if self.final_only and (num_steps != self.num_steps or np.any(batch_ids < 0)):
      raise ValueError(
          f"{who}: simulator {self.name!r} predicts only the final loss of "
          f"curricula of exactly {self.num_steps} full batches; got {num_steps} "
          f"steps{' with padding (-1)' if np.any(batch_ids < 0) else ''}.")
    return batch_ids.astype(np.int32)

  def unfitted_by_phase(self, batch_ids) -> list:
    """[(phase, int32[k] sorted ids)] the ids of `batch_ids` (-1 = padding) that
    no fitted run contained where they are, for the phases that have any.

    Without `phase_fitted_ids`: at most one entry, (None, the ids outside
    `fitted_ids`). With it: curricula int[R', T', B] are read per step (step t
    in phase `phase_of_steps(T')[t]`, past T the last), so each entry holds the
    ids of phase k's steps outside `phase_fitted_ids[k]`; ids of any other shape
    (e.g. a search pool, without steps) may go to any step: each entry holds the
    ids outside phase k's. Empty when `fitted_ids` is None.
    """
    if self.fitted_ids is None:
      return []
    batch_ids = np.asarray(batch_ids)
    if self.phase_fitted_ids is None:
      missing = _outside(batch_ids, self.fitted_ids)
      return [(None, missing)] if missing.size else []
    if batch_ids.ndim == 3:
      step_phase = self.phase_of_steps(batch_ids.shape[1])
      parts = [(k, batch_ids[:, step_phase == k]) for k in range(self.num_phases)]
    else:
      parts = [(k, batch_ids) for k in range(self.num_phases)]
    found = [(k, _outside(ids, self.phase_fitted_ids[k])) for k, ids in parts]
    return [(k, ids) for k, ids in found if ids.size]

  def unfitted_ids(self, batch_ids) -> np.ndarray:
    """int32[k] the sorted distinct ids of `batch_ids` (any shape, -1 = padding)
    that no fitted run contained (outside `fitted_ids`); empty when `fitted_ids` is
    None (every id predicted, or unknown). With `phase_fitted_ids`, the ids that
    no fitted run contained in the phase of a step holding them (any phase, for
    ids not shaped as curricula int[R', T', B]; see `unfitted_by_phase`)."""
    found = [ids for _, ids in self.unfitted_by_phase(batch_ids)]
    return (np.unique(np.concatenate(found)).astype(np.int32) if found else
            np.zeros(0, np.int32))

  def check_fitted_ids(self, batch_ids, *, who: str = "batch_ids",
                       caller: str = "simulate") -> None:
    """Raises ValueError, naming `who` and the ids, if `batch_ids` hold train ids
    that no fitted run contained (`unfitted_ids`): for them this simulator has only
    its prior, no prediction. With phases it also names each phase and its ids."""
    found = self.unfitted_by_phase(batch_ids)
    if not found:
      return
    missing = self.unfitted_ids(batch_ids)
    where = ""
    if self.phase_fitted_ids is not None:  # curricula: per step; else: any phase
      where = (" in the phase of their steps (" if np.ndim(batch_ids) == 3 else
               " in some phase, and they may go to any step (missing from ")
      where += "; ".join(f"phase {k}: {format_ids(ids)}" for k, ids in found) + ")"
    raise ValueError(
        f"{caller}: {who} hold train ids {format_ids(missing)} ({missing.size} in "
        f"all) that no fitted run contained{where}; simulator {self.name!r} has only "
        f"its prior for them ({COVERING_METHODS} can predict them); pass "
        "allow_unfitted_ids=True to roll out anyway.")

  def _check_inputs(self, batch_ids, initial_losses, weights=None,
                    allow_extrapolation=False, allow_unfitted_ids=False,
                    caller="simulate"):
    batch_ids = self.check_curricula(batch_ids, allow_extrapolation=allow_extrapolation)
    if not allow_unfitted_ids:
      self.check_fitted_ids(batch_ids, caller=caller)
    initial_losses = np.asarray(initial_losses, np.float32)
    expected = (batch_ids.shape[0], self.num_test_examples)
    if initial_losses.shape != expected:
      raise ValueError(f"initial_losses: expected shape {expected}, got "
                       f"{initial_losses.shape}.")
    if not np.all(np.isfinite(initial_losses)):
      raise ValueError("initial_losses: contains NaN or inf.")
    self.check_initial_losses(initial_losses)
    if self.final_only and weights is not None and np.any(np.asarray(weights) != 1):
      raise ValueError(f"weights: simulator {self.name!r} predicts unweighted "
                       "curricula only (final_only).")
    if weights is None:
      weights = np.ones(batch_ids.shape, np.float32)
    else:
      weights = np.asarray(weights)
      if weights.shape != batch_ids.shape or not (
          np.issubdtype(weights.dtype, np.floating) or
          np.issubdtype(weights.dtype, np.integer)):
        raise ValueError(f"weights: expected float32{list(batch_ids.shape)} like "
                         f"batch_ids, got {weights.dtype} {list(weights.shape)}.")
      if not np.all(np.isfinite(weights)):
        raise ValueError("weights: contains NaN or inf.")
      if np.any(weights < 0):
        bad = tuple(int(i) for i in np.argwhere(weights < 0)[0])
        raise ValueError(f"weights: must be non-negative (1 = present, 0 = removed), "
                         f"found {float(weights[bad]):g} at {list(bad)}.")
      weights = weights.astype(np.float32)
    return (jnp.asarray(batch_ids), jnp.asarray(initial_losses), jnp.asarray(weights))

  def check_initial_losses(self, initial_losses) -> None:
    """Raises ValueError if a final-only simulator gets other initial losses than
    the ones its predictions assume (`fit_info["initial_losses"]`, None where it
    predicts nothing); no-op otherwise.
    """
    if not self.final_only:
      return
    assumed = np.array([np.nan if v is None else v
                        for v in self.fit_info["initial_losses"]], np.float32)
    given = np.asarray(initial_losses, np.float32)
    known = np.isfinite(assumed)  # None: a column the simulator does not predict
    if given.shape[-1:] != assumed.shape or not np.allclose(
        given[..., known], assumed[known], rtol=1e-4, atol=1e-4):
      raise ValueError(f"initial_losses: simulator {self.name!r} predicts final losses "
                       "from the base model's test losses (fit_info['initial_losses'])"
                       "; these differ.")

  def resolved_null_a(self, width: int) -> float:
    """a₀ of a removed occurrence in curricula of batch width `width`."""
    if self.null_a is not None:
      return float(self.null_a)
    return 1.0 / float(self.batch_size or width)

  def phase_of_steps(self, num_steps: int) -> np.ndarray:
    """int32[T'] the phase of every step (0 without phases; past T: the last)."""
    return phase_of_steps(self.phase_starts, num_steps)

  def phase_parameters(self):
    """(A float32[P, N, M] (B itself if additive), B float32[P, N, M])."""
    if self.phase_B is not None:
      b = jnp.asarray(self.phase_B)
      return (b if self.kind == "additive" else jnp.asarray(self.phase_A)), b
    b = jnp.asarray(self.B)[None]
    return (b if self.kind == "additive" else jnp.asarray(self.A)[None]), b

  def first_nonfinite(self, losses, ends_only: bool = False
                      ) -> Optional[Tuple[int, int, int]]:
    """(run, step, test example) of the first non-finite loss of a rollout
    `losses` [R', T'+1, M] of this simulator (host values), or None. A final-only
    simulator is read in its columns with an initial loss (the others are NaN by
    design); `ends_only`: at steps 0 and T' only (what `simulate` returns of a
    final-only simulator: its other steps are NaN by design)."""
    losses = np.asarray(losses)  # on the host: no program to compile per shape
    columns = np.arange(losses.shape[-1])
    steps = np.arange(losses.shape[1])
    if self.final_only:
      columns = np.flatnonzero([v is not None for v in self.fit_info["initial_losses"]])
    if ends_only:
      steps = np.array([0, losses.shape[1] - 1])
    bad = _checks.first_nonfinite(losses[:, steps][..., columns])
    if bad is None:
      return None
    run, step, column = bad
    return run, int(steps[step]), int(columns[column])

  def _check_finite(self, losses, allow_nonfinite: bool, what: str = "losses"):
    """Raises ValueError naming the first run of `losses` [R', T'+1, M] that is not
    finite (a diverging rollout, or overflow from huge weights / initial losses;
    `first_nonfinite`), unless `allow_nonfinite`; skipped under tracing (no values
    to check)."""
    if allow_nonfinite or isinstance(losses, jax.core.Tracer):
      return
    where = self.first_nonfinite(losses)
    if where is None:
      return
    run, step, column = where
    raise ValueError(
        f"simulate: run {run} of batch_ids gives non-finite {what} (first at step "
        f"{step}, test example {column}) with simulator {self.name!r}: it diverges on "
        "this curriculum, its A/B are not finite, or the weights/initial_losses "
        "overflow float32; pass allow_nonfinite=True to get the inf/NaN values.")

  def simulate(self, batch_ids, initial_losses, weights=None, *,
               allow_extrapolation: bool = False,
               allow_nonfinite: bool = False,
               allow_unfitted_ids: bool = False) -> jax.Array:
    """Rolls the simulator out autoregressively (never teacher-forced).

    Args:
      batch_ids: int32[R', T', B] any curricula, -1 = padding; B must be the fitted
        batch size and T' ≤ the fitted T (when known).
      initial_losses: float32[R', M] losses before the first step.
      weights: optional float32[R', T', B] occurrence weights, ≥ 0 (1 = present,
        0 = removed; see the module docstring); ignored at padding.
      allow_extrapolation: allow T' beyond the fitted number of steps.
      allow_nonfinite: return a diverging (inf/NaN) rollout instead of raising
        (e.g. for `evaluation`, which scores it NaN with a reason).
      allow_unfitted_ids: roll out curricula holding train ids that no fitted run
        contained (outside `fitted_ids`), for which the simulator has only its
        prior (e.g. to measure exactly that, as the main job's unseen-example
        evaluation does).

    Returns:
      float32[R', T'+1, M], `[:, 0]` = initial_losses (final-only: NaN at steps
      1..T'−1).

    Raises:
      ValueError: bad inputs (naming the argument), ids outside `fitted_ids`
        without `allow_unfitted_ids` (naming them), or, unless `allow_nonfinite`, a
        run whose simulated losses are not finite (naming the run).
    """
    batch_ids, initial_losses, weights = self._check_inputs(
        batch_ids, initial_losses, weights, allow_extrapolation, allow_unfitted_ids)
    a, b = self.phase_parameters()
    phases = jnp.asarray(self.phase_of_steps(batch_ids.shape[1]))
    null_a = jnp.float32(self.resolved_null_a(batch_ids.shape[2]))
    losses = _rollout(a, b, batch_ids, weights, phases, initial_losses, null_a,
                      linear=self.kind == "linear", batch_mean=self.batch_mean)
    self._check_finite(losses, allow_nonfinite)
    if self.final_only:
      losses = losses.at[:, 1:-1].set(jnp.nan)
    return losses

  def sample_parameters(self, num_samples: int, rng: Any = 0):
    """Posterior samples of (A, B) by perturb-and-MAP with the fit's solver.

    Each sample solves the ridge problem with targets y + σε₁ and prior centre
    θ₀ + σ/√l2·ε₂ (ε ~ N(0, I)), an exact draw from the Gaussian posterior.

    Returns:
      (A float32[S, N, M] or None, B float32[S, N, M]); with P phases
      float32[S, P, N, M] each.
    """
    a, b = self._sample_phase_parameters(num_samples, rng)
    if not self.phase_starts:
      a, b = (None if a is None else a[:, 0]), b[:, 0]
    return a, b

  def _sample_phase_parameters(self, num_samples, rng):
    """(A float32[S, P, N, M] or None, B float32[S, P, N, M])."""
    if self.posterior is None:
      raise ValueError(f"simulator {self.name!r}: has no posterior (not fitted with "
                       "`fit`), so no bands can be sampled.")
    if not _checks.is_int(num_samples) or num_samples < 1:
      raise ValueError(f"num_samples: expected a positive integer, got {num_samples!r}.")
    post = self.posterior
    _closures.check_rng(rng, "draw the posterior samples", seed_ok=True)
    key = jax.random.key(int(rng)) if _checks.is_int(rng) else rng
    linear = self.kind == "linear"
    blocks = 2 if linear else 1
    num_phases = self.num_phases
    num_train, num_test = self.B.shape
    num_params = num_phases * num_train  # parameter rows: one per phase and id
    key_y, key_prior = jax.random.split(key)
    sigma = jnp.sqrt(jnp.asarray(post.noise_var))  # [M]
    x = jnp.tile(jnp.asarray(post.x), (1, num_samples))  # [P, S·M], sample-major
    sigma_cols = jnp.tile(sigma, num_samples)
    y = jnp.tile(jnp.asarray(post.y), (1, num_samples))
    y = y + sigma_cols * jax.random.normal(key_y, y.shape)
    prior_noise = (sigma_cols / np.sqrt(post.l2)) * jax.random.normal(
        key_prior, (num_params, blocks, num_samples * num_test))
    # `post.y` is already relative to the prior centre θ₀; shift by the perturbation's
    # prediction so the solver again sees a zero-centred prior.
    y = y - _solver.jitted_forward(prior_noise, jnp.asarray(post.ids), x,
                                   linear=linear)
    theta, _ = _solver.solve(post.ids, x, y, num_params, post.l2, linear=linear,
                             method=post.method)
    theta = theta + np.asarray(prior_noise)
    theta = theta.reshape(num_phases, num_train, blocks, num_samples, num_test)
    theta = theta.transpose(3, 2, 0, 1, 4)  # [S, J, P, N, M]
    centre_b = 0.0 if post.prior_B is None else np.asarray(post.prior_B).reshape(
        num_phases, num_train, num_test)
    if linear:
      centre_a = (float(post.prior_a) if post.prior_A is None else
                  np.asarray(post.prior_A).reshape(num_phases, num_train, num_test))
      return theta[:, 0] + centre_a, theta[:, 1] + centre_b
    return None, theta[:, 0] + centre_b

  def simulate_with_bands(self, batch_ids, initial_losses, num_samples: int = 32,
                          rng: Any = 0, *, weights=None,
                          allow_extrapolation: bool = False,
                          allow_nonfinite: bool = False,
                          allow_unfitted_ids: bool = False):
    """Posterior mean and std of simulated trajectories (parameter uncertainty).

    Args:
      batch_ids: int32[R', T', B] (checked as in `simulate`).
      initial_losses: float32[R', M].
      num_samples: posterior samples of (A, B) to roll out.
      rng: int seed or PRNG key.
      weights: optional float32[R', T', B] occurrence weights, as in `simulate`.
      allow_extrapolation: as in `simulate`.
      allow_nonfinite: as in `simulate` (checked on the mean and std).
      allow_unfitted_ids: as in `simulate`.

    Returns:
      (mean, std), each float32[R', T'+1, M].
    """
    batch_ids, initial_losses, weights = self._check_inputs(
        batch_ids, initial_losses, weights, allow_extrapolation, allow_unfitted_ids,
        caller="simulate_with_bands")
    a_samples, b_samples = self._sample_phase_parameters(num_samples, rng)
    linear = self.kind == "linear"
    a_samples = b_samples if a_samples is None else a_samples
    phases = jnp.asarray(self.phase_of_steps(batch_ids.shape[1]))
    null_a = jnp.float32(self.resolved_null_a(batch_ids.shape[2]))
    rollouts = jax.vmap(lambda a, b: _rollout(a, b, batch_ids, weights, phases,
                                              initial_losses, null_a,
                                              linear=linear,
                                              batch_mean=self.batch_mean))(
                                                  jnp.asarray(a_samples),
                                                  jnp.asarray(b_samples))
    mean, std = jnp.mean(rollouts, axis=0), jnp.std(rollouts, axis=0)
    self._check_finite(mean, allow_nonfinite, "mean losses")
    self._check_finite(std, allow_nonfinite, "loss std")
    return mean, std
