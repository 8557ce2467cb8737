"""The library's own jitted kernels that its drivers build but do not export.

The plan compiles what the main job compiles. Where a library exposes its per-chunk
kernel only inside a host-side driver (`tracin_scores`, `simulators.solve`,
`Simulator.simulate`), this module is the one place that reaches for it; every
other stage is built from public functions. If one of these names moves, the
stages using it report an error row naming it instead of planning a different
program.

Used (module: name):
  influence._tracin: _cached_plan, _query_kernel, _chunk_kernel
  influence._ekfac: _statistics_kernel, _device_sum, _query_captures_kernel,
    _precondition_kernel, _shape_key, _score_kernel
  simulators._solver: _kernels, _chunk_size, _DEFAULT_MEMORY_BUDGET, choose_method,
    column_mesh
  simulators._simulator: _rollout
  simulators._fit: _tracin_sums
"""

# pylint: disable=protected-access
from simfluence_jax.influence import _ekfac
from simfluence_jax.influence import _tracin
from simfluence_jax.simulators import _fit
from simfluence_jax.simulators import _simulator
from simfluence_jax.simulators import _solver


def tracin_plan(task, params, query_batch, train_chunk, num_query):
  """TracIn's static split (layers with factored / materialised products, other
  leaves) for these shapes; call under tracing (`stages.traced`)."""
  return _tracin._cached_plan(task, params, query_batch, train_chunk, num_query)


def tracin_query_kernel(task, plan):
  """jit: (params, query_batch) -> query-side gradients of one checkpoint."""
  return _tracin._query_kernel(task, plan)


def tracin_chunk_kernel(task, plan, mesh):
  """jit(shard_map over `data`): (params, query, learning_rate, chunk) -> float32[Q, n]."""
  return _tracin._chunk_kernel(task, plan, mesh)


def ekfac_statistics_kernel(which: str, task, layers, fisher: str, mesh):
  """jit(shard_map over `data`): (params, eigenvectors or None, chunk, weights,
  indices, rng) -> per-shard sums of `which` ("covariance" | "eigenvalues"),
  leaves [D, ...], split over `model` like the params."""
  return _ekfac._statistics_kernel(which, task, layers, fisher, mesh)


def ekfac_shard_sum(mesh):
  """jit: per-shard statistics -> their sum over `data`, split over `model` (the
  on-device reduction of accelerators)."""
  return _ekfac._device_sum(mesh)


def ekfac_query_captures_kernel(task, layers, mesh):
  """jit: (params, query_batch) -> by layer, the queries' `LayerActivations`."""
  return _ekfac._query_captures_kernel(task, layers, mesh)


def ekfac_precondition_kernel(spec, query_rank, mesh):
  """jit: (one layer's factors, its queries' `LayerActivations`, λ) -> its
  preconditioned queries; one program per `ekfac_shape_key(spec)`."""
  return _ekfac._precondition_kernel(spec, query_rank, mesh)


def ekfac_shape_key(spec):
  """What layers sharing one preconditioning program have in common."""
  return _ekfac._shape_key(spec)


def ekfac_score_kernel(task, layers, mesh):
  """jit(shard_map over `data`): (params, queries, chunk) -> float32[Q, n]."""
  return _ekfac._score_kernel(task, layers, "total", mesh)


def solver_kernels(mesh, num_train: int, linear: bool):
  """The solver's shard_maps over a `columns` mesh (`cg_init`, `forward`, `cg_step`,
  `normal`, `dual`, `gap`)."""
  return _solver._kernels(mesh, num_train, linear)


def solver_layout(num_train: int, num_rows: int, batch: int, num_columns: int,
                  linear: bool, num_devices: int):
  """(method "normal" | "dual" | "cg", columns per chunk) that `simulators.solve`
  picks with its default memory budget."""
  method = _solver.choose_method(num_train, num_rows, linear)
  chunk = _solver._chunk_size(method, num_train, num_rows, batch, num_columns,
                              linear, _solver._DEFAULT_MEMORY_BUDGET)
  return method, -(-chunk // num_devices) * num_devices


def column_mesh(devices):
  return _solver.column_mesh(devices)


def rollout():
  """jit: (a, b, batch_ids, weights, phases, initial_losses, null_a, *, linear)."""
  return _simulator._rollout


def tracin_sums():
  """jit: (batch_ids, train_grads, test_grads, learning_rates) of one run."""
  return _fit._tracin_sums
