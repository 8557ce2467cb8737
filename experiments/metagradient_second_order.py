r"""Second-order metagradient predictions around the full-batch reference.

  python experiments/metagradient_second_order.py WORKDIR SEED [CHUNK]

Along the straight path e(ε) = e_ref + ε (e_c − e_ref) from the reference run's
per-slot coefficients to curriculum c's, the test-loss trajectory L(ε) is expanded to
second order, L(1) ≈ L(0) + L'(0) + ½ L''(0), with L' and L'' by forward-over-forward
mode (`jax.jvp` of a `jax.jvp`) through the scanned run on the combined slot set
(the reference's slots, then the curriculum's: the same parametrisation as
`training.first_order_losses`, whose first-order prediction L(0) + L'(0) this script
reproduces as a check). Prints, for the held-out curricula: the time, and the
spearman_across_runs and all_steps_mse / curriculum_blind's of the first-order,
second-order, [1/1] Padé and hybrid (mean with the job's Simfluence-Linear)
predictions; saves the terms to WORKDIR/second_order_terms.npz.
"""

import functools
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import _workdir
from simfluence_jax import evaluation
from simfluence_jax import training
from simfluence_jax.pipeline import stages
from simfluence_jax.training import optim
from simfluence_jax.training import step as step_lib


def make_path(params, loss_fn, config, reference_ids, train, test):
  """path(eps, ids_c, coefficients_c) -> float32[T+1, M]: the test losses of the run
  trained on (1 − eps)·(the full-batch reference's coefficients) + eps·(curriculum
  c's), with the reference's slots first (`first_order_losses`' parametrisation)."""
  num_steps, num_ref = reference_ids.shape
  optimizer, _ = optim.make_optimizer(optim.optimizer_settings(config, num_steps))
  ref_coefficients = jnp.full((num_steps, num_ref), 1.0 / num_ref, jnp.float32)

  def run_losses(eps, ids_c, coefficients_c):
    def body(carry, xs):
      params_t, state_t = carry
      ref_t, ids_t, ref_coef_t, coef_t = xs
      batch, _ = step_lib.gather_batch(train, jnp.concatenate([ref_t, ids_t]))
      coefficients = jnp.concatenate([(1.0 - eps) * ref_coef_t, eps * coef_t])
      grads = jax.grad(lambda q: jnp.sum(step_lib.example_losses(loss_fn, q, batch)
                                         * coefficients))(params_t)
      updates, state_t = optimizer.update(grads, state_t, params_t)
      params_t = optax.apply_updates(params_t, updates)
      return (params_t, state_t), loss_fn(params_t, test)

    _, losses = jax.lax.scan(body, (params, optimizer.init(params)),
                             (reference_ids, ids_c, ref_coefficients, coefficients_c))
    return jnp.concatenate([loss_fn(params, test)[None], losses])

  return run_losses


def taylor_terms(params, loss_fn, config, reference_ids, curricula, train, test,
                 chunk_size):
  """(L(0) float32[T+1, M], L'(0) and L''(0) float32[R', T+1, M])."""
  run_losses = make_path(params, loss_fn, config, reference_ids, train, test)

  def terms(ids_c, coefficients_c):
    path = functools.partial(run_losses, ids_c=ids_c, coefficients_c=coefficients_c)
    first = lambda eps: jax.jvp(path, (eps,), (jnp.float32(1.0),))
    (value, d1), (_, d2) = jax.jvp(first, (jnp.float32(0.0),), (jnp.float32(1.0),))
    return value, d1, d2

  compiled = jax.jit(jax.vmap(terms))
  values, firsts, seconds = [], [], []
  for start in range(0, len(curricula), chunk_size):
    index = np.minimum(np.arange(start, start + chunk_size), len(curricula) - 1)
    ids = jnp.asarray(curricula[index])
    coefficients = jnp.full(ids.shape, 1.0 / ids.shape[-1], jnp.float32)
    value, d1, d2 = compiled(ids, coefficients)
    keep = len(curricula) - start
    values.append(np.asarray(value)[:keep])
    firsts.append(np.asarray(d1)[:keep])
    seconds.append(np.asarray(d2)[:keep])
  return values[0][0], np.concatenate(firsts), np.concatenate(seconds)


def main(workdir, seed, chunk_size="8"):
  config, dataset, model, held, _, blind = _workdir.held_out(workdir, int(seed),
                                                             no_padding=True)
  reference_ids = stages._reference_batch_ids(config)  # pylint: disable=protected-access
  start = time.perf_counter()
  value, d1, d2 = taylor_terms(model.params, model.loss_fn, config,
                               jnp.asarray(reference_ids), held.batch_ids,
                               dataset.train, dataset.test, int(chunk_size))
  seconds = time.perf_counter() - start
  check = training.first_order_losses(
      model.params, reference_ids, held.batch_ids, loss_fn=model.loss_fn,
      config=config, train_arrays=dataset.train, test_arrays=dataset.test,
      chunk_size=8, seed=config.seed).losses
  np.savez(os.path.join(workdir, "second_order_terms.npz"), value=value, d1=d1, d2=d2)
  first, second = value + d1, value + d1 + 0.5 * d2
  # [1/1] Padé approximant of the same series, L0 + d1 / (1 − d2 / (2 d1)), where
  # the ratio is a contraction (|d2 / (2 d1)| < 1); first order elsewhere.
  ratio = np.divide(0.5 * d2, d1, out=np.zeros_like(d1), where=np.abs(d1) > 1e-8)
  pade = np.where(np.abs(ratio) < 1.0, value + d1 / (1.0 - ratio), first)
  linear = np.load(os.path.join(workdir, "evaluation", "pred_simfluence_linear.npy"))
  print(f"seed {seed}: {seconds:.1f}s for {held.num_runs} curricula; first order vs "
        f"first_order_losses max |diff| {np.abs(first - check).max():.2e}; "
        f"|d2|/|d1| at T {np.abs(d2[:, -1]).mean() / np.abs(d1[:, -1]).mean():.3f}")
  for name, pred in (("first", first), ("second", second), ("pade", pade),
                     ("hybrid first", 0.5 * (first + linear)),
                     ("hybrid second", 0.5 * (second + linear))):
    print(f"  {name:<14} rho {evaluation.spearman_across_runs(pred, held.losses):.3f} "
          f"mse_ratio {evaluation.all_steps_mse(pred, held.losses) / blind:.3f}",
          flush=True)


if __name__ == "__main__":
  main(*sys.argv[1:])
