"""Curvature blocks: one class per layer kind (after kfac-jax's `curvature_blocks`).

A block turns one call of a layer into tokens and holds everything the kernels need
that depends on the layer kind:

* discovery: `describe(module, inputs, outputs)` reads the module's static
  configuration (or raises `UnsupportedLayerError` saying why it cannot be used);
* capture: `tokens(inputs, output_grads)` maps the captured input and output
  gradient of a call to per-token `a` (float32[B, T, I], a ones column last for the
  bias) and `g` (float32[B, T, O]), so that the example's weight gradient is
  `G = Σ_t g_t a_tᵀ` (float32[O, I]);
* parameters: `param_matrix` / `matrix_params` map the kernel and bias leaves to
  that `[O, I]` layout and back;
* statistics and preconditioning: Kronecker-factor sums, corrected eigenvalues,
  the damped inverse in the eigenbasis;
* inner products: EK-FAC scores against preconditioned queries and TracIn's
  `⟨G_q, G_i⟩`, in the factored form `Σ_{s,t} (g_qs·g_it)(a_qs·a_it)` or with
  materialised gradients, whichever costs fewer multiply-adds for the shapes.

Blocks are stateless apart from their `LayerSpec` (static, hashable); the arrays
live in the statistics and factor pytrees of `_ekfac`. A new layer kind is a new
subclass registered with `register_layer_kind(module_class, BlockClass)`.

Kinds here: `DenseBlock` (linen `Dense`/`DenseGeneral`, `nnx.Linear`/
`nnx.LinearGeneral`), `ConvBlock` (linen `Conv`, `nnx.Conv`: im2col patches as
tokens, as Kronfluence does for `Conv2d`), `EmbedBlock` (linen `Embed`, `nnx.Embed`;
one-hot inputs, so A is diagonal and is never formed densely; off by default, as in
Grosse et al. 2023).
"""

import math
from typing import Any, ClassVar, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from simfluence_jax import sharding as sharding_lib
from simfluence_jax.influence import _nnx
from simfluence_jax.influence._nnx import nnx  # flax.nnx once the user imports it

# Identity eigenbasis of a diagonal Kronecker factor: a [0, 0] placeholder that
# fails loudly if it is ever multiplied like a real [I, I] basis.
IDENTITY_BASIS_SHAPE = (0, 0)


def _model_split() -> bool:
  """Whether this trace runs on a mesh whose `model` axis (size > 1) splits arrays."""
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get(sharding_lib.MODEL_AXIS, 1) > 1


class UnsupportedLayerError(ValueError):
  """A layer of a known kind whose configuration the block cannot handle."""


def _dims(x) -> Tuple[int, ...]:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class CurvatureBlock:
  """Base class of a layer kind; subclasses override what differs.

  `per_example_grads` and `precondition` may read the spec's kind, shapes and
  `config`, not its `name`, `kernel_path` or `bias_path`: EK-FAC compiles them
  once per layer kind and shape, shared by the layers that agree on the rest
  (`_ekfac._shape_key`).

  Attributes:
    spec: the layer's `LayerSpec` (static).
  """

  name: ClassVar[str] = ""
  # Leaf names of the weight and (optional) bias inside the module's parameters.
  kernel_name: ClassVar[str] = "kernel"
  bias_name: ClassVar[Optional[str]] = "bias"
  # Methods of the module other than `__call__` that read its weights (e.g. a tied
  # embedding's `attend`): a layer used through them is excluded, since its
  # captured calls would not account for its whole gradient.
  weight_reading_methods: ClassVar[Tuple[str, ...]] = ()
  enabled_by_default: ClassVar[bool] = True

  def __init__(self, spec):
    self.spec = spec

  # --- discovery -------------------------------------------------------------------

  @classmethod
  def call_inputs(cls, args, kwargs):
    """The array argument of the module call."""
    return args[0] if args else kwargs["inputs"]

  @classmethod
  def describe(cls, module, inputs, outputs) -> Dict[str, Any]:
    """Static configuration of one call.

    Returns:
      dict with `in_axes`, `num_feature_axes`, `input_dim` (I0, without bias),
      `output_dim`, `has_bias`, `kernel_shape` and `config` (tuple of pairs).

    Raises:
      UnsupportedLayerError: the configuration cannot be handled (says why).
    """
    raise NotImplementedError

  # --- capture ---------------------------------------------------------------------

  def tokens(self, inputs, output_grads):
    """(a float32[B, T, I], g float32[B, T, O], token-grid shape) of one call."""
    raise NotImplementedError

  # --- parameters <-> [O, I] ---------------------------------------------------------

  def param_matrix(self, kernel, bias, lead: Tuple[int, ...] = ()) -> jax.Array:
    """float32[*lead, O, I] from the kernel (and bias) leaves."""
    spec = self.spec
    kernel = jnp.reshape(kernel, lead + (spec.input_dim, spec.output_dim))
    matrix = jnp.swapaxes(kernel, -1, -2)
    if spec.has_bias:
      matrix = jnp.concatenate(
          [matrix, jnp.reshape(bias, lead + (spec.output_dim, 1))], axis=-1)
    return matrix.astype(jnp.float32)

  def matrix_params(self, matrix) -> Tuple[jax.Array, Optional[jax.Array]]:
    """Inverse of `param_matrix` (no lead axes): (kernel, bias or None)."""
    spec = self.spec
    kernel = jnp.reshape(jnp.swapaxes(matrix[:, :spec.input_dim], 0, 1),
                         spec.kernel_shape)
    bias = matrix[:, spec.input_dim] if spec.has_bias else None
    return kernel, bias

  # --- statistics --------------------------------------------------------------------

  def activation_sum(self, act) -> jax.Array:
    """Σ_tokens w a aᵀ: float32[I, I]."""
    return jnp.einsum("bt,bti,btj->ij", act.token_weights, act.inputs, act.inputs)

  def gradient_sum(self, act) -> jax.Array:
    """Σ_tokens w g gᵀ: float32[O, O]."""
    return jnp.einsum("bt,bto,btp->op", act.token_weights, act.output_grads,
                      act.output_grads)

  def rotated_square_sum(self, act, q_a, q_s, example_weights) -> jax.Array:
    """Σ_examples w (Q_Sᵀ G Q_A)²: float32[O, I]."""
    rotated_inputs = act.inputs @ q_a
    rotated_grads = act.output_grads @ q_s
    if act.inputs.shape[1] == 1:
      # One token: the rotated gradient is an outer product, square it factor-wise.
      return jnp.einsum("b,bo,bi->oi", example_weights, rotated_grads[:, 0] ** 2,
                        rotated_inputs[:, 0] ** 2)
    rotated = jnp.einsum("bto,bti->boi", rotated_grads, rotated_inputs)
    return jnp.einsum("b,boi->oi", example_weights, rotated ** 2)

  def per_example_grads(self, act) -> jax.Array:
    """float32[B, O, I] = Σ_t g_t a_tᵀ."""
    return jnp.einsum("bto,bti->boi", act.output_grads, act.inputs)

  def precondition(self, factors, grad, damping) -> jax.Array:
    """Q_S ((Q_Sᵀ G Q_A) / (Λ + λ)) Q_Aᵀ for grad float32[..., O, I]."""
    q_a, q_s = factors.activation_eigenvectors, factors.gradient_eigenvectors
    rotated = jnp.swapaxes(q_s, 0, 1) @ grad @ q_a
    rotated = rotated / (factors.eigenvalues + damping)
    return q_s @ rotated @ jnp.swapaxes(q_a, 0, 1)

  def self_preconditioned(self, factors, act, damping) -> jax.Array:
    """⟨G_i, (G + λI)^{-1} G_i⟩ of this layer: float32[B].

    The eigenbases are orthogonal, so it is Σ (Q_Sᵀ G_i Q_A)² / (Λ + λ): the tokens
    are rotated (B·T·(O² + I²) multiply-adds) instead of every G_i, into the
    eigenbasis and back (2·B·O·I·(O + I)), and a one-token G_i = g aᵀ is never
    formed: Σ_oi (Q_Sᵀg)²_o (Q_Aᵀa)²_i / (Λ + λ)_oi.
    """
    q_a, q_s = factors.activation_eigenvectors, factors.gradient_eigenvectors
    inverse = 1.0 / (factors.eigenvalues + damping)
    rotated_inputs = act.inputs @ q_a
    rotated_grads = act.output_grads @ q_s
    if act.inputs.shape[1] == 1:
      return jnp.einsum("bo,oi,bi->b", rotated_grads[:, 0] ** 2, inverse,
                        rotated_inputs[:, 0] ** 2)
    rotated = jnp.einsum("bto,bti->boi", rotated_grads, rotated_inputs)
    return jnp.einsum("boi,oi->b", rotated ** 2, inverse)

  # --- inner products ------------------------------------------------------------------

  def token_dot(self, query, act) -> jax.Array:
    """⟨P_q, g_t a_tᵀ⟩ per train token: query float32[Q, O, I] -> float32[Q, B, T]."""
    return jnp.einsum("qoi,nto,nti->qnt", query, act.output_grads, act.inputs)

  def dot(self, query, act) -> jax.Array:
    """⟨P_q, G_i⟩: query float32[Q, O, I] -> float32[Q, B]."""
    if act.inputs.shape[1] == 1 and not _model_split():
      # One token: G_i = g_i a_iᵀ and ⟨P_q, G_i⟩ = g_iᵀ P_q a_i, the same Q·O·I
      # multiply-adds per example without writing the [B, O, I] gradients and
      # reading them back (XLA contracts the smaller of O, I first): 25–40% faster
      # on XLA:CPU at O = I = 256, Q = 128 (docs/experiments.md).
      return jnp.einsum("qoi,no,ni->qn", query, act.output_grads[:, 0],
                        act.inputs[:, 0])
    grads = self.per_example_grads(act)
    if _model_split():
      # An einsum over (O, I): reshaping a dimension split over `model` into [O·I]
      # makes XLA's SPMD partitioner reshard (the 8B plan's scores program did not
      # compile in 25 min; with the einsum, 64 s). Each shard contracts its part.
      return jnp.einsum("qoi,noi->qn", query, grads)
    # One [Q, O·I] @ [O·I, B] GEMM: on XLA:CPU the einsum takes 16% longer.
    return (jnp.reshape(query, (query.shape[0], -1))
            @ jnp.reshape(grads, (grads.shape[0], -1)).T)

  def low_rank_token_dot(self, u, v, act) -> jax.Array:
    """⟨U Vᵀ, g_t a_tᵀ⟩ = Σ_r (u_rᵀ g_t)(v_rᵀ a_t): float32[Q, B, T]."""
    return jnp.einsum("qor,nto,qir,nti->qnt", u, act.output_grads, v, act.inputs)

  def factored_cost(self, num_query, query_tokens, train_tokens) -> Tuple[int, int]:
    """Multiply-adds per train example: (factored, materialised) `⟨G_q, G_i⟩`."""
    i, o = self.spec.augmented_input_dim, self.spec.output_dim
    factored = num_query * query_tokens * train_tokens * (i + o + 1)
    materialised = train_tokens * i * o + num_query * i * o
    return factored, materialised

  def use_factored(self, num_query, query_tokens, train_tokens) -> bool:
    factored, materialised = self.factored_cost(num_query, query_tokens,
                                                train_tokens)
    return factored < materialised

  def inner_products(self, query_act, train_act) -> jax.Array:
    """⟨G_q, G_i⟩ (plain, unpreconditioned): float32[Q, B], cheaper form."""
    num_query, query_tokens = query_act.output_grads.shape[:2]
    if self.use_factored(num_query, query_tokens, train_act.output_grads.shape[1]):
      return self.factored_products(query_act, train_act)
    return self.dot(self.per_example_grads(query_act), train_act)

  def factored_products(self, query_act, train_act) -> jax.Array:
    """`Σ_{s,t} (g_qs·g_it)(a_qs·a_it)` = ⟨G_q, G_i⟩ without forming G: [Q, B]."""
    if query_act.inputs.shape[1] == 1 and train_act.inputs.shape[1] == 1:
      return ((query_act.output_grads[:, 0] @ train_act.output_grads[:, 0].T)
              * (query_act.inputs[:, 0] @ train_act.inputs[:, 0].T))
    grads = jnp.einsum("qso,nto->qnst", query_act.output_grads,
                       train_act.output_grads)
    inputs = jnp.einsum("qsi,nti->qnst", query_act.inputs, train_act.inputs)
    return jnp.sum(grads * inputs, axis=(2, 3))

  def self_inner_products(self, act) -> jax.Array:
    """‖G_i‖²: float32[B], factored `Σ_{s,t}(g_s·g_t)(a_s·a_t)` when cheaper."""
    tokens = act.output_grads.shape[1]
    i, o = self.spec.augmented_input_dim, self.spec.output_dim
    if tokens * tokens * (i + o + 1) < tokens * i * o + i * o:
      grams = jnp.einsum("bso,bto->bst", act.output_grads, act.output_grads)
      return jnp.sum(grams * jnp.einsum("bsi,bti->bst", act.inputs, act.inputs),
                     axis=(1, 2))
    grads = self.per_example_grads(act)
    return jnp.sum(grads * grads, axis=(1, 2))


def _append_ones(a):
  return jnp.concatenate([a, jnp.ones(a.shape[:-1] + (1,), a.dtype)], axis=-1)


class DenseBlock(CurvatureBlock):
  """Dense layers: `x @ W` over contracted input axes, any number of token axes."""

  name = "dense"

  @classmethod
  def describe(cls, module, inputs, outputs):
    ndim = inputs.ndim
    if isinstance(module, nn.Dense):
      axes, features, batch = (-1,), (module.features,), ()
    elif isinstance(module, nn.DenseGeneral):
      axes, features, batch = (_dims(module.axis), _dims(module.features),
                               tuple(_dims(module.batch_dims)))
    elif isinstance(module, nnx.Linear):
      axes, features, batch = (-1,), (module.out_features,), ()
    elif isinstance(module, nnx.LinearGeneral):
      axes, features, batch = (tuple(module.axis), tuple(module.out_features),
                               tuple(module.batch_axis))
    else:
      raise UnsupportedLayerError(
          f"{type(module).__name__} is not a layer kind DenseBlock knows; subclass "
          f"DenseBlock and override describe().")
    if batch:
      raise UnsupportedLayerError(
          f"batch dimensions {batch} (one kernel per batch index) are not a "
          f"Kronecker-factored layer")
    # Sorted like flax's own `_normalize_axes`: the kernel follows that order.
    in_axes = tuple(ax - ndim for ax in sorted(ax % ndim for ax in axes))
    input_dim = math.prod(inputs.shape[ax] for ax in in_axes)
    return dict(in_axes=in_axes, num_feature_axes=len(features),
                input_dim=input_dim, output_dim=math.prod(features),
                has_bias=bool(module.use_bias),
                kernel_shape=tuple(inputs.shape[ax] for ax in in_axes) + features,
                config=())

  def tokens(self, inputs, output_grads):
    spec = self.spec
    a = inputs.astype(jnp.float32)
    in_axes = tuple(ax % a.ndim for ax in spec.in_axes)
    free_shape = tuple(a.shape[ax] for ax in range(a.ndim) if ax not in in_axes)
    a = jnp.moveaxis(a, in_axes, tuple(range(a.ndim - len(in_axes), a.ndim)))
    a = jnp.reshape(a, (a.shape[0], -1, spec.input_dim))
    g = jnp.reshape(output_grads, (a.shape[0], -1, spec.output_dim))
    if spec.has_bias:
      a = _append_ones(a)
    return a, g.astype(jnp.float32), free_shape


def _canonical_padding(padding, rank):
  if isinstance(padding, str):
    return padding.upper()
  if isinstance(padding, int):
    return tuple((padding, padding) for _ in range(rank))
  pads = tuple(padding)
  if len(pads) != rank:
    raise UnsupportedLayerError(f"padding {padding!r} does not have {rank} entries")
  return tuple((int(p), int(p)) if isinstance(p, int) else tuple(int(x) for x in p)
               for p in pads)


class ConvBlock(DenseBlock):
  """Convolutions (channels last, `feature_group_count=1`): patches as tokens.

  `a` holds the im2col patch of every output position (input channels major, then
  the kernel's spatial offsets, as `lax.conv_general_dilated_patches` and torch's
  `unfold` order them; a ones column for the bias), `g` the output gradient at that
  position, so `Σ_positions g aᵀ` is the kernel gradient (Kronfluence's `Conv2d`
  treatment, for any stride, padding, input and kernel dilation).
  """

  name = "conv"

  @classmethod
  def describe(cls, module, inputs, outputs):
    if isinstance(module, nn.Conv):
      features = module.features
    elif isinstance(module, nnx.Conv):
      features = module.out_features
    else:
      raise UnsupportedLayerError(
          f"{type(module).__name__} is not a layer kind ConvBlock knows")
    kernel_size = _dims(module.kernel_size)
    rank = len(kernel_size)
    if rank > 3:
      raise UnsupportedLayerError(f"convolutions of rank {rank} > 3 are not supported")
    if module.feature_group_count != 1:
      raise UnsupportedLayerError(
          f"feature_group_count={module.feature_group_count} (grouped convolution) "
          f"is not supported; only feature_group_count=1")
    if getattr(module, "mask", None) is not None:
      raise UnsupportedLayerError("masked convolutions (mask=...) are not supported")
    broadcast = lambda x: (1,) * rank if x is None else (
        (x,) * rank if isinstance(x, int) else tuple(int(v) for v in x))
    padding = _canonical_padding(module.padding, rank)
    if padding == "CAUSAL" and rank != 1:
      raise UnsupportedLayerError("CAUSAL padding needs a 1D convolution")
    channels = inputs.shape[-1]
    config = (("kernel_size", kernel_size), ("strides", broadcast(module.strides)),
              ("padding", padding),
              ("input_dilation", broadcast(module.input_dilation)),
              ("kernel_dilation", broadcast(module.kernel_dilation)))
    return dict(in_axes=(), num_feature_axes=1,
                input_dim=channels * math.prod(kernel_size), output_dim=features,
                has_bias=bool(module.use_bias),
                kernel_shape=kernel_size + (channels, features), config=config)

  def _patches(self, inputs):
    config = dict(self.spec.config)
    kernel_size = config["kernel_size"]
    rank = len(kernel_size)
    x = inputs.astype(jnp.float32)
    x = jnp.reshape(x, (-1,) + x.shape[x.ndim - rank - 1:])
    padding = config["padding"]
    dilation = config["kernel_dilation"]
    # The same input padding flax applies before its VALID convolution.
    if padding in ("CIRCULAR", "REFLECT"):
      dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
      pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
      x = jnp.pad(x, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
      padding = "VALID"
    elif padding == "CAUSAL":
      x = jnp.pad(x, [(0, 0), (dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
      padding = "VALID"
    spatial = "HWD"[:rank]
    numbers = ("N" + spatial + "C", "OI" + spatial, "N" + spatial + "C")
    return jax.lax.conv_general_dilated_patches(
        x, kernel_size, config["strides"], padding,
        lhs_dilation=config["input_dilation"], rhs_dilation=dilation,
        dimension_numbers=numbers, precision=jax.lax.Precision.HIGHEST)

  def tokens(self, inputs, output_grads):
    spec = self.spec
    num_examples = inputs.shape[0]
    patches = self._patches(inputs)
    free_shape = tuple(output_grads.shape[:-1])
    a = jnp.reshape(patches, (num_examples, -1, spec.input_dim))
    g = jnp.reshape(output_grads, (num_examples, -1, spec.output_dim))
    if spec.has_bias:
      a = _append_ones(a)
    return a, g.astype(jnp.float32), free_shape

  def _kernel_to_rows(self, kernel, lead):
    # kernel [*lead, *kernel_size, C, F] -> [*lead, C, *kernel_size, F]: patch order.
    rank = len(self.spec.kernel_shape) - 2
    n = len(lead)
    order = tuple(range(n)) + (n + rank,) + tuple(range(n, n + rank)) + (n + rank + 1,)
    return jnp.transpose(kernel, order)

  def param_matrix(self, kernel, bias, lead=()):
    kernel = jnp.reshape(kernel, lead + self.spec.kernel_shape)
    return super().param_matrix(self._kernel_to_rows(kernel, lead), bias, lead)

  def matrix_params(self, matrix):
    spec = self.spec
    rank = len(spec.kernel_shape) - 2
    channels, features = spec.kernel_shape[-2:]
    rows = jnp.reshape(jnp.swapaxes(matrix[:, :spec.input_dim], 0, 1),
                       (channels,) + spec.kernel_shape[:rank] + (features,))
    kernel = jnp.transpose(rows, tuple(range(1, rank + 1)) + (0, rank + 1))
    return kernel, (matrix[:, spec.input_dim] if spec.has_bias else None)


class EmbedBlock(CurvatureBlock):
  """Embedding lookups: `a` is the one-hot id, kept as int32 ids [B, T].

  The gradient matrix is float32[features, vocab] (the embedding table's
  transpose). A = E[a aᵀ] is diagonal (token frequencies), so Q_A is the identity
  (stored as a [0, 0] placeholder) and nothing of size vocab² is formed.
  """

  name = "embed"
  kernel_name = "embedding"
  bias_name = None
  weight_reading_methods = ("attend",)
  enabled_by_default = False

  @classmethod
  def describe(cls, module, inputs, outputs):
    if not isinstance(module, (nn.Embed, nnx.Embed)):
      raise UnsupportedLayerError(
          f"{type(module).__name__} is not a layer kind EmbedBlock knows")
    if not jnp.issubdtype(inputs.dtype, jnp.integer):
      raise UnsupportedLayerError(f"inputs of dtype {inputs.dtype} are not token ids")
    return dict(in_axes=(), num_feature_axes=1, input_dim=module.num_embeddings,
                output_dim=module.features, has_bias=False,
                kernel_shape=(module.num_embeddings, module.features), config=())

  def tokens(self, inputs, output_grads):
    num_examples = inputs.shape[0]
    ids = jnp.reshape(inputs.astype(jnp.int32), (num_examples, -1))
    g = jnp.reshape(output_grads, (num_examples, -1, self.spec.output_dim))
    return ids, g.astype(jnp.float32), tuple(inputs.shape)

  def param_matrix(self, kernel, bias, lead=()):
    kernel = jnp.reshape(kernel, lead + (self.spec.input_dim, self.spec.output_dim))
    return jnp.swapaxes(kernel, -1, -2).astype(jnp.float32)

  def matrix_params(self, matrix):
    return jnp.swapaxes(matrix, 0, 1), None

  def activation_sum(self, act):
    """The diagonal Σ_tokens w [id = v]: float32[V]."""
    return jnp.zeros((self.spec.input_dim,), jnp.float32).at[
        jnp.ravel(act.inputs)].add(jnp.ravel(act.token_weights))

  def rotated_square_sum(self, act, q_a, q_s, example_weights):
    del q_a  # identity
    rotated = act.output_grads @ q_s  # [B, T, O]
    # Σ_b (Σ_{t: id_t = v} r_bt)² = Σ_b Σ_t r_bt ⊙ Σ_{t': id_t' = id_t} r_bt', then
    # scattered to column id_t: T² per example instead of a dense [O, V] per example.
    same = (act.inputs[:, :, None] == act.inputs[:, None, :]).astype(jnp.float32)
    partner = jnp.einsum("bst,bto->bso", same, rotated)
    contributions = rotated * partner * example_weights[:, None, None]
    sums = jnp.zeros((self.spec.input_dim, self.spec.output_dim), jnp.float32)
    sums = sums.at[jnp.ravel(act.inputs)].add(
        jnp.reshape(contributions, (-1, self.spec.output_dim)))
    return sums.T

  def per_example_grads(self, act):
    num_examples, num_tokens = act.inputs.shape
    grads = jnp.zeros((num_examples, self.spec.input_dim, self.spec.output_dim),
                      jnp.float32)
    rows = jnp.repeat(jnp.arange(num_examples), num_tokens)
    grads = grads.at[rows, jnp.ravel(act.inputs)].add(
        jnp.reshape(act.output_grads, (-1, self.spec.output_dim)))
    return jnp.swapaxes(grads, 1, 2)

  def precondition(self, factors, grad, damping):
    q_s = factors.gradient_eigenvectors
    rotated = (jnp.swapaxes(q_s, 0, 1) @ grad) / (factors.eigenvalues + damping)
    return q_s @ rotated

  def self_preconditioned(self, factors, act, damping):
    # The activation basis is the identity: precondition the sparse gradients.
    grads = self.per_example_grads(act)
    return jnp.sum(self.precondition(factors, grads, damping) * grads, axis=(1, 2))

  def token_dot(self, query, act):
    # P_q[:, id_t] · g_t: a gather of the query's columns, no one-hot.
    columns = jnp.take(query, act.inputs, axis=2)  # [Q, O, B, T]
    return jnp.einsum("qont,nto->qnt", columns, act.output_grads)

  def dot(self, query, act):
    return jnp.sum(self.token_dot(query, act), axis=-1)

  def low_rank_token_dot(self, u, v, act):
    rows = jnp.take(v, act.inputs, axis=1)  # [Q, B, T, R]
    return jnp.einsum("qor,nto,qntr->qnt", u, act.output_grads, rows)

  def factored_cost(self, num_query, query_tokens, train_tokens):
    o = self.spec.output_dim
    return (num_query * query_tokens * train_tokens * (o + 1),
            train_tokens * o + num_query * self.spec.input_dim * o)

  def factored_products(self, query_act, train_act):
    grads = jnp.einsum("qso,nto->qnst", query_act.output_grads,
                       train_act.output_grads)
    same = (query_act.inputs[:, None, :, None]
            == train_act.inputs[None, :, None, :]).astype(jnp.float32)
    return jnp.sum(grads * same, axis=(2, 3))

  def self_inner_products(self, act):
    grams = jnp.einsum("bso,bto->bst", act.output_grads, act.output_grads)
    same = (act.inputs[:, :, None] == act.inputs[:, None, :]).astype(jnp.float32)
    return jnp.sum(grams * same, axis=(1, 2))


# --- registry ------------------------------------------------------------------------

_BLOCKS_BY_NAME: Dict[str, type] = {}
_BLOCKS_BY_MODULE: Dict[type, type] = {}


def register_layer_kind(module_class: type, block_class: type) -> None:
  """Makes layer discovery treat calls of `module_class` as `block_class` layers.

  Args:
    module_class: a linen or NNX module class. Its subclasses that override none
      of its methods (they change field defaults only) are its kind too; one with
      its own `__call__` or other method is not tracked unless registered itself.
    block_class: a `CurvatureBlock` subclass with a unique `name`; its `describe`
      must read `module_class`'s configuration.

  Raises:
    ValueError: `block_class` is not a `CurvatureBlock` with a name, or another
      class is registered under its name.
  """
  if not (isinstance(block_class, type) and issubclass(block_class, CurvatureBlock)
          and block_class.name):
    raise ValueError(f"block_class must be a CurvatureBlock subclass with a name, "
                     f"got {block_class!r}.")
  if not isinstance(module_class, type):
    raise ValueError(f"module_class must be a class, got {module_class!r}.")
  existing = _BLOCKS_BY_NAME.get(block_class.name)
  if existing is not None and existing is not block_class:
    raise ValueError(f"block_class: the name {block_class.name!r} is already "
                     f"registered for {existing.__name__}.")
  _BLOCKS_BY_NAME[block_class.name] = block_class
  _BLOCKS_BY_MODULE[module_class] = block_class


def block_for_module(module) -> Optional[type]:
  """The block class registered for `type(module)` or inherited (`_inherited_block`),
  or None."""
  _register_nnx_kinds()
  found = _BLOCKS_BY_MODULE.get(type(module))
  return found if found is not None else _inherited_block(type(module))


def _inherited_block(module_class: type) -> Optional[type]:
  """The block of `module_class`'s nearest registered base class, if neither it nor
  the classes between them override any of that base's methods (a subclass that only
  changes field defaults, e.g. `class MyDense(nn.Dense): use_bias: bool = False`,
  computes what the base does); else None. Left out, such a layer was excluded with
  only a warning (review h33). An overridden `__call__` could apply the kernel to
  other inputs than those captured, so it is never inherited.
  """
  mro = module_class.__mro__
  fields = getattr(module_class, "__dataclass_fields__", {})
  for depth, base in enumerate(mro[1:], 1):
    found = _BLOCKS_BY_MODULE.get(base)
    if found is None:
      continue
    for klass in mro[:depth]:
      for attr, value in vars(klass).items():
        if attr in fields or (attr.startswith("__") and attr != "__call__"):
          continue
        method = callable(value) or isinstance(value, (property, staticmethod,
                                                       classmethod))
        if method and hasattr(base, attr):
          return None
    return found
  return None


def block_for_module_class(module_class: type) -> Optional[type]:
  _register_nnx_kinds()
  return _BLOCKS_BY_MODULE.get(module_class)


def block_class(name: str) -> type:
  """The block class registered under `name`."""
  if name not in _BLOCKS_BY_NAME:
    raise ValueError(f"block: no layer kind {name!r} is registered (known: "
                     f"{sorted(_BLOCKS_BY_NAME)}); register_layer_kind it first.")
  return _BLOCKS_BY_NAME[name]


def block(spec) -> CurvatureBlock:
  """The block instance of a `LayerSpec`."""
  return block_class(spec.block)(spec)


def registered_module_classes() -> Tuple[type, ...]:
  _register_nnx_kinds()
  return tuple(_BLOCKS_BY_MODULE)


def default_block_names() -> Tuple[str, ...]:
  return tuple(n for n, c in _BLOCKS_BY_NAME.items() if c.enabled_by_default)


def all_block_names() -> Tuple[str, ...]:
  return tuple(_BLOCKS_BY_NAME)


for _module_class, _block_class in ((nn.Dense, DenseBlock), (nn.DenseGeneral, DenseBlock),
                                    (nn.Conv, ConvBlock), (nn.Embed, EmbedBlock)):
  register_layer_kind(_module_class, _block_class)
del _module_class, _block_class
# NNX kinds: registered once flax.nnx is imported (`_nnx.py`), by every lookup after
# that (setdefault: a kind the user registered stays theirs).
_NNX_KINDS = (("Linear", DenseBlock), ("LinearGeneral", DenseBlock), ("Conv", ConvBlock),
              ("Embed", EmbedBlock))


def _register_nnx_kinds() -> None:
  if _nnx.imported():
    for class_name, block_class_ in _NNX_KINDS:
      _BLOCKS_BY_MODULE.setdefault(getattr(nnx, class_name), block_class_)
