"""Swin Transformer (Liu et al. 2021): a hierarchical vision transformer with shifted-window attention.

A ``patch x patch`` stride-``patch`` conv + LayerNorm embeds the image into a ``[B, H/4, W/4, C]`` token map.
Stage ``i`` (``C_i = embed_dim * 2**i`` channels) runs ``depths[i]`` pre-norm blocks
``x + DropPath(W-MSA(LN(x)))``, ``x + DropPath(MLP(LN(x)))``; every second block shifts its windows by
``window_size // 2`` (``jnp.roll`` by ``-shift`` before the window partition, ``+shift`` after, with the -100
region mask of ``cvjax.ops.shifted_window_mask``). Every stage but the last ends with PatchMerging (2x2
neighbours concatenated in the reference's channel order, LayerNorm(4C), Linear 4C -> 2C without bias). The
classifier applies a final LayerNorm, averages over positions and a linear head.

Semantics follow HF ``SwinModel`` (microsoft/Swin-Transformer's code, generalised to any input size):
  * images whose sides are not multiples of ``patch_size`` are zero-padded bottom/right first;
  * in every block, maps whose sides are not multiples of the window are zero-padded bottom/right after the
    first LayerNorm, attended (padding tokens take part as keys, as in the reference) and cropped back;
  * a map with ``min(H, W) <= window_size`` uses one window of side ``min(H, W)`` and no shift
    (``cvjax.ops.effective_window_and_shift``). The bias for that smaller window is the central
    ``(2w - 1)^2`` part of the table, i.e. the same bias for the same relative offset (HF raises a shape
    error when ``min(H, W) < window_size``; the reference builds a smaller table at construction instead).
    ``shrink_small_windows=False`` instead keeps the configured window and shift on every map, zero-padding
    it up to whole windows: the reference's detection / segmentation backbone and HF ``MaskFormerSwin``;
  * PatchMerging zero-pads odd sides bottom/right (so a 25x35 map merges to 13x18).
Training-only difference: stochastic depth drops both residual branches of a block as in the paper's code
(HF drops only the attention branch).

Submodule names follow HF (``layers_1/blocks_0/attention/q_proj`` is
``swin.encoder.layers.1.blocks.0.attention.q_proj``), so ``cvjax.convert.swin`` maps one key to one leaf.

Input: NHWC float32 images already normalised by the input pipeline.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models.backbones.vit import gelu
from cvjax.models.layers import DropPath
from cvjax.models.registry import MODELS
from cvjax.ops.window_attention import (crop_window_padding, effective_window_and_shift, pad_to_window_multiple,
                                        relative_position_index, shifted_window_mask, window_attention,
                                        window_partition, window_reverse)

# Swin paper Sec. 3.3 / Table 1: (embed_dim C, depths, heads, ImageNet-1K stochastic depth rate (Sec. 4.1)).
ARCHITECTURES = {
    "swin_t": (96, (2, 2, 6, 2), (3, 6, 12, 24), 0.2),
    "swin_s": (96, (2, 2, 18, 2), (3, 6, 12, 24), 0.3),
    "swin_b": (128, (2, 2, 18, 2), (4, 8, 16, 32), 0.5),
}
# The reference's patch-embedding and PatchMerging LayerNorms use torch's default epsilon whatever the
# config's ``layer_norm_eps`` (which only reaches the blocks and the final norm).
TORCH_LAYER_NORM_EPS = 1e-5

# The reference initialises every Linear and the bias tables with trunc-normal std 0.02.
trunc_normal = nn.initializers.truncated_normal(0.02)


def relative_position_bias(table: jnp.ndarray, table_window: int, window: int) -> jnp.ndarray:
  """``[heads, N, N]`` bias (``N = window**2``) from a ``[(2 * table_window - 1)**2, heads]`` table.

  ``window <= table_window``; a smaller window (Swin's rule for small maps) needs only the offsets
  ``|dh|, |dw| < window``, the central ``(2 * window - 1)**2`` block of the table seen as a 2-D grid.
  """
  heads = table.shape[-1]
  if window != table_window:
    span, start = 2 * table_window - 1, table_window - window
    table = table.reshape(span, span, heads)[start:start + 2 * window - 1, start:start + 2 * window - 1]
    table = table.reshape(-1, heads)
  return table[relative_position_index(window)].transpose(2, 0, 1)


class WindowAttention(nn.Module):
  """Multi-head self-attention inside windows, with a learned relative position bias (HF ``SwinAttention``).

  Attributes:
    num_heads: heads; the channel count must divide by it.
    window_size: the configured window side; the bias table is ``[(2 * window_size - 1)**2, num_heads]``.
    qkv_bias: biases on the q/k/v projections.
    dropout_rate: dropout on the attention probabilities (train only, rng ``'dropout'``).
  """
  num_heads: int
  window_size: int
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, windows: jnp.ndarray, window: int, mask: Optional[jnp.ndarray], *,
               train: bool = False) -> jnp.ndarray:
    """``windows [B * nW, window**2, C]`` (``window <= window_size``), optional ``mask [nW, N, N]`` ->
    ``[B * nW, window**2, C]``."""
    num_windows, tokens, channels = windows.shape
    head_dim = channels // self.num_heads
    dense = functools.partial(nn.Dense, channels, dtype=self.dtype, kernel_init=trunc_normal)
    q, k, v = (dense(use_bias=self.qkv_bias, name=f"{n}_proj")(windows)
               .reshape(num_windows, tokens, self.num_heads, head_dim).transpose(0, 2, 1, 3) for n in "qkv")
    table = self.param("relative_position_bias_table", trunc_normal,
                       ((2 * self.window_size - 1) ** 2, self.num_heads))
    bias = relative_position_bias(table, self.window_size, window)
    if train and self.dropout_rate:
      # The dropout sits between the softmax and the value product, inside the op: redo that product here
      # (under jit the op's own, unused output is dead code).
      _, probs = window_attention(q, k, v, bias, mask, return_weights=True)
      probs = nn.Dropout(self.dropout_rate)(probs, deterministic=False)
      out = jnp.einsum("whnm,whmd->whnd", probs, v)
    else:
      out = window_attention(q, k, v, bias, mask)
    return dense(name="o_proj")(out.transpose(0, 2, 1, 3).reshape(num_windows, tokens, channels))


class MLP(nn.Module):
  """``fc2(activation(fc1(x)))`` (exact GELU by default) with inner width ``int(mlp_ratio * C)``."""
  mlp_ratio: float = 4.0
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    dense = functools.partial(nn.Dense, dtype=self.dtype, kernel_init=trunc_normal)
    y = dense(int(self.mlp_ratio * x.shape[-1]), name="fc1")(x)
    return dense(x.shape[-1], name="fc2")(self.activation(y))


class SwinBlock(nn.Module):
  """One (shifted-)window transformer block on a ``[B, H, W, C]`` map (HF ``SwinLayer``).

  Attributes:
    num_heads, window_size, mlp_ratio, qkv_bias: as in ``Swin``.
    shift: the configured cyclic shift (0 or ``window_size // 2``); small maps drop it (see module doc).
    drop_path_rate: stochastic depth rate of this block.
    dropout_rate: dropout on both residual branches' outputs.
    layer_norm_eps: epsilon of the two LayerNorms.
    activation, attention_dropout_rate, shrink_small_windows: as in ``Swin``.
  """
  num_heads: int
  window_size: int
  shift: int = 0
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu
  attention_dropout_rate: float = 0.0
  shrink_small_windows: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    _, height, width, channels = x.shape
    window, shift = self.window_size, self.shift
    if self.shrink_small_windows:
      window, shift = effective_window_and_shift(height, width, window, shift)
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    dropout = functools.partial(nn.Dropout(self.dropout_rate), deterministic=not train)
    drop_path = functools.partial(DropPath(self.drop_path_rate), deterministic=not train)

    # Padding comes after the norm, so padded tokens are exact zeros (not the norm's bias), as the reference.
    y, pad = pad_to_window_multiple(norm(name="layernorm_before")(x), window)
    padded_h, padded_w = y.shape[1:3]
    mask = None
    if shift:
      y = jnp.roll(y, (-shift, -shift), axis=(1, 2))
      mask = shifted_window_mask(padded_h, padded_w, window, shift)
    windows = window_partition(y, window).reshape(-1, window * window, channels)
    windows = WindowAttention(self.num_heads, self.window_size, self.qkv_bias, self.dtype,
                              self.attention_dropout_rate, name="attention")(windows, window, mask, train=train)
    y = window_reverse(windows.reshape(-1, window, window, channels), window, padded_h, padded_w)
    if shift:
      y = jnp.roll(y, (shift, shift), axis=(1, 2))
    x = x + drop_path(dropout(crop_window_padding(y, pad)))

    y = MLP(self.mlp_ratio, self.dtype, self.activation, name="mlp")(norm(name="layernorm_after")(x))
    return x + drop_path(dropout(y))


class PatchMerging(nn.Module):
  """``[B, H, W, C]`` -> ``[B, ceil(H / 2), ceil(W / 2), 2C]`` (HF ``SwinPatchMerging``).

  Odd sides are zero-padded bottom/right; the 2x2 neighbours are concatenated as
  ``x[0::2, 0::2], x[1::2, 0::2], x[0::2, 1::2], x[1::2, 1::2]`` (the reference's channel order, which a
  space-to-depth reshape does not give), then LayerNorm(4C) and a bias-free Linear 4C -> 2C.
  """
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    _, height, width, channels = x.shape
    x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
    x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], axis=-1)
    x = nn.LayerNorm(epsilon=TORCH_LAYER_NORM_EPS, dtype=self.dtype, name="norm")(x)
    return nn.Dense(2 * channels, use_bias=False, dtype=self.dtype, kernel_init=trunc_normal,
                    name="reduction")(x)


class SwinStage(nn.Module):
  """``depth`` blocks (shifted every second one when ``shifted_windows``) and an optional PatchMerging.

  Attributes:
    depth, num_heads: blocks and heads of the stage.
    drop_path_rates: the ``depth`` stochastic depth rates of its blocks.
    downsample: end with PatchMerging (every stage but the last).
    The rest: as in ``Swin``.
  """
  depth: int
  num_heads: int
  window_size: int
  drop_path_rates: Sequence[float]
  downsample: bool
  shifted_windows: bool = True
  mlp_ratio: float = 4.0
  qkv_bias: bool = True
  dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu
  attention_dropout_rate: float = 0.0
  shrink_small_windows: bool = True

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``[B, H, W, C]`` -> (stage output ``[B, H, W, C]``, next stage's input (merged, or the output))."""
    for i in range(self.depth):
      shift = self.window_size // 2 if self.shifted_windows and i % 2 else 0
      x = SwinBlock(self.num_heads, self.window_size, shift, self.mlp_ratio, self.qkv_bias,
                    self.drop_path_rates[i], self.dropout_rate, self.layer_norm_eps, self.dtype,
                    self.activation, self.attention_dropout_rate, self.shrink_small_windows,
                    name=f"blocks_{i}")(x, train=train)
    return x, (PatchMerging(self.dtype, name="downsample")(x) if self.downsample else x)


class Swin(nn.Module):
  """Swin Transformer classifier / multi-scale backbone.

  Attributes:
    patch_size: side of the square patches of the embedding conv (4 in the paper), or ``(PH, PW)``.
    embed_dim: channels ``C`` of stage 1; stage ``i`` (0-based) has ``C * 2**i``.
    depths: blocks per stage.
    num_heads: heads per stage (``C * 2**i`` must divide by ``num_heads[i]``).
    window_size: window side ``M`` (7 in the paper).
    mlp_ratio: MLP inner width over the channels.
    num_classes: classes of the ``classifier`` head; ``0`` returns the pooled ``[B, C * 2**(S-1)]`` features.
    drop_path_rate: stochastic depth rate of the last block; block ``k`` of ``K`` gets ``rate * k / (K - 1)``.
    dropout_rate: dropout after the embedding and on the residual branches (HF ``hidden_dropout_prob``).
    qkv_bias: biases on the q/k/v projections.
    shifted_windows: ``False`` never shifts (W-MSA only: the paper's Table 4 ablation).
    layer_norm_eps: epsilon of the blocks' and the final LayerNorm.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, logits are returned in float32.
    activation: the MLPs' activation (exact GELU as the paper; HF ``hidden_act``).
    attention_dropout_rate: dropout on the attention probabilities (HF ``attention_probs_dropout_prob``; the
      paper's ``attn_drop_rate``).
    shrink_small_windows: a map no larger than the window gets one window of its size and no shift (HF
      ``SwinModel``, the reference's classifier); False keeps the window and shift everywhere (module doc).
  """
  patch_size: Union[int, Tuple[int, int]] = 4
  embed_dim: int = 96
  depths: Sequence[int] = (2, 2, 6, 2)
  num_heads: Sequence[int] = (3, 6, 12, 24)
  window_size: int = 7
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  drop_path_rate: float = 0.0
  dropout_rate: float = 0.0
  qkv_bias: bool = True
  shifted_windows: bool = True
  layer_norm_eps: float = 1e-5
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu
  attention_dropout_rate: float = 0.0
  shrink_small_windows: bool = True

  def _patch(self) -> Tuple[int, int]:
    patch = (self.patch_size,) * 2 if isinstance(self.patch_size, int) else tuple(self.patch_size)
    if len(patch) != 2 or min(patch) < 1:
      raise ValueError(f"patch_size must be a positive int or a pair of them, got {self.patch_size!r}")
    return patch

  def _check(self, x: jnp.ndarray) -> None:
    if x.ndim != 4:
      raise ValueError(f"Swin expects NHWC images [B, H, W, C], got an input of shape {x.shape}")
    if len(self.depths) != len(self.num_heads) or not self.depths:
      raise ValueError(f"depths {tuple(self.depths)} and num_heads {tuple(self.num_heads)} must be non-empty "
                       "and of the same length (one entry per stage)")
    for i, heads in enumerate(self.num_heads):
      if (self.embed_dim * 2**i) % heads:
        raise ValueError(f"stage {i + 1} has {self.embed_dim * 2**i} channels, not divisible by num_heads "
                         f"{heads}")
    if self.window_size < 1:
      raise ValueError(f"window_size must be positive, got {self.window_size}")

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False) -> Union[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Classifies ``[B, H, W, C]`` images of any size (see the module doc for padding).

    Returns:
      logits ``[B, num_classes]`` float32 (pooled features ``[B, C * 2**(S-1)]`` if ``num_classes == 0``);
      with ``return_features=True`` instead a dict of NHWC maps in the compute dtype, as HF's
      ``reshaped_hidden_states`` with ``output_hidden_states_before_downsampling=True``:
      ``'stem'``: the patch embedding (after its LayerNorm) ``[B, h, w, C]``, ``h, w = ceil(H / patch)``;
      ``'stage{i}'``, ``i = 1..S``: stage ``i``'s output before its PatchMerging, ``[B, h_i, w_i, C * 2**(i-1)]``
      with ``h_1 = h`` and ``h_{i+1} = ceil(h_i / 2)`` (strides 4, 8, 16, 32 for the paper's models).
      No final LayerNorm is applied to them (HF ``SwinBackbone`` adds one per stage).
    """
    self._check(x)
    patch = self._patch()
    x = jnp.pad(x, ((0, 0), (0, -x.shape[1] % patch[0]), (0, -x.shape[2] % patch[1]), (0, 0)))
    x = nn.Conv(self.embed_dim, patch, strides=patch, padding="VALID", dtype=self.dtype,
                name="patch_embedding")(x)
    x = nn.LayerNorm(epsilon=TORCH_LAYER_NORM_EPS, dtype=self.dtype, name="embedding_norm")(x)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    features = {"stem": x}

    total = sum(self.depths)
    rates = [self.drop_path_rate * k / max(total - 1, 1) for k in range(total)]
    for i, (depth, heads) in enumerate(zip(self.depths, self.num_heads)):
      start = sum(self.depths[:i])
      features[f"stage{i + 1}"], x = SwinStage(
          depth, heads, self.window_size, tuple(rates[start:start + depth]), i + 1 < len(self.depths),
          self.shifted_windows, self.mlp_ratio, self.qkv_bias, self.dropout_rate, self.layer_norm_eps,
          self.dtype, self.activation, self.attention_dropout_rate, self.shrink_small_windows,
          name=f"layers_{i}")(x, train=train)
    if return_features:
      return features

    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=trunc_normal, name="classifier")(x)
    return x.astype(jnp.float32)


for _name, (_dim, _depths, _heads, _rate) in ARCHITECTURES.items():
  MODELS.register(_name)(functools.partial(Swin, embed_dim=_dim, depths=_depths, num_heads=_heads,
                                           drop_path_rate=_rate))
