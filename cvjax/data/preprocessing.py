"""Per-example preprocessing on host: pure NumPy/PIL functions (no JAX, no TensorFlow).

Conventions: decoded images are uint8 [H, W, 3] RGB; model inputs are float32 [.., .., 3] normalised with the
ImageNet mean/std (the pipeline normalises, models don't). Boxes arrive as normalised (ymin, xmin, ymax, xmax)
and leave as normalised (cx, cy, w, h) relative to the real (unpadded) image region, as DETR's losses expect.
Randomness always comes from an explicit `np.random.Generator`.

Classification training crops are either torchvision's random resized crop (the default) or, with
`Options.scale_range`, the scale augmentation of He et al. 2016 / Simonyan & Zisserman 2015 (shorter side
jittered, then a random fixed-size crop); `Options.pca_lighting` adds AlexNet's PCA colour noise.

Detection examples are either letterboxed onto a square S x S canvas (`Options.scales` empty, the default) or
resized DETR-style to their own size (shorter side from `scales`, longer side <= `max_size`; see
`cvjax.data.detection_transforms`), in which case `cvjax.data.batching` pads each batch to a bucket. With
`Options.masks`, instance masks go through the same geometry as their image (nearest-neighbour resampling).
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from cvjax.data import detection_transforms

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# AlexNet's "standard colour augmentation" (Krizhevsky et al. 2012, Sec. 4.1) needs the principal components
# of ImageNet's RGB pixel values; the paper does not publish them. These are fb.resnet.torch's
# (datasets/imagenet.lua), which later reproductions share: eigenvalues for pixels on the [0, 1] scale, the
# matching unit eigenvectors as the columns of IMAGENET_PCA_EIGVEC (rows are R, G, B).
IMAGENET_PCA_EIGVAL = np.array([0.2175, 0.0188, 0.0045], np.float32)
IMAGENET_PCA_EIGVEC = np.array([[-0.5675, 0.7192, 0.4009],
                                [-0.5808, -0.0045, -0.8140],
                                [-0.5836, -0.6948, 0.4203]], np.float32)


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
    scale_range: classification: None = the random resized crop; (low, high) = scale augmentation instead:
      the shorter side is resized to an integer drawn uniformly from [low, high] (aspect kept) and an S x S
      window is cropped at a uniform position (He et al. 2016 use (256, 480); Simonyan & Zisserman 2015 use
      (256, 512), or (S, S) for a fixed training scale). Needs low >= S; crop_scale/crop_ratio are unused.
    flip: random horizontal flip with probability 1/2 when augmenting.
    pca_lighting: classification: standard deviation of AlexNet's PCA lighting noise when augmenting (0 = off;
      the papers use 0.1); see `pca_lighting_shift`.
    eval_crop_fraction: side of the central square crop as a fraction of the shorter image side, used when
      not augmenting (1.0 = whole square image; 0.875 is the usual ImageNet 224/256).
    eval_resize: classification, not augmenting: None = use eval_crop_fraction; R = resize the shorter side
      to R (aspect kept), then keep the central S x S window (the usual ImageNet R = 256 for S = 224). Needs
      R >= S.
    max_boxes: boxes per example after padding/truncation (detection).
    scales: detection: shorter-side sizes drawn from when training (DETR multi-scale); empty = letterbox
      every image to image_size x image_size instead (and the fields below are unused).
    max_size: detection: cap on the longer side after the multi-scale resize.
    eval_scale: detection: shorter side when not augmenting (multi-scale mode).
    crop_prob: detection: probability of DETR's random crop branch when augmenting (multi-scale mode).
    crop_resize_scales: detection: shorter sides of the resize that precedes the random crop.
    crop_size: detection: (min, max) side of the random crop, in pixels of that resized image.
    masks: detection: examples also carry instance masks (`detection_example`'s `masks`).
  """

  image_size: int
  augment: bool = False
  crop_scale: tuple[float, float] = (0.08, 1.0)
  crop_ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  scale_range: tuple[int, int] | None = None
  flip: bool = True
  pca_lighting: float = 0.0
  eval_crop_fraction: float = 1.0
  eval_resize: int | None = None
  max_boxes: int = 100
  scales: tuple[int, ...] = ()
  max_size: int = 1333
  eval_scale: int = 800
  crop_prob: float = 0.5
  crop_resize_scales: tuple[int, ...] = (400, 500, 600)
  crop_size: tuple[int, int] = (384, 600)
  masks: bool = False


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


def resize_window(image: np.ndarray, box: tuple[float, float, float, float], size: tuple[int, int]) -> np.ndarray:
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


def pca_lighting_shift(rng: np.random.Generator, std: float) -> np.ndarray:
  """AlexNet's PCA lighting noise for one image: the float32 RGB offset [3] added to every pixel.

  `IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)` with `alpha` [3] drawn from N(0, std^2), once per
  image (Krizhevsky et al. 2012, Sec. 4.1, std 0.1), on the [0, 1] pixel scale, i.e. before normalisation.
  """
  alpha = rng.normal(0.0, std, 3).astype(np.float32)
  return IMAGENET_PCA_EIGVEC @ (alpha * IMAGENET_PCA_EIGVAL)


def _resized_window(image: np.ndarray, resized: tuple[int, int], top_left: tuple[int, int],
                    size: int) -> np.ndarray:
  """The size x size window at `top_left` = (y0, x0) of uint8 `image` resized (bilinear) to `resized` =
  (height, width), resampled straight from `image`.

  The same pixels as resizing the whole image and then cropping (up to PIL's rounding, a grey level or two),
  at the cost of the window only: scale augmentation would otherwise resize every ImageNet image to a shorter
  side of up to 480 or 512 for one 224 x 224 crop.
  """
  h, w = image.shape[:2]
  sy, sx = h / resized[0], w / resized[1]
  y0, x0 = top_left
  return resize_window(image, (x0 * sx, y0 * sy, (x0 + size) * sx, (y0 + size) * sy), (size, size))


def classification_image(image: np.ndarray, rng: np.random.Generator | None, options: Options) -> np.ndarray:
  """uint8 [H, W, 3] -> normalised float32 [S, S, 3].

  Augmenting (random draws in this order, all from `rng`):
  1. geometry: with `scale_range` = (lo, hi), the shorter side L ~ U{lo..hi}, the image resized so that its
     shorter side is L (longer side truncated as torchvision's `Resize(L)`), then the S x S window at
     y0 ~ U{0..H'-S}, x0 ~ U{0..W'-S}; otherwise a random resized crop (`crop_scale`, `crop_ratio`);
  2. a horizontal flip with probability 1/2 (if `flip`);
  3. PCA lighting (if `pca_lighting` > 0): `pca_lighting_shift` added to every pixel before normalisation,
     unclipped (as fb.resnet.torch, which adds it to the [0, 1] tensor).
  Not augmenting: with `eval_resize` = R, the shorter side resized to R, then the central S x S window
  (top-left at ((H'-S) // 2, (W'-S) // 2)); otherwise the central crop of `eval_crop_fraction` resized to S
  (for square inputs and fraction 1: a plain resize).
  """
  h, w = image.shape[:2]
  size = options.image_size
  if options.augment:
    if options.scale_range:
      low, high = options.scale_range
      resized = detection_transforms.shorter_side_size(h, w, int(rng.integers(low, high + 1)))
      top_left = (int(rng.integers(0, resized[0] - size + 1)), int(rng.integers(0, resized[1] - size + 1)))
      image = _resized_window(image, resized, top_left, size)
    else:
      box = random_resized_crop_box(rng, h, w, options.crop_scale, options.crop_ratio)
      image = resize_window(image, box, (size, size))
    if options.flip and rng.random() < 0.5:
      image = image[:, ::-1]
    if options.pca_lighting:
      return normalize(image) + pca_lighting_shift(rng, options.pca_lighting) / IMAGENET_STD
  elif options.eval_resize:
    resized = detection_transforms.shorter_side_size(h, w, options.eval_resize)
    image = _resized_window(image, resized, ((resized[0] - size) // 2, (resized[1] - size) // 2), size)
  else:
    image = resize_window(image, central_crop_box(h, w, options.eval_crop_fraction), (size, size))
  return normalize(image)


def yxyx_to_cxcywh(boxes: np.ndarray) -> np.ndarray:
  """Normalised (ymin, xmin, ymax, xmax) [..., 4] -> normalised (cx, cy, w, h) [..., 4], float32."""
  ymin, xmin, ymax, xmax = np.moveaxis(np.asarray(boxes, np.float32), -1, 0)
  return np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=-1)


def resize_masks(masks: np.ndarray, window: tuple[float, float, float, float],
                 size: tuple[int, int]) -> np.ndarray:
  """Resamples the window (x0, y0, x1, y1), in pixels, of uint8 masks [N, H, W] to `size` = (height, width).

  Nearest neighbour at pixel centres: each output pixel takes the input pixel under its centre, as PIL's
  NEAREST and torch's `interpolate(mode='nearest-exact')` (DETR resizes masks with mode='nearest', which
  samples at the top-left corner instead and shifts them up to half an input pixel off their boxes). The
  window maps onto the output exactly as `_resize` maps the image's, so masks stay on their pixels.
  """
  _, h, w = masks.shape
  x0, y0, x1, y1 = window
  if (x0, y0, x1, y1) == (0, 0, w, h) and tuple(size) == (h, w):
    return masks
  rows = np.floor(y0 + (np.arange(size[0]) + 0.5) * ((y1 - y0) / size[0])).astype(np.int64).clip(0, h - 1)
  cols = np.floor(x0 + (np.arange(size[1]) + 0.5) * ((x1 - x0) / size[1])).astype(np.int64).clip(0, w - 1)
  return masks[:, rows[:, None], cols[None, :]]


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


def pad_masks(masks: np.ndarray, max_boxes: int) -> np.ndarray:
  """uint8 masks [N, H, W] padded with zero masks (or truncated to the first `max_boxes`), as `pad_boxes`."""
  out = np.zeros((max_boxes, *masks.shape[1:]), np.uint8)
  out[:min(len(masks), max_boxes)] = masks[:max_boxes]
  return out


def letterbox_image(image: np.ndarray, size: int) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 [H, W, 3] resized (aspect kept) so that its longer side is `size`, normalised and placed top-left
  on a zero `size` x `size` canvas: (float32 [size, size, 3], (new_h, new_w) of the real region)."""
  h, w = image.shape[:2]
  scale = size / max(h, w)
  new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
  canvas = np.zeros((size, size, 3), np.float32)
  canvas[:new_h, :new_w] = normalize(resize_window(np.ascontiguousarray(image), (0, 0, w, h), (new_h, new_w)))
  return canvas, (new_h, new_w)


def _letterbox(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator | None,
               options: Options):
  """Flips (when augmenting) and letterboxes uint8 `image` (and `masks` [N, H, W], unless None) onto an
  S x S canvas; boxes stay normalised."""
  h, w = image.shape[:2]
  size = options.image_size
  if options.augment and options.flip and rng.random() < 0.5:
    image, boxes = image[:, ::-1], detection_transforms.hflip_yxyx(boxes)
    masks = None if masks is None else masks[:, :, ::-1]
  canvas, (new_h, new_w) = letterbox_image(image, size)
  pixel_mask = np.zeros((size, size), bool)
  pixel_mask[:new_h, :new_w] = True
  if masks is not None:
    resized = resize_masks(masks, (0, 0, w, h), (new_h, new_w))
    masks = np.zeros((len(masks), size, size), np.uint8)
    masks[:, :new_h, :new_w] = resized
  return canvas, boxes, masks, pixel_mask


def _multiscale(image: np.ndarray, boxes: np.ndarray, masks: np.ndarray | None, rng: np.random.Generator | None,
                options: Options):
  """DETR's flip / random crop / multi-scale resize (eval: resize to `eval_scale`) of uint8 `image`.

  Returns the normalised image at its own size, the boxes normalised to it, the masks [K, h, w] of the
  surviving boxes resampled from the same window (None if `masks` is None), the bool [N] mask of input
  boxes that survive the crop and the fraction [K] of each survivor's area inside it.
  """
  h, w = image.shape[:2]
  if options.augment:
    if options.flip and rng.random() < 0.5:
      image, boxes = image[:, ::-1], detection_transforms.hflip_yxyx(boxes)
      masks = None if masks is None else masks[:, :, ::-1]
    window, size = detection_transforms.train_geometry(
        rng, h, w, scales=options.scales, max_size=options.max_size, crop_prob=options.crop_prob,
        crop_resize_scales=options.crop_resize_scales, crop_size=options.crop_size)
  else:
    window = detection_transforms.FULL_WINDOW
    size = detection_transforms.shorter_side_size(h, w, options.eval_scale, options.max_size)
  boxes, keep, fraction = detection_transforms.crop_boxes(boxes, window)
  y0, x0, y1, x1 = window
  pixels = normalize(resize_window(np.ascontiguousarray(image), (x0 * w, y0 * h, x1 * w, y1 * h), size))
  if masks is not None:
    masks = resize_masks(masks[keep], (x0 * w, y0 * h, x1 * w, y1 * h), size)
  return pixels, boxes, masks, keep, fraction


def detection_example(image: np.ndarray, boxes_yxyx: np.ndarray, labels: np.ndarray,
                      rng: np.random.Generator | None, options: Options, area: np.ndarray | None = None,
                      masks: np.ndarray | None = None):
  """One detection example: resize (letterbox or DETR multi-scale), boxes to cxcywh, pad to `max_boxes`.

  Boxes are clipped to the image; degenerate ones (zero width or height, e.g. entirely outside) are removed,
  as DETR does. Letterbox mode (`options.scales` empty): the image is resized (aspect kept) so that its longer
  side is S and placed top-left on a zero canvas (zero after normalisation, as DETR pads); augmenting flips
  image and boxes with probability 1/2 if `options.flip`. Multi-scale mode: see `_multiscale`; the image
  keeps its own size and `pixel_mask` is all True until the batch is padded. Either way boxes are normalised
  to the real image region.

  Instance masks (`options.masks`) follow every geometric step of their image: the flip, the letterbox or
  multi-scale resize and the crop window, resampled with `resize_masks` (nearest neighbour); they are dropped
  with their boxes (degenerate, cut away by the crop, past `max_boxes`). A kept box's mask may come out empty
  (an object thinner than a pixel after downscaling, or a mask that was empty in the annotation): boxes and
  masks are transformed alike, not made to agree.

  Args:
    image: uint8 [H, W, 3].
    boxes_yxyx: float [N, 4] normalised (ymin, xmin, ymax, xmax).
    labels: int [N].
    rng: randomness for augmentation (unused when not augmenting).
    options: see `Options`.
    area: float [N] annotation areas in original pixels (COCO's `area`); None or NaN entries mean the area of
      the (clipped) box. A random crop scales an area by the fraction of its box that stays inside the crop.
    masks: uint8 [N, H, W] instance masks (nonzero = inside), row-aligned with `boxes_yxyx`; required exactly
      when `options.masks` (with N = 0 any empty array does).

  Returns:
    (features, dropped): features has `image` float32 [h, w, 3] (S x S in letterbox mode), `pixel_mask`
    bool [h, w], `boxes` float32 [M, 4] cxcywh, `labels` int32 [M], `valid` bool [M], `area` float32 [M]
    (0 past the real boxes), `orig_size` int32 [2] = (H, W), and with `options.masks` `masks` uint8
    [M, h, w] (1 inside the instance, on the same pixels as `image`; 0 on padding pixels and rows);
    `dropped` is the number of boxes beyond `max_boxes` = M.

  Raises:
    ValueError: `masks` is given without `options.masks` or missing with it, or its shape is not [N, H, W].
  """
  h, w = image.shape[:2]
  boxes = np.clip(np.asarray(boxes_yxyx, np.float32).reshape(-1, 4), 0.0, 1.0)
  labels = np.asarray(labels, np.int32).reshape(-1)
  if options.masks != (masks is not None):
    raise ValueError('detection_example: masks must be given exactly when options.masks is True (got '
                     f'options.masks={options.masks}, masks {"None" if masks is None else "given"})')
  if masks is not None:
    masks = np.asarray(masks)
    masks = (masks.reshape(0, h, w) if masks.size == 0 else masks) > 0
    if masks.shape != (len(boxes), h, w):
      raise ValueError(f'detection_example: masks have shape {masks.shape}, expected [N, H, W] = '
                       f'{(len(boxes), h, w)} for {len(boxes)} boxes of a {h} x {w} image')
    masks = masks.astype(np.uint8)
  box_area = detection_transforms.box_area(boxes) * (h * w)
  area = box_area if area is None else np.asarray(area, np.float32).reshape(-1)
  area = np.where(np.isnan(area), box_area, area)
  keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
  boxes, labels, area = boxes[keep], labels[keep], area[keep]
  masks = None if masks is None else masks[keep]
  if options.scales:
    pixels, boxes, masks, keep, fraction = _multiscale(image, boxes, masks, rng, options)
    labels, area = labels[keep], area[keep] * fraction
    pixel_mask = np.ones(pixels.shape[:2], bool)
  else:
    pixels, boxes, masks, pixel_mask = _letterbox(image, boxes, masks, rng, options)
  boxes, labels, valid, dropped = pad_boxes(yxyx_to_cxcywh(boxes), labels, options.max_boxes)
  padded_area = np.zeros((options.max_boxes,), np.float32)
  padded_area[valid] = area[:options.max_boxes]
  features = {'image': pixels, 'boxes': boxes, 'labels': labels, 'valid': valid, 'area': padded_area,
              'pixel_mask': pixel_mask, 'orig_size': np.array([h, w], np.int32)}
  if masks is not None:
    features['masks'] = pad_masks(masks, options.max_boxes)
  return features, dropped


def padding_example(task: str, options: Options) -> dict:
  """An all-zero example with `mask=False`, used to fill the last evaluation batch.

  In detection multi-scale mode its image (and its zero `masks`, with `options.masks`) is 1 x 1: batching pads
  it to the batch's bucket like any other.
  """
  size = 1 if task == 'detection' and options.scales else options.image_size
  example = {'image': np.zeros((size, size, 3), np.float32), 'mask': np.bool_(False)}
  if task == 'classification':
    example['label'] = np.int32(0)
  else:
    m = options.max_boxes
    example.update(boxes=np.zeros((m, 4), np.float32), labels=np.zeros((m,), np.int32),
                   valid=np.zeros((m,), bool), area=np.zeros((m,), np.float32),
                   pixel_mask=np.zeros((size, size), bool),
                   image_id=np.int32(-1), orig_size=np.zeros((2,), np.int32))
    if options.masks:
      example['masks'] = np.zeros((m, size, size), np.uint8)
  return example
