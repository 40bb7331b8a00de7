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
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
from absl import logging
from PIL import Image

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
  has no `area`)}.
  """

  def __init__(self, paths, image_ids, json_sizes, offsets, boxes, labels, area):
    self._paths, self._image_ids, self._json_sizes = paths, image_ids, json_sizes
    self._offsets, self._boxes, self._labels, self._area = offsets, boxes, labels, area

  def __len__(self) -> int:
    return len(self._paths)

  def __getitem__(self, index: int) -> dict:
    if not 0 <= index < len(self._paths):
      raise IndexError(f'record {index} out of range for {len(self._paths)} images')
    lo, hi = self._offsets[index], self._offsets[index + 1]
    size = self._json_sizes[index]
    return {'file_name': self._paths[index], 'image_id': int(self._image_ids[index]),
            'json_size': None if size[0] < 0 else (int(size[0]), int(size[1])),
            'boxes': self._boxes[lo:hi], 'labels': self._labels[lo:hi], 'area': self._area[lo:hi]}


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


def load(dataset_config, split: str) -> CocoFolder:
  """Reads and checks the annotation file of `split` (see the module docstring for the layout).

  Raises:
    FileNotFoundError: missing annotation file, images folder or listed image files.
    ValueError: the json is not a valid COCO instances file (the message names the file and the entry).
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

  owners, boxes, labels, area = [], [], [], []
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

  missing = _missing_files(images_dir, file_names)
  if missing:
    raise FileNotFoundError(f'{len(missing)} of {len(file_names)} images listed in {annotation_file} are missing '
                            f'from {images_dir}, e.g. {missing[:3]}. Expected {LAYOUT}; each file_name is '
                            'relative to the images folder.')
  # Flat arrays grouped by image (stable, so each image keeps the json's annotation order).
  owners = np.asarray(owners, np.int64)
  order = np.argsort(owners, kind='stable')
  offsets = np.concatenate([[0], np.cumsum(np.bincount(owners, minlength=len(file_names)))])
  records = CocoRecords(
      paths=[os.path.join(images_dir, name) for name in file_names], image_ids=np.asarray(image_ids, np.int64),
      json_sizes=np.asarray(json_sizes, np.int64).reshape(-1, 2), offsets=offsets,
      boxes=np.asarray(boxes, np.float32).reshape(-1, 4)[order], labels=np.asarray(labels, np.int32)[order],
      area=np.asarray(area, np.float32)[order])
  logging.info('coco_folder %s: %d images, %d boxes (crowds dropped), %d categories', annotation_file,
               len(records), len(owners), len(category_ids))
  return CocoFolder(images_dir=images_dir, annotation_file=annotation_file, records=records,
                    class_names=class_names, category_ids=category_ids)


def parse(record: dict) -> dict:
  """Raw record -> canonical detection record; reads the image file and its header (not its pixels).

  Returns:
    {'image': bytes, 'boxes': float32 [N, 4] normalised (ymin, xmin, ymax, xmax) (not yet clipped),
    'labels': int32 [N], 'area': float32 [N], 'image_id': int, 'file_name': path}.

  Raises:
    ImageDecodeError: the file's header is not an image PIL can read (the message names the file).
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
  return {'image': data, 'boxes': boxes, 'labels': record['labels'], 'area': record['area'],
          'image_id': record['image_id'], 'file_name': path}
