"""Every stage of the main job as the programs it compiles, on abstract inputs.

One plain function per stage: `fn(job) -> [Program]`, each program a jitted function
with `jax.ShapeDtypeStruct` arguments carrying the shardings the job places them
with (`Program.lower()` lowers it; nothing is allocated). `STAGES` is the registry:
which stages a config runs, and the config changes that could make a stage fit
(`Fix`), cheapest first.

Meshes are the job's: training runs over `sharding.runs_mesh(mesh_model)`, score
kernels over `sharding.scores_mesh(influence.mesh_model or mesh_model)`
(`pipeline.stages._runs_mesh`, `_score_mesh`), the Simfluence solver over the first process's
devices (`simulators.solve`' default on accelerators); pre-training, per-step
TracIn sums and rollouts run on one device, as in the job.
"""

import dataclasses
import math
from typing import Any, Callable, List, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from simfluence_jax import influence
from simfluence_jax import sharding
from simfluence_jax import training
from simfluence_jax.planning import devices as devices_lib
from simfluence_jax.planning import job as job_lib
from simfluence_jax.planning import kernels

SDS = jax.ShapeDtypeStruct
# The `chunk_size` default of `tracin_scores`, `fit_ekfac` and `ekfac_scores`, which
# the pipeline leaves as is (it sizes its batches with `influence.chunk_size`).
_DRIVER_CHUNK_SIZE = 256
# Larger eigendecompositions are sized, not compiled: XLA:TPU's eigh compile time
# grows steeply above n = 256 (measured with libtpu 0.0.52, see `ekfac_if`).
EIGH_COMPILE_LIMIT = 256


class NotAvailable(Exception):
  """The stage's library function does not exist (yet): a "not available" row."""


@dataclasses.dataclass(frozen=True)
class Program:
  """One compiled program of a stage.

  Attributes:
    name: row label within the stage.
    fn: a jitted function.
    args: its arguments (`ShapeDtypeStruct` leaves with shardings).
    static: static keyword arguments.
    calls: how many times the job runs it (None: data-dependent, e.g. per CG
      iteration).
    note: what the row counts, or how the job differs.
    skip: why it is sized from its inputs and outputs instead of compiled ("" =
      compile it).
    resident: arrays (`ShapeDtypeStruct`s) the job holds on each chip while this
      program runs, outside its arguments (e.g. the other layers' inputs of a
      per-layer program); counted into its peak by arithmetic.
    min_flops: per call, FLOPs of work XLA's cost model cannot see, estimated from
      shapes: an eigh compiles to a custom call (XLA:TPU's "EighTpu", LAPACK on
      CPU) that HLO cost analysis counts as 0 FLOPs (review h23: the plan read
      0.12–0.42·n³ where a symmetric eigendecomposition takes about 9·n³). The row
      reports the larger of the two.
  """

  name: str
  fn: Any
  args: tuple
  static: dict = dataclasses.field(default_factory=dict)
  calls: Optional[int] = 1
  note: str = ""
  skip: str = ""
  resident: Any = ()
  min_flops: float = 0.0

  def lower(self):
    return self.fn.lower(*self.args, **self.static)


@dataclasses.dataclass(frozen=True)
class Fix:
  """A config change that may make a stage fit: `overrides` {dotted field: value}.

  `setting`: its size along its lever (the fixes setting the same fields), smaller
  expected to need less memory (runs per slot, chunk length, 1 / model axis, batch);
  None: not comparable. `report.suggest` gives a lever up only when a strictly
  smaller setting than one already tried did not lower the memory.
  """

  label: str
  overrides: dict
  setting: Optional[float] = None


def traced(fn: Callable, *abstract_args):
  """`fn(*args)` run on tracers of `abstract_args` (for library helpers that slice
  or trace their inputs to discover shapes, e.g. `influence.find_layers`); returns
  fn's Python result."""
  out = []
  jax.eval_shape(lambda *args: out.append(fn(*args)), *abstract_args)
  return out[0]


def _rows(tree, count: int):
  return jax.tree_util.tree_map(lambda x: SDS((count,) + x.shape[1:], x.dtype), tree)


# --- pre-training -------------------------------------------------------------------


def _pretrain_run(loss_fn, learning_rate: float):
  """`training.pretrain_base`'s jitted scan (same maths; that function builds it
  inside and runs it at once, so it cannot be lowered on its own)."""
  optimizer = optax.adam(learning_rate)

  @jax.jit
  def run(params, arrays, batch_ids):
    def body(carry, ids):
      params, opt_state = carry
      batch = jax.tree_util.tree_map(lambda x: jnp.take(x, ids, axis=0), arrays)
      loss, grads = jax.value_and_grad(lambda p: jnp.mean(loss_fn(p, batch)))(params)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, _), step_losses = jax.lax.scan(
        body, (params, optimizer.init(params)), batch_ids)
    return params, step_losses

  return run


def pretrain(job: job_lib.Job) -> List[Program]:
  """Adam on the pre-training split, one scan on one device."""
  config = job.config
  on_one = job_lib.replicated_on(job.devices[:1])
  num_examples = next(iter(job.pretrain.values())).shape[0]
  batch = min(config.pretrain_batch_size, num_examples)
  args = (job_lib.place(job.params, on_one), job_lib.place(job.pretrain, on_one),
          SDS((config.pretrain_steps, batch), jnp.int32, sharding=on_one))
  return [Program("scan", _pretrain_run(job.loss_fn, config.pretrain_learning_rate),
                  args, note=f"{config.pretrain_steps} steps of {batch}, one device")]


# --- training runs ------------------------------------------------------------------


# FLOPs of a symmetric eigendecomposition with eigenvectors, per n³: about 9
# (tridiagonal reduction 4/3·n³ plus QR iteration and back-transformation, Golub &
# Van Loan, "Matrix Computations", §8.3); XLA:TPU's Jacobi-type eigh does more.
EIGH_FLOPS_PER_N3 = 9.0


def segment_steps(config) -> int:
  """Steps per jitted segment: `train_runs` cuts at multiples of checkpoint_every."""
  return min(config.checkpoint_every, config.num_steps)


def _segment(job: job_lib.Job, num_runs: int, record_grads: bool) -> Program:
  config = job.config
  mesh = sharding.runs_mesh(job.mesh_model_sizes[0], devices=job.devices)
  run_sharding, replicated = training.runs_shardings(num_runs, mesh)
  steps = segment_steps(config)
  # `train_runs`' own program and layouts: runs over `runs`, each leaf over `model`
  # (all runs at once on accelerators; on a CPU, runs that do not record gradients
  # in groups, as `train_runs` picks them: review h23 found the plan sizing the
  # all-at-once program, 16x the memory of the one the job runs); the optimizer's
  # numbers are an argument, like the occurrence weights.
  params = job_lib.place(job.params, None, (num_runs,))
  runs_per_group = training.runs.runs_per_group_for(
      job.params, num_runs, run_sharding, record_grads,
      platform=job.devices[0].platform)
  program = training.segment_program(
      job.loss_fn, config, config.num_steps, params, run_sharding,
      record_grads=record_grads, projection_dim=config.projection_dim,
      seed=config.seed, runs_per_group=runs_per_group, who="plan")
  params = job_lib.place(params, program.params_sharding)
  opt_state = job_lib.place(jax.eval_shape(program.init, params),
                            program.opt_sharding)
  ids = (num_runs, steps, config.batch_size)
  args = (params, opt_state, SDS((), jnp.int32, sharding=replicated),
          SDS(ids, jnp.int32, sharding=run_sharding),
          job_lib.place(job.train, replicated), job_lib.place(job.test, replicated),
          SDS(ids, jnp.float32, sharding=run_sharding),
          jax.tree_util.tree_map(
              lambda x: SDS(np.shape(x), np.asarray(x).dtype, sharding=replicated),
              program.hyperparameters))
  segment = program.fn
  size, model = mesh.shape[sharding.RUNS_AXIS], mesh.shape[sharding.MODEL_AXIS]
  where = "chip" if model == 1 else f"{model} chips"
  placement = (f"{num_runs // size} run(s) per {where}" if num_runs % size == 0 else
               f"R={num_runs} does not divide {size} run slots: every slot holds "
               "all runs")
  return Program("segment", segment, args,
                 calls=-(-config.num_steps // steps),
                 note=f"R={num_runs}, {steps} steps of {config.batch_size}, "
                      f"{config.optimizer}; {placement}"
                      + (f", trained {runs_per_group} at a time" if runs_per_group
                         else ""))


def record_runs(job: job_lib.Job) -> List[Program]:
  """The runs without recorded gradients (fitted, held-out, unseen): one segment."""
  return [_segment(job, job.plain_runs(), record_grads=False)]


def record_grad_runs(job: job_lib.Job) -> List[Program]:
  """The first `num_grad_runs` fitted runs, recording projected per-step gradients."""
  return [_segment(job, job.grad_runs(), record_grads=True)]


# --- influence scores ----------------------------------------------------------------


def _score_mesh(job: job_lib.Job):
  if job.num_devices == 1:
    return sharding.make_mesh(runs=1, data=1, devices=job.devices)
  return sharding.scores_mesh(job.mesh_model_sizes[1], devices=job.devices)


def score_chunks(chunk_size: int, num_train: int, num_devices: int
                 ) -> Tuple[int, int]:
  """(examples per chunk, chunks per pass) of the kernels' chunking.

  The pipeline splits the N train examples into batches of `influence.chunk_size`;
  the drivers (default chunk_size 256) pad each chunk to a multiple of the `data`
  axis (`influence._common.iterate_padded_chunks`).
  """
  batch = min(chunk_size, num_train)
  length = -(-min(_DRIVER_CHUNK_SIZE, batch) // num_devices) * num_devices
  step = min(_DRIVER_CHUNK_SIZE, length)
  full, last = divmod(num_train, batch)
  return length, full * -(-batch // step) + (-(-last // step) if last else 0)


def _task(job: job_lib.Job):
  task_cls = (influence.LanguageModelingTask if job.kind == "lm" else
              influence.ClassificationTask)
  return task_cls(job.module.apply)


def _score_inputs(job: job_lib.Job):
  mesh = _score_mesh(job)
  length, num_chunks = score_chunks(job.config.influence.chunk_size,
                                    job.config.num_train_examples,
                                    mesh.shape[sharding.DATA_AXIS])
  split = sharding.data_sharded(mesh)
  chunk = job_lib.place(_rows(job.train, length), split)
  return mesh, length, num_chunks, chunk


def ekfac_if(job: job_lib.Job) -> List[Program]:
  """EK-FAC at the base model, the library's own kernels: factor statistics over
  one chunk (two passes, per-shard sums reduced on device), eigendecomposition,
  preconditioned queries (rank `influence.query_rank` if set), scores of one chunk.
  Params, statistics, factors and queries are split over the `model` axis."""
  config = job.config
  task, fisher = _task(job), config.influence.fisher
  mesh, length, num_chunks, chunk = _score_inputs(job)
  replicated, split = sharding.replicated(mesh), sharding.data_sharded(mesh)
  layers = tuple(traced(
      lambda p, b: influence.find_layers(task.loss, p, b, warn=False),
      job.params, _rows(job.train, 1)))
  params = job_lib.place_params(job.params, mesh)
  weights = SDS((length,), jnp.float32, sharding=split)
  indices = SDS((length,), jnp.int32, sharding=split)
  rng = SDS((2,), jnp.uint32, sharding=replicated)
  per_chip = length // mesh.shape[sharding.DATA_AXIS]
  chunk_note = f"chunk of {length} ({per_chip} per chip), {num_chunks} chunks"

  cov_kernel = kernels.ekfac_statistics_kernel("covariance", task, layers, fisher,
                                               mesh)
  cov_args = (params, None, chunk, weights, indices, rng)
  per_shard = jax.eval_shape(cov_kernel, *cov_args)
  shard_sum = kernels.ekfac_shard_sum(mesh)
  per_shard = job_lib.place(per_shard, sharding.param_shardings(
      per_shard, mesh, leading=(sharding.DATA_AXIS,)))
  stats = job_lib.place_params(jax.eval_shape(shard_sum, per_shard), mesh)
  eigh = jax.jit(influence.eigendecompose, out_shardings=replicated)
  decomposed = jax.eval_shape(eigh, stats)
  eigenvectors = job_lib.place_params(
      {n: (v[1], v[3]) for n, v in decomposed.items()}, mesh)
  eig_kernel = kernels.ekfac_statistics_kernel("eigenvalues", task, layers, fisher,
                                               mesh)
  eig_args = (params, eigenvectors, chunk, weights, indices, rng)
  factors = job_lib.place_params({
      spec.name: influence.LayerFactors(
          *eigenvectors[spec.name],
          SDS((spec.output_dim, spec.augmented_input_dim), jnp.float32))
      for spec in layers}, mesh)
  lambdas = job_lib.place({spec.name: SDS((), jnp.float32) for spec in layers},
                          replicated)
  query_batch = job_lib.place(job.test, replicated)
  rank = config.influence.query_rank
  captures_kernel = kernels.ekfac_query_captures_kernel(task, layers, mesh)
  captures = job_lib.place_params(
      jax.eval_shape(captures_kernel, params, query_batch), mesh, leading=(None,))
  query = {spec.name: jax.eval_shape(
      kernels.ekfac_precondition_kernel(spec, rank, mesh), factors[spec.name],
      captures[spec.name], lambdas[spec.name]) for spec in layers}
  query = job_lib.place_params(query, mesh, leading=(None,))
  score_kernel = kernels.ekfac_score_kernel(task, layers, mesh)
  factor_bytes = sum(math.prod(x.shape) * 4 for x in jax.tree_util.tree_leaves(
      factors))
  model = mesh.shape[sharding.MODEL_AXIS]
  layout = f"split over {model} chips" if model > 1 else "replicated"
  programs = [
      Program("covariance", cov_kernel, cov_args, calls=num_chunks, note=chunk_note),
      Program("reduce", shard_sum, (per_shard,), calls=2,
              note="per-shard sums of each pass, on device"),
  ]
  # `eigendecompose` runs one jitted program per distinct layer shape, so one
  # program per distinct (I, O) layer shape here, run per layer.
  by_shape = {}
  for spec in layers:
    by_shape.setdefault((spec.augmented_input_dim, spec.output_dim), []).append(spec)
  for (dim_in, dim_out), specs in by_shape.items():
    one = _select_layers(stats, specs[0].name)
    largest = max(dim_in, dim_out)
    skip = ""
    if largest > EIGH_COMPILE_LIMIT:
      skip = (f"not compiled (n={largest} > {EIGH_COMPILE_LIMIT}): XLA:TPU's eigh "
              "compile time grows steeply with n (257: 32 s, 512: 111 s, 1024: "
              "> 12 min on a 2-core machine); memory is its inputs and outputs, a "
              "lower bound")
    programs.append(Program(
        f"eigendecompose_{dim_in}x{dim_out}", eigh, (one,), calls=len(specs),
        note=f"eigh of A [{dim_in}²] and S [{dim_out}²] of {len(specs)} layer(s); "
             f"FLOPs ≈ {EIGH_FLOPS_PER_N3:g}·n³ per matrix (XLA counts the eigh "
             "custom call as 0)", skip=skip,
        min_flops=EIGH_FLOPS_PER_N3 * (dim_in ** 3 + dim_out ** 3)))
  query_form = "dense [O, I]" if rank is None else f"rank {rank}"
  programs += [
      Program("eigenvalues", eig_kernel, eig_args, calls=num_chunks, note=chunk_note),
      # `ekfac_scores` holds every layer's factors and λ from here to its end.
      Program("query_tokens", captures_kernel, (params, query_batch),
              resident=(factors, lambdas),
              note=f"{job.config.num_test_examples} queries' layer inputs and output "
                   f"gradients, {len(layers)} layers, {layout}; its total counts the "
                   "factors held beside it"),
  ]
  # `ekfac_scores` forms and preconditions each layer's query gradients in one
  # jitted program per layer kind and shape (and, for layers of one key seeing
  # other token counts, per token shape: jit compiles each). Beside it the job
  # holds the params, the queries, every other layer's factors and λ, and the
  # other layers' query tokens (those to come) and preconditioned queries (those
  # done): both counted, an upper bound.
  groups = {}
  for spec in layers:
    tokens = jax.tree_util.tree_map(lambda x: x.shape, tuple(captures[spec.name]))
    groups.setdefault((kernels.ekfac_shape_key(spec), tokens), []).append(spec)
  names = set()
  for specs in groups.values():
    name = specs[0].name
    others = lambda tree: {n: x for n, x in tree.items() if n != name}  # pylint: disable=cell-var-from-loop
    resident = (params, query_batch, others(factors), others(lambdas),
                others(captures), others(query))
    short = sorted({spec.name.split("/")[-1] for spec in specs})
    label = (f"precondition_{specs[0].augmented_input_dim}x{specs[0].output_dim}_"
             f"{short[0]}")
    label = label if label not in names else f"{label}_{len(names)}"
    names.add(label)
    programs.append(Program(
        label, kernels.ekfac_precondition_kernel(specs[0], rank, mesh),
        (factors[name], captures[name], lambdas[name]), calls=len(specs),
        resident=resident,
        note=f"{len(specs)} {specs[0].block} layer(s) ({', '.join(short)}), "
             f"{query_form}; all layers' factors {factor_bytes / 2**30:.3g} GiB "
             f"{layout}; its total counts what the job holds beside it"))
  return programs + [
      Program("scores", score_kernel, (params, query, chunk), calls=num_chunks,
              resident=(factors, lambdas),
              note=f"{chunk_note}; its total counts the factors held beside it"),
  ]


def _select_layers(stats, name: str):
  """`CovarianceStatistics` of one layer."""
  return stats._replace(**{
      field: {name: getattr(stats, field)[name]}
      for field in ("activation_sums", "gradient_sums", "token_counts")})


def tracin_checkpoints(config) -> int:
  """Checkpoints TracIn-CP sums over: every `checkpoint_every` steps below T, of
  each of `influence.tracin_num_runs` runs."""
  return len(range(0, config.num_steps, config.checkpoint_every)) * (
      config.influence.tracin_num_runs)


def tracin_cp(job: job_lib.Job) -> List[Program]:
  """TracIn-CP: query gradients of one checkpoint, scores of one chunk (exact
  gradients, factored inner products where cheaper: `influence.tracin_scores`)."""
  config = job.config
  task = _task(job)
  mesh, length, num_chunks, chunk = _score_inputs(job)
  replicated = sharding.replicated(mesh)
  num_query = config.num_test_examples
  plan = traced(lambda p, q, t: kernels.tracin_plan(task, p, q, t, num_query),
                job.params, job.test, _rows(job.train, 1))
  params = job_lib.place_params(job.params, mesh)
  query_batch = job_lib.place(job.test, replicated)
  query_kernel = kernels.tracin_query_kernel(task, plan)
  query = job_lib.place(jax.eval_shape(query_kernel, params, query_batch), replicated)
  chunk_kernel = kernels.tracin_chunk_kernel(task, plan, mesh)
  count = tracin_checkpoints(config)
  per_chip = length // mesh.shape[sharding.DATA_AXIS]
  factored = sum(plan.factored.values())
  return [
      Program("query", query_kernel, (params, query_batch), calls=count,
              note=f"{num_query} queries x {count} checkpoints"),
      Program("chunk", chunk_kernel,
              (params, query, SDS((), jnp.float32, sharding=replicated), chunk),
              calls=num_chunks * count,
              note=f"chunk of {length} ({per_chip} per chip); {factored}/"
                   f"{len(plan.layers)} layers factored"),
  ]


def tracin_per_step(job: job_lib.Job) -> List[Program]:
  """Per-step TracIn: the recorded projected-gradient dot products of one run."""
  config = job.config
  on_one = job_lib.replicated_on(job.devices[:1])
  steps, batch, dim = config.num_steps, config.batch_size, config.projection_dim
  args = (SDS((steps, batch), jnp.int32, sharding=on_one),
          SDS((steps, batch, dim), jnp.float32, sharding=on_one),
          SDS((steps, config.num_test_examples, dim), jnp.float32, sharding=on_one),
          SDS((steps,), jnp.float32, sharding=on_one))
  return [Program("dots", kernels.tracin_sums(), args, calls=job.grad_runs(),
                  note=f"one run ({steps} steps), K={dim}")]


# --- simulators ------------------------------------------------------------------------


def ridge_solves(config) -> List[Tuple[str, int, int, int, int]]:
  """(label, rows P, unknowns per block N·K, columns, solves) of each problem shape
  `pipeline.stages.fit_ridge` hands `simulators.solve`, per kind: with
  `simulators.l2 = None` first one solve per CV fold on the other folds' runs (run r
  in fold r mod K) with the whole `l2_grid` as columns (G·M), then the final fit on
  every fitted run (M columns); K = `simulators.num_phases` phases give each train
  id K unknowns per block. P counts every step (the job drops empty ones)."""
  sim = config.simulators
  runs, steps = config.num_runs, config.num_steps
  unknowns = sim.num_phases * config.num_train_examples
  num_test = config.num_test_examples
  solves = []
  if sim.l2 is None:
    folds = min(sim.cv_folds, runs)
    by_size = {}
    for fold in range(folds):
      train_runs = runs - len(range(fold, runs, folds))
      by_size[train_runs] = by_size.get(train_runs, 0) + 1
    for train_runs, count in sorted(by_size.items(), reverse=True):
      label = "cv" if len(by_size) == 1 else f"cv{train_runs}"
      solves.append((label, train_runs * steps, unknowns,
                     len(sim.l2_grid) * num_test, count))
  solves.append(("", runs * steps, unknowns, num_test, 1))
  return solves


def simfluence_fit(job: job_lib.Job) -> List[Program]:
  """The ridge solver's kernels on each problem shape the job solves per kind
  (`ridge_solves`: CV folds over the l2 grid, the final fit; phases)."""
  config = job.config
  local = devices_lib.primary_devices(list(job.devices))
  mesh = kernels.column_mesh(local)
  col = jax.sharding.PartitionSpec("columns")
  place = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  rep, per_column = place(jax.sharding.PartitionSpec()), place(col)
  rows_by_column = place(jax.sharding.PartitionSpec(None, "columns"))
  by_theta = place(jax.sharding.PartitionSpec(None, None, "columns"))
  batch = config.batch_size
  programs = []
  for kind in ("linear", "additive"):
    if f"simfluence_{kind}" not in config.methods:
      continue
    linear = kind == "linear"
    blocks = 2 if linear else 1
    for label, num_rows, num_train, num_columns, solves in ridge_solves(config):
      prefix = f"{kind}_{label}_" if label else f"{kind}_"
      programs += _solver_programs(
          prefix, num_rows, num_train, num_columns, solves, batch, linear, blocks,
          mesh, len(local), rep, per_column, rows_by_column, by_theta,
          what=(f"{solves} CV fold solve(s) over {len(config.simulators.l2_grid)} "
                "l2 values" if label else "final fit")
          + (f", {config.simulators.num_phases} phases"
             if config.simulators.num_phases > 1 else ""))
  if len(local) < len(job.devices):
    # Multi-host: the library solves on each host's CPU (simulators.default_devices).
    programs = [dataclasses.replace(
        p, skip="multi-host: runs on each host's CPU, not the TPU slice")
                for p in programs]
  return programs


def _solver_programs(prefix, num_rows, num_train, num_columns, solves, batch, linear,
                     blocks, mesh, num_local, rep, per_column, rows_by_column,
                     by_theta, what) -> List[Program]:
  """The programs of `solves` calls of `simulators.solve` on one problem shape."""
  method, columns = kernels.solver_layout(num_train, num_rows, batch, num_columns,
                                          linear, num_local)
  num_chunks = -(-num_columns // columns) * solves
  solver = kernels.solver_kernels(mesh, num_train, linear)
  ids = SDS((num_rows, batch), jnp.int32, sharding=rep)
  x = SDS((num_rows, columns), jnp.float32, sharding=rows_by_column)
  l2 = SDS((columns,), jnp.float32, sharding=per_column)
  theta = SDS((num_train, blocks, columns), jnp.float32, sharding=by_theta)
  note = (f"{method}: P={num_rows} rows, {num_train} unknowns per block, {columns} "
          f"columns per chunk over {num_local} local devices; {what}")
  if method == "cg":
    scalar = SDS((columns,), jnp.float32, sharding=per_column)
    inverse = SDS((num_train, 3 if linear else 1, columns), jnp.float32,
                  sharding=by_theta)
    return [
        Program(f"{prefix}cg_init", solver.cg_init,
                (ids, x, x, l2, SDS((), jnp.float32, sharding=rep)),
                calls=num_chunks, note=note),
        Program(f"{prefix}forward", solver.forward, (theta, ids, x), calls=None,
                note="X·direction, once per CG iteration"),
        Program(f"{prefix}cg_step", solver.cg_step,
                (x, theta, theta, theta, scalar, scalar, inverse, ids, x, l2),
                calls=None, note="once per CG iteration"),
    ]
  return [Program(f"{prefix}{method}", getattr(solver, method), (ids, x, x, l2),
                  calls=num_chunks, note=note)]


def simulate(job: job_lib.Job) -> List[Program]:
  """Rollouts of the held-out runs by a linear and an additive simulator."""
  config = job.config
  on_one = job_lib.replicated_on(job.devices[:1])
  num_runs, steps = job.held_out_runs(), config.num_steps
  num_train, num_test, batch = (config.num_train_examples, config.num_test_examples,
                                config.batch_size)
  # a, b: float32[K, N, M], one per phase (`simulators.num_phases`).
  params = SDS((config.simulators.num_phases, num_train, num_test), jnp.float32,
               sharding=on_one)
  args = (params, params,
          SDS((num_runs, steps, batch), jnp.int32, sharding=on_one),
          SDS((num_runs, steps, batch), jnp.float32, sharding=on_one),
          SDS((steps,), jnp.int32, sharding=on_one),
          SDS((num_runs, num_test), jnp.float32, sharding=on_one),
          SDS((), jnp.float32, sharding=on_one))
  kinds = [k for k in ("linear", "additive")
           if k == "additive" or "simfluence_linear" in config.methods]
  return [Program(f"rollout_{kind}", kernels.rollout(), args,
                  static={"linear": kind == "linear"},
                  note=f"{num_runs} held-out runs x {steps} steps")
          for kind in kinds]


def metagradient(job: job_lib.Job) -> List[Program]:
  """Metagradients through the training run (`training.metagradients`,
  `training.first_order_losses`)."""
  del job
  if not hasattr(training, "metagradients"):
    raise NotAvailable("training.metagradients does not exist yet")
  # Both build their jitted program inside the call and run it at once on host
  # arrays, so there is nothing to lower without allocating the inputs.
  raise NotAvailable("training.metagradients / first_order_losses build and run "
                     "their jitted program in one call; planning needs them to "
                     "expose it (a function returning the jitted program)")


# --- fixes -------------------------------------------------------------------------------


def _halvings(value: int, floor: int = 1):
  value //= 2
  while value >= floor:
    yield value
    value //= 2


def _per_slot(count: int, slots: int) -> int:
  """Runs per run slot of a run axis of `count` (replicated unless it divides)."""
  return count // slots if count % slots == 0 else count


def _model_sizes(job: job_lib.Job, current: Optional[int] = None):
  """`model` axis sizes above `current` (default: the config's `mesh_model`) that
  divide the devices (doubling)."""
  size = (current or job.config.mesh_model) * 2
  while size <= job.num_devices:
    if job.num_devices % size == 0:
      yield size
    size *= 2


def _scaled_runs(job: job_lib.Job, slots: int, per_slot: int):
  """(overrides, label) scaling every group of the no-gradient call (fitted,
  held-out, unseen) alike to `slots × per_slot` runs; None if too few remain."""
  config = job.config
  plain, grad = job.plain_runs(), job.grad_runs()
  held = config.num_held_out_runs
  unseen = job.held_out_runs() - held
  total = slots * per_slot
  scaled = lambda count: min(count, max(1, round(count * total / plain))) if (
      count) else 0
  new_held, new_unseen = scaled(held), scaled(unseen)
  num_runs = total - new_held - new_unseen + grad
  if num_runs - grad < 0 or num_runs < max(new_held,
                                             config.influence.tracin_num_runs, 1):
    return None
  overrides = {"num_runs": num_runs, "num_held_out_runs": new_held}
  label = f"num_runs={num_runs}, num_held_out_runs={new_held}"
  if unseen:
    overrides["unseen.num_runs"] = new_unseen
    label += f", unseen.num_runs={new_unseen}"
  return overrides, label


def run_counts_per_slot(plain: int, slots: int) -> List[int]:
  """Runs per slot k to try for `plain` runs over `slots` run slots, largest first:
  k = floor(plain / slots) when the runs do not divide the slots (now every slot
  holds all of them), then its halvings; never more runs in all (slots·k ≤ plain)
  and fewer per slot than now."""
  base = plain // slots
  targets = ([base] if plain % slots else []) + list(_halvings(base))
  return [k for k in dict.fromkeys(targets) if 1 <= k and slots * k <= plain
          and k < _per_slot(plain, slots)]


def _run_count_fixes(job: job_lib.Job) -> List[Fix]:
  """Fewer runs per run slot (k below the current, never more runs in all), then a
  larger `model` axis with one run per slot (each run's state split over more
  chips), then SGD."""
  config, slots, plain = job.config, job.run_slots, job.plain_runs()
  where = ("chip" if config.mesh_model == 1 else
           f"{config.mesh_model} chips")
  fixes = []
  for per_slot in run_counts_per_slot(plain, slots):
    scaled = _scaled_runs(job, slots, per_slot)
    if scaled:
      fixes.append(Fix(f"{scaled[1]} ({per_slot} run(s) per {where})", scaled[0],
                       setting=per_slot))
  for model in _model_sizes(job):
    if job.num_devices // model > plain:  # would add runs
      continue
    scaled = _scaled_runs(job, job.num_devices // model, 1)
    if scaled:
      fixes.append(Fix(f"mesh_model={model}, {scaled[1]} (one run per {model} "
                       "chips)", {"mesh_model": model, **scaled[0]},
                       setting=1 / model))
  if config.optimizer != "sgd":
    fixes.append(Fix(f"optimizer=sgd (no {config.optimizer} state; changes the "
                     "experiment)", {"optimizer": "sgd"}))
  return fixes


def _grad_run_fixes(job: job_lib.Job) -> List[Fix]:
  slots, grad = job.run_slots, job.grad_runs()
  now = _per_slot(grad, slots)
  targets = ([max(1, grad // slots)] if grad % slots else []) + list(
      _halvings(now))
  fixes = [Fix(f"num_grad_runs={slots * k} ({k} per slot)",
               {"num_grad_runs": slots * k}, setting=k)
           for k in dict.fromkeys(t for t in targets if slots * t < grad)]
  # Without recorded gradients the job refuses tracin_per_step (validate_config).
  methods = tuple(m for m in job.config.methods if m != "tracin_per_step")
  return fixes + [Fix("record_grads=False (no per-step TracIn)",
                      {"record_grads": False, "methods": methods})]


def _chunk_fixes(job: job_lib.Job) -> List[Fix]:
  """Smaller chunks of train examples, then params (and factors, queries) split
  over a larger `model` axis of the score kernels."""
  config = job.config
  model = job.mesh_model_sizes[1]
  data = job.num_devices // model
  seen = {score_chunks(config.influence.chunk_size, config.num_train_examples,
                       data)[0]}
  fixes = []
  for chunk in _halvings(config.influence.chunk_size):
    length, _ = score_chunks(chunk, config.num_train_examples, data)
    if length not in seen:
      seen.add(length)
      fixes.append(Fix(f"influence.chunk_size={chunk} ({length // data} per "
                       "data slot)", {"influence.chunk_size": chunk},
                       setting=length))
  return fixes + [Fix(f"influence.mesh_model={size} (params, factors and queries "
                      f"split over {size} chips)", {"influence.mesh_model": size},
                      setting=1 / size)
                  for size in _model_sizes(job, model)]


def _pretrain_fixes(job: job_lib.Job) -> List[Fix]:
  return [Fix(f"pretrain_batch_size={b}", {"pretrain_batch_size": b}, setting=b)
          for b in _halvings(job.config.pretrain_batch_size)]


def _no_fixes(job: job_lib.Job) -> List[Fix]:
  del job
  return []


# --- registry ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Stage:
  """A stage of the main job: its programs, whether the config runs it, its fixes."""

  name: str
  build: Callable[[job_lib.Job], List[Program]]
  applies: Callable[[job_lib.Job], bool]
  fixes: Callable[[job_lib.Job], List[Fix]] = _no_fixes


def _uses(*methods):
  return lambda job: any(m in job.config.methods for m in methods)


STAGES = (
    Stage("pretrain", pretrain, lambda job: job.pretrain is not None,
          _pretrain_fixes),
    Stage("record_runs", record_runs, lambda job: job.plain_runs() > 0,
          _run_count_fixes),
    Stage("record_grad_runs", record_grad_runs, lambda job: job.grad_runs() > 0,
          _grad_run_fixes),
    Stage("ekfac_if", ekfac_if, _uses("ekfac_if"), _chunk_fixes),
    Stage("tracin_cp", tracin_cp, _uses("tracin_cp"), _chunk_fixes),
    Stage("tracin_per_step", tracin_per_step,
          lambda job: "tracin_per_step" in job.config.methods and job.grad_runs() > 0),
    Stage("simfluence_fit", simfluence_fit,
          _uses("simfluence_linear", "simfluence_additive")),
    Stage("simulate", simulate, lambda job: True),
    # Always listed, so a plan says when metagradients cannot be planned.
    Stage("metagradient", metagradient, lambda job: True),
)

STAGE_NAMES = tuple(stage.name for stage in STAGES)


def get(name: str) -> Stage:
  for stage in STAGES:
    if stage.name == name:
      return stage
  raise ValueError(f"--stages: unknown stage {name!r}; known: {STAGE_NAMES}.")
