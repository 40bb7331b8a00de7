"""Per-example preprocessing on host: pure NumPy/PIL functions (no JAX, no TensorFlow).

Conventions: decoded images are uint8 [H, W, 3] RGB; model inputs are float32 [S, S, 3] normalised with the
ImageNet mean/std (the pipeline normalises, models don't). Boxes arrive from TFDS as normalised
(ymin, xmin, ymax, xmax) and leave as normalised (cx, cy, w, h) relative to the real (unpadded) image region,
as DETR's losses expect. Randomness always comes from an explicit `np.random.Generator`.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class ImageDecodeError(ValueError):
  """An encoded image could not be decoded; the message names the dataset, split and record."""


@dataclasses.dataclass(frozen=True)
class Options:
  """How examples become model inputs.

  Attributes:
    image_size: side `S` of the square model input.
    augment: apply training augmentation (the pipeline sets this only for training).
    crop_scale: (low, high) area fraction of the random resized crop (classification).
    crop_ratio: (low, high) aspect ratio (w / h) of the random resized crop (classification).
    flip: random horizontal flip with probability 1/2 when augmenting.
    eval_crop_fraction: side of the central square crop as a fraction of the shorter image side, used when
      not augmenting (1.0 = whole square image; 0.875 is the usual ImageNet 224/256).
    max_boxes: boxes per example after padding/truncation (detection).
  """

  image_size: int
  augment: bool = False
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  flip: bool = True
  eval_crop_fraction: float = 1.0
  max_boxes: int = 100


def decode_image(data: bytes, where: str) -> np.ndarray:
  """Decodes PNG/JPEG/... bytes to uint8 [H, W, 3] RGB (grayscale is repeated to 3 channels).

  Args:
    data: the encoded image.
    where: what the image is, e.g. "dataset 'mnist', split 'train', record 12"; it starts the error message.

  Raises:
    ImageDecodeError: when `data` is not a decodable image.
  """
  try:
    with Image.open(io.BytesIO(data)) as image:
      return np.asarray(image.convert('RGB'))
  except Exception as error:  # PIL raises several unrelated types for bad data.
    raise ImageDecodeError(f'{where}: cannot decode the image ({len(data)} bytes): {error}') from error


def _resize(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
  """Resamples the window `box` = (x0, y0, x1, y1) of uint8 `image` to `size` = (height, width), bilinear.

  PIL's bilinear filter widens its support when downsampling, i.e. it antialiases like torchvision's
  `antialias=True`.
  """
  h, w = image.shape[:2]
  if box == (0, 0, w, h) and size == (h, w):
    return image
  return np.asarray(Image.fromarray(image).resize((size[1], size[0]), Image.BILINEAR, box=box))


def random_resized_crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
                            ratio: tuple[float, float]) -> tuple[int, int, int, int]:
  """Crop window (x0, y0, x1, y1) with torchvision `RandomResizedCrop.get_params` semantics.

  Up to 10 draws of an area fraction in `scale` and a log-uniform aspect ratio in `ratio`; the first window
  that fits is placed uniformly. If none fits, the central crop with the aspect ratio clamped to `ratio`.
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(10):
    target_area = area * rng.uniform(*scale)
    aspect = np.exp(rng.uniform(*log_ratio))
    w = int(round(np.sqrt(target_area * aspect)))
    h = int(round(np.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      y0 = int(rng.integers(0, height - h + 1))
      x0 = int(rng.integers(0, width - w + 1))
      return x0, y0, x0 + w, y0 + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  y0, x0 = (height - h) // 2, (width - w) // 2
  return x0, y0, x0 + w, y0 + h


def central_crop_box(height: int, width: int, fraction: float) -> tuple[float, float, float, float]:
  """Centred square window (x0, y0, x1, y1) whose side is `fraction` of the shorter image side."""
  side = min(height, width) * fraction
  y0, x0 = (height - side) / 2, (width - side) / 2
  return x0, y0, x0 + side, y0 + side


def normalize(image: np.ndarray) -> np.ndarray:
  """uint8 [..., 3] -> float32 [..., 3]: `(image / 255 - IMAGENET_MEAN) / IMAGENET_STD`."""
  return (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD


def classification_image(image: np.ndarray, rng: np.random.Generator | None, options: Options) -> np.ndarray:
  """uint8 [H, W, 3] -> normalised float32 [S, S, 3].

  Augmenting: random resized crop + random horizontal flip (if `options.flip`). Otherwise: central crop of
  `eval_crop_fraction` resized to S (for square inputs and fraction 1: a plain resize).
  """
  h, w = image.shape[:2]
  size = (options.image_size, options.image_size)
  if options.augment:
    box = random_resized_crop_box(rng, h, w, options.crop_scale, options.crop_ratio)
    image = _resize(image, box, size)
    if options.flip and rng.random() < 0.5:
      image = image[:, ::-1]
  else:
    image = _resize(image, central_crop_box(h, w, options.eval_crop_fraction), size)
  return normalize(image)


def yxyx_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) [..., 4] -> normalised (cx, cy, w, h) [..., 4], float32."""
  ymin, xmin, ymax, xmax = np.moveaxis(np.asarray(boxes, np.float32), -1, 0)
  return np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def hflip_cxcywh(boxes: np.ndarray) -> np.ndarray:
  """Boxes [..., 4] normalised cxcywh of an image flipped left-right: cx -> 1 - cx."""
  return np.concatenate([1.0 - boxes[..., :1], boxes[..., 1:]], axis=-1)


def pad_boxes(boxes: np.ndarray, labels: np.ndarray, max_boxes: int):
  """Pads (or truncates to the first `max_boxes`) boxes [N, 4] and labels [N].

  Returns:
    boxes float32 [max_boxes, 4] (zeros past the real ones), labels int32 [max_boxes], valid bool
    [max_boxes] (True = real box), and the number of boxes dropped by truncation.
  """
  n = min(len(boxes), max_boxes)
  out_boxes = np.zeros((max_boxes, 4), np.float32)
  out_labels = np.zeros((max_boxes,), np.int32)
  valid = np.zeros((max_boxes,), bool)
  out_boxes[:n], out_labels[:n], valid[:n] = boxes[:n], labels[:n], True
  return out_boxes, out_labels, valid, len(boxes) - n


def detection_example(image: np.ndarray, boxes_yxyx: np.ndarray, labels: np.ndarray,
                      rng: np.random.Generator | None, options: Options):
  """One detection example: letterbox to S x S, boxes to cxcywh, pad to `max_boxes`.

  The image is resized (aspect kept) so that its longer side is S and placed top-left on a zero canvas
  (zero after normalisation, as DETR pads); boxes stay normalised to the real image region, which
  `pixel_mask` marks. Degenerate boxes (zero width or height) are removed, as DETR does. Augmenting flips
  image and boxes together with probability 1/2 if `options.flip`.

  Args:
    image: uint8 [H, W, 3].
    boxes_yxyx: float [N, 4] normalised (ymin, xmin, ymax, xmax).
    labels: int [N].
    rng: randomness for augmentation (unused when not augmenting).
    options: see `Options`.

  Returns:
    (features, dropped): features has `image` float32 [S, S, 3], `boxes` float32 [M, 4] cxcywh, `labels`
    int32 [M], `valid` bool [M], `pixel_mask` bool [S, S], `orig_size` int32 [2] = (H, W); `dropped` is
    the number of boxes beyond `max_boxes` = M.
  """
  h, w = image.shape[:2]
  size = options.image_size
  boxes = yxyx_to_cxcywh(np.clip(np.asarray(boxes_yxyx, np.float32).reshape(-1, 4), 0.0, 1.0))
  keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
  boxes, labels = boxes[keep], np.asarray(labels).reshape(-1)[keep]
  if options.augment and options.flip and rng.random() < 0.5:
    image, boxes = image[:, ::-1], hflip_cxcywh(boxes)
  scale = size / max(h, w)
  new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[:new_h, :new_w] = normalize(_resize(np.ascontiguousarray(image), (0, 0, w, h), (new_h, new_w)))
  pixel_mask = np.zeros((size, size), bool)
  pixel_mask[:new_h, :new_w] = True
  boxes, labels, valid, dropped = pad_boxes(boxes, labels, options.max_boxes)
  features = {'image': canvas, 'boxes': boxes, 'labels': labels, 'valid': valid, 'pixel_mask': pixel_mask,
              'orig_size': np.array([h, w], np.int32)}
  return features, dropped


def padding_example(task: str, options: Options) -> dict:
  """An all-zero example with `mask=False`, used to fill the last evaluation batch."""
  size = options.image_size
  example = {'image': np.zeros((size, size, 3), np.float32), 'mask': np.bool_(False)}
  if task == 'classification':
    example['label'] = np.int32(0)
  else:
    m = options.max_boxes
    example.update(boxes=np.zeros((m, 4), np.float32), labels=np.zeros((m,), np.int32),
                   valid=np.zeros((m,), bool), pixel_mask=np.zeros((size, size), bool),
                   image_id=np.int32(-1), orig_size=np.zeros((2,), np.int32))
  return example
