"""Box-relative instance masks pasted into the image, as Mask R-CNN's inference does.

Reference: ``torchvision.models.detection.roi_heads.paste_masks_in_image`` (with ``expand_masks``,
``expand_boxes`` and ``paste_mask_in_image``), reproduced exactly: each ``M x M`` mask is padded by ``padding``
zeros, its box expanded about its centre by ``(M + 2 padding) / M`` and truncated to integers (toward zero),
the padded mask resized to the box's ``(y2 - y1 + 1, x2 - x1 + 1)`` pixels (at least 1) by
``F.interpolate(mode='bilinear', align_corners=False)`` and written into a zero image, clipped to it.

Bilinear resizing is separable, so box ``d``'s pasted mask is ``R_y[d] @ P[d] @ R_x[d]^T`` with interpolation
matrices ``R_y [D, H, M + 2p]`` and ``R_x [D, W, M + 2p]`` whose rows hold PyTorch's two taps of each image row
(column) inside the box and are zero elsewhere: static shapes, two batched matrix products, no loop over boxes.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops._args import positive_int_pair


def paste_masks_in_image(masks, boxes, image_size: Sequence[int], padding: int = 1):
  """Pastes box-relative masks into an ``(H, W)`` image (torchvision's ``paste_masks_in_image``).

  Args:
    masks: float ``[D, M, M]`` per-box mask values (Mask R-CNN's sigmoid probabilities, e.g. 28 x 28), each
      covering its box.
    boxes: float ``[D, 4]`` absolute ``(x1, y1, x2, y2)`` in image pixels. The box arithmetic is float32, as
      torchvision's on float32 boxes.
    image_size: static ``(H, W)`` of the output.
    padding: zeros added on each side of every mask before resizing (torchvision's 1, with which 28 x 28 masks
      have their boxes expanded by 30 / 28).

  Returns:
    float32 ``[D, H, W]``: each mask resized onto its expanded integer box, zero outside it. Equal to
    ``roi_heads.paste_masks_in_image(masks[:, None], boxes, (H, W), padding)[:, 0]`` for every box torchvision
    accepts; a box entirely above or left of the image (where torchvision's slicing fails) gives zeros.
    NumPy inputs are computed with NumPy (host-side evaluation pastes at each image's own size: jnp would
    compile for every new ``(D, H, W)``); jax arrays and tracers with jnp: jit-able, vmap-able and
    differentiable in ``masks``, matrix products at full float32 precision (no TF32 on GPUs).
  """
  height, width = positive_int_pair(image_size if isinstance(image_size, (int, np.integer)) else tuple(image_size),
                                    "image_size (H, W)")
  if not isinstance(padding, (int, np.integer)) or padding < 0:
    raise ValueError(f"padding must be a non-negative int, got {padding!r}")
  xp = jnp if any(isinstance(x, jax.Array) for x in (masks, boxes)) else np
  masks = xp.asarray(masks, xp.float32)
  boxes = xp.asarray(boxes, xp.float32)
  if masks.ndim != 3 or masks.shape[1] != masks.shape[2]:
    raise ValueError(f"masks must be square box-relative masks [D, M, M], got shape {masks.shape}")
  if boxes.shape != (masks.shape[0], 4):
    raise ValueError(f"boxes must be absolute (x1, y1, x2, y2) [D, 4] with D = {masks.shape[0]} (one per "
                     f"mask), got shape {boxes.shape}")
  size = masks.shape[-1]
  padded = xp.pad(masks, ((0, 0), (padding, padding), (padding, padding)))
  # torchvision's expand_boxes, then .to(int64): truncation toward zero.
  x1, y1, x2, y2 = (_expand_boxes(xp, boxes, (size + 2 * padding) / size).astype(xp.int32)[:, i] for i in range(4))
  rows = _interpolation_matrix(xp, y1, y2, size + 2 * padding, height)      # [D, H, M + 2p]
  columns = _interpolation_matrix(xp, x1, x2, size + 2 * padding, width)    # [D, W, M + 2p]
  if xp is np:
    return np.matmul(np.matmul(rows, padded), np.swapaxes(columns, 1, 2))
  highest = jax.lax.Precision.HIGHEST
  return jnp.matmul(jnp.matmul(rows, padded, precision=highest), jnp.swapaxes(columns, 1, 2), precision=highest)


def _expand_boxes(xp, boxes, scale: float):
  """torchvision's ``expand_boxes``: half extents scaled by ``scale`` about the centre, in float32."""
  x1, y1, x2, y2 = (boxes[:, i] for i in range(4))
  w_half = (x2 - x1) * xp.float32(0.5) * xp.float32(scale)
  h_half = (y2 - y1) * xp.float32(0.5) * xp.float32(scale)
  x_c = (x2 + x1) * xp.float32(0.5)
  y_c = (y2 + y1) * xp.float32(0.5)
  return xp.stack([x_c - w_half, y_c - h_half, x_c + w_half, y_c + h_half], axis=1)


def _interpolation_matrix(xp, low, high, in_size: int, out_size: int):
  """float32 ``[D, out_size, in_size]``: row ``y`` holds the taps of image pixel ``y`` when a length-``in_size``
  signal is resized onto the integer box ``[low, high]`` (``high - low + 1`` pixels, at least 1) as PyTorch's
  ``upsample_bilinear2d`` (``align_corners=False``) does; zero for pixels outside ``[low, high]``."""
  length = xp.maximum(high - low + 1, 1)                                   # [D]
  index = xp.arange(out_size, dtype=xp.int32)[None, :] - low[:, None]      # [D, out]: pixel within the box
  # torchvision writes pixels [max(low, 0), min(high + 1, size)): none when high < low, though length is 1.
  inside = (index >= 0) & (index <= (high - low)[:, None])
  # PyTorch's float32 arithmetic: scale = in / out, source = max(scale * (dst + 0.5) - 0.5, 0), clamped taps.
  scale = (xp.float32(in_size) / length.astype(xp.float32))[:, None]
  source = xp.maximum(scale * (index.astype(xp.float32) + xp.float32(0.5)) - xp.float32(0.5), xp.float32(0))
  first = xp.minimum(xp.floor(source).astype(xp.int32), in_size - 1)
  weight = xp.clip(source - first.astype(xp.float32), xp.float32(0), xp.float32(1))
  second = first + (first < in_size - 1).astype(xp.int32)
  taps = xp.arange(in_size, dtype=xp.int32)
  matrix = (1 - weight)[..., None] * (first[..., None] == taps) + weight[..., None] * (second[..., None] == taps)
  return xp.where(inside[..., None], matrix, xp.float32(0)).astype(xp.float32)
