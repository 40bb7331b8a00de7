"""DETR's detection augmentation as geometry: multi-scale shorter-side resize and random size crop.

Reference: facebookresearch/detr `datasets/coco.py` (`make_coco_transforms`) and `datasets/transforms.py`:
  train: RandomHorizontalFlip(); RandomSelect(RandomResize(scales, max_size),
         Compose([RandomResize(crop_resize_scales), RandomSizeCrop(*crop_size), RandomResize(scales, max_size)]))
         (RandomSelect picks the second branch with probability `crop_prob`, 0.5 in DETR)
  eval:  RandomResize([eval_scale], max_size)

These functions only decide the geometry: a crop window in normalised coordinates of the (flipped) source
image and the output size. `cvjax.data.preprocessing` then resamples the window once from the original
pixels, which is DETR's resize -> crop -> resize with one interpolation instead of two. Boxes here are
normalised (ymin, xmin, ymax, xmax) relative to the current image; sizes are (height, width) in pixels.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

# The whole image as a normalised (ymin, xmin, ymax, xmax) window.
FULL_WINDOW = (0.0, 0.0, 1.0, 1.0)


def shorter_side_size(height: int, width: int, size: int, max_size: int | None = None) -> tuple[int, int]:
  """Output (height, width) with the shorter side `size` and the aspect ratio kept, as DETR's `get_size`.

  If the longer side would exceed `max_size`, `size` shrinks so that it does not (DETR's
  `get_size_with_aspect_ratio`, including its `int()` truncation of the longer side). Unlike DETR, the
  longer side is also clamped to `max_size` afterwards: DETR's rounding can exceed it by a pixel for very
  elongated images, and the bucketed batch shapes rely on the bound.
  """
  if max_size is not None:
    short, long = float(min(height, width)), float(max(height, width))
    if long / short * size > max_size:
      size = int(round(max_size * short / long))
  size = max(1, size)
  if (width <= height and width == size) or (height <= width and height == size):
    out_h, out_w = height, width
  elif width < height:
    out_h, out_w = int(size * height / width), size
  else:
    out_h, out_w = size, int(size * width / height)
  if max_size is not None:
    out_h, out_w = min(out_h, max_size), min(out_w, max_size)
  return max(1, out_h), max(1, out_w)


def random_size_crop(rng: np.random.Generator, height: int, width: int,
                     crop_size: tuple[int, int]) -> tuple[int, int, int, int]:
  """DETR's `RandomSizeCrop(min, max)`: a crop (top, left, crop_h, crop_w) in pixels of a height x width image.

  The crop width is uniform in [min, min(width, max)] and its height likewise (inclusive, width drawn
  first, as DETR), placed uniformly. Where the image is smaller than `min` the range starts at the image side
  instead (DETR would fail there; it only meets images resized to >= 400 pixels).
  """
  low, high = crop_size
  crop_w = int(rng.integers(min(low, width), min(width, high) + 1))
  crop_h = int(rng.integers(min(low, height), min(height, high) + 1))
  top = int(rng.integers(0, height - crop_h + 1))
  left = int(rng.integers(0, width - crop_w + 1))
  return top, left, crop_h, crop_w


def train_geometry(rng: np.random.Generator, height: int, width: int, *, scales: Sequence[int],
                   max_size: int, crop_prob: float, crop_resize_scales: Sequence[int],
                   crop_size: tuple[int, int]) -> tuple[tuple[float, float, float, float], tuple[int, int]]:
  """DETR training geometry after the flip: (window, output size).

  With probability `crop_prob`: resize (conceptually) to a shorter side drawn from `crop_resize_scales` (no
  max size, as DETR), crop with `random_size_crop`, and resize the crop to a shorter side drawn from `scales`
  capped at `max_size`. Otherwise the whole image gets the last resize.

  Returns:
    window: normalised (ymin, xmin, ymax, xmax) of the source image that becomes the output image.
    size: output (height, width); the shorter side is in `scales` unless `max_size` shrank it.
  """
  window, region = FULL_WINDOW, (height, width)
  if crop_prob > 0 and rng.random() < crop_prob:
    mid_h, mid_w = shorter_side_size(height, width, int(rng.choice(crop_resize_scales)))
    top, left, crop_h, crop_w = random_size_crop(rng, mid_h, mid_w, crop_size)
    window = (top / mid_h, left / mid_w, (top + crop_h) / mid_h, (left + crop_w) / mid_w)
    region = (crop_h, crop_w)
  return window, shorter_side_size(*region, int(rng.choice(scales)), max_size)


def hflip_yxyx(boxes: np.ndarray) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) [N, 4] of an image flipped left-right: x -> 1 - x."""
  ymin, xmin, ymax, xmax = np.moveaxis(boxes, -1, 0)
  return np.stack([ymin, 1.0 - xmax, ymax, 1.0 - xmin], axis=-1).astype(np.float32)


def box_area(boxes: np.ndarray) -> np.ndarray:
  """Area [N] of normalised (ymin, xmin, ymax, xmax) boxes [N, 4], in units of the image area."""
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def crop_boxes(boxes: np.ndarray, window: tuple[float, float, float, float]):
  """Boxes of the image region `window`, as DETR's `crop`: shifted, clipped to it, empty ones removed.

  Args:
    boxes: float32 [N, 4] normalised (ymin, xmin, ymax, xmax), non-degenerate.
    window: normalised (ymin, xmin, ymax, xmax) of the crop in the same image.

  Returns:
    (boxes, keep, kept_fraction): float32 [K, 4] normalised to the window; bool [N] which input boxes
    survive (positive width and height inside the window); float32 [K] the fraction of each surviving
    box's area that lies inside the window (scales annotation areas).
  """
  y0, x0, y1, x1 = window
  if window == FULL_WINDOW:  # Exactly the identity (no float round trip) when nothing is cropped.
    return boxes, np.ones(len(boxes), bool), np.ones(len(boxes), np.float32)
  offset = np.array([y0, x0, y0, x0], np.float32)
  extent = np.array([y1 - y0, x1 - x0, y1 - y0, x1 - x0], np.float32)
  cropped = np.clip((boxes - offset) / extent, 0.0, 1.0).astype(np.float32)
  keep = (cropped[:, 2] > cropped[:, 0]) & (cropped[:, 3] > cropped[:, 1])
  fraction = box_area(cropped) * float(extent[0] * extent[1]) / np.maximum(box_area(boxes), 1e-12)
  return cropped[keep], keep, np.minimum(fraction[keep], 1.0).astype(np.float32)
