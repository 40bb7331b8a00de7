"""COCO-format folders (images + an `instances` json) read directly as a detection dataset: users' own data.

Where split `s` lives (keys of `config.dataset`):
  folders: {split: (images_dir, annotation_file)}, for any layout; wins for the splits it names.
  path: a folder in the standard COCO layout: `<path>/annotations/instances_<s>.json` with the images in
    `<path>/<s>/` (COCO 2017 as unzipped: splits 'train2017' and 'val2017').
Each json image's `file_name` is relative to images_dir. Splits are whole files: TFDS slicing such as
'train[:90%]' is not supported (write a separate annotation file instead).

The annotation file is read once when the source is built: labels are the json's category ids in sorted
order mapped to 0..K-1 (`category_ids[label]` gives the original id back for results files; every split's
json must list the same categories, as COCO's do, for labels to agree between splits), crowd
annotations (`iscrowd=1`) are dropped from the training targets as DETR drops them, and images without
annotations are kept. Evaluation reads the annotation file itself (`CocoFolder.ground_truth`): every
annotation, crowds as ignore regions, not the targets cut to `max_boxes`. Boxes are COCO's absolute (x, y,
width, height); `parse` reads the image file and normalises them by the file's own size (as DETR does; a json
width/height that disagrees is logged).
Image files are only checked for existence up front (one directory listing); whether they decode is found
out when they are read, where the pipeline skips undecodable ones (`DatasetSource.skip_corrupt`).

Instance masks (`config.dataset.masks`, for Mask R-CNN): every non-crowd annotation then needs a
`segmentation` (polygons, uncompressed RLE or compressed RLE; checked when the file is read, an annotation
without one is an error naming it), decoded by `parse` at the image file's height and width exactly as
pycocotools' `COCO.annToMask` does (frPyObjects, merge, decode). Polygons with fewer than 3 points are
dropped from their annotation, as detectron2 drops them (logged; an annotation left with none gets an empty
mask). Polygons are kept as float64 arrays, not the json's lists of Python floats, which would hold most of
COCO train's json in memory.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from absl import logging
from PIL import Image
from pycocotools import mask as mask_utils

from cvjax.data.preprocessing import ImageDecodeError

LAYOUT = ("config.dataset.path=<root> with the annotations in <root>/annotations/instances_<split>.json and "
          "the images in <root>/<split>/, or config.dataset.folders={'<split>': (images_dir, "
          "annotation_file)}")
_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class CocoFolder:
  """One split of a COCO-format folder.

  Attributes:
    images_dir: folder the json's `file_name`s are relative to.
    annotation_file: the instances json.
    records: random access to raw records (`CocoRecords`).
    class_names: category names in label order.
    category_ids: the json category id of each label, sorted ascending.
  """

  images_dir: str
  annotation_file: str
  records: CocoRecords
  class_names: tuple[str, ...]
  category_ids: tuple[int, ...]

  def ground_truth(self) -> dict:
    """The annotation file as a COCO-format dict (read again: only evaluation needs it, once per pass)."""
    return _load_json(self.annotation_file)


class CocoRecords:
  """Raw records of a split, built from the json into flat arrays (no per-image Python objects).

  `records[i]` is {'file_name': path, 'image_id': int, 'json_size': (height, width) or None,
  'boxes': float32 [N, 4] absolute (x, y, w, h), 'labels': int32 [N], 'area': float32 [N] (NaN where the json
  has no `area`)}; when built with segmentations also 'segmentations' (N `segmentation`s as `_segmentation`
  keeps them) and 'annotation_ids' int64 [N] (the json's ids, -1 where absent; named in errors).
  """

  def __init__(self, paths, image_ids, json_sizes, offsets, boxes, labels, area, segmentations=None,
               annotation_ids=None):
    self._paths, self._image_ids, self._json_sizes = paths, image_ids, json_sizes
    self._offsets, self._boxes, self._labels, self._area = offsets, boxes, labels, area
    self._segmentations, self._annotation_ids = segmentations, annotation_ids

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._paths):
      raise IndexError(f'record {index} out of range for {len(self._paths)} images')
    lo, hi = self._offsets[index], self._offsets[index + 1]
    size = self._json_sizes[index]
    record = {'file_name': self._paths[index], 'image_id': int(self._image_ids[index]),
              'json_size': None if size[0] < 0 else (int(size[0]), int(size[1])),
              'boxes': self._boxes[lo:hi], 'labels': self._labels[lo:hi], 'area': self._area[lo:hi]}
    if self._segmentations is not None:
      record.update(segmentations=self._segmentations[lo:hi], annotation_ids=self._annotation_ids[lo:hi])
    return record


def split_files(dataset_config, split: str) -> tuple[str, str]:
  """(images_dir, annotation_file) of `split` from `config.dataset.folders` or `config.dataset.path`.

  Raises:
    ValueError: neither key locates the split, or the split uses TFDS slicing.
    FileNotFoundError: the annotation file or the images folder does not exist (the message names the path
      and the expected layout).
  """
  if '[' in split:
    raise ValueError(f"coco_folder splits are whole annotation files; {split!r} uses TFDS slicing, which is "
                     'not supported: write the subset to its own annotation file')
  folders = dataset_config.get('folders', None) or {}
  path = dataset_config.get('path', None)
  if split in folders:
    try:
      images_dir, annotation_file = folders[split]
    except (TypeError, ValueError):
      raise ValueError(f'config.dataset.folders[{split!r}] must be (images_dir, annotation_file), got '
                       f'{folders[split]!r}') from None
  elif path:
    root = os.path.expanduser(path)
    images_dir, annotation_file = os.path.join(root, split), os.path.join(root, 'annotations',
                                                                        f'instances_{split}.json')
  else:
    named = f' (folders names {sorted(folders)})' if folders else ''
    raise ValueError(f'coco_folder has no location for split {split!r}{named}: set {LAYOUT}')
  images_dir, annotation_file = os.path.expanduser(images_dir), os.path.expanduser(annotation_file)
  if not os.path.isfile(annotation_file):
    raise FileNotFoundError(f'coco_folder split {split!r}: annotation file {annotation_file!r} does not exist. '
                            f'Expected {LAYOUT}.')
  if not os.path.isdir(images_dir):
    raise FileNotFoundError(f'coco_folder split {split!r}: images folder {images_dir!r} does not exist. '
                            f'Expected {LAYOUT}.')
  return images_dir, annotation_file


def _load_json(annotation_file: str) -> dict:
  try:
    with open(annotation_file, 'rb') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f'{annotation_file} is not valid JSON: {error}') from error
  if not isinstance(data, dict) or not isinstance(data.get('images'), list) or not isinstance(
      data.get('categories'), list):
    raise ValueError(f'{annotation_file} is not a COCO instances file: expected a JSON object with lists '
                     "'images', 'categories' and (optionally) 'annotations'")
  return data


def _categories(data: dict, annotation_file: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
  try:
    by_id = {}
    for category in data['categories']:
      category_id = int(category['id'])
      if category_id in by_id:
        raise ValueError(f'category id {category_id} appears twice')
      by_id[category_id] = str(category['name'])
  except (KeyError, TypeError, ValueError) as error:
    raise ValueError(f"{annotation_file}: bad 'categories' (each needs an integer 'id' and a 'name'): "
                     f'{error!r}') from None
  if not by_id:
    raise ValueError(f"{annotation_file} lists no categories")
  ids = tuple(sorted(by_id))
  return ids, tuple(by_id[i] for i in ids)


def _missing_files(images_dir: str, file_names: list[str]) -> list[str]:
  """file_names not present in images_dir; one directory listing covers the usual flat folder."""
  listed = set(os.listdir(images_dir))
  return [name for name in file_names
          if not (name in listed or ('/' in name and os.path.isfile(os.path.join(images_dir, name))))]


def _segmentation(segmentation) -> tuple[list[np.ndarray] | dict, int]:
  """A COCO `segmentation` checked and kept compactly, and how many polygons were dropped.

  Returns:
    (polygons, dropped): the polygons as float64 [2K] arrays of K >= 3 (x, y) points (shorter ones dropped);
    or (rle, 0): an RLE dict {'counts': list of ints (uncompressed) or str (compressed), 'size': [h, w]}.

  Raises:
    ValueError: it is neither a non-empty list of polygons nor an RLE dict.
  """
  if isinstance(segmentation, dict):
    counts, size = segmentation.get('counts'), segmentation.get('size')
    if not isinstance(counts, (str, list)) or not isinstance(size, (list, tuple)) or len(size) != 2:
      raise ValueError(f"an RLE segmentation needs 'counts' (a list of ints or a string) and 'size' [height, "
                       f'width], got keys {sorted(segmentation)}')
    return {'counts': counts, 'size': [int(size[0]), int(size[1])]}, 0
  if isinstance(segmentation, list) and segmentation:
    polygons = [np.asarray(polygon, np.float64) for polygon in segmentation]
    if any(polygon.ndim != 1 for polygon in polygons):
      raise ValueError('polygons must be flat lists [x1, y1, x2, y2, ...]')
    kept = [polygon for polygon in polygons if len(polygon) >= 6 and len(polygon) % 2 == 0]
    return kept, len(polygons) - len(kept)
  raise ValueError(f'a segmentation is a non-empty list of polygons or an RLE dict, got {segmentation!r:.80}')


def load(dataset_config, split: str, masks: bool = False) -> CocoFolder:
  """Reads and checks the annotation file of `split` (see the module docstring for the layout).

  Args:
    dataset_config: `config.dataset` (`folders` or `path` locate the split).
    split: the split, a whole annotation file.
    masks: also keep each non-crowd annotation's `segmentation` for `parse` to decode.

  Raises:
    FileNotFoundError: missing annotation file, images folder or listed image files.
    ValueError: the json is not a valid COCO instances file, or with `masks` an annotation has no valid
      `segmentation` (the message names the file and the entry).
  """
  images_dir, annotation_file = split_files(dataset_config, split)
  data = _load_json(annotation_file)
  category_ids, class_names = _categories(data, annotation_file)
  label_of = {category_id: label for label, category_id in enumerate(category_ids)}

  image_ids, file_names, json_sizes, position = [], [], [], {}
  for n, image in enumerate(data['images']):
    try:
      image_id, file_name = image['id'], str(image['file_name'])
      if not isinstance(image_id, int) or not 0 <= image_id <= _INT32_MAX:
        raise ValueError(f'id {image_id!r} is not an integer in [0, 2**31)')
      if image_id in position:
        raise ValueError(f'id {image_id} appears twice')
      size = (int(image.get('height', -1)), int(image.get('width', -1)))
    except (KeyError, TypeError, ValueError) as error:
      raise ValueError(f"{annotation_file}: images[{n}] is not a COCO image entry (needs a unique non-negative "
                       f"integer 'id' and a 'file_name'): {error!r}") from None
    position[image_id] = n
    image_ids.append(image_id)
    file_names.append(file_name)
    json_sizes.append(size)

  owners, boxes, labels, area, segmentations, annotation_ids = [], [], [], [], [], []
  dropped_polygons = 0
  for n, annotation in enumerate(data.get('annotations') or []):
    try:
      if annotation.get('iscrowd', 0):
        continue
      owner = position[annotation['image_id']]
      label = label_of[annotation['category_id']]
      box = [float(v) for v in annotation['bbox']]
      if len(box) != 4:
        raise ValueError(f'bbox {annotation["bbox"]!r} is not [x, y, width, height]')
      owners.append(owner)
      labels.append(label)
      boxes.append(box)
      area.append(float(annotation.get('area', np.nan)))  # NaN: the box's area after clipping, later.
    except (KeyError, TypeError, ValueError, AttributeError) as error:
      raise ValueError(f"{annotation_file}: annotations[{n}] is not a valid COCO annotation: {error!r}; it "
                       "needs an 'image_id' listed in 'images', a 'category_id' listed in 'categories' and a "
                       "'bbox' [x, y, width, height]") from None
    if masks:
      annotation_id = annotation.get('id')
      which = f'annotation id {annotation_id} (annotations[{n}], image_id {annotation["image_id"]})'
      if annotation.get('segmentation') is None:
        raise ValueError(f"{annotation_file}: {which} has no 'segmentation', which config.dataset.masks=True "
                         'needs for its instance mask: add its polygons or RLE, or set config.dataset.masks=False')
      try:
        segmentation, dropped = _segmentation(annotation['segmentation'])
      except (TypeError, ValueError) as error:
        raise ValueError(f'{annotation_file}: {which} has an invalid segmentation: {error}') from None
      dropped_polygons += dropped
      segmentations.append(segmentation)
      annotation_ids.append(annotation_id if isinstance(annotation_id, int) else -1)

  missing = _missing_files(images_dir, file_names)
  if missing:
    raise FileNotFoundError(f'{len(missing)} of {len(file_names)} images listed in {annotation_file} are missing '
                            f'from {images_dir}, e.g. {missing[:3]}. Expected {LAYOUT}; each file_name is '
                            'relative to the images folder.')
  # Flat arrays grouped by image (stable, so each image keeps the json's annotation order).
  owners = np.asarray(owners, np.int64)
  order = np.argsort(owners, kind='stable')
  offsets = np.concatenate([[0], np.cumsum(np.bincount(owners, minlength=len(file_names)))])
  if dropped_polygons:
    logging.warning('%s: dropped %d polygons with fewer than 3 points from their segmentations (as detectron2 '
                    'does); an annotation left without polygons has an empty mask', annotation_file,
                    dropped_polygons)
  records = CocoRecords(
      paths=[os.path.join(images_dir, name) for name in file_names], image_ids=np.asarray(image_ids, np.int64),
      json_sizes=np.asarray(json_sizes, np.int64).reshape(-1, 2), offsets=offsets,
      boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[order], labels=np.asarray(labels, np.int32)[order],
      area=np.asarray(area, np.float32)[order],
      segmentations=[segmentations[i] for i in order] if masks else None,
      annotation_ids=np.asarray(annotation_ids, np.int64)[order] if masks else None)
  logging.info('coco_folder %s: %d images, %d boxes (crowds dropped), %d categories', annotation_file,
               len(records), len(owners), len(category_ids))
  return CocoFolder(images_dir=images_dir, annotation_file=annotation_file, records=records,
                    class_names=class_names, category_ids=category_ids)


def decode_masks(segmentations, annotation_ids, height: int, width: int, where: str) -> np.ndarray:
  """uint8 [N, height, width] masks of segmentations kept by `load`, as pycocotools' `COCO.annToMask`.

  Polygons: frPyObjects at (height, width), merged into one RLE; uncompressed RLE: frPyObjects; compressed
  RLE as is; then decoded.

  Raises:
    ValueError: naming `where` and the annotation id, when an RLE's size is not height x width or
      pycocotools cannot decode a segmentation.
  """
  masks = np.zeros((len(segmentations), height, width), np.uint8)
  for n, (segmentation, annotation_id) in enumerate(zip(segmentations, annotation_ids)):
    try:
      if isinstance(segmentation, dict):
        if tuple(segmentation['size']) != (height, width):
          raise ValueError(f'its RLE size {segmentation["size"]} (h, w) is not the image\'s {[height, width]}')
        rle = (mask_utils.frPyObjects(segmentation, height, width) if isinstance(segmentation['counts'], list)
               else segmentation)
      elif segmentation:
        rle = mask_utils.merge(mask_utils.frPyObjects(list(segmentation), height, width))
      else:
        continue  # Every polygon had fewer than 3 points: an empty mask.
      masks[n] = mask_utils.decode(rle)
    except Exception as error:  # pycocotools raises bare Exceptions for malformed input.
      raise ValueError(f'{where}: annotation id {annotation_id}: cannot decode its segmentation: '
                       f'{error}') from error
  return masks


def parse(record: dict) -> dict:
  """Raw record -> canonical detection record; reads the image file and its header (not its pixels).

  Returns:
    {'image': bytes, 'boxes': float32 [N, 4] normalised (ymin, xmin, ymax, xmax) (not yet clipped),
    'labels': int32 [N], 'area': float32 [N], 'image_id': int, 'file_name': path}, plus 'masks' uint8
    [N, H, W] (`decode_masks` at the file's size) when the records were loaded with masks.

  Raises:
    ImageDecodeError: the file's header is not an image PIL can read (the message names the file).
    ValueError: a segmentation cannot be decoded (`decode_masks`).
  """
  path = record['file_name']
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
  except Exception as error:  # PIL raises several unrelated types for bad data.
    raise ImageDecodeError(f'{path}: cannot decode the image ({len(data)} bytes): {error}') from error
  if record['json_size'] is not None and record['json_size'] != (height, width):
    logging.log_first_n(logging.WARNING, '%s is %d x %d pixels (h x w) but its annotation file says %d x %d; '
                        'boxes are normalised by the file (e.g. EXIF-rotated annotations do not match).', 5,
                        path, height, width, *record['json_size'])
  x, y, w, h = np.moveaxis(record['boxes'], -1, 0)
  boxes = np.stack([y / height, x / width, (y + h) / height, (x + w) / width], axis=-1).astype(np.float32)
  parsed = {'image': data, 'boxes': boxes, 'labels': record['labels'], 'area': record['area'],
            'image_id': record['image_id'], 'file_name': path}
  if 'segmentations' in record:
    parsed['masks'] = decode_masks(record['segmentations'], record['annotation_ids'], height, width, path)
  return parsed
