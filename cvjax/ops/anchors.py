"""Faster / Mask R-CNN anchors (torchvision ``AnchorGenerator``), as static NumPy arrays.

Anchors depend only on static shapes (image size, feature sizes, sizes, ratios), so they are computed once
in NumPy at trace time and enter a jitted program as constants; there is nothing to trace or differentiate.
All arrays are float32 xyxy boxes in input-image pixels, computed in float32 in torchvision's order of
operations, so they equal torchvision's bit for bit.

References: ``torchvision.models.detection.anchor_utils.AnchorGenerator`` (``generate_anchors``,
``grid_anchors``, ``forward``).
"""

from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from cvjax.ops._args import positive_int_pair


def _positive_floats(values: Sequence[float], name: str) -> np.ndarray:
  array = np.asarray(values, np.float32)
  if array.ndim != 1 or array.size == 0 or not np.all(array > 0):
    raise ValueError(f"{name} must be a non-empty sequence of positive numbers; got {values!r}")
  return array


def base_anchors(sizes: Sequence[float], aspect_ratios: Sequence[float]) -> np.ndarray:
  """Zero-centred cell anchors ``[len(aspect_ratios) * len(sizes), 4]`` float32 xyxy (ratio-major).

  torchvision ``AnchorGenerator.generate_anchors``: ``h_ratio = sqrt(ratio)``, ``w_ratio = 1 / h_ratio``,
  ``w = w_ratio * size``, ``h = h_ratio * size``, anchor ``round([-w, -h, w, h] / 2)`` with round half to even
  (``torch.round``), so size 5, ratio 1 gives ``[-2, -2, 2, 2]``. ``ratio`` is height / width.
  """
  sizes = _positive_floats(sizes, "sizes")
  ratios = _positive_floats(aspect_ratios, "aspect_ratios")
  h_ratios = np.sqrt(ratios)
  w_ratios = np.float32(1) / h_ratios
  ws = (w_ratios[:, None] * sizes[None, :]).reshape(-1)
  hs = (h_ratios[:, None] * sizes[None, :]).reshape(-1)
  return np.round(np.stack([-ws, -hs, ws, hs], axis=1) / np.float32(2)).astype(np.float32)


def grid_anchors(base: np.ndarray, feature_size: Tuple[int, int], stride: Tuple[int, int]) -> np.ndarray:
  """The cell anchors shifted to every feature location: ``[h * w * A, 4]`` float32 xyxy.

  torchvision ``AnchorGenerator.grid_anchors``: location ``(i, j)`` shifts by ``(j * sx, i * sy)``;
  order is location-major (row ``i``, then column ``j``), then anchor.

  Args:
    base: ``[A, 4]`` cell anchors (``base_anchors``).
    feature_size: ``(h, w)`` of the feature map.
    stride: ``(sy, sx)`` in image pixels per feature cell.
  """
  base = np.asarray(base, np.float32)
  if base.ndim != 2 or base.shape[1] != 4:
    raise ValueError(f"base must have shape [A, 4]; got {base.shape}")
  h, w = positive_int_pair(feature_size, "feature_size")
  sy, sx = positive_int_pair(stride, "stride")
  shift_y, shift_x = np.meshgrid(np.arange(h) * sy, np.arange(w) * sx, indexing="ij")
  shifts = np.stack([shift_x, shift_y, shift_x, shift_y], axis=-1).reshape(-1, 1, 4).astype(np.float32)
  return (shifts + base[None]).reshape(-1, 4)


def multilevel_anchors(image_size: Tuple[int, int], feature_sizes: Sequence[Tuple[int, int]],
                       sizes: Sequence[Sequence[float]],
                       aspect_ratios: Sequence[Sequence[float]]) -> Tuple[np.ndarray, Tuple[int, ...]]:
  """All anchors of an (FPN) image, levels concatenated: torchvision ``AnchorGenerator.forward`` for one image.

  Args:
    image_size: ``(H, W)`` of the (padded) input batch, static ints.
    feature_sizes: ``(h, w)`` per level.
    sizes: one sequence of anchor sizes per level, e.g. ``((32,), (64,), (128,), (256,), (512,))``.
    aspect_ratios: one sequence of ratios (height / width) per level, e.g. ``((0.5, 1.0, 2.0),) * 5``.

  Returns:
    ``(anchors, level_sizes)``: ``anchors [N, 4]`` float32 NumPy xyxy in image pixels, levels contiguous in
    order, each laid out as ``grid_anchors``; ``level_sizes`` the number of anchors per level (``sum = N``).
    The stride of a level is ``(H // h, W // w)`` (integer division, as torchvision).
  """
  height, width = positive_int_pair(image_size, "image_size")
  if not (len(feature_sizes) == len(sizes) == len(aspect_ratios)) or not feature_sizes:
    raise ValueError(f"feature_sizes, sizes and aspect_ratios need one entry per level (and at least one); "
                     f"got {len(feature_sizes)}, {len(sizes)} and {len(aspect_ratios)}")
  levels = []
  for level, (feature_size, level_sizes, ratios) in enumerate(zip(feature_sizes, sizes, aspect_ratios)):
    h, w = positive_int_pair(feature_size, f"feature_sizes[{level}]")
    if h > height or w > width:
      raise ValueError(f"feature_sizes[{level}] = {(h, w)} is larger than image_size {(height, width)}")
    levels.append(grid_anchors(base_anchors(level_sizes, ratios), (h, w), (height // h, width // w)))
  return np.concatenate(levels, axis=0), tuple(len(a) for a in levels)
