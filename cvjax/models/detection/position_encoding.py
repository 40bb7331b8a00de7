"""Padding masks at feature resolution and the 2-D sine position encoding computed from them (DETR).

Masks are ``True`` (or 1) on real pixels and ``False`` on padding, the convention of HF's ``pixel_mask``.
"""

from __future__ import annotations

import math
from typing import Tuple

import jax.numpy as jnp
import numpy as np


def resize_mask_nearest(mask: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """Nearest-neighbour resize of a padding mask, as PyTorch's ``F.interpolate(mode='nearest')`` does.

  Output pixel ``i`` reads input pixel ``floor(i * in / out)`` on each axis (PyTorch's legacy ``nearest``,
  not ``nearest-exact``), which is how DETR brings the image mask to the backbone's feature map.

  Args:
    mask: ``[B, H, W]`` bool or 0/1 mask of real pixels.
    size: ``(h, w)`` of the output.

  Returns:
    ``[B, h, w]`` bool.
  """
  if mask.ndim != 3:
    raise ValueError(f"mask must be [B, H, W], got shape {mask.shape}")
  in_h, in_w = mask.shape[1:]
  out_h, out_w = size
  # Static NumPy indices: the gather is fixed at trace time (and a NumPy mask is not indexed by tracers).
  rows = (np.arange(out_h) * in_h) // out_h
  cols = (np.arange(out_w) * in_w) // out_w
  return jnp.asarray(mask)[:, rows][:, :, cols].astype(bool)


def sine_position_encoding(mask: jnp.ndarray, num_pos_feats: int, *, temperature: float = 10000.0,
                           normalize: bool = True, scale: float = 2 * math.pi,
                           eps: float = 1e-6) -> jnp.ndarray:
  """DETR's 2-D sine position encoding of the real pixels of a padded batch.

  Each real pixel's position is its count of real pixels above and to the left (inclusive cumulative sums of
  the mask along H and W, so padding does not shift the coordinates of real pixels); with ``normalize`` the
  counts are divided by the column / row total (+ ``eps``) and multiplied by ``scale``. Coordinate ``p`` is
  encoded on ``num_pos_feats`` channels as ``sin(p / t_k)`` on even channels ``2k`` and ``cos(p / t_k)`` on
  odd channels ``2k + 1``, with ``t_k = temperature ** (2k / num_pos_feats)``.

  Args:
    mask: ``[B, H, W]`` bool or 0/1 mask of real pixels.
    num_pos_feats: channels per axis (``d_model / 2`` in DETR).
    temperature, normalize, scale, eps: as in DETR (10000, True, 2*pi, 1e-6).

  Returns:
    ``[B, H, W, 2 * num_pos_feats]`` float32: the y encoding in the first half of the channels, x in the
    second (HF's ``DetrSinePositionEmbedding`` in NHWC).
  """
  if mask.ndim != 3:
    raise ValueError(f"mask must be [B, H, W], got shape {mask.shape}")
  if num_pos_feats % 2:
    raise ValueError(f"num_pos_feats must be even (sin/cos pairs), got {num_pos_feats}")
  mask = mask.astype(jnp.float32)
  y_embed = jnp.cumsum(mask, axis=1)
  x_embed = jnp.cumsum(mask, axis=2)
  if normalize:
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
  channel = jnp.arange(num_pos_feats)
  dim_t = temperature**(2 * (channel // 2) / num_pos_feats)
  is_even = channel % 2 == 0

  def encode(embed):
    phase = embed[..., None] / dim_t
    return jnp.where(is_even, jnp.sin(phase), jnp.cos(phase))

  return jnp.concatenate([encode(y_embed), encode(x_embed)], axis=-1).astype(jnp.float32)
