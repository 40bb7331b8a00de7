"""Vision Transformer (Dosovitskiy et al. 2021; DeiT widths from Touvron et al. 2021).

Pre-norm encoder: patchify with a ``patch x patch`` stride-``patch`` conv, prepend a learned class token, add
learned position embeddings, ``depth`` blocks of ``x + MHSA(LN(x))`` then ``x + MLP(LN(x))`` (exact GELU),
a final LayerNorm, and a linear head on the class token (``pool='cls'``) or on the mean of the patch tokens
(``pool='gap'``, no class token, as big_vision).

Submodule names follow HF ``ViTForImageClassification`` (``layers_3/attention/q_proj`` is
``vit.layers.3.attention.q_proj``), so ``cvjax.convert.vit`` maps a state_dict one key to one leaf.

Input: NHWC float32 images already normalised by the input pipeline.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, List, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cvjax.models.layers import DropPath
from cvjax.models.registry import MODELS
from cvjax.ops._args import positive_int_pair

IntPair = Union[int, Tuple[int, int]]
POOLS = ("cls", "gap")
# ViT paper (Table 1) Base/Large and DeiT (Table 1) Tiny/Small: (hidden_size, depth, num_heads, mlp_dim).
WIDTHS = {"ti": (192, 12, 3, 768), "s": (384, 12, 6, 1536), "b": (768, 12, 12, 3072), "l": (1024, 24, 16, 4096)}
# Torch's bicubic convolution constant (``upsample_bicubic2d``); Keys' a=-0.5 (``jax.image.resize``) differs.
TORCH_BICUBIC_A = -0.75

dense_init = nn.initializers.xavier_uniform()


def gelu(x: jnp.ndarray) -> jnp.ndarray:
  """Exact (erf) GELU, the paper's and HF's ``'gelu'`` (flax's ``nn.gelu`` defaults to the tanh form)."""
  return nn.gelu(x, approximate=False)


def bicubic_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The ``[out_size, in_size]`` float64 matrix of torch's 1-D bicubic resize (``align_corners=False``).

  As ``torch.nn.functional.interpolate(mode='bicubic')``: source coordinate ``(i + 0.5) * in/out - 0.5``
  (not clamped), cubic convolution with ``a = -0.75`` over the 4 nearest samples, indices clamped to the edge.
  No antialiasing when shrinking (torch's default).
  """
  def cubic(t):
    t = np.abs(t)
    a = TORCH_BICUBIC_A
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))

  source = (np.arange(out_size) + 0.5) * (in_size / out_size) - 0.5
  base = np.floor(source).astype(int)
  matrix = np.zeros((out_size, in_size))
  for offset in (-1, 0, 1, 2):
    index = np.clip(base + offset, 0, in_size - 1)
    np.add.at(matrix, (np.arange(out_size), index), cubic(source - (base + offset)))
  return matrix


def resize_position_grid(grid: jnp.ndarray, out_hw: Tuple[int, int]) -> jnp.ndarray:
  """Bicubically resizes position embeddings ``[gh, gw, D]`` -> ``[out_h, out_w, D]`` as HF's
  ``interpolate_pos_encoding`` (torch bicubic, separable); the identity when the size is unchanged."""
  rows = jnp.asarray(bicubic_resize_matrix(grid.shape[0], out_hw[0]), grid.dtype)
  cols = jnp.asarray(bicubic_resize_matrix(grid.shape[1], out_hw[1]), grid.dtype)
  return jnp.einsum("ph,qw,hwd->pqd", rows, cols, grid)


class SelfAttention(nn.Module):
  """Multi-head self-attention with separate q/k/v/o projections (HF layout).

  Attributes:
    num_heads: heads; ``hidden_size`` must divide by it.
    dropout_rate: dropout on the attention probabilities (train only).
    qkv_bias: biases on the q/k/v projections.
  """
  num_heads: int
  dropout_rate: float = 0.0
  qkv_bias: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``[B, N, D]`` -> (``[B, N, D]``, attention probabilities ``[B, heads, N, N]`` in float32)."""
    batch, tokens, hidden = x.shape
    if hidden % self.num_heads:
      raise ValueError(f"hidden_size {hidden} is not divisible by num_heads {self.num_heads}")
    head_dim = hidden // self.num_heads
    dense = functools.partial(nn.Dense, hidden, dtype=self.dtype, kernel_init=dense_init)
    q, k, v = (dense(use_bias=self.qkv_bias, name=f"{n}_proj")(x).reshape(batch, tokens, self.num_heads, head_dim)
               for n in "qkv")
    logits = jnp.einsum("bqhd,bkhd->bhqk", q * head_dim**-0.5, k)
    # Softmax in float32 whatever the compute dtype (as HF's eager attention).
    probs = nn.softmax(logits.astype(jnp.float32), axis=-1)
    dropped = nn.Dropout(self.dropout_rate)(probs, deterministic=not train)
    out = jnp.einsum("bhqk,bkhd->bqhd", dropped.astype(self.dtype), v).reshape(batch, tokens, hidden)
    return dense(name="o_proj")(out), probs


class MLP(nn.Module):
  """``fc2(activation(fc1(x)))``, exact (erf) GELU by default: ``[B, N, D]`` -> ``[B, N, D]``."""
  mlp_dim: int
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=dense_init, name="fc2")(self.activation(y))


class EncoderBlock(nn.Module):
  """Pre-norm block: ``x + DropPath(drop(MHSA(LN(x))))``, then ``x + DropPath(drop(MLP(LN(x))))``."""
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``[B, N, D]`` -> (``[B, N, D]``, attention probabilities ``[B, heads, N, N]``)."""
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    dropout = functools.partial(nn.Dropout(self.dropout_rate), deterministic=not train)
    drop_path = functools.partial(DropPath(self.drop_path_rate), deterministic=not train)
    y, probs = SelfAttention(self.num_heads, self.attention_dropout_rate, self.qkv_bias, self.dtype,
                             name="attention")(norm(name="layernorm_before")(x), train=train)
    x = x + drop_path(dropout(y))
    y = MLP(self.mlp_dim, self.dtype, self.activation, name="mlp")(norm(name="layernorm_after")(x))
    return x + drop_path(dropout(y)), probs

def sincos_position_embedding(grid_h: int, grid_w: int, dim: int, cls_token: bool = True) -> np.ndarray:
  """The fixed 2-D sin-cos table ``[(1 +) grid_h * grid_w, dim]`` float32 of MAE (and HF's stored tables).

  Row ``r * grid_w + c`` (raster order) is ``[sin(c w) | cos(c w) | sin(r w) | cos(r w)]`` with frequencies
  ``w_k = 10000 ** (-k / (dim / 4))``, ``k < dim / 4``: the column half first, as MAE's released code (whose
  swapped h/w names HF reproduces by rotating its halves). ``cls_token`` prepends a row of zeros.
  """
  if dim % 4:
    raise ValueError(f"sin-cos position embeddings need a width divisible by 4, got {dim}")
  omega = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))
  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64),
                           indexing="ij")
  col_angles, row_angles = np.outer(cols.ravel(), omega), np.outer(rows.ravel(), omega)
  table = np.concatenate([np.sin(col_angles), np.cos(col_angles), np.sin(row_angles), np.cos(row_angles)], axis=1)
  if cls_token:
    table = np.concatenate([np.zeros((1, dim)), table], axis=0)
  return table.astype(np.float32)


class ViT(nn.Module):
  """Vision Transformer classifier.

  Attributes:
    image_size: the resolution the position embeddings are made for (int or ``(H, W)``); other resolutions
      (multiples of ``patch_size``) get the patch part of the embeddings bicubically resized on the fly.
    patch_size: side of the square patches (int or ``(PH, PW)``).
    hidden_size, depth, num_heads, mlp_dim: width, number of blocks, heads and MLP inner width.
    num_classes: classes of the ``classifier`` head; ``0`` returns the pooled ``[B, hidden_size]`` features.
    dropout_rate: dropout after the embeddings, the attention output and the MLP (HF ``hidden_dropout_prob``).
    attention_dropout_rate: dropout on the attention probabilities.
    drop_path_rate: stochastic depth rate of the last block; block ``i`` of ``depth`` drops its residual
      branches with ``rate * i / (depth - 1)`` (DeiT's linear rule; train only, rng ``'dropout'``).
    layer_norm_eps: LayerNorm epsilon (1e-6 as the paper's code; HF configs default to 1e-12).
    pool: ``'cls'`` (class token, as the paper and HF) or ``'gap'`` (no class token; mean of the patch tokens
      after the final LayerNorm).
    qkv_bias: biases on the q/k/v projections.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, logits are returned in float32.
    activation: the MLPs' activation (exact GELU as the paper; HF ``hidden_act``).
    position_embedding: ``'learned'`` (the paper's ``position_embeddings`` parameter) or ``'sincos'``: the fixed
      2-D sin-cos table of MAE (``sincos_position_embedding``, zero class-token row; no parameter), as MAE's
      fine-tuning uses it.
  """
  image_size: IntPair = 224
  patch_size: IntPair = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  num_classes: int = 1000
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  drop_path_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  pool: str = "cls"
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu
  position_embedding: str = "learned"

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool, return_attention: bool = False
               ) -> Union[jnp.ndarray, Tuple[jnp.ndarray, List[jnp.ndarray]]]:
    """Classifies ``[B, H, W, C]`` images (``H``, ``W`` multiples of ``patch_size``).

    Returns:
      logits ``[B, num_classes]`` float32 (pooled features ``[B, hidden_size]`` if ``num_classes == 0``);
      with ``return_attention=True`` also a list of ``depth`` attention-probability arrays
      ``[B, num_heads, N, N]`` float32, ``N`` = number of patches (+1 for the class token).
    """
    if self.pool not in POOLS:
      raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
    if x.ndim != 4:
      raise ValueError(f"ViT expects NHWC images [B, H, W, C], got shape {x.shape}")
    patch = positive_int_pair(self.patch_size, "patch_size")
    image = positive_int_pair(self.image_size, "image_size")
    if x.shape[1] % patch[0] or x.shape[2] % patch[1]:
      raise ValueError(f"ViT input height and width must be multiples of patch_size {patch}, got shape {x.shape}")
    if image[0] % patch[0] or image[1] % patch[1]:
      raise ValueError(f"image_size {image} must be a multiple of patch_size {patch}")
    batch = x.shape[0]

    x = nn.Conv(self.hidden_size, patch, strides=patch, padding="VALID", dtype=self.dtype,
                kernel_init=nn.initializers.lecun_normal(), name="patch_embedding")(x)
    grid_hw = x.shape[1:3]
    x = x.reshape(batch, -1, self.hidden_size)

    native_hw = (image[0] // patch[0], image[1] // patch[1])
    num_extra = 1 if self.pool == "cls" else 0
    if self.position_embedding == "sincos":
      position = jnp.asarray(sincos_position_embedding(*native_hw, self.hidden_size, cls_token=bool(num_extra)))[None]
    elif self.position_embedding == "learned":
      position = self.param("position_embeddings", nn.initializers.normal(0.02),
                            (1, num_extra + native_hw[0] * native_hw[1], self.hidden_size))
    else:
      raise ValueError(f"position_embedding must be 'learned' or 'sincos', got {self.position_embedding!r}")
    extra, grid = position[:, :num_extra], position[0, num_extra:].reshape(*native_hw, self.hidden_size)
    if grid_hw != native_hw:
      grid = resize_position_grid(grid, grid_hw)
    position = jnp.concatenate([extra, grid.reshape(1, -1, self.hidden_size)], axis=1)
    if self.pool == "cls":
      cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, self.hidden_size))
      x = jnp.concatenate([jnp.broadcast_to(cls_token, (batch, 1, self.hidden_size)).astype(x.dtype), x], axis=1)
    x = nn.Dropout(self.dropout_rate)(x + position.astype(x.dtype), deterministic=not train)

    attentions = []
    for i in range(self.depth):
      x, probs = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout_rate, self.attention_dropout_rate,
                              self.drop_path_rate * i / max(self.depth - 1, 1), self.layer_norm_eps,
                              self.qkv_bias, self.dtype, self.activation, name=f"layers_{i}")(x, train=train)
      attentions.append(probs)
    x = nn.LayerNorm(epsilon=self.layer_norm_eps, dtype=self.dtype, name="layernorm")(x)
    x = x[:, 0] if self.pool == "cls" else jnp.mean(x, axis=1)
    if self.num_classes:
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros, name="classifier")(x)
    x = x.astype(jnp.float32)
    return (x, attentions) if return_attention else x


for _name, _width, _patch in (("vit_ti16", "ti", 16), ("vit_s16", "s", 16), ("vit_b16", "b", 16),
                              ("vit_b32", "b", 32), ("vit_l16", "l", 16), ("vit_l32", "l", 32)):
  _hidden, _depth, _heads, _mlp = WIDTHS[_width]
  MODELS.register(_name)(functools.partial(ViT, patch_size=_patch, hidden_size=_hidden, depth=_depth,
                                           num_heads=_heads, mlp_dim=_mlp))
