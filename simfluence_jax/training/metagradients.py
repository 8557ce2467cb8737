"""Metagradients: derivatives of test losses with respect to per-occurrence weights.

Every occurrence (run r, step t, slot b) of a curriculum carries a weight w_{r,t,b}
multiplying its loss in the step objective (`step.py`):

    L_t(θ) = Σ_b w_b·valid_b·ℓ(z_{id_b}; θ) / num_valid_t,   num_valid_t = Σ_b valid_b,

so a weight-0 slot keeps its place in the denominator (MAGIC's convention). Equivalently
each step trains on *effective per-example weights* e_t[i] = Σ_{b: id_b = i} w_b/num_valid_t
(`step.effective_weights`); both functions here are derivatives of the same map
e ↦ test-loss trajectory, taken around one training run:

* `metagradients`: ∂L_T[m]/∂w_{r,t,b}, the exact gradient of the final test losses of
  each run (the run `train_runs` trains, same arithmetic), by reverse mode through
  the scanned training run (MAGIC, Ilyas & Engstrom 2025).
* `first_order_losses`: the first-order Taylor expansion of the whole test-loss
  trajectory around a reference run, evaluated at other curricula, by forward mode.
* `first_order_final_losses`: its final step, by forward mode or from the reference
  run's `metagradients` table (`predict_from_table`), whichever costs less.

All work for SGD, momentum and Adam (`optim.make_optimizer`) and any schedule.

Why not `jax.jacrev`: on jax 0.10.2 / XLA CPU, `vmap` over the cotangents of the
scanned run's pullback (what `jacrev` does) returns wrong rows (row 0 right, the
others off by up to 1e26) for the Transformer LM. Measured here: the same jaxpr is
right when the pullback's residuals are compile-time constants, right evaluated op
by op, wrong when they are parameters of the compiled program, and right again when
XLA's `while-loop-invariant-code-motion` pass is disabled, so the fault is that XLA
pass, not JAX's batching rules. The reverse passes here are compiled without it, one
cotangent at a time (`lax.map`) by default or `cotangents_at_once` vmapped; every
row is tested against references that use neither (`tests/metagradients_test.py`).
Forward mode (vmapped jvps, `first_order_losses`) is not affected.
"""

import functools
from typing import Any, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax import _checks
from simfluence_jax import sharding as sharding_lib
from simfluence_jax.training import optim
from simfluence_jax.training import runs as runs_lib
from simfluence_jax.training import step as step_lib

# What the reverse pass is compiled without (see the module docstring): needed for
# vmapped cotangents, kept off for single ones too (measured: same speed, and a
# miscompiled row would be silently wrong).
_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "while-loop-invariant-code-motion"}


class FirstOrderLosses(NamedTuple):
  """What `first_order_losses` returns.

  Attributes:
    losses: float32[R', T+1, M], the first-order prediction of each curriculum's
      test-loss trajectory (row 0 = the losses of params0).
    reference_losses: float32[T+1, M], the reference run's trajectory (the point
      of the expansion; exact).
  """

  losses: np.ndarray
  reference_losses: np.ndarray


def _as_runs(batch_ids: Any, weights: Any, num_train: int, who: str, name: str):
  """(int32[R, T, B], float32[R, T, B], whether one run [T, B] was given)."""
  batch_ids = np.asarray(batch_ids)
  single = batch_ids.ndim == 2
  if batch_ids.ndim not in (2, 3) or not np.issubdtype(batch_ids.dtype, np.integer):
    raise ValueError(f"{who}: {name} must be int[R, T, B] or int[T, B], got "
                     f"{batch_ids.dtype}{list(batch_ids.shape)}.")
  if batch_ids.size == 0:
    raise ValueError(f"{who}: {name} is empty ({list(batch_ids.shape)}).")
  if batch_ids.min() < -1 or batch_ids.max() >= num_train:
    raise ValueError(f"{who}: {name} must be in [-1, N={num_train}), found "
                     f"[{batch_ids.min()}, {batch_ids.max()}].")
  batch_ids = batch_ids.astype(np.int32)
  weights_name = name.replace("batch_ids", "weights").replace("curricula",
                                                              "curricula_weights")
  weights = runs_lib.checked_weights(who, weights, batch_ids, weights_name, name)
  if single:
    batch_ids, weights = batch_ids[None], weights[None]
  return batch_ids, weights, single


def _check_metagradients(who: str, grads: np.ndarray, losses: np.ndarray,
                         single: bool) -> None:
  """FloatingPointError naming the first non-finite final test loss [R, M] (checked
  first: a diverged run) or metagradient [R, T, B, M] of a `metagradients` call."""
  run = lambda r: "" if single else f"run {r}, "
  bad = _checks.first_nonfinite(losses)
  if bad is not None:
    r, m = bad
    raise FloatingPointError(
        f"{who}: non-finite final test loss ({run(r)}test example {m}: "
        f"{losses[bad]}); the run diverged or an input (learning rate, params0, "
        "train/test arrays) is not finite.")
  bad = _checks.first_nonfinite(grads)
  if bad is not None:
    r, t, b, m = bad
    slot = f"batch_ids[{t}, {b}]" if single else f"batch_ids[{r}, {t}, {b}]"
    raise FloatingPointError(
        f"{who}: non-finite metagradient ({run(r)}step {t}, {slot}, test example "
        f"{m}: {grads[bad]}); the reverse pass overflowed (a run that diverges "
        "under perturbation: try a smaller learning rate).")


def _one_reference(reference_batch_ids, reference_weights, num_train: int, who: str):
  """(reference int32[T, S], its weights float32[T, S]), checked to be one run."""
  reference_ids, reference_weights, _ = _as_runs(
      reference_batch_ids, reference_weights, num_train, who, "reference_batch_ids")
  if reference_ids.shape[0] != 1 or np.ndim(reference_batch_ids) != 2:
    raise ValueError(f"{who}: reference_batch_ids must be int[T, S], got shape "
                     f"{list(np.shape(reference_batch_ids))}.")
  return reference_ids[0], reference_weights[0]


def _reference_and_curricula(reference_batch_ids, reference_weights, curricula,
                             curricula_weights, num_train: int, who: str):
  """(reference int32[T, S], its weights float32[T, S], curricula int32[R', T, B],
  their weights, whether one curriculum [T, B] was given), checked: the reference
  is one run and has the curricula's number of steps."""
  reference_ids, reference_weights = _one_reference(
      reference_batch_ids, reference_weights, num_train, who)
  curricula, curricula_weights, single = _as_runs(
      curricula, curricula_weights, num_train, who, "curricula")
  num_steps, curriculum_steps = reference_ids.shape[0], curricula.shape[1]
  if curriculum_steps != num_steps:
    raise ValueError(f"{who}: curricula have T={curriculum_steps} steps, the "
                     f"reference T={num_steps}.")
  return reference_ids, reference_weights, curricula, curricula_weights, single


def _scan_steps(step_fn, carry, xs, remat_every: Optional[int]):
  """`lax.scan` of `carry = step_fn(carry, x)`, rematerialised for reverse mode.

  remat_every None: `jax.checkpoint` per step, the backward pass stores the carry
  of every step (T × (params + optimizer state)) and recomputes one step at a time.
  remat_every k: two levels, T/k segment carries plus the k carries of the segment
  being differentiated, at the price of a second recomputation of the forward.
  """
  body = jax.checkpoint(lambda c, x: (step_fn(c, x), None), prevent_cse=False)
  num_steps = jax.tree_util.tree_leaves(xs)[0].shape[0]
  if not remat_every or remat_every >= num_steps:
    return jax.lax.scan(body, carry, xs)[0]
  num_segments, remainder = divmod(num_steps, remat_every)
  split = num_segments * remat_every
  segments = jax.tree_util.tree_map(
      lambda x: x[:split].reshape((num_segments, remat_every) + x.shape[1:]), xs)
  segment = jax.checkpoint(lambda c, x: (jax.lax.scan(body, c, x)[0], None),
                           prevent_cse=False)
  carry = jax.lax.scan(segment, carry, segments)[0]
  if remainder:
    carry = jax.lax.scan(body, carry, jax.tree_util.tree_map(lambda x: x[split:], xs))[0]
  return carry


@functools.lru_cache(maxsize=16)
def _metagradients_fn(loss_fn, structure, remat_every, cotangents_at_once, seed,
                      run_sharding):
  """The jitted metagradients of R runs (cached: repeated calls do not recompile;
  the optimizer's numbers are an argument, `optim.split_settings`)."""
  test_loss = lambda params, test: loss_fn(params, test)

  def one_run(params, ids, run_weights, run, train, test, hyperparameters):
    optimizer, _ = optim.joined_optimizer(structure, hyperparameters)
    update = step_lib.make_update(loss_fn, optimizer,
                                  rng_key=step_lib.dropout_key(seed))
    num_steps = ids.shape[0]
    opt_state = optimizer.init(params)

    def final_losses(w):
      def step_fn(carry, xs):
        params_t, opt_state_t = carry
        t, ids_t, w_t = xs
        return update(params_t, opt_state_t, t, ids_t, w_t, train, run)
      steps = jnp.arange(num_steps, dtype=jnp.int32)
      final, _ = _scan_steps(step_fn, (params, opt_state), (steps, ids, w),
                             remat_every)
      return test_loss(final, test)

    losses, pullback = jax.vjp(final_losses, run_weights)
    num_test = losses.shape[0]
    # Cotangents e_m, `cotangents_at_once` per pullback (padded with m = M, a zero
    # cotangent, to whole chunks).
    num_chunks = -(-num_test // cotangents_at_once)
    test_ids = jnp.arange(num_chunks * cotangents_at_once).reshape(
        num_chunks, cotangents_at_once)
    row = lambda m: pullback(jax.nn.one_hot(m, num_test, dtype=losses.dtype))[0]
    if cotangents_at_once == 1:
      rows = jax.lax.map(lambda m: row(m[0])[None], test_ids)
    else:
      rows = jax.lax.map(jax.vmap(row), test_ids)
    rows = rows.reshape((-1,) + rows.shape[2:])[:num_test]  # [M, T, B]
    return jnp.moveaxis(rows, 0, -1) * (ids >= 0)[..., None], losses

  def all_runs(params, ids, run_weights, train, test, hyperparameters):
    count = ids.shape[0]
    return jax.vmap(one_run, in_axes=(None, 0, 0, 0, None, 0, None))(
        params, ids, run_weights, jnp.arange(count, dtype=jnp.int32), train,
        runs_lib.broadcast_over_runs(test, count), hyperparameters)

  return jax.jit(all_runs, out_shardings=run_sharding,
                 compiler_options=_COMPILER_OPTIONS)


def metagradients(params0: Any, batch_ids: Any, *, loss_fn: step_lib.LossFn,
                  config: Any, train_arrays: Dict[str, Any],
                  test_arrays: Dict[str, Any], weights: Any = None,
                  remat_every: Optional[int] = None, seed: int = 0,
                  mesh: Optional[jax.sharding.Mesh] = None,
                  cotangents_at_once: int = 1,
                  return_final_losses: bool = False) -> Any:
  """∂(final test loss m of run r) / ∂(weight of occurrence (r, t, b)).

  Exact for the run `train_runs(params0, batch_ids, ..., weights=weights)` trains
  (same step arithmetic; without recorded gradients): reverse mode through the
  jitted `lax.scan` of its steps, one pullback per test example (`lax.map`, see the
  module docstring), runs vmapped and sharded over the mesh's `runs` axis.

  Cost per run ≈ one training run + M reverse passes, each recomputing the forward
  step by step. Memory: remat_every=None keeps T carries (params + optimizer state)
  per run; remat_every=k keeps T/k + k of them and recomputes the forward once more.

  Derivative with respect to effective weights: ∂L/∂e_t[i] =
  num_valid_t · ∂L/∂w_{t,b} for a slot b holding i (w_b itself only enters as
  w_b/num_valid_t).

  Args:
    params0: base variables `{"params": ...}` (unbatched), shared by all runs.
    batch_ids: int32[R, T, B] (-1 = padding), or int32[T, S] for one run of any
      batch width S (e.g. a full-batch reference run, `batch_ids[t] = arange(N)`).
    loss_fn: per-example loss (`step.make_loss_fn`); a stochastic one gets the keys
      of `train_runs` with the same `seed` (run r = index in `batch_ids`).
    config: optimizer config (`optim.make_optimizer`: `optimizer`, `learning_rate`,
      `lr_schedule`, `momentum`, `b1`, `b2`, `eps`, ...); a linear schedule decays
      over T.
    train_arrays: dict of arrays, row i = train example i.
    test_arrays: dict of arrays of the M test examples.
    weights: float32 like `batch_ids` (None = ones): the point w at which the
      derivative is taken.
    remat_every: None or k (see above).
    seed: seed of a stochastic loss's keys.
    mesh: mesh whose `runs` axis the runs are split over (default: all devices).
    cotangents_at_once: test examples differentiated per reverse pass (vmapped
      cotangents; 1 = one pullback at a time in a `lax.map`). Above 1 it relies
      on the pass being compiled without XLA's loop-invariant code motion (done
      here; see the module docstring), is faster by sharing the recomputed
      forward, and costs that many reverse passes' memory.
    return_final_losses: also return the runs' final test losses, the primal
      output of the reverse pass (no extra training run).

  Returns:
    numpy float32[R, T, B, M] (float32[T, S, M] for 2-D `batch_ids`); exactly 0 at
    padding slots. With `return_final_losses`: (that, float32[R, M] (float32[M])
    final test losses).

  Raises:
    ValueError: bad shapes, ids or weights, arrays whose leading sizes differ,
      labels / targets out of range (`runs.check_arrays`), or a learning rate that
      is not a finite positive number.
    FloatingPointError: a non-finite final test loss or metagradient (checked on
      the host copies; names run, step, slot and test example).
  """
  who = "metagradients"
  runs_lib.check_float32_params(who, params0)
  num_train, _ = runs_lib.check_arrays(who, loss_fn, params0, train_arrays,
                                       test_arrays)
  batch_ids, weights, single = _as_runs(batch_ids, weights, num_train, who,
                                        "batch_ids")
  if not _checks.is_int(cotangents_at_once) or cotangents_at_once <= 0:
    raise ValueError(f"{who}: cotangents_at_once must be a positive integer, got "
                     f"{cotangents_at_once!r}.")
  cotangents_at_once = int(cotangents_at_once)
  if remat_every is not None and (not _checks.is_int(remat_every) or remat_every <= 0):
    raise ValueError(f"{who}: remat_every must be a positive int or None, got "
                     f"{remat_every}.")
  remat_every = None if remat_every is None else int(remat_every)
  num_runs, num_steps, _ = batch_ids.shape
  run_sharding, replicated = runs_lib.runs_shardings(num_runs, mesh)
  structure, hyperparameters = runs_lib.checked_split_settings(who, config, num_steps)
  compiled = _metagradients_fn(loss_fn, structure, remat_every, cotangents_at_once,
                               int(seed), run_sharding)
  grads, losses = compiled(sharding_lib.put(sharding_lib.to_host(params0), replicated),
                           sharding_lib.put(batch_ids, run_sharding),
                           sharding_lib.put(weights, run_sharding),
                           sharding_lib.put(train_arrays, replicated),
                           sharding_lib.put(test_arrays, replicated), hyperparameters)
  grads = sharding_lib.to_host(grads).astype(np.float32)
  losses = sharding_lib.to_host(losses).astype(np.float32)
  _check_metagradients(who, grads, losses, single)
  if single:
    grads, losses = grads[0], losses[0]
  return (grads, losses) if return_final_losses else grads


# `derivative_growth` above which the main job and its report flag a run as
# amplifying perturbations. Measured on the default workload's removal reference
# runs (docs/experiments.md): ≤ 1.17 where the removal LDS was ≥ 0.93, 1.36 at 0.84,
# and ≥ 1.73 where it was ≤ 0.76.
GROWTH_WARNING = 1.5


def growth_warning(growth: Optional[float], where: str = "") -> Optional[str]:
  """The sentence the main job logs and its report shows for a removal reference
  run (`where`, e.g. " (seed 0)") whose `derivative_growth` exceeds
  `GROWTH_WARNING`; None otherwise (also for None or NaN)."""
  if growth is None or not growth > GROWTH_WARNING:
    return None
  return (f"The removal benchmark's reference run{where} amplifies perturbations of "
          f"its first steps {growth:.1f}× (`training.derivative_growth`; > "
          f"{GROWTH_WARNING:g}: some curvature exceeds 2/η): first-order removal "
          "predictions (metagradient, TracIn) are unreliable around it.")


def derivative_growth(metagradients_table: Any, learning_rates: Any) -> float:
  """How much one run amplifies a perturbation of its early steps.

  s_t = Σ_{b,m} |∂L_T[m]/∂w_{t,b}| / η_t is the effect on the final test losses of
  step t's weights per unit step size. Around a stable run s_t stays level or rises
  towards the end (recency); where some curvature λ of the batch loss exceeds 2/η
  (SGD's edge of stability) a perturbation grows at every step, so s_t falls from the
  first steps to the last. The ratio of the mean s_t over the first quarter of the
  steps to that over the last quarter measures it: on the default workload's removal
  reference runs, 0.9 and 1.2 (removal LDS 0.96) against 8.5 (LDS 0.47), and 3.8–35
  in the rough regime (LDS 0.18–0.48). Well above 1, first-order predictions of
  finite changes to that run (removals, other curricula) are unreliable: the
  linearisation grows where the real run saturates.

  Args:
    metagradients_table: float[T, B, M], `metagradients` of one run.
    learning_rates: float[T], the run's schedule value per step
      (`Trace.learning_rates[r]`); steps with η_t = 0 are left out.

  Returns:
    The ratio (NaN when fewer than 2 steps have η_t > 0 or the last quarter's
    derivatives are all 0).

  Raises:
    ValueError: shapes that do not match, a non-finite table, or learning rates
      that are not finite and >= 0.
  """
  table = np.asarray(metagradients_table, np.float64)
  rates = np.asarray(learning_rates, np.float64)
  if table.ndim != 3 or rates.shape != table.shape[:1]:
    raise ValueError(f"derivative_growth: expected metagradients_table float[T, B, M] "
                     f"and learning_rates float[T], got shapes {list(table.shape)} and "
                     f"{list(rates.shape)}.")
  bad = _checks.first_nonfinite(table)
  if bad is not None:
    raise ValueError(f"derivative_growth: metagradients_table must be finite, got "
                     f"{table[bad]} at {list(bad)}.")
  if not np.all(np.isfinite(rates)) or np.any(rates < 0):
    raise ValueError(f"derivative_growth: learning_rates must be finite and >= 0 "
                     f"(0: a step that does not train), got {rates.tolist()}.")
  keep = rates > 0
  per_step = np.abs(table[keep]).sum(axis=(1, 2)) / rates[keep]
  if per_step.size < 2:
    return float("nan")
  quarter = max(1, per_step.size // 4)
  late = per_step[-quarter:].mean()
  return float(per_step[:quarter].mean() / late) if late > 0 else float("nan")


def _float_leaves(tree):
  """(float leaves as a list, rebuild(float_leaves, other_leaves), other leaves)."""
  leaves, treedef = jax.tree_util.tree_flatten(tree)
  is_float = [jnp.issubdtype(jnp.result_type(x), jnp.inexact) for x in leaves]
  floats = [x for x, f in zip(leaves, is_float) if f]
  others = [x for x, f in zip(leaves, is_float) if not f]

  def rebuild(new_floats, new_others):
    floats_iter, others_iter = iter(new_floats), iter(new_others)
    return jax.tree_util.tree_unflatten(
        treedef, [next(floats_iter) if f else next(others_iter) for f in is_float])

  return floats, rebuild, others


class SingularExpansionError(ValueError):
  """`first_order_losses`: Adam's update has slope 1/eps along a curriculum
  (`_adam_singular`), where no first-order prediction holds."""


def _adam_singular(state, updates_dot) -> jax.Array:
  """bool[]: whether an Adam update moves, to first order, a parameter element whose
  second moment ν is exactly 0 (its gradient has been 0 at every step so far).

  There Adam's update m̂ / (√ν̂ + eps) has slope 1/eps in the gradient (1e8 by
  default): exact, but linear only for perturbations below ~eps, so a first-order
  prediction through it is off by orders of magnitude (review h20: −5.4e6 times the
  retrained change). A reference that never trains on what a curriculum trains on
  (a partial reference, e.g. an embedding row of a token only unsampled examples
  hold) gets there; a full-batch reference does not.
  """
  flags = []
  nodes = jax.tree_util.tree_leaves(
      state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
  updates = jax.tree_util.tree_leaves(updates_dot)
  for node in nodes:
    if not isinstance(node, optax.ScaleByAdamState):
      continue
    nu = jax.tree_util.tree_leaves(node.nu)
    if len(nu) != len(updates):
      continue
    flags += [jnp.any((n == 0) & (u != 0)) for n, u in zip(nu, updates)
              if jnp.shape(n) == jnp.shape(u)]
  return jnp.any(jnp.stack(flags)) if flags else jnp.zeros((), bool)


@functools.lru_cache(maxsize=16)
def _first_order_fn(loss_fn, structure, seed, chunk_sharding, replicated):
  """The jitted first-order predictions of one chunk of curricula (cached; the
  optimizer's numbers are an argument, `optim.split_settings`)."""
  stochastic = step_lib.takes_rng(loss_fn)
  rng_key = step_lib.dropout_key(seed)

  def chunk_fn(params, ref_ids, ref_weights, ids, tangent_coefficients, train, test,
               hyperparameters):
    optimizer, _ = optim.joined_optimizer(structure, hyperparameters)
    chunk_size = ids.shape[0]
    num_steps, num_ref_slots = ref_ids.shape
    opt_state = optimizer.init(params)
    state_floats, rebuild_state, state_others = _float_leaves(opt_state)
    test_loss = lambda p: loss_fn(p, test)
    zeros = lambda tree: jax.tree_util.tree_map(
        lambda x: jnp.zeros((chunk_size,) + jnp.shape(x), jnp.result_type(x)), tree)

    def body(carry, xs):
      params_t, floats_t, others_t, params_dot, floats_dot = carry
      t, ref_ids_t, ref_weights_t, ids_t, coefficients_t = xs
      ref_batch, _ = step_lib.gather_batch(train, ref_ids_t)
      ref_coefficients, ref_valid = step_lib.slot_coefficients(ref_ids_t,
                                                               ref_weights_t)
      ref_keys = (step_lib.slot_keys(rng_key, 0, t, num_ref_slots) if stochastic
                  else None)

      def ref_grad(p):  # the reference step's gradient, as `train_runs` computes it
        return jax.grad(lambda q: jnp.sum(step_lib.example_losses(
            loss_fn, q, ref_batch, ref_keys) * ref_coefficients) / ref_valid)(p)

      def per_curriculum(params_dot_c, floats_dot_c, ids_c, coefficients_c):
        grads, hvp = jax.jvp(ref_grad, (params_t,), (params_dot_c,))
        batch_c, _ = step_lib.gather_batch(train, ids_c)
        # The keys `train_runs` gives this curriculum trained as run 0 (slots from
        # 0): a curriculum equal to the reference then predicts the reference.
        keys_c = (step_lib.slot_keys(rng_key, 0, t, ids_c.shape[0])
                  if stochastic else None)
        own_grads = jax.grad(lambda q: jnp.sum(step_lib.example_losses(
            loss_fn, q, batch_c, keys_c) * coefficients_c))(params_t)
        # d(step gradient) = H·θ̇ − (reference's gradient) + (curriculum's gradient).
        grads_dot = jax.tree_util.tree_map(lambda h, g, o: h - g + o, hvp, grads,
                                           own_grads)

        def optimizer_update(g, floats, p):
          updates, new_state = optimizer.update(g, rebuild_state(floats, others_t), p)
          new_floats, _, new_others = _float_leaves(new_state)
          return (updates, new_floats), new_others

        (updates, new_floats), (updates_dot, new_floats_dot), new_others = jax.jvp(
            optimizer_update, (grads, floats_t, params_t),
            (grads_dot, floats_dot_c, params_dot_c), has_aux=True)
        new_params = optax.apply_updates(params_t, updates)
        new_params_dot = jax.tree_util.tree_map(jnp.add, params_dot_c, updates_dot)
        losses, losses_dot = jax.jvp(test_loss, (new_params,), (new_params_dot,))
        singular = _adam_singular(rebuild_state(new_floats, new_others), updates_dot)
        return ((new_params, new_floats, new_others, losses),
                (new_params_dot, new_floats_dot, losses_dot, singular))

      primal, tangent = jax.vmap(per_curriculum, out_axes=(None, 0))(
          params_dot, floats_dot, ids_t, coefficients_t)
      new_params, new_floats, new_others, losses = primal
      new_params_dot, new_floats_dot, losses_dot, singular = tangent
      return ((new_params, new_floats, new_others, new_params_dot, new_floats_dot),
              (losses, losses_dot, singular))

    carry = (params, state_floats, state_others, zeros(params), zeros(state_floats))
    xs = (jnp.arange(num_steps, dtype=jnp.int32), ref_ids, ref_weights,
          jnp.swapaxes(ids, 0, 1), jnp.swapaxes(tangent_coefficients, 0, 1))
    _, (losses, losses_dot, singular) = jax.lax.scan(body, carry, xs)
    initial = test_loss(params)
    reference = jnp.concatenate([initial[None], losses])  # [T+1, M]
    predicted = jnp.concatenate(
        [jnp.broadcast_to(initial, (chunk_size, 1) + initial.shape),
         reference[None, 1:] + jnp.swapaxes(losses_dot, 0, 1)], axis=1)
    return predicted, reference, jnp.swapaxes(singular, 0, 1)

  return jax.jit(chunk_fn, out_shardings=(chunk_sharding, replicated,
                                          chunk_sharding))


def first_order_losses(params0: Any, reference_batch_ids: Any, curricula: Any, *,
                       loss_fn: step_lib.LossFn, config: Any,
                       train_arrays: Dict[str, Any], test_arrays: Dict[str, Any],
                       reference_weights: Any = None, curricula_weights: Any = None,
                       chunk_size: int = 8, seed: int = 0,
                       mesh: Optional[jax.sharding.Mesh] = None) -> FirstOrderLosses:
  """First-order Taylor expansion of the test-loss trajectory around a reference run.

  With L(e) the test losses after every step of a run trained on effective
  per-example weights e (module docstring), the prediction for curriculum c is

      L(e_ref) + J_ref · (e_c − e_ref),     J_ref = ∂L/∂e at the reference run,

  computed by `jax.jvp` through the scanned run (vmapped over `chunk_size` curricula
  at a time). Each step works on the combined slot set "reference slots + the
  curriculum's own slots": primal coefficients (the reference's, 0 on the
  curriculum's slots) and tangent (−the reference's on its slots, the curriculum's on
  its own). The primal is then the reference run for every curriculum, computed once
  per chunk and shared (not vmapped), and a step costs a Hessian-vector product on
  the S reference slots plus a gradient on the B curriculum slots per curriculum:
  O(S + B) examples, never O(N). The reference losses are exact, the predictions
  exact to first order in e_c − e_ref (no retraining).

  Typical uses:
  * a full-batch reference (`reference_batch_ids[t] = arange(N)`, every example
    weight 1/N) predicting arbitrary curricula with no fitted runs;
  * MAGIC's removal: the reference is one run, `curricula` its batch ids tiled and
    `curricula_weights` 1 with the removed occurrences set to 0.

  Args:
    params0: base variables `{"params": ...}`.
    reference_batch_ids: int32[T, S] (-1 = padding).
    curricula: int32[R', T, B] (-1 = padding), or int32[T, B] for one.
    loss_fn: per-example loss (`step.make_loss_fn`); a stochastic one holds the
      randomness fixed at the keys `train_runs(seed=seed)` gives run 0: the
      reference's slots and each curriculum's slots are keyed from slot 0, so a
      curriculum equal to the reference predicts exactly the reference (with keys
      S, S+1, ... for the curriculum's slots, as before 2026-12-06, it did not).
    config: optimizer config (`optim.make_optimizer`); SGD, momentum or Adam.
    train_arrays: dict of arrays, row i = train example i.
    test_arrays: dict of arrays of the M test examples.
    reference_weights: float32[T, S] occurrence weights of the reference (None = 1).
    curricula_weights: float32 like `curricula` (None = 1).
    chunk_size: curricula per vmapped jvp (memory: chunk_size tangents of params
      and optimizer state, and of one step's activations).
    seed: seed of a stochastic loss's keys.
    mesh: a chunk's curricula are split over the mesh's `runs` axis when it
      divides `chunk_size` (default: all devices).

  Returns:
    `FirstOrderLosses(losses float32[R', T+1, M] (float32[T+1, M] for 2-D
    curricula), reference_losses float32[T+1, M])`.

  Raises:
    ValueError: bad shapes, ids or weights, different step counts, arrays whose
      leading sizes differ, labels / targets out of range (`runs.check_arrays`),
      or a learning rate that is not a finite positive number.
    SingularExpansionError (a ValueError): with Adam, a curriculum trains on
      parameters the reference never moved (second moment exactly 0), where the
      expansion's slope is 1/eps (`_adam_singular`); a full-batch reference never
      does.
    FloatingPointError: a non-finite reference or predicted test loss (checked on
      each chunk's host copy; names curriculum, step and test example).
  """
  who = "first_order_losses"
  runs_lib.check_float32_params(who, params0)
  num_train, _ = runs_lib.check_arrays(who, loss_fn, params0, train_arrays,
                                       test_arrays)
  reference_ids, reference_weights, curricula, curricula_weights, single = (
      _reference_and_curricula(reference_batch_ids, reference_weights, curricula,
                               curricula_weights, num_train, who))
  num_steps, num_curricula = reference_ids.shape[0], curricula.shape[0]
  if not _checks.is_int(chunk_size) or chunk_size <= 0:
    raise ValueError(f"{who}: chunk_size must be a positive integer, got "
                     f"{chunk_size!r}.")
  chunk_size = min(int(chunk_size), num_curricula)

  chunk_sharding, replicated = runs_lib.runs_shardings(chunk_size, mesh)
  # Tangent coefficients of the curriculum's own slots: w·valid / num_valid.
  coefficients, num_valid = jax.vmap(jax.vmap(step_lib.slot_coefficients))(
      jnp.asarray(curricula), jnp.asarray(curricula_weights))
  curriculum_coefficients = np.asarray(coefficients / num_valid[..., None])
  structure, hyperparameters = runs_lib.checked_split_settings(who, config, num_steps)
  compiled = _first_order_fn(loss_fn, structure, int(seed), chunk_sharding, replicated)
  put = functools.partial(sharding_lib.put, sharding=replicated)
  args = (put(sharding_lib.to_host(params0)), put(reference_ids),
          put(reference_weights))
  data = (put(train_arrays), put(test_arrays), hyperparameters)
  predictions, reference = [], None
  for start in range(0, num_curricula, chunk_size):
    # The last chunk is padded with copies of its last curriculum (static shapes).
    index = np.minimum(np.arange(start, start + chunk_size), num_curricula - 1)
    predicted, reference, singular = compiled(
        *args, sharding_lib.put(curricula[index], chunk_sharding),
        sharding_lib.put(curriculum_coefficients[index], chunk_sharding), *data)
    predicted = sharding_lib.to_host(predicted)[:num_curricula - start]
    singular = sharding_lib.to_host(singular)[:num_curricula - start]
    if np.any(singular):
      r, t = (int(i[0]) for i in np.nonzero(singular))
      raise SingularExpansionError(
          f"{who}: curriculum {start + r} trains at step {t} on parameters whose Adam "
          "second moment is exactly 0 in the reference run (their gradient there has "
          "been 0 at every step so far, e.g. embedding rows of tokens only examples "
          "outside the reference hold); Adam's slope there is 1/eps, so a "
          "first-order prediction is meaningless. Use a reference that holds the "
          "curricula's examples (the full batch), or SGD / momentum.")
    if start == 0:
      bad = _checks.first_nonfinite(sharding_lib.to_host(reference))
      if bad is not None:
        raise FloatingPointError(
            f"{who}: non-finite reference test loss (step {bad[0]}, test example "
            f"{bad[1]}); the reference run diverged or an input (learning rate, "
            "params0, train/test arrays) is not finite.")
    bad = _checks.first_nonfinite(predicted)
    if bad is not None:
      r, t, m = bad
      raise FloatingPointError(
          f"{who}: non-finite predicted test loss (curriculum {start + r}, step {t}, "
          f"test example {m}); the tangents overflowed (huge curricula_weights, or a "
          "reference run that amplifies perturbations: try a smaller learning "
          "rate).")
    predictions.append(predicted)
  losses = np.concatenate(predictions).astype(np.float32)
  reference = sharding_lib.to_host(reference).astype(np.float32)
  return FirstOrderLosses(losses=losses[0] if single else losses,
                          reference_losses=reference)


class FirstOrderFinalLosses(NamedTuple):
  """What `first_order_final_losses` returns.

  Attributes:
    losses: float32[R', M], the first-order prediction of each curriculum's final
      test losses (float32[M] for 2-D curricula).
    reference_losses: float32[M], the reference run's final test losses (exact).
    route: "jvp" (forward mode per curriculum) or "table" (one reverse-mode table).
  """

  losses: np.ndarray
  reference_losses: np.ndarray
  route: str


# What one test example's row of the reverse-mode table costs, in jvps of one
# curriculum (both routes step through the same reference run, so the ratio does not
# depend on its width S). Measured on the default workload (S = N = 200, T = 32,
# M = 32, 8 test examples a reverse pass): table 297 s, jvp 5.08 s per curriculum
# (`experiments/metagradient_table.py`, docs/experiments.md); one test example a
# pass costs 1.45× more (the removal metagradients' measurement).
TABLE_JVPS_PER_TEST_EXAMPLE = 1.8


def choose_route(num_curricula: int, num_test: int) -> str:
  """"table" when one reverse-mode table (M rows) costs less than R' jvps."""
  return ("table" if num_curricula > TABLE_JVPS_PER_TEST_EXAMPLE * num_test
          else "jvp")


def _slots_of(ref_ids: np.ndarray, num_train: int) -> np.ndarray:
  """int64[T, N]: the slot of example i in reference step t, −1 if absent."""
  slot_of = np.full((ref_ids.shape[0], num_train), -1, np.int64)
  t_index, s_index = np.nonzero(ref_ids >= 0)
  slot_of[t_index, ref_ids[t_index, s_index]] = s_index
  return slot_of


def _table_coverage(slot_of, ids, weights, who):
  """(slots int64[R', T, B], coefficients float64[R', T, B]) of curricula read
  from a table; ValueError naming the first occurrence (weight ≠ 0) of an example
  its step's reference slots do not hold (its derivative is not in the table)."""
  steps = np.arange(slot_of.shape[0])[None, :, None]
  valid = ids >= 0
  slots = slot_of[steps, np.maximum(ids, 0)]
  coefficients = weights * valid / np.maximum(valid.sum(2, keepdims=True), 1)
  missing = valid & (slots < 0) & (coefficients != 0)
  if missing.any():
    r, t, b = (int(x) for x in np.argwhere(missing)[0])
    raise ValueError(f"{who}: curricula[{r}, {t}, {b}] = example {ids[r, t, b]}, "
                     f"which the reference's step {t} does not hold: its derivative "
                     f"is not in the table (use first_order_losses).")
  return slots, coefficients


def _table_terms(table, ref_ids, ref_w, reference_final, num_train, who):
  """What a first-order prediction from a reverse-mode table needs.

  Returns (slot_of int64[T, N]: the slot of example i in reference step t, −1 if
  absent; derivative float64[T, S, M] = num_valid_t·G[t, s], the derivative with
  respect to the effective weight of the example in slot s; baseline float64[M] =
  L_T(ref) − Σ_{t,s} w_s·G[t, s], the prediction's curriculum-independent part).
  """
  table = np.asarray(table, np.float64)
  num_steps, num_slots = ref_ids.shape
  if table.shape[:2] != (num_steps, num_slots) or table.ndim != 3:
    raise ValueError(f"{who}: table must be float[T={num_steps}, S={num_slots}, M], "
                     f"got {list(table.shape)}.")
  reference_final = np.asarray(reference_final, np.float64)
  if reference_final.shape != table.shape[2:]:
    raise ValueError(f"{who}: reference_final must be float[M={table.shape[2]}], got "
                     f"{list(reference_final.shape)}.")
  for name, values in (("table", table), ("reference_final", reference_final)):
    bad = _checks.first_nonfinite(values)
    if bad is not None:
      raise ValueError(f"{who}: {name} must be finite, got {values[bad]} at "
                       f"{name}{list(bad)}.")
  ref_valid = ref_ids >= 0
  num_valid = np.maximum(ref_valid.sum(1), 1).astype(np.float64)  # [T]
  slot_of = _slots_of(ref_ids, num_train)
  derivative = table * num_valid[:, None, None]
  baseline = reference_final - np.einsum("ts,tsm->m", ref_w * ref_valid, table)
  return slot_of, derivative, baseline


def _check_num_train(num_train_examples: Any, who: str) -> None:
  """N must be a positive integer (review h38: "12" was a numpy traceback, 12.5
  was taken as 12)."""
  if not _checks.is_int(num_train_examples) or num_train_examples < 1:
    raise ValueError(f"{who}: num_train_examples must be a positive integer (N), "
                     f"got {num_train_examples!r}.")


def table_simulator(table: Any, reference_batch_ids: Any, reference_final: Any,
                    initial_losses: Any, *, num_train_examples: int, batch_size: int,
                    reference_weights: Any = None, test_columns: Any = None,
                    num_test_examples: Optional[int] = None,
                    name: str = "metagradient_table"):
  """A reference run's metagradient table as a final-only `simulators.Simulator`.

  `predict_from_table` of a curriculum of T full batches of B examples is additive
  in its occurrences, with one effect per step:

      L_T(c) = L_0 + Σ_t Σ_{i∈c_t} β[t, i],
      β[t, i] = num_valid_t·G[t, s(i)] / B + (baseline − L_0) / (T·B),

  an additive simulator with one phase per step (`phase_B` = β), so
  `simulators.search_curriculum` searches curricula on it (order swaps included:
  where an example sits matters) and `Simulator.simulate` gives their final losses.
  It is final-only: the rollout's intermediate steps are not predictions (NaN), and
  it refuses padded, weighted or shorter curricula and other initial losses.

  Args:
    table: float[T, S, M'] `metagradients` of the reference run (M' test examples).
    reference_batch_ids: int[T, S]; every train example must be in every step (a
      full-batch reference), since β needs each example's derivative at each step.
    reference_final: float[M'] the reference run's final test losses.
    initial_losses: float[M'] the test losses before the first step (the base
      model's; every curriculum starts there).
    num_train_examples: N.
    batch_size: B of the curricula the simulator predicts.
    reference_weights: float[T, S] (None = ones), the weights G was taken at.
    test_columns: None (the table's M' test examples are the simulator's M), or
      int[M'] the columns of a simulator over `num_test_examples` test examples that
      the table holds; the other columns are NaN (no prediction), and a search with
      targets among them is refused.
    num_test_examples: M, with `test_columns`.
    name: label for reports.

  Returns:
    `Simulator(kind="additive", final_only=True)` over N train examples, with
    batch_size B, num_steps T and `fit_info["initial_losses"]` (M floats, None off
    the table's columns).

  Raises:
    ValueError: shapes disagree, a non-finite table / reference_final /
      initial_losses, an example is missing from a reference step, or bad columns.
  """
  from simfluence_jax.simulators import _simulator  # pylint: disable=g-import-not-at-top
  who = "table_simulator"
  _check_num_train(num_train_examples, who)
  num_train = int(num_train_examples)
  ref_ids, ref_w = _one_reference(reference_batch_ids, reference_weights, num_train,
                                  who)
  slot_of, derivative, baseline = _table_terms(table, ref_ids, ref_w, reference_final,
                                               num_train, who)
  missing = np.argwhere(slot_of < 0)
  if missing.size:
    t, i = (int(x) for x in missing[0])
    raise ValueError(f"{who}: the reference's step {t} does not hold example {i} "
                     "(and maybe others); the simulator needs every example at every "
                     "step (a full-batch reference).")
  num_steps, num_cols = derivative.shape[0], derivative.shape[2]
  initial = np.asarray(initial_losses, np.float64)
  if initial.shape != (num_cols,) or not np.all(np.isfinite(initial)):
    raise ValueError(f"{who}: initial_losses must be finite float[M={num_cols}], got "
                     f"shape {list(initial.shape)}.")
  if not _checks.is_int(batch_size) or batch_size < 1:
    raise ValueError(f"{who}: batch_size must be a positive integer, got "
                     f"{batch_size!r}.")
  effects = derivative[np.arange(num_steps)[:, None], slot_of]  # [T, N, M']
  beta = effects / batch_size + (baseline - initial) / (num_steps * batch_size)
  if test_columns is not None:
    columns = np.asarray(test_columns)
    if (num_test_examples is None or columns.shape != (num_cols,) or
        not np.issubdtype(columns.dtype, np.integer) or
        len(np.unique(columns)) != num_cols or columns.min() < 0 or
        columns.max() >= num_test_examples):
      raise ValueError(f"{who}: test_columns must be {num_cols} distinct ids in "
                       f"[0, num_test_examples={num_test_examples}).")
    full = np.full(beta.shape[:2] + (num_test_examples,), np.nan)
    full[..., columns], beta = beta, full
    full = np.full(num_test_examples, np.nan)
    full[columns], initial = initial, full
  beta = beta.astype(np.float32)
  return _simulator.Simulator(
      A=None, B=jnp.asarray(beta.mean(0)), kind="additive", name=name,
      fit_info_items=_simulator.fit_info_items(
          {"source": "metagradient table",
           "initial_losses": [None if np.isnan(v) else float(v) for v in initial]}),
      batch_size=int(batch_size), num_steps=num_steps, phase_B=jnp.asarray(beta),
      phase_starts=tuple(range(num_steps)), final_only=True).check_shapes()


def predict_from_table(table: Any, reference_batch_ids: Any, reference_final: Any,
                       curricula: Any, *, num_train_examples: int,
                       reference_weights: Any = None, curricula_weights: Any = None,
                       chunk: int = 1024) -> np.ndarray:
  """First-order final losses of curricula from a reference run's metagradients.

  With G[t, s, m] = ∂L_T[m]/∂w_{t,s} of the reference run (`metagradients` on its
  int32[T, S] batches), the derivative with respect to example i's effective weight
  in step t is num_valid_t·G[t, s, m] for any valid slot s holding i (the same for
  every such slot), so a curriculum c is predicted as

      L_T(c) ≈ L_T(ref) + Σ_t [Σ_b (w_b/num_valid^c_t)·num_valid_t·G[t, s(id_b)]
                              − Σ_s w_s·G[t, s]].

  Exact to first order, equal to `first_order_losses`' last step for a
  deterministic loss. Every example a curriculum uses with a nonzero weight in step t
  must be in the reference's step t (true of a full-batch reference).

  Args:
    table: float[T, S, M] metagradients of the reference run.
    reference_batch_ids: int[T, S] (-1 = padding).
    reference_final: float[M], the reference run's final test losses.
    curricula: int[R', T, B] (-1 = padding).
    num_train_examples: N.
    reference_weights: float[T, S] (None = ones), the weights G was taken at.
    curricula_weights: float like `curricula` (None = ones).
    chunk: curricula gathered at a time (memory chunk·T·B·M floats).

  Returns:
    float32[R', M].

  Raises:
    ValueError: shapes disagree, a non-finite table or reference_final, or a
      curriculum uses an example its step's reference slots do not hold (named:
      curriculum, step, id).
  """
  who = "predict_from_table"
  _check_num_train(num_train_examples, who)
  if not _checks.is_int(chunk) or chunk < 1:
    raise ValueError(f"{who}: chunk must be a positive integer, got {chunk!r}.")
  ref_ids, ref_w, ids, weights, _ = _reference_and_curricula(
      reference_batch_ids, reference_weights, curricula, curricula_weights,
      num_train_examples, who)
  slot_of, derivative, baseline = _table_terms(table, ref_ids, ref_w, reference_final,
                                               num_train_examples, who)
  num_steps = ref_ids.shape[0]
  slots, coefficients = _table_coverage(slot_of, ids, weights, who)
  out = np.empty((ids.shape[0], table.shape[2]), np.float64)
  steps = np.arange(num_steps)[None, :, None]
  for start in range(0, ids.shape[0], chunk):
    part = slice(start, start + chunk)
    gathered = derivative[steps, np.maximum(slots[part], 0)]  # [r, T, B, M]
    out[part] = baseline + np.einsum("rtb,rtbm->rm", coefficients[part], gathered)
  return out.astype(np.float32)


def first_order_final_losses(params0: Any, reference_batch_ids: Any, curricula: Any,
                             *, loss_fn: step_lib.LossFn, config: Any,
                             train_arrays: Dict[str, Any], test_arrays: Dict[str, Any],
                             reference_weights: Any = None,
                             curricula_weights: Any = None, route: str = "auto",
                             chunk_size: int = 8, cotangents_at_once: int = 8,
                             seed: int = 0, mesh: Optional[jax.sharding.Mesh] = None
                             ) -> FirstOrderFinalLosses:
  """The final test losses of `first_order_losses`, by the cheaper of two routes.

  * "jvp": `first_order_losses` (one forward-mode pass per curriculum, `chunk_size`
    at a time), its last step;
  * "table": the reference run's `metagradients` (⌈M/cotangents_at_once⌉ reverse
    passes, once; their primal output is its final losses), then every curriculum is a
    gather-sum (`predict_from_table`): thousands of curricula (a curriculum search)
    for the price of the table;
  * "auto": the one `choose_route` expects to cost less; "jvp" for a stochastic
    loss, whose per-slot keys the table cannot give a curriculum's own slots.

  Both give the same first-order prediction (tested). Arguments as in
  `first_order_losses`; `cotangents_at_once` as in `metagradients`.

  Raises:
    ValueError: bad arguments, route "table" with a stochastic loss, or (table) a
      curriculum using an example its step's reference slots do not hold.
    FloatingPointError: a non-finite prediction, reference loss or metagradient.
  """
  who = "first_order_final_losses"
  if route not in ("auto", "jvp", "table"):
    raise ValueError(f"{who}: route must be 'auto', 'jvp' or 'table', got {route!r}.")
  stochastic = step_lib.takes_rng(loss_fn)
  if route == "table" and stochastic:
    raise ValueError(f"{who}: route='table' needs a deterministic loss (a stochastic "
                     f"one draws per-slot keys a curriculum's own slots would not "
                     f"share); use route='jvp'.")
  runs_lib.check_float32_params(who, params0)
  num_train, num_test = runs_lib.check_arrays(who, loss_fn, params0, train_arrays,
                                               test_arrays)
  ref_ids, ref_w, ids, weights, single = _reference_and_curricula(
      reference_batch_ids, reference_weights, curricula, curricula_weights, num_train,
      who)
  runs_lib.checked_split_settings(who, config, ref_ids.shape[0])  # named `who`
  if route == "auto":
    route = "jvp" if stochastic else choose_route(ids.shape[0], num_test)
  common = dict(loss_fn=loss_fn, config=config, train_arrays=train_arrays,
                test_arrays=test_arrays, seed=seed, mesh=mesh)
  if route == "jvp":
    result = first_order_losses(params0, ref_ids, ids, reference_weights=ref_w,
                                curricula_weights=weights, chunk_size=chunk_size,
                                **common)
    losses, reference = result.losses[:, -1], result.reference_losses[-1]
  else:
    # Before the table is computed, and named as the caller's.
    _table_coverage(_slots_of(ref_ids, num_train), ids, weights, who)
    table, reference = metagradients(params0, ref_ids, weights=ref_w,
                                     cotangents_at_once=cotangents_at_once,
                                     return_final_losses=True, **common)
    losses = predict_from_table(table, ref_ids, reference, ids,
                                num_train_examples=num_train,
                                reference_weights=ref_w,
                                curricula_weights=weights)
  return FirstOrderFinalLosses(losses=losses[0] if single else losses,
                               reference_losses=reference, route=route)
