"""Per-example preprocessing of semantic and panoptic segmentation examples: NumPy/PIL on host.

An example is an image with a label map of the same size (one class per pixel, `IGNORE_LABEL` = 255 where no
class applies) and, for panoptic segmentation, an instance map (0 = no instance: stuff or void; thing
segments numbered 1, 2, ... within the image). Every geometric step applies to image and maps alike; the maps
are resampled with nearest-neighbour sampling at pixel centres (`preprocessing.resize_masks`), so no label is
ever blended with another.

Training (`Options.augment`): a horizontal flip with probability 1/2 (if `flip`), then torchvision's random
resized crop (`crop_scale`, `crop_ratio`) resized to S x S. Evaluation: the longer side resized to S (aspect
kept) and placed top-left on an S x S canvas whose padding pixels get `IGNORE_LABEL` (square images: a plain
resize; `shapes`: the identity), so metrics never count padding.
"""

from __future__ import annotations

import numpy as np

from cvjax.data import preprocessing

IGNORE_LABEL = 255


def segmentation_example(image: np.ndarray, label_map: np.ndarray, rng: np.random.Generator | None,
                         options: preprocessing.Options, instance_map: np.ndarray | None = None) -> dict:
  """One segmentation example at the model's S x S input size.

  Args:
    image: uint8 [H, W, 3].
    label_map: integer [H, W] class indices in [0, K) or `IGNORE_LABEL`.
    rng: randomness for augmentation (unused when not augmenting).
    options: `preprocessing.Options` (image_size, augment, flip, crop_scale, crop_ratio).
    instance_map: None, or integer [H, W] instance ids (0 = no instance) for panoptic examples.

  Returns:
    `image` float32 [S, S, 3] (ImageNet-normalised; 0 on padding), `label_map` int32 [S, S]
    (`IGNORE_LABEL` on padding), and with `instance_map` also `panoptic` int32 [S, S, 2]: (category, instance
    id), i.e. the label map and the instance map stacked (torchmetrics' `PanopticQuality` layout).

  Raises:
    ValueError: a map's shape differs from the image's.
  """
  h, w = image.shape[:2]
  maps = [np.asarray(label_map)]
  if instance_map is not None:
    maps.append(np.asarray(instance_map))
  for name, array in zip(('label_map', 'instance_map'), maps):
    if array.shape != (h, w):
      raise ValueError(f'segmentation_example: {name} has shape {array.shape}, expected the image\'s (H, W) '
                       f'= {(h, w)}')
  maps = np.stack([m.astype(np.int32) for m in maps])  # [C, H, W]
  size = options.image_size
  if options.augment:
    if options.flip and rng.random() < 0.5:
      image, maps = image[:, ::-1], maps[:, :, ::-1]
    window = preprocessing.random_resized_crop_box(rng, h, w, options.crop_scale, options.crop_ratio)
    pixels = preprocessing.normalize(preprocessing.resize_window(np.ascontiguousarray(image), window, (size, size)))
    maps = preprocessing.resize_masks(maps, window, (size, size))
  else:
    pixels, (new_h, new_w) = preprocessing.letterbox_image(image, size)
    resized = preprocessing.resize_masks(maps, (0, 0, w, h), (new_h, new_w))
    maps = np.zeros((len(maps), size, size), np.int32)
    maps[0] = IGNORE_LABEL  # padding: no class (the instance map's padding stays 0, "no instance")
    maps[:, :new_h, :new_w] = resized
  example = {'image': pixels, 'label_map': np.ascontiguousarray(maps[0], np.int32)}
  if instance_map is not None:
    example['panoptic'] = np.ascontiguousarray(np.moveaxis(maps, 0, -1), np.int32)
  return example


def panoptic_segments(panoptic: np.ndarray, things, max_segments: int) -> dict:
  """The segments of a panoptic map as padded mask-classification targets (MaskFormer's).

  Args:
    panoptic: int [S, S, 2] (category, instance id) from `segmentation_example`.
    things: the categories that are things: each (category, instance id > 0) pair is one segment; every other
      category present (stuff) is one segment whatever its instance ids. `IGNORE_LABEL` pixels belong to none.
    max_segments: M; segments past it are dropped (stuff first, then things in instance order, are kept).

  Returns:
    `segment_masks` uint8 [M, S, S] (1 inside), `segment_labels` int32 [M], `segment_valid` bool [M].
  """
  categories, instances = panoptic[..., 0], panoptic[..., 1]
  things = np.asarray(sorted(things), np.int32)
  is_thing = np.isin(categories, things)
  keys = []
  for category in np.unique(categories[~is_thing & (categories != IGNORE_LABEL)]):
    keys.append((int(category), categories == category))
  for instance in np.unique(instances[is_thing & (instances > 0)]):
    pixels = is_thing & (instances == instance)
    for category in np.unique(categories[pixels]):   # one category per instance, unless the ids collide
      keys.append((int(category), pixels & (categories == category)))
  size = panoptic.shape[:2]
  masks = np.zeros((max_segments, *size), np.uint8)
  labels = np.zeros((max_segments,), np.int32)
  valid = np.zeros((max_segments,), bool)
  for n, (category, pixels) in enumerate(keys[:max_segments]):
    masks[n], labels[n], valid[n] = pixels, category, True
  return {'segment_masks': masks, 'segment_labels': labels, 'segment_valid': valid}


def padding_example(options: preprocessing.Options, panoptic: bool, max_segments: int = 0) -> dict:
  """An all-ignore example with `mask=False`, to fill the last evaluation batch."""
  size = options.image_size
  example = {'image': np.zeros((size, size, 3), np.float32),
             'label_map': np.full((size, size), IGNORE_LABEL, np.int32),
             'image_id': np.int32(-1), 'mask': np.bool_(False)}
  if panoptic:
    example['panoptic'] = np.stack([example['label_map'], np.zeros((size, size), np.int32)], axis=-1)
  if max_segments:
    example.update(panoptic_segments(example['panoptic'], (), max_segments))
  return example
