"""Pure NumPy/PIL rendering of the synthetic `shapes` images (no TFDS, no TensorFlow).

Every image is a noisy gradient background with coloured, randomly placed, sized and rotated geometric shapes
drawn on top of each other; later shapes occlude earlier ones. The renderer returns the image together with
the exact annotations of what is visible, so the TFDS builder in `cvjax.data.shapes` only has to encode them.

Conventions: images are `uint8 [S, S, 3]`; masks are `bool [S, S]`; boxes are tight boxes of the visible mask
in pixel-edge coordinates normalised to [0, 1] as `(ymin, xmin, ymax, xmax)` (TFDS `BBoxFeature` order), i.e.
a mask whose rows span `r0..r1` inclusive gives `ymin = r0 / S`, `ymax = (r1 + 1) / S`.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image, ImageDraw

CLASS_NAMES = ('circle', 'square', 'triangle', 'star', 'ellipse', 'hexagon')

# Each shape is edge-antialiased by rasterising it at this many times the output resolution and averaging;
# the binary instance mask is "coverage >= 1/2".
_SUPERSAMPLE = 4
# Vertices of the polygons that approximate circles and ellipses.
_ROUND_VERTICES = 48
# Star inner radius relative to its outer radius.
_STAR_INNER_RATIO = 0.45
# Shape colours are re-drawn until they differ this much (L2 over RGB in [0, 255]) from the background
# colour under the shape, so that every shape stays visible.
_MIN_COLOUR_CONTRAST = 90.0


@dataclasses.dataclass(frozen=True)
class RenderOptions:
  """How one image is drawn.

  Attributes:
    image_size: side `S` of the square image in pixels.
    min_objects: fewest shapes drawn (before dropping occluded ones).
    max_objects: most shapes drawn.
    radius_range: (low, high) circumradius of a shape as a fraction of `S`.
    min_visible_fraction: a shape whose visible area after occlusion is below this fraction of its own
      area is dropped (and not drawn).
    min_visible_pixels: a shape with fewer visible pixels than this is dropped (and not drawn).
  """

  image_size: int
  min_objects: int
  max_objects: int
  radius_range: tuple[float, float]
  min_visible_fraction: float = 0.3
  min_visible_pixels: int = 6

  def __post_init__(self):
    # The panoptic map stores instance n as n + 1 in uint8.
    if not 1 <= self.min_objects <= self.max_objects <= 254:
      raise ValueError(f'need 1 <= min_objects <= max_objects <= 254, got {self.min_objects}, {self.max_objects}')
    if not 0 < self.radius_range[0] <= self.radius_range[1]:
      raise ValueError(f'radius_range must be (low, high) with 0 < low <= high, got {self.radius_range}')
    if self.min_visible_pixels < 1:
      raise ValueError(f'min_visible_pixels must be >= 1, got {self.min_visible_pixels}')


@dataclasses.dataclass(frozen=True)
class RenderedImage:
  """One rendered image with the annotations of its `N` visible shapes (drawing order, back to front).

  Attributes:
    image: uint8 [S, S, 3].
    labels: int64 [N], indices into `CLASS_NAMES`.
    masks: bool [N, S, S], visible part of each shape after occlusion (pairwise disjoint).
    boxes: float32 [N, 4], normalised (ymin, xmin, ymax, xmax) tight boxes of `masks`.
    semantic: uint8 [S, S], 0 = background, `label + 1` where a shape is visible.
    panoptic: uint8 [S, S], 0 = background, `n + 1` where shape `n` is visible.
  """

  image: np.ndarray
  labels: np.ndarray
  masks: np.ndarray
  boxes: np.ndarray
  semantic: np.ndarray
  panoptic: np.ndarray


def shape_polygon(label: int, center_xy: tuple[float, float], radius: float, angle: float,
                  aspect: float) -> np.ndarray:
  """Vertices of shape `CLASS_NAMES[label]`, float64 [K, 2] as (x, y) in pixels.

  `radius` is the circumradius; `angle` (radians) rotates the shape about its centre; `aspect` is the
  minor/major axis ratio used by the ellipse only.
  """
  name = CLASS_NAMES[label]
  if name in ('circle', 'ellipse'):
    t = np.linspace(0.0, 2.0 * np.pi, _ROUND_VERTICES, endpoint=False)
    minor = aspect if name == 'ellipse' else 1.0
    local = np.stack([np.cos(t), minor * np.sin(t)], axis=-1)
  elif name == 'star':
    t = np.linspace(0.0, 2.0 * np.pi, 10, endpoint=False)
    r = np.where(np.arange(10) % 2 == 0, 1.0, _STAR_INNER_RATIO)
    local = np.stack([r * np.cos(t), r * np.sin(t)], axis=-1)
  else:
    sides = {'square': 4, 'triangle': 3, 'hexagon': 6}[name]
    t = np.linspace(0.0, 2.0 * np.pi, sides, endpoint=False)
    local = np.stack([np.cos(t), np.sin(t)], axis=-1)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  return radius * local @ rotation.T + np.asarray(center_xy, np.float64)


def coverage(polygon: np.ndarray, size: int) -> np.ndarray:
  """Fraction of each pixel of a `size` x `size` image covered by `polygon`: float32 [size, size] in [0, 1].

  Estimated by rasterising at `_SUPERSAMPLE` times the resolution (PIL's scanline fill) and averaging; only
  the window of pixels the polygon can touch is rasterised.
  """
  x0, y0 = np.clip(np.floor(polygon.min(axis=0)).astype(int), 0, size)
  x1, y1 = np.clip(np.ceil(polygon.max(axis=0)).astype(int) + 1, 0, size)
  out = np.zeros((size, size), np.float32)
  if x1 <= x0 or y1 <= y0:
    return out
  h, w = y1 - y0, x1 - x0
  canvas = Image.new('L', (w * _SUPERSAMPLE, h * _SUPERSAMPLE), 0)
  # Fine pixel (i, j) has its centre at ((j + 0.5) / _SUPERSAMPLE + x0, ...) in output pixel coordinates.
  points = [(float(x), float(y)) for x, y in (polygon - (x0, y0)) * _SUPERSAMPLE - 0.5]
  ImageDraw.Draw(canvas).polygon(points, fill=1)
  fine = np.asarray(canvas, np.float32)
  out[y0:y1, x0:x1] = fine.reshape(h, _SUPERSAMPLE, w, _SUPERSAMPLE).mean(axis=(1, 3))
  return out


def mask_to_box(mask: np.ndarray) -> np.ndarray:
  """Tight normalised box (ymin, xmin, ymax, xmax) of a non-empty bool mask [H, W]: float32 [4]."""
  rows = np.flatnonzero(mask.any(axis=1))
  cols = np.flatnonzero(mask.any(axis=0))
  h, w = mask.shape
  return np.array([rows[0] / h, cols[0] / w, (rows[-1] + 1) / h, (cols[-1] + 1) / w], np.float32)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
  """Random linear colour gradient + low-frequency blotches + pixel noise: float32 [S, S, 3] in [0, 255]."""
  c0, c1 = rng.uniform(0.0, 255.0, size=(2, 3))
  theta = rng.uniform(0.0, 2.0 * np.pi)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
  t = np.cos(theta) * xx + np.sin(theta) * yy
  t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
  image = (c0 + (c1 - c0) * t[..., None]).astype(np.float32)
  # Low-frequency texture: a coarse random grid upsampled bilinearly.
  grid = rng.uniform(-1.0, 1.0, size=(4, 4, 3)).astype(np.float32)
  blotches = np.stack([
      np.asarray(Image.fromarray(grid[..., c], mode='F').resize((size, size), Image.BILINEAR))
      for c in range(3)
  ], axis=-1)
  image = image + rng.uniform(5.0, 35.0) * blotches
  image = image + np.float32(rng.uniform(2.0, 10.0)) * rng.standard_normal(image.shape, dtype=np.float32)
  return np.clip(image, 0.0, 255.0, dtype=np.float32)


def _sample_shape(rng: np.random.Generator, options: RenderOptions, label: int) -> np.ndarray:
  size = options.image_size
  radius = rng.uniform(*options.radius_range) * size
  # Keep the centre far enough inside that most of the shape is in frame.
  margin = min(0.6 * radius, size / 2)
  center = rng.uniform(margin, size - margin, size=2)
  return shape_polygon(label, center, radius, rng.uniform(0.0, 2.0 * np.pi), rng.uniform(0.4, 0.7))


def _visible_masks(masks: np.ndarray) -> np.ndarray:
  """Visible part of each mask [N, S, S] when later masks are drawn over earlier ones."""
  # covered_above[n] = union of masks n+1..N-1.
  covered_above = np.zeros_like(masks)
  if len(masks) > 1:
    covered_above[:-1] = np.logical_or.accumulate(masks[::-1], axis=0)[::-1][1:]
  return masks & ~covered_above


def render(rng: np.random.Generator, options: RenderOptions) -> RenderedImage:
  """Draws one image of `min_objects..max_objects` shapes and annotates the visible ones.

  Shapes whose visible area is too small (see `RenderOptions`) are removed before drawing; removing a shape
  only uncovers the shapes below it, so the remaining ones stay above the thresholds and every drawn shape is
  annotated.
  """
  size = options.image_size
  count = int(rng.integers(options.min_objects, options.max_objects + 1))
  labels = rng.integers(0, len(CLASS_NAMES), size=count)
  covers = np.stack([coverage(_sample_shape(rng, options, int(label)), size) for label in labels])
  colours = rng.uniform(0.0, 255.0, size=(count, 3))
  texture_gain = rng.uniform(0.0, 25.0, size=count)
  image = background(rng, size)

  masks = covers >= 0.5
  visible = _visible_masks(masks)
  area, visible_area = masks.sum(axis=(1, 2)), visible.sum(axis=(1, 2))
  keep = (visible_area >= options.min_visible_pixels) & (
      visible_area >= options.min_visible_fraction * np.maximum(area, 1))
  labels, covers, masks = labels[keep], covers[keep], masks[keep]
  colours, texture_gain = colours[keep], texture_gain[keep]
  visible = _visible_masks(masks)

  for n in range(len(labels)):
    under = image[masks[n]].mean(axis=0)
    while np.linalg.norm(colours[n] - under) < _MIN_COLOUR_CONTRAST:
      colours[n] = rng.uniform(0.0, 255.0, size=3)
    fill = colours[n].astype(np.float32) + np.float32(texture_gain[n]) * rng.standard_normal(
        (size, size, 1), dtype=np.float32)
    alpha = covers[n][..., None]
    image += alpha * (fill - image)
  image = np.clip(np.rint(image), 0, 255).astype(np.uint8)

  semantic = np.zeros((size, size), np.uint8)
  panoptic = np.zeros((size, size), np.uint8)
  for n, label in enumerate(labels):
    semantic[visible[n]] = label + 1
    panoptic[visible[n]] = n + 1
  boxes = np.stack([mask_to_box(m) for m in visible]) if len(labels) else np.zeros((0, 4), np.float32)
  return RenderedImage(image=image, labels=labels.astype(np.int64), masks=visible, boxes=boxes,
                       semantic=semantic, panoptic=panoptic)
