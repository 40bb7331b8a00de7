"""Post-norm transformer encoder / decoder with positional embeddings added to queries and keys (DETR).

As in DETR (Carion et al. 2020) and HF's ``DetrEncoderLayer`` / ``DetrDecoderLayer``: position embeddings
are added to the queries and keys of every attention, never to the values; each sub-layer is
``LayerNorm(x + Dropout(sublayer(x)))``; the decoder returns every layer's output after one shared final
LayerNorm (auxiliary decoding losses). Submodule names follow HF's attribute names (``layers_0/self_attn/
q_proj``, ``mlp/fc1``, ``final_layer_norm``) so that ``cvjax.convert`` maps one HF key to one leaf.

Sequences are ``[B, N, d_model]``; key padding masks are ``[B, N]`` bool, ``True`` on real tokens. Dropout
draws from the ``dropout`` rng when ``train=True``.

Initialisation as facebookresearch/detr's ``Transformer._reset_parameters``: every weight matrix is
xavier-uniform -- the q/k/v projections with the bounds of PyTorch's fused ``in_proj_weight [3d, d]``, which
is what that rule sees -- attention biases are zero (``nn.MultiheadAttention``), the feed-forward biases keep
PyTorch's default ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, LayerNorms start at (1, 0).
"""

from __future__ import annotations

import functools
from typing import Callable, Optional, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models.layers import torch_default_bias_init

# PyTorch's LayerNorm epsilon (flax defaults to 1e-6).
LAYER_NORM_EPSILON = 1e-5

_layer_norm = functools.partial(nn.LayerNorm, epsilon=LAYER_NORM_EPSILON)


def _fused_qkv_xavier_uniform(key, shape, dtype=jnp.float32):
  """Xavier-uniform of one of the three ``[d, d]`` blocks of a fused ``[3d, d]`` q/k/v projection: bound
  ``sqrt(6 / (d + 3d))``, i.e. fan-out three times the block's."""
  fan_in, fan_out = shape[0], 3 * shape[1]
  bound = (6.0 / (fan_in + fan_out)) ** 0.5
  return jax.random.uniform(key, shape, dtype, -bound, bound)


def _with_position(x: jnp.ndarray, position: Optional[jnp.ndarray]) -> jnp.ndarray:
  return x if position is None else x + position


class MultiHeadAttention(nn.Module):
  """Scaled dot-product attention over ``num_heads`` heads with separate q/k/v/out projections.

  Attributes:
    num_heads: heads; ``d_model`` (the query's last dim) must be divisible by it.
    dropout_rate: dropout on the attention weights in training.
  """
  num_heads: int
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, query: jnp.ndarray, key: jnp.ndarray, value: jnp.ndarray, *,
               key_padding_mask: Optional[jnp.ndarray] = None, train: bool) -> jnp.ndarray:
    """Attends ``query [B, Q, d]`` to ``key [B, K, d]`` / ``value [B, K, d]``.

    ``key_padding_mask [B, K]`` (``True`` = attend) removes padded keys from the softmax. Returns
    ``[B, Q, d]``.
    """
    d_model = query.shape[-1]
    if d_model % self.num_heads:
      raise ValueError(f"d_model {d_model} is not divisible by num_heads {self.num_heads}")
    head_dim = d_model // self.num_heads

    def project(x, name):
      dense = nn.Dense(d_model, kernel_init=_fused_qkv_xavier_uniform, name=name)
      return dense(x).reshape(*x.shape[:-1], self.num_heads, head_dim)

    q = project(query, "q_proj") * head_dim**-0.5
    k = project(key, "k_proj")
    v = project(value, "v_proj")
    logits = jnp.einsum("bqhc,bkhc->bhqk", q, k)
    if key_padding_mask is not None:
      if key_padding_mask.shape != key.shape[:2]:
        raise ValueError(f"key_padding_mask must be [B, K] = {key.shape[:2]}, got {key_padding_mask.shape}")
      # A large finite negative (not -inf) keeps a fully padded row finite, as HF does.
      logits = jnp.where(key_padding_mask[:, None, None, :], logits, jnp.finfo(logits.dtype).min)
    weights = nn.softmax(logits, axis=-1)
    weights = nn.Dropout(self.dropout_rate, deterministic=not train)(weights)
    out = jnp.einsum("bhqk,bkhc->bqhc", weights, v).reshape(*query.shape[:-1], d_model)
    return nn.Dense(d_model, kernel_init=nn.initializers.xavier_uniform(), name="o_proj")(out)


class FeedForward(nn.Module):
  """``fc2(Dropout(activation(fc1(x))))``: ``[..., d]`` -> ``[..., d]`` through ``hidden_dim`` channels."""
  hidden_dim: int
  activation_dropout_rate: float = 0.0
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    dense = functools.partial(nn.Dense, kernel_init=nn.initializers.xavier_uniform())
    y = self.activation(dense(self.hidden_dim, bias_init=torch_default_bias_init(x.shape[-1]), name="fc1")(x))
    y = nn.Dropout(self.activation_dropout_rate, deterministic=not train)(y)
    return dense(x.shape[-1], bias_init=torch_default_bias_init(self.hidden_dim), name="fc2")(y)


class _LayerSettings(nn.Module):
  """Hyperparameters shared by the encoder and decoder layers and stacks.

  Attributes:
    num_heads: attention heads.
    ffn_dim: hidden width of the feed-forward block.
    dropout_rate: dropout on each sub-layer's output before the residual add.
    attention_dropout_rate: dropout on attention weights.
    activation_dropout_rate: dropout after the feed-forward block's activation.
    activation: the feed-forward block's activation (relu in DETR; HF ``activation_function``).
  """
  num_heads: int = 8
  ffn_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.1
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  def _residual_norm(self, x, update, name, train):
    update = nn.Dropout(self.dropout_rate, deterministic=not train)(update)
    return _layer_norm(name=name)(x + update)

  def _attention(self, name):
    return MultiHeadAttention(self.num_heads, self.attention_dropout_rate, name=name)

  def _feed_forward(self, x, train):
    y = FeedForward(self.ffn_dim, self.activation_dropout_rate, self.activation, name="mlp")(x, train=train)
    return self._residual_norm(x, y, "final_layer_norm", train)

  def _layer_kwargs(self):
    return dict(num_heads=self.num_heads, ffn_dim=self.ffn_dim, dropout_rate=self.dropout_rate,
                attention_dropout_rate=self.attention_dropout_rate,
                activation_dropout_rate=self.activation_dropout_rate, activation=self.activation)


class EncoderLayer(_LayerSettings):
  """Self-attention (position added to queries and keys) then feed-forward, both post-norm."""

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, position: Optional[jnp.ndarray] = None,
               padding_mask: Optional[jnp.ndarray] = None, train: bool) -> jnp.ndarray:
    """``x [B, N, d]``, ``position [B, N, d]``, ``padding_mask [B, N]`` -> ``[B, N, d]``."""
    qk = _with_position(x, position)
    y = self._attention("self_attn")(qk, qk, x, key_padding_mask=padding_mask, train=train)
    x = self._residual_norm(x, y, "self_attn_layer_norm", train)
    return self._feed_forward(x, train)


class DecoderLayer(_LayerSettings):
  """Query self-attention, cross-attention to the memory, feed-forward; all post-norm.

  The query position embedding is added to the queries and keys of the self-attention and to the queries
  of the cross-attention; the memory's position embedding to the cross-attention keys.
  """

  @nn.compact
  def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, *, query_position: Optional[jnp.ndarray] = None,
               memory_position: Optional[jnp.ndarray] = None, memory_padding_mask: Optional[jnp.ndarray] = None,
               train: bool) -> jnp.ndarray:
    """``x [B, Q, d]``, ``memory [B, N, d]``, positions of the same shapes, ``memory_padding_mask [B, N]``
    -> ``[B, Q, d]``."""
    qk = _with_position(x, query_position)
    y = self._attention("self_attn")(qk, qk, x, train=train)
    x = self._residual_norm(x, y, "self_attn_layer_norm", train)
    y = self._attention("encoder_attn")(_with_position(x, query_position), _with_position(memory, memory_position),
                                        memory, key_padding_mask=memory_padding_mask, train=train)
    x = self._residual_norm(x, y, "encoder_attn_layer_norm", train)
    return self._feed_forward(x, train)


class Encoder(_LayerSettings):
  """``num_layers`` ``EncoderLayer``s (named ``layers_<i>``), no final norm (post-norm layers end normed).

  Attributes:
    input_dropout_rate: dropout on the encoder's input (HF's ``DetrEncoder`` applies ``dropout`` there, the
      official DETR does not).
  """
  num_layers: int = 6
  input_dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, position: Optional[jnp.ndarray] = None,
               padding_mask: Optional[jnp.ndarray] = None, train: bool) -> jnp.ndarray:
    """``x [B, N, d]``, ``position [B, N, d]``, ``padding_mask [B, N]`` -> ``[B, N, d]``."""
    x = nn.Dropout(self.input_dropout_rate, deterministic=not train)(x)
    for i in range(self.num_layers):
      x = EncoderLayer(**self._layer_kwargs(), name=f"layers_{i}")(
          x, position=position, padding_mask=padding_mask, train=train)
    return x


class Decoder(_LayerSettings):
  """``num_layers`` ``DecoderLayer``s (``layers_<i>``) and one shared output LayerNorm (``layernorm``).

  The LayerNorm is applied to a copy of each layer's output for the result; the next layer receives the
  un-normalised output (DETR's ``return_intermediate``; HF ``auxiliary_loss=False`` for the last layer).

  Attributes:
    feed_normed_outputs: instead, each layer receives the previous layer's normalised output, which is also
      its result, and the last result is normalised once more: HF's ``DetrDecoder`` with
      ``auxiliary_loss=True``.
  """
  num_layers: int = 6
  feed_normed_outputs: bool = False

  @nn.compact
  def __call__(self, x: jnp.ndarray, memory: jnp.ndarray, *, query_position: Optional[jnp.ndarray] = None,
               memory_position: Optional[jnp.ndarray] = None, memory_padding_mask: Optional[jnp.ndarray] = None,
               train: bool, return_layer_outputs: bool = False
               ) -> Union[jnp.ndarray, Tuple[jnp.ndarray, jnp.ndarray]]:
    """Decodes queries ``x [B, Q, d]`` against ``memory [B, N, d]``.

    Returns:
      ``[num_layers, B, Q, d]``: every layer's output after the shared LayerNorm (the last entry is the
      final output). With ``return_layer_outputs`` also, second, every ``DecoderLayer``'s own output before
      that LayerNorm, ``[num_layers, B, Q, d]`` (what HF's decoders report as ``hidden_states``).
    """
    norm = _layer_norm(name="layernorm")
    outputs, layer_outputs = [], []
    for i in range(self.num_layers):
      x = DecoderLayer(**self._layer_kwargs(), name=f"layers_{i}")(
          x, memory, query_position=query_position, memory_position=memory_position,
          memory_padding_mask=memory_padding_mask, train=train)
      layer_outputs.append(x)
      if self.feed_normed_outputs:
        x = norm(x)
        outputs.append(norm(x) if i == self.num_layers - 1 else x)
      else:
        outputs.append(norm(x))
    if return_layer_outputs:
      return jnp.stack(outputs), jnp.stack(layer_outputs)
    return jnp.stack(outputs)
