"""Segmentation sources for the dataset registry: shapes (generated), ADE20K, Cityscapes, COCO panoptic, and a
folder of images + PNG label maps.

Canonical segmentation record (what `DatasetSource.parse` returns for task 'segmentation'):
  {'image': bytes, 'label_map': int [H, W] (class index in [0, K), `IGNORE_LABEL` = 255 where no class applies),
   'image_id': int, and for panoptic sources 'instance_map': int [H, W] (0 = no instance: stuff, void or crowd;
   1, 2, ... one per thing segment of the image)}.
`DatasetSource.things` lists the label values that are things (countable instances); the other labels are stuff.

Real datasets are read when prepared (nothing is downloaded); their absence raises the usual message saying how
to prepare them. Label conventions follow each benchmark's usual evaluation: ADE20K's label 0 ("other") is
ignored and 1..150 become 0..149 (mmsegmentation's `reduce_zero_label`); Cityscapes' label ids become its 19
train ids, the rest ignored; COCO panoptic's crowd segments become ignore (void) regions, which panoptic quality
neither rewards nor penalises (a prediction mostly inside void is no false positive).
"""

from __future__ import annotations

import dataclasses
import glob
import io
import os

import numpy as np
from PIL import Image

from cvjax.data import shapes
from cvjax.data.datasets import DATASETS, DatasetSource, _check_task, _data_source, _option, _prepared_builder
from cvjax.data.segmentation_transforms import IGNORE_LABEL

# Cityscapes label id -> train id (the 19 evaluated classes; every other id, and -1, is ignored).
CITYSCAPES_TRAIN_IDS = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
                        25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_CLASSES = ('road', 'sidewalk', 'building', 'wall', 'fence', 'pole', 'traffic light', 'traffic sign',
                      'vegetation', 'terrain', 'sky', 'person', 'rider', 'car', 'truck', 'bus', 'train',
                      'motorcycle', 'bicycle')
# COCO panoptic's 133 categories come in the annotation file's order: the 80 things first, then 53 stuff.
COCO_PANOPTIC_THINGS = 80
_IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp')


def decode_map(data, where: str) -> np.ndarray:
  """A label / id map stored as an image (PNG bytes, or an already decoded array) -> int32 [H, W] of its
  first channel (single-channel maps saved as RGB repeat the value)."""
  if isinstance(data, (bytes, bytearray)):
    try:
      with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    except Exception as error:  # PIL raises several unrelated types for bad data.
      raise ValueError(f'{where}: cannot decode the label map ({len(data)} bytes): {error}') from error
  else:
    array = np.asarray(data)
  return (array[..., 0] if array.ndim == 3 else array).astype(np.int32)


def lookup(label_map: np.ndarray, table: dict[int, int]) -> np.ndarray:
  """Maps label values through `table`; values not in it become `IGNORE_LABEL`."""
  lut = np.full(max(max(table), int(label_map.max(initial=0))) + 2, IGNORE_LABEL, np.int32)
  lut[list(table)] = list(table.values())
  return lut[np.where(label_map < 0, len(lut) - 1, label_map)]


@dataclasses.dataclass(frozen=True)
class _ShapesSegmentation:
  """Parse of a `shapes` detection record: 'segmentation' (0 = background, label + 1) is the label map,
  'panoptic' (0 = background, n + 1 = object n) the instance map."""
  panoptic: bool

  def __call__(self, record: dict) -> dict:
    image_id = int(record['image_id'])
    where = f'shapes record {image_id}'
    out = {'image': record['image'], 'image_id': image_id,
           'label_map': decode_map(record['segmentation'], where)}
    if self.panoptic:
      out['instance_map'] = decode_map(record['panoptic'], where)
    return out


def shapes_segmentation(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """`shapes` detection configs as semantic (7 classes: background + the 6 shapes) or panoptic segmentation
  (background is the one stuff class, the shapes are things)."""
  config = shapes.shapes_config(
      _option(dataset_config, 'config_name', 'detection_64'),
      num_examples=_option(dataset_config, 'num_examples', None),
      seed=_option(dataset_config, 'generation_seed', 0))
  name = f'shapes/{config.name}'
  if config.task != 'detection':
    raise ValueError(f'segmentation reads the label maps of the shapes detection configs; {name!r} is a '
                     f'{config.task} config (use e.g. config_name="detection_64")')
  builder = shapes.prepare_shapes(data_dir, config)
  panoptic = bool(_option(dataset_config, 'panoptic', False))
  class_names = ('background',) + tuple(shapes.CLASS_NAMES)
  return DatasetSource(
      name=name, split=split, task='segmentation', records=_data_source(builder, name, split),
      parse=_ShapesSegmentation(panoptic), class_names=class_names, image_size=config.image_size,
      crop_scale=(0.35, 1.0), panoptic=panoptic, things=tuple(range(1, len(class_names))))


@DATASETS.register('scene_parse150')
def _ade20k(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """ADE20K (MIT Scene Parsing, TFDS `scene_parse150`): 150 classes; label 0 ("other objects") ignored."""
  _check_task('scene_parse150', _option(dataset_config, 'task', 'segmentation'), ('segmentation',))
  builder = _prepared_builder(data_dir, 'scene_parse150')
  table = {v: v - 1 for v in range(1, 151)}

  def parse(record: dict) -> dict:
    return {'image': record['image'],
            'label_map': lookup(decode_map(record['annotation'], 'scene_parse150 annotation'), table)}

  return DatasetSource(
      name='scene_parse150', split=split, task='segmentation', records=_data_source(builder, 'scene_parse150',
                                                                                    split),
      parse=parse, class_names=tuple(f'ade_{i}' for i in range(1, 151)), image_size=512, crop_scale=(0.25, 1.0))


@DATASETS.register('cityscapes')
def _cityscapes(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """Cityscapes fine annotations (TFDS `cityscapes/semantic_segmentation`, prepared from the manually
  downloaded archives): the 19 train-id classes, every other label id ignored."""
  _check_task('cityscapes', _option(dataset_config, 'task', 'segmentation'), ('segmentation',))
  name = f'cityscapes/{_option(dataset_config, "config_name", "semantic_segmentation")}'
  builder = _prepared_builder(data_dir, name)

  def parse(record: dict) -> dict:
    labels = decode_map(record['segmentation_label'], f'{name} segmentation_label')
    return {'image': record['image_left'], 'label_map': lookup(labels, CITYSCAPES_TRAIN_IDS)}

  return DatasetSource(
      name=name, split=split, task='segmentation', records=_data_source(builder, name, split), parse=parse,
      class_names=CITYSCAPES_CLASSES, image_size=512, crop_scale=(0.25, 1.0))


def coco_panoptic_maps(panoptic_rgb: np.ndarray, segment_ids, labels, crowd) -> tuple[np.ndarray, np.ndarray]:
  """COCO panoptic PNG (segment id = R + 256 G + 256^2 B, 0 = void) and its segments -> (label map, instance
  map): stuff segments get instance 0, thing segments 1, 2, ... in annotation order, crowds and void pixels
  `IGNORE_LABEL` with instance 0."""
  rgb = np.asarray(panoptic_rgb, np.int64)
  ids = rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
  label_map = np.full(ids.shape, IGNORE_LABEL, np.int32)
  instance_map = np.zeros(ids.shape, np.int32)
  next_instance = 1
  for segment_id, label, is_crowd in zip(segment_ids, labels, crowd):
    if is_crowd:
      continue
    pixels = ids == int(segment_id)
    label_map[pixels] = int(label)
    if int(label) < COCO_PANOPTIC_THINGS:
      instance_map[pixels] = next_instance
      next_instance += 1
  return label_map, instance_map


@DATASETS.register('coco_panoptic')
def _coco_panoptic(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """COCO panoptic (TFDS `coco/2017_panoptic`): 133 categories (80 things, 53 stuff); crowds are void."""
  _check_task('coco_panoptic', _option(dataset_config, 'task', 'segmentation'), ('segmentation',))
  name = f'coco/{_option(dataset_config, "config_name", "2017_panoptic")}'
  builder = _prepared_builder(data_dir, name)
  class_names = tuple(builder.info.features['panoptic_objects']['label'].names)

  def parse(record: dict) -> dict:
    objects = record['panoptic_objects']
    with Image.open(io.BytesIO(record['panoptic_image'])) as image:
      rgb = np.asarray(image.convert('RGB'))
    label_map, instance_map = coco_panoptic_maps(rgb, objects['id'], objects['label'], objects['is_crowd'])
    return {'image': record['image'], 'image_id': int(record['image/id']), 'label_map': label_map,
            'instance_map': instance_map}

  return DatasetSource(
      name=name, split=split, task='segmentation', records=_data_source(builder, name, split), parse=parse,
      class_names=class_names, image_size=512, crop_scale=(0.25, 1.0), panoptic=True,
      things=tuple(range(COCO_PANOPTIC_THINGS)))


VOC_CLASSES = ('background', 'aeroplane', 'bicycle', 'bird', 'boat', 'bottle', 'bus', 'car', 'cat', 'chair', 'cow',
               'diningtable', 'dog', 'horse', 'motorbike', 'person', 'pottedplant', 'sheep', 'sofa', 'train',
               'tvmonitor')
VOC_LAYOUT = ('config.dataset.path=<VOCdevkit/VOC2012 (or VOC2011)> holding JPEGImages/<id>.jpg, '
              'SegmentationClass/<id>.png (palette PNGs: pixel value = class index, 255 = object boundary, '
              'ignored) and ImageSets/Segmentation/<split>.txt (one id per line), as the VOC archive unpacks')


@DATASETS.register('voc_segmentation')
def _voc_segmentation(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """PASCAL VOC semantic segmentation (21 classes, background included) from an unpacked VOCdevkit folder
  (`VOC_LAYOUT`; TFDS's `voc` has no segmentation masks); `data_dir` is unused."""
  del data_dir
  _check_task('voc_segmentation', _option(dataset_config, 'task', 'segmentation'), ('segmentation',))
  root = os.path.expanduser(_option(dataset_config, 'path', ''))
  list_file = os.path.join(root, 'ImageSets', 'Segmentation', f'{split}.txt')
  if not root or not os.path.isfile(list_file):
    raise FileNotFoundError(f'voc_segmentation: no split list {list_file!r}; cvjax never downloads data: '
                            f'unpack the VOC archive and give {VOC_LAYOUT}')
  with open(list_file) as f:
    ids = [line.strip() for line in f if line.strip()]
  records = [{'image_path': os.path.join(root, 'JPEGImages', f'{i}.jpg'),
              'label_path': os.path.join(root, 'SegmentationClass', f'{i}.png'), 'image_id': n}
             for n, i in enumerate(ids)]
  return DatasetSource(
      name=f'voc_segmentation:{root}', split=split, task='segmentation', records=records,
      parse=_read_folder_record, class_names=VOC_CLASSES, image_size=500, crop_scale=(0.25, 1.0))


FOLDER_LAYOUT = ('config.dataset.path=<root> holding images/<split>/<name>.{jpg,png} and '
                 'labels/<split>/<name>.png (label maps: pixel value = class index, 255 = ignore) and a '
                 'classes.txt (one class name per line, in label order)')


def _folder_records(root: str, split: str) -> list[dict]:
  image_dir, label_dir = os.path.join(root, 'images', split), os.path.join(root, 'labels', split)
  if not os.path.isdir(image_dir) or not os.path.isdir(label_dir):
    raise FileNotFoundError(f'segmentation_folder: no {image_dir} or {label_dir}; expected {FOLDER_LAYOUT}')
  images = sorted(p for p in glob.glob(os.path.join(image_dir, '*')) if p.lower().endswith(_IMAGE_SUFFIXES))
  if not images:
    raise FileNotFoundError(f'segmentation_folder: no images in {image_dir}; expected {FOLDER_LAYOUT}')
  records = []
  for index, path in enumerate(images):
    stem = os.path.splitext(os.path.basename(path))[0]
    label = os.path.join(label_dir, stem + '.png')
    if not os.path.isfile(label):
      raise FileNotFoundError(f'segmentation_folder: image {path} has no label map {label}')
    records.append({'image_path': path, 'label_path': label, 'image_id': index})
  return records


def _read_folder_record(record: dict) -> dict:
  with open(record['image_path'], 'rb') as f:
    image = f.read()
  with open(record['label_path'], 'rb') as f:
    label_map = decode_map(f.read(), record['label_path'])
  return {'image': image, 'image_id': record['image_id'], 'label_map': label_map,
          'file_name': record['image_path']}


@DATASETS.register('segmentation_folder')
def _segmentation_folder(dataset_config, data_dir: str, split: str) -> DatasetSource:
  """Users' own data: a folder of images and PNG label maps (`FOLDER_LAYOUT`); `data_dir` is unused."""
  del data_dir
  _check_task('segmentation_folder', _option(dataset_config, 'task', 'segmentation'), ('segmentation',))
  root = os.path.expanduser(_option(dataset_config, 'path', ''))
  if not root:
    raise ValueError(f'segmentation_folder needs {FOLDER_LAYOUT}')
  classes_file = os.path.join(root, 'classes.txt')
  if not os.path.isfile(classes_file):
    raise FileNotFoundError(f'segmentation_folder: no {classes_file}; expected {FOLDER_LAYOUT}')
  with open(classes_file) as f:
    class_names = tuple(line.strip() for line in f if line.strip())
  image_size = int(_option(dataset_config, 'image_size', 512))
  return DatasetSource(
      name=f'segmentation_folder:{root}', split=split, task='segmentation', records=_folder_records(root, split),
      parse=_read_folder_record, class_names=class_names, image_size=image_size, skip_corrupt=True)
