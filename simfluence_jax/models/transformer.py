"""A small decoder-only Transformer language model (pre-LN, learned positions).

Every linear map is an `nn.Dense`, so the EK-FAC kernels find all layers by
intercepting `Dense` calls; the token and position embeddings are lookups, not
matmuls, and are therefore not EK-FAC layers.
"""

import flax.linen as nn
import jax.numpy as jnp

# GPT-2 style small-normal embedding init: a unit-variance embedding would dwarf the
# residual stream of a 64-wide model at initialisation.
_EMBED_INIT = nn.initializers.normal(stddev=0.02)


class CausalSelfAttention(nn.Module):
  """Multi-head causal self-attention with separate q/k/v `Dense` projections.

  Attributes:
    num_heads: number of attention heads; must divide the model width.
    dropout: dropout rate on the attention weights (0 = deterministic).
    use_bias: biases on the q/k/v/out projections.
  """

  num_heads: int
  dropout: float = 0.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """float32[B, L, D] -> float32[B, L, D]."""
    batch, length, width = x.shape
    if width % self.num_heads:
      raise ValueError(f"CausalSelfAttention: d_model={width} is not divisible by "
                       f"num_heads={self.num_heads}.")
    head_dim = width // self.num_heads
    split = lambda y: jnp.reshape(y, (batch, length, self.num_heads, head_dim))
    query = split(nn.Dense(width, use_bias=self.use_bias, name="query")(x))
    key = split(nn.Dense(width, use_bias=self.use_bias, name="key")(x))
    value = split(nn.Dense(width, use_bias=self.use_bias, name="value")(x))
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key) / jnp.sqrt(
        jnp.asarray(head_dim, x.dtype))
    causal = jnp.tril(jnp.ones((length, length), dtype=bool))
    logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
    weights = nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
    attended = jnp.einsum("bhqk,bkhd->bqhd", weights, value)
    return nn.Dense(width, use_bias=self.use_bias, name="out")(
        jnp.reshape(attended, (batch, length, width)))


class Block(nn.Module):
  """Pre-LN Transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

  num_heads: int
  d_ff: int
  dropout: float = 0.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    """float32[B, L, D] -> float32[B, L, D]."""
    width = x.shape[-1]
    h = CausalSelfAttention(self.num_heads, self.dropout, self.use_bias,
                            name="attention")(nn.LayerNorm(name="ln_attention")(x),
                                              deterministic)
    x = x + nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.Dense(self.d_ff, use_bias=self.use_bias, name="mlp_in")(
        nn.LayerNorm(name="ln_mlp")(x))
    h = nn.Dense(width, use_bias=self.use_bias, name="mlp_out")(nn.gelu(h))
    return x + nn.Dropout(self.dropout)(h, deterministic=deterministic)


class TransformerLM(nn.Module):
  """Decoder-only causal language model.

  The reference configuration (vocab 259, d_model 64, 2 layers, 4 heads, d_ff 256,
  max_len 32) has 135,555 parameters.

  Attributes:
    vocab_size: V, number of token ids.
    d_model: residual stream width D.
    num_layers: number of Transformer blocks.
    num_heads: attention heads per block.
    d_ff: hidden width of the feed-forward layers.
    max_len: longest sequence the learned position embedding covers.
    dropout: dropout rate; 0 keeps the model deterministic (the default, so that
      per-step losses depend only on the curriculum).
    use_bias: biases on every Dense layer. Without them (as in Llama-style
      decoders) a layer's EK-FAC A factor is I × I, not (I + 1)², so a model mesh
      axis that divides the width can split it.
  """

  vocab_size: int
  d_model: int = 64
  num_layers: int = 2
  num_heads: int = 4
  d_ff: int = 256
  max_len: int = 32
  dropout: float = 0.0
  use_bias: bool = True

  @nn.compact
  def __call__(self, tokens, deterministic: bool = True):
    """Next-token logits.

    Args:
      tokens: int32[B, L] with L <= max_len.
      deterministic: disables dropout (needs a "dropout" rng when False).

    Returns:
      float32[B, L, V]; position l only depends on tokens[:, :l+1] (for ids in
      [0, V): an id ≥ V embeds as NaN, and a NaN value anywhere in a row reaches
      every position through attention's zero weights, 0·NaN = NaN).
    """
    length = tokens.shape[-1]
    if length > self.max_len:
      raise ValueError(f"TransformerLM: sequence length {length} exceeds "
                       f"max_len={self.max_len}.")
    x = nn.Embed(self.vocab_size, self.d_model, embedding_init=_EMBED_INIT,
                 name="token_embedding")(tokens)
    x = x + nn.Embed(self.max_len, self.d_model, embedding_init=_EMBED_INIT,
                     name="position_embedding")(jnp.arange(length))[None]
    x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
    for layer in range(self.num_layers):
      x = Block(self.num_heads, self.d_ff, self.dropout, self.use_bias,
                name=f"block_{layer}")(x, deterministic)
    x = nn.LayerNorm(name="ln_final")(x)
    # An untied output head keeps the vocabulary projection a plain Dense layer that
    # EK-FAC can precondition like any other.
    return nn.Dense(self.vocab_size, use_bias=self.use_bias, name="head")(x).astype(
        jnp.float32)
