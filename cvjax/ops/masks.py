"""Instance-mask ops: pasting box-relative mask probabilities into the image (torchvision's semantics).

``paste_masks_in_image`` is torchvision's ``roi_heads.paste_masks_in_image`` with static shapes: each ``M x M``
mask is padded by ``padding`` zeros, its box expanded by ``(M + 2 padding) / M`` about the centre and truncated
to integers, the padded mask resized bilinearly (``align_corners=False``) to the box's ``(y2 - y1 + 1, x2 - x1 +
1)`` pixels and written into a zero image, clipped to it. The resize is separable, so it runs as two batched
matrix products with per-box interpolation matrices (rows ``[D, H, M + 2p]``, columns ``[D, W, M + 2p]``, zero
outside the box) instead of a loop over boxes.
"""

from __future__ import annotations

from typing import Tuple

import jax.numpy as jnp


def _interpolation_matrix(start: jnp.ndarray, length: jnp.ndarray, size: int, source: int) -> jnp.ndarray:
  """``[D, size, source]``: row ``i`` holds the bilinear weights (``align_corners=False``, PyTorch's source index
  ``max((i - start + 0.5) * source / length - 0.5, 0)``) of output pixel ``i`` of a ``length``-pixel resize of a
  ``source``-pixel signal placed at ``start``; rows outside ``[start, start + length)`` are zero."""
  pixel = jnp.arange(size, dtype=jnp.float32)[None, :]
  local = pixel - start[:, None]
  scale = source / length[:, None]
  src = jnp.maximum((local + 0.5) * scale - 0.5, 0.0)
  low = jnp.floor(src)
  frac = src - low
  low = low.astype(jnp.int32)
  low = jnp.minimum(low, source - 1)
  high = jnp.minimum(low + 1, source - 1)
  taps = jnp.arange(source)[None, None, :]
  weights = ((taps == low[..., None]) * (1.0 - frac)[..., None] + (taps == high[..., None]) * frac[..., None])
  inside = (local >= 0) & (local < length[:, None])
  return jnp.where(inside[..., None], weights, 0.0)


def paste_masks_in_image(masks: jnp.ndarray, boxes: jnp.ndarray, image_size: Tuple[int, int],
                         padding: int = 1) -> jnp.ndarray:
  """Pastes box-relative masks into ``image_size`` images (torchvision ``paste_masks_in_image``).

  Args:
    masks: ``[D, M, M]`` float mask probabilities (e.g. Mask R-CNN's 28 x 28), each relative to its box.
    boxes: ``[D, 4]`` absolute xyxy boxes in the pixels of the image.
    image_size: static ``(H, W)`` of the output.
    padding: zero border added to each mask before the box is expanded (1 in torchvision).

  Returns:
    ``[D, H, W]`` float32, each mask resized into its (expanded, integer) box and zero elsewhere. Jit-able and
    vmap-able; NumPy inputs work too (the evaluator pastes at original image sizes on the host).
  """
  masks = jnp.asarray(masks, jnp.float32)
  boxes = jnp.asarray(boxes, jnp.float32)
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
    raise ValueError(f"masks must be [D, M, M], got shape {masks.shape}")
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(f"boxes must be [D, 4] = [{masks.shape[0]}, 4], got shape {boxes.shape}")
  height, width = (int(v) for v in image_size)
  side = masks.shape[1]
  padded = jnp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  scale = (side + 2 * padding) / side
  half_w = (boxes[:, 2] - boxes[:, 0]) * 0.5 * scale
  half_h = (boxes[:, 3] - boxes[:, 1]) * 0.5 * scale
  center_x = (boxes[:, 2] + boxes[:, 0]) * 0.5
  center_y = (boxes[:, 3] + boxes[:, 1]) * 0.5
  # torchvision's .to(int64): truncation toward zero.
  x1, x2 = jnp.trunc(center_x - half_w), jnp.trunc(center_x + half_w)
  y1, y2 = jnp.trunc(center_y - half_h), jnp.trunc(center_y + half_h)
  box_w = jnp.maximum(x2 - x1 + 1.0, 1.0)
  box_h = jnp.maximum(y2 - y1 + 1.0, 1.0)
  rows = _interpolation_matrix(y1, box_h, height, side + 2 * padding)     # [D, H, S]
  columns = _interpolation_matrix(x1, box_w, width, side + 2 * padding)   # [D, W, S]
  return jnp.einsum("dhs,dst,dwt->dhw", rows, padded, columns)
