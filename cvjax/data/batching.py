"""Batching detection examples of different sizes into a few static shapes ("buckets").

Jitted steps recompile for every new input shape, and padding every image to the largest possible size
wastes most of the compute (Scenic's DETR pads all of COCO to 1333 x 1333). Instead each batch is padded to
the smallest of a few (height, width) buckets that holds all of its images: top-left placement, zeros
elsewhere (zero is the mean colour after normalisation, as DETR pads; instance masks are 0 there too) and
`pixel_mask` True exactly on real pixels. Bucket sets are closed under the element-wise maximum, so the last
(largest) bucket holds every image: it is the one shape of multi-process runs, whose processes never exchange
batch shapes (`cvjax.data.pipeline`).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

Bucket = tuple[int, int]
# Padded sides are multiples of the backbone's total stride, so feature maps cover the padding exactly.
STRIDE = 32


def default_buckets(max_short_side: int, max_size: int, multiple: int = STRIDE) -> tuple[Bucket, ...]:
  """Buckets for images whose shorter side is at most `max_short_side` and longer side at most `max_size`.

  Every (h, w) with both sides in three levels rounded up to `multiple`: the largest shorter side, the
  longest side and half way between (DETR on COCO: 800, 1088, 1344 -> 9 buckets, 800 x 1088 for a typical
  landscape batch instead of 1344 x 1344).
  """
  round_up = lambda side: int(math.ceil(side / multiple) * multiple)
  short = min(max_short_side, max_size)
  levels = sorted({round_up(short), round_up((short + max_size) / 2), round_up(max_size)})
  return tuple((h, w) for h in levels for w in levels)


def check_buckets(buckets, name: str = 'config.dataset.buckets') -> tuple[Bucket, ...]:
  """`buckets` as a sorted tuple of positive (height, width) int pairs, closed under element-wise max.

  Raises:
    ValueError: naming `name`, when `buckets` is not a non-empty sequence of positive int pairs.
  """
  try:
    pairs = {(int(h), int(w)) for h, w in buckets}
  except (TypeError, ValueError):
    raise ValueError(f'{name} must be a sequence of (height, width) pairs, got {buckets!r}') from None
  if not pairs or any(h < 1 or w < 1 for h, w in pairs):
    raise ValueError(f'{name} must be a non-empty sequence of positive (height, width) pairs, got {buckets!r}')
  closed = set(pairs)
  for a in pairs:  # Every element-wise max of a subset is the max of a pair of its row and column extremes.
    for b in pairs:
      closed.add((max(a[0], b[0]), max(a[1], b[1])))
  return tuple(sorted(closed, key=lambda hw: (hw[0] * hw[1], hw)))


def smallest_bucket(buckets: Sequence[Bucket], height: int, width: int) -> Bucket:
  """The bucket of least area (then least height) holding a height x width image.

  Raises:
    ValueError: no bucket is large enough (the message names the largest).
  """
  fitting = [b for b in buckets if b[0] >= height and b[1] >= width]
  if not fitting:
    largest = max(buckets, key=lambda hw: hw[0] * hw[1])
    raise ValueError(f'an image of {height} x {width} pixels does not fit the largest bucket {largest} of '
                     f'{tuple(buckets)}: add a larger bucket to config.dataset.buckets or lower max_size')
  return min(fitting, key=lambda hw: (hw[0] * hw[1], hw))


# Features that differ in size between examples, by the axis of their height (width follows it).
_SPATIAL = {'image': 0, 'pixel_mask': 0, 'masks': 1}


def collate_detection(examples: Sequence[dict], buckets: Sequence[Bucket]) -> dict[str, np.ndarray]:
  """Stacks detection examples, padding `image` [h, w, 3], `pixel_mask` [h, w] and, where present, `masks`
  [M, h, w] to the batch's bucket.

  Args:
    examples: dicts of NumPy arrays; `image`, `pixel_mask` and `masks` may differ in size between examples,
      every other feature has one shape.
    buckets: allowed (height, width) batch shapes.

  Returns:
    The batch: `image` float32 [B, H, W, 3], `pixel_mask` bool [B, H, W] and `masks` uint8 [B, M, H, W] with
    (H, W) the smallest bucket holding every example, placed top-left (zeros / False elsewhere); other keys
    stacked along a new axis 0.
  """
  height = max(e['image'].shape[0] for e in examples)
  width = max(e['image'].shape[1] for e in examples)
  bucket = smallest_bucket(buckets, height, width)
  padded = {}
  for key, axis in _SPATIAL.items():
    if key not in examples[0]:
      continue
    first = examples[0][key]
    out = np.zeros((len(examples), *first.shape[:axis], *bucket, *first.shape[axis + 2:]), first.dtype)
    for i, example in enumerate(examples):
      h, w = example[key].shape[axis:axis + 2]
      out[(i, *[slice(None)] * axis, slice(0, h), slice(0, w))] = example[key]
    padded[key] = out
  return {key: padded[key] if key in padded else np.stack([e[key] for e in examples]) for key in examples[0]}
