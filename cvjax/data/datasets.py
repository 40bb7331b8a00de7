"""The dataset registry: config name -> random-access source of records in one canonical form.

Every entry is a factory `(dataset_config, data_dir, split) -> DatasetSource`. Sources read prepared TFDS
`array_record` folders with `as_data_source` (no TensorFlow, never a download), or COCO-format folders
(`coco_folder`, see `cvjax.data.coco_folder`), and keep images encoded, so that
`cvjax.data.preprocessing.decode_image` decodes them where errors can name the record. `parse` maps a raw
record to the canonical form the pipeline consumes:
  classification: {'image': bytes, 'label': int}
  segmentation:   see `cvjax.data.segmentation_datasets` ('image', 'label_map', optionally 'instance_map')
  detection:      {'image': bytes, 'boxes': float32 [N, 4] normalised (ymin, xmin, ymax, xmax),
                   'labels': int32 [N] contiguous 0..K-1, 'image_id': int, optionally 'area': float32 [N]
                   (annotation areas in original pixels) and 'file_name' (str, named in messages); with
                   `config.dataset.masks`, 'masks': uint8 [N, H, W] instance masks (nonzero = inside) at the
                   image's size, row-aligned with 'boxes' (`DatasetSource.masks` says the source gives them)}
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import json
import os
from typing import Any, Callable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from cvjax.data import coco_folder, shapes
from cvjax.registry import Registry

DATASETS = Registry('dataset')


@dataclasses.dataclass(frozen=True)
class DatasetSource:
  """One split of one dataset, plus the per-dataset preprocessing defaults.

  Attributes:
    name: how errors name the dataset, e.g. 'shapes/classification_32' or 'coco/2017'.
    split: the TFDS split string read.
    task: 'classification', 'detection' or 'segmentation'.
    records: random access (`len`, `[i]`) to raw TFDS records of the split.
    parse: raw record -> canonical record (module docstring).
    class_names: names of the label values, in order.
    image_size: default model input side when the config gives none.
    crop_scale: default random-resized-crop area range (classification).
    flip: whether horizontal flips are a sensible default augmentation (not for digits).
    eval_crop_fraction: default central crop fraction at evaluation.
    max_boxes: default boxes per example (detection).
    category_ids: detection: the dataset's original category id of each label (COCO ids for results files);
      None when labels are the only ids.
    ground_truth: detection: a zero-argument callable returning the split's annotations as a COCO-format dict
      (every annotation, crowds included), for COCO evaluation by the official protocol; None for datasets
      without annotation files (generated data), whose evaluation uses the boxes of the batches.
    skip_corrupt: skip undecodable images with a warning instead of failing (user folders; TFDS datasets
      were checked when prepared, so a bad record there is an error).
    masks: detection: parsed records carry 'masks' (the config asked for them and the dataset has them).
    panoptic: segmentation: parsed records carry 'instance_map' (panoptic segmentation).
    things: segmentation: the label values that are things (countable instances); the rest are stuff.
  """

  name: str
  split: str
  task: str
  records: Sequence[Any]
  parse: Callable[[dict], dict]
  class_names: tuple[str, ...]
  image_size: int
  crop_scale: tuple[float, float] = (0.08, 1.0)
  flip: bool = True
  eval_crop_fraction: float = 1.0
  max_boxes: int = 100
  category_ids: tuple[int, ...] | None = None
  ground_truth: Callable[[], dict] | None = None
  skip_corrupt: bool = False
  masks: bool = False
  panoptic: bool = False
  things: tuple[int, ...] = ()


# Original COCO category ids of TFDS coco/2014 and coco/2017's 80 labels (TFDS keeps the json's sorted order).
COCO_CATEGORY_IDS = (*range(1, 12), *range(13, 26), 27, 28, *range(31, 45), *range(46, 66), 67, 70,
                     *range(72, 83), *range(84, 91))


def _option(dataset_config, key: str, default=None):
  value = dataset_config.get(key, None)
  return default if value is None else value


def _classification_record(record: dict) -> dict:
  return {'image': record['image'], 'label': int(record['label'])}


def _detection_record(record: dict, image_id_key: str, crowd_key: str | None, masks: bool = False) -> dict:
  """Canonical detection record; sequence features come back from TFDS as lists of arrays or scalars.

  With `masks`, 'masks' uint8 [N, H, W] from `objects/mask` (uint8 [H, W, 1] images; shape (0, 0, 0) when N = 0).
  """
  objects = record['objects']
  canonical = {'boxes': np.asarray(objects['bbox'], np.float32).reshape(-1, 4),
               'labels': np.asarray(objects['label'], np.int32).reshape(-1)}
  if 'area' in objects:
    canonical['area'] = np.asarray(objects['area'], np.float32).reshape(-1)
  if masks:
    canonical['masks'] = (np.stack([np.asarray(m, np.uint8)[..., 0] for m in objects['mask']])
                          if len(objects['mask']) else np.zeros((0, 0, 0), np.uint8))
  if crowd_key is not None:  # Crowd regions are not detection targets (DETR drops them too).
    keep = ~np.asarray(objects[crowd_key], bool).reshape(-1)
    canonical = {key: value[keep] for key, value in canonical.items()}
  return {'image': record['image'], 'image_id': int(record[image_id_key]), **canonical}


def _check_task(name: str, task: str, supported: Sequence[str]) -> None:
  if task not in supported:
    raise ValueError(f'dataset {name!r} supports task {" or ".join(map(repr, supported))}, '
                     f'but config.dataset.task is {task!r}')


def _prepared_builder(data_dir: str, tfds_name: str) -> tfds.core.DatasetBuilder:
  """Read-only builder of the newest prepared version of `tfds_name` ('name' or 'name/config') in data_dir.

  Raises:
    FileNotFoundError: the dataset is not prepared there (the message says how to prepare it).
    ValueError: it is prepared, but not in the `array_record` format that random access needs.
  """
  root = os.path.join(os.path.expanduser(data_dir), *tfds_name.split('/'))
  infos = glob.glob(os.path.join(root, '*', 'dataset_info.json'))
  if not infos:
    raise FileNotFoundError(
        f'dataset {tfds_name!r} is not prepared in data_dir {data_dir!r} (no {root}/<version>/'
        'dataset_info.json). cvjax never downloads data. Prepare it on a machine with network access and '
        f'TensorFlow: `tfds build {tfds_name} --data_dir={data_dir} --file_format=array_record` (imagenet2012 '
        'first needs its manually downloaded archives in <data_dir>/downloads/manual), or copy an already '
        f'prepared {tfds_name!r} folder into {data_dir!r}.')
  newest = max(infos, key=lambda path: tfds.core.Version(os.path.basename(os.path.dirname(path))))
  builder = tfds.builder_from_directory(os.path.dirname(newest))
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
        f'dataset {tfds_name!r} in {os.path.dirname(newest)} is stored as {builder.info.file_format.value}, '
        'but reading it without TensorFlow needs array_record: convert it with `tfds convert_format '
        f'--dataset_version_dir={os.path.dirname(newest)} --out_file_format=array_record` or rebuild it with '
        '`--file_format=array_record`.')
  return builder


def _data_source(builder: tfds.core.DatasetBuilder, name: str, split: str):
  available = sorted(builder.info.splits)
  base_split = split.split('[')[0]
  if base_split not in available:
    raise ValueError(f'dataset {name!r} has no split {split!r}; available splits: {available}')
  # Images stay encoded here: the pipeline decodes the ones it uses, where errors can name the record.
  features = builder.info.features
  skip = {key: tfds.decode.SkipDecoding() for key in features if isinstance(features[key], tfds.features.Image)}
  return builder.as_data_source(split, decoders=skip)


def _tfds_classification(tfds_name: str, *, image_size: int, crop_scale=(0.08, 1.0), flip: bool = True,
                         eval_crop_fraction: float = 1.0):
  """Registry factory for a prepared TFDS classification dataset with `image` and `label` features."""

  def factory(dataset_config, data_dir: str, split: str) -> DatasetSource:
    _check_task(tfds_name, _option(dataset_config, 'task', 'classification'), ('classification',))
    builder = _prepared_builder(data_dir, tfds_name)
    return DatasetSource(
        name=tfds_name, split=split, task='classification', records=_data_source(builder, tfds_name, split),
        parse=_classification_record, class_names=tuple(builder.info.features['label'].names),
        image_size=image_size, crop_scale=crop_scale, flip=flip, eval_crop_fraction=eval_crop_fraction)

  return factory


DATASETS.register('mnist')(_tfds_classification('mnist', image_size=28, crop_scale=(0.5, 1.0), flip=False))
DATASETS.register('cifar10')(_tfds_classification('cifar10', image_size=32, crop_scale=(0.35, 1.0)))
DATASETS.register('imagenet2012')(
    _tfds_classification('imagenet2012', image_size=224, eval_crop_fraction=0.875))


def tfds_coco_ground_truth(records: Sequence[dict], class_names: Sequence[str],
                           category_ids: Sequence[int]) -> dict:
  """The COCO-format ground truth of TFDS `coco` records (images kept encoded): every object with its
  `is_crowd` flag and `area`, boxes back in pixels of the image (whose size is read from its header).

  TFDS stores boxes as float32 normalised (ymin, xmin, ymax, xmax), so they come back within ~1e-4 pixels of
  the annotation file's; `dataset.annotation_file` gives the original json instead.
  """
  images, annotations = [], []
  for record in (records[i] for i in range(len(records))):
    with Image.open(io.BytesIO(record['image'])) as image:
      width, height = image.size
    image_id = int(record['image/id'])
    images.append({'id': image_id, 'height': height, 'width': width})
    objects = record['objects']
    boxes = np.asarray(objects['bbox'], np.float64).reshape(-1, 4)
    labels = np.asarray(objects['label'], np.int64).reshape(-1)
    crowd = np.asarray(objects['is_crowd'], bool).reshape(-1)
    area = np.asarray(objects['area'], np.float64).reshape(-1)
    for (ymin, xmin, ymax, xmax), label, is_crowd, a in zip(boxes, labels, crowd, area):
      annotations.append({'id': len(annotations) + 1, 'image_id': image_id,
                          'category_id': int(category_ids[label]), 'iscrowd': int(is_crowd), 'area': float(a),
                          'bbox': [xmin * width, ymin * height, (xmax - xmin) * width, (ymax - ymin) * height]})
  categories = [{'id': int(c), 'name': n} for c, n in zip(category_ids, class_names)]
  return {'images': images, 'annotations': annotations, 'categories': categories}


def _annotation_file_ground_truth(path: str) -> Callable[[], dict]:
  def load() -> dict:
    with open(os.path.expanduser(path)) as f:
      return json.load(f)
  return load


@DATASETS.register('coco')
def _coco(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """COCO detection from TFDS `coco/<config_name>` (default '2017'); 80 contiguous labels.

  Training targets drop crowd regions (as DETR does); evaluation uses every annotation of the split, crowds as
  ignore regions, from the TFDS records or from `dataset.annotation_file` (e.g. instances_val2017.json).
  """
  name = f'coco/{_option(dataset_config, "config_name", "2017")}'
  _check_task(name, _option(dataset_config, 'task', 'detection'), ('detection',))
  if _option(dataset_config, 'masks', False):
    raise ValueError(f'config.dataset.masks=True, but TFDS {name!r} has no instance masks (its objects carry '
                     "boxes, labels, areas and crowd flags only). Read COCO's instance masks from a COCO-format "
                     "folder instead: config.dataset.name='coco_folder' with "
                     f'{coco_folder.LAYOUT} (e.g. COCO 2017 as unzipped: images and instances_*.json, whose '
                     'annotations carry segmentation)')
  builder = _prepared_builder(data_dir, name)
  class_names = tuple(builder.info.features['objects']['label'].names)
  category_ids = COCO_CATEGORY_IDS if len(class_names) == 80 else tuple(range(1, len(class_names) + 1))
  records = _data_source(builder, name, split)
  annotation_file = _option(dataset_config, 'annotation_file', None)
  if annotation_file and not os.path.isfile(os.path.expanduser(annotation_file)):
    raise FileNotFoundError(f'config.dataset.annotation_file={annotation_file!r} does not exist')
  ground_truth = (_annotation_file_ground_truth(annotation_file) if annotation_file
                  else functools.partial(tfds_coco_ground_truth, records, class_names, category_ids))
  return DatasetSource(
      name=name, split=split, task='detection', records=records,
      parse=lambda record: _detection_record(record, 'image/id', 'is_crowd'), class_names=class_names,
      image_size=512, category_ids=category_ids if len(class_names) == 80 else None, ground_truth=ground_truth)


@DATASETS.register('coco_folder')
def _coco_folder(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """A COCO-format folder (images + instances json) per split; `data_dir` is unused (see `coco_folder`)."""
  del data_dir
  _check_task('coco_folder', _option(dataset_config, 'task', 'detection'), ('detection',))
  masks = bool(_option(dataset_config, 'masks', False))
  folder = coco_folder.load(dataset_config, split, masks=masks)
  return DatasetSource(
      name=f'coco_folder:{folder.annotation_file}', split=split, task='detection', records=folder.records,
      parse=coco_folder.parse, class_names=folder.class_names, image_size=512,
      category_ids=folder.category_ids, ground_truth=folder.ground_truth, skip_corrupt=True, masks=masks)


@DATASETS.register('shapes')
def _shapes(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """The generated `shapes` dataset; prepared into data_dir on first use (see `cvjax.data.shapes`).

  Detection configs give instance masks (`objects/mask`, the visible part of each shape) with
  `config.dataset.masks`, and their label maps for task 'segmentation' (`segmentation_datasets`).
  """
  task = _option(dataset_config, 'task', 'classification')
  if task == 'segmentation':
    return segmentation_datasets.shapes_segmentation(dataset_config, data_dir, split)
  default_config = {'classification': 'classification_32', 'detection': 'detection_64'}.get(task)
  config = shapes.shapes_config(
      _option(dataset_config, 'config_name', default_config),
      num_examples=_option(dataset_config, 'num_examples', None),
      seed=_option(dataset_config, 'generation_seed', 0))
  name = f'shapes/{config.name}'
  _check_task(name, task, (config.task,))
  builder = shapes.prepare_shapes(data_dir, config)
  masks = config.task == 'detection' and bool(_option(dataset_config, 'masks', False))
  if config.task == 'classification':
    parse = _classification_record
  else:
    parse = functools.partial(_detection_record, image_id_key='image_id', crowd_key=None, masks=masks)
  return DatasetSource(
      name=name, split=split, task=config.task, records=_data_source(builder, name, split), parse=parse,
      class_names=shapes.CLASS_NAMES, image_size=config.image_size, crop_scale=(0.35, 1.0),
      max_boxes=config.max_objects, masks=masks)


# At the end: the segmentation sources register into DATASETS and build on the helpers above.
from cvjax.data import segmentation_datasets  # noqa: E402  pylint: disable=wrong-import-position
