"""Input pipelines on grain: deterministic, sharded per process, resumable from a JSON-serialisable state.

`create_pipeline(config, split, train)` is what the train loop calls. Training streams are infinite: each
process reads its contiguous shard of the split, shuffled with `config.seed` (a new permutation every epoch),
augmented with randomness seeded by (seed, record index, epoch), batched with `drop_remainder`. Evaluation
streams make exactly one ordered pass over the process's shard; every process yields the same number of
batches (so collective eval steps line up) and rows past the real examples have `mask=False`.

Batches are dicts of NumPy arrays with leading dim `config.batch_size // process_count`:
  classification: image float32 [b, S, S, 3] (ImageNet-normalised), label int32 [b], mask bool [b].
  detection: image float32 [b, H, W, 3], boxes float32 [b, M, 4] normalised cxcywh (relative to each image's
    real region), labels int32 [b, M], valid bool [b, M], area float32 [b, M] (annotation area in original
    pixels, else the box's; 0 where not valid), pixel_mask bool [b, H, W] (True on real pixels, which start
    top-left), image_id int32 [b] (-1 on padding rows), orig_size int32 [b, 2] (h, w), mask bool [b]; with
    `config.dataset.masks` also masks uint8 [b, M, H, W] (instance masks, 1 inside the instance, on the same
    pixels as `image`, row-aligned with boxes; 0 on padding pixels, on rows past the real boxes and on padding
    examples). Masks go through every flip, resize and crop of their image (nearest neighbour) and are
    dropped with their boxes; a kept box's mask may be empty (e.g. an object thinner than a pixel after
    downscaling).
    (H, W) is S x S when letterboxing (no `scales`); with DETR multi-scale resizing it is the smallest of
    `buckets` that holds every image of the batch (see `cvjax.data.batching`), or with several processes
    always the largest bucket (one shape per run: processes never exchange shapes).
  segmentation: image float32 [b, S, S, 3], label_map int32 [b, S, S] (class per pixel, 255 = ignore, also on
    letterbox padding and padding rows), image_id int32 [b], mask bool [b]; with `config.dataset.panoptic`
    also panoptic int32 [b, S, S, 2] (category, instance id; see `cvjax.data.segmentation_transforms`), and
    with `config.dataset.max_segments` = M segment_masks uint8 [b, M, S, S], segment_labels int32 [b, M],
    segment_valid bool [b, M] (one segment per stuff category and per thing instance).

Folder datasets (`DatasetSource.skip_corrupt`) skip undecodable images with one warning per file: training
streams filter them out (epochs are a little shorter; the resumable position counts examples read), and
evaluation passes turn them into padding rows (`mask=False`), so batch counts stay equal across processes
and every decodable example is still seen exactly once.
"""

from __future__ import annotations

import functools
import math
import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from cvjax.data import batching, preprocessing, segmentation_transforms
from cvjax.data.datasets import DATASETS, DatasetSource

_SHUFFLE_STREAM, _AUGMENT_STREAM = 0, 1


def create_pipeline(config, split: str, train: bool, process_index: int | None = None,
                    process_count: int | None = None) -> Pipeline:
  """The input pipeline of `split` of `config.dataset`.

  Args:
    config: ConfigDict with `data_dir`, `batch_size` (global), `seed` and a `dataset` ConfigDict; keys of
      `config.dataset` are listed in `Pipeline`.
    split: TFDS split string, e.g. 'train', 'validation', 'train[:90%]'.
    train: infinite shuffled augmented stream (True) or one ordered padded pass (False).
    process_index, process_count: this process and how many read the split; default `jax.process_index()`
      and `jax.process_count()`.
  """
  if process_index is None or process_count is None:
    import jax  # Deferred: only multi-process runs need JAX here.
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  source = DATASETS.get(config.dataset.name)(config.dataset, config.data_dir, split)
  return Pipeline(source, config.dataset, batch_size=config.batch_size, seed=config.seed, train=train,
                  process_index=process_index, process_count=process_count)


def _option(dataset_config, key: str, default):
  value = dataset_config.get(key, None)
  return default if value is None else value


_MULTISCALE_KEYS = ('max_size', 'eval_scale', 'crop_prob', 'crop_resize_scales', 'crop_size', 'buckets')


def _positive_ints(dataset_config, key: str, default, count: int | None = None) -> tuple[int, ...]:
  """`config.dataset.<key>` as a tuple of positive ints (of length `count` if given), else a ValueError."""
  value = _option(dataset_config, key, default)
  try:
    ints = tuple(int(v) for v in (value if isinstance(value, (tuple, list)) else (value,)))
  except (TypeError, ValueError):
    ints = ()
  if not ints or min(ints) < 1 or (count is not None and len(ints) != count):
    what = 'a positive integer' if count == 1 else f'{count or "some"} positive integers'
    raise ValueError(f'config.dataset.{key} must be {what}, got {value!r}')
  return ints


def _multiscale_options(dataset_config, task: str) -> dict:
  """The DETR multi-scale fields of `preprocessing.Options` from `config.dataset` ({} = letterbox mode)."""
  if _option(dataset_config, 'scales', ()) and task != 'detection':
    raise ValueError(f'config.dataset.scales (DETR multi-scale resizing) applies to detection, not {task}')
  if not _option(dataset_config, 'scales', ()):
    given = [key for key in _MULTISCALE_KEYS if dataset_config.get(key, None) is not None]
    if given:
      raise ValueError(f'config.dataset.{given[0]} only applies to DETR multi-scale resizing, which '
                       'config.dataset.scales turns on (e.g. (480, 512, ..., 800)); without scales every image '
                       'is letterboxed to image_size')
    return {}
  scales = _positive_ints(dataset_config, 'scales', ())
  (max_size,) = _positive_ints(dataset_config, 'max_size', 1333, count=1)
  (eval_scale,) = _positive_ints(dataset_config, 'eval_scale', max(scales), count=1)
  crop_size = _positive_ints(dataset_config, 'crop_size', (384, 600), count=2)
  crop_prob = float(_option(dataset_config, 'crop_prob', 0.5))
  if crop_size[0] > crop_size[1]:
    raise ValueError(f'config.dataset.crop_size must be (min, max) with min <= max, got {crop_size}')
  if not 0.0 <= crop_prob <= 1.0:
    raise ValueError(f'config.dataset.crop_prob must be in [0, 1], got {crop_prob}')
  return dict(scales=scales, max_size=max_size, eval_scale=eval_scale, crop_prob=crop_prob,
              crop_resize_scales=_positive_ints(dataset_config, 'crop_resize_scales', (400, 500, 600)),
              crop_size=crop_size)


_RANDOM_RESIZED_CROP_DEFAULTS = {'crop_scale': (0.08, 1.0), 'crop_ratio': (3.0 / 4.0, 4.0 / 3.0)}


def _classification_options(dataset_config, task: str, image_size: int) -> dict:
  """The paper-augmentation fields of `preprocessing.Options` (scale_range, eval_resize, pca_lighting)."""
  scale_range = _option(dataset_config, 'scale_range', ())
  eval_resize = _option(dataset_config, 'eval_resize', 0)
  pca_lighting = _option(dataset_config, 'pca_lighting', 0.0)
  if task != 'classification':
    given = [key for key, value in (('scale_range', scale_range), ('eval_resize', eval_resize),
                                    ('pca_lighting', pca_lighting)) if value]
    if given:
      raise ValueError(f'config.dataset.{given[0]} applies to classification, not {task}')
    return {}
  options = {}
  if scale_range:  # () (what the command line gives for "none") is off too.
    low, high = _positive_ints(dataset_config, 'scale_range', (), count=2)
    if not image_size <= low <= high:
      raise ValueError(f'config.dataset.scale_range must be (low, high) with image_size={image_size} <= low <= '
                       f'high (the shorter side is resized into [low, high] before an image_size crop), got '
                       f'{tuple(scale_range)}')
    for key, default in _RANDOM_RESIZED_CROP_DEFAULTS.items():
      configured = dataset_config.get(key, None)
      if configured is not None and tuple(configured) != default:
        raise ValueError(f'config.dataset.scale_range={(low, high)} replaces the random resized crop, so '
                         f'config.dataset.{key}={tuple(configured)} would have no effect: drop one of them '
                         f'(set {key} to None or its default {default})')
    options['scale_range'] = (low, high)
  if eval_resize:
    (eval_resize,) = _positive_ints(dataset_config, 'eval_resize', 0, count=1)
    if eval_resize < image_size:
      raise ValueError(f'config.dataset.eval_resize={eval_resize} must be at least image_size={image_size} '
                       '(the shorter side is resized to it before the central image_size crop)')
    if dataset_config.get('eval_crop_fraction', None) is not None:
      raise ValueError(f'config.dataset.eval_resize={eval_resize} replaces the central crop of '
                       f'config.dataset.eval_crop_fraction={dataset_config.eval_crop_fraction}: set only one')
    options['eval_resize'] = eval_resize
  try:
    pca_lighting = float(pca_lighting)
  except (TypeError, ValueError):
    pca_lighting = math.nan
  if not 0.0 <= pca_lighting < math.inf:
    raise ValueError(f'config.dataset.pca_lighting must be a non-negative standard deviation (0 = off, AlexNet '
                     f'0.1), got {dataset_config.get("pca_lighting")!r}')
  options['pca_lighting'] = pca_lighting
  return options


def _buckets(dataset_config, options: preprocessing.Options) -> tuple[batching.Bucket, ...]:
  """The allowed detection batch shapes, smallest first: S x S when letterboxing."""
  if not options.scales:
    return ((options.image_size, options.image_size),)
  configured = dataset_config.get('buckets', None)
  if configured is None:
    return batching.default_buckets(max(max(options.scales), options.eval_scale), options.max_size)
  buckets = batching.check_buckets(configured)
  largest = buckets[-1]
  if min(largest) < options.max_size:
    raise ValueError(f'config.dataset.buckets {tuple(configured)}: the largest bucket {largest} must be at '
                     f'least max_size x max_size = {options.max_size} x {options.max_size} so that every '
                     'resized image fits; add a larger bucket or lower config.dataset.max_size')
  return buckets


class Pipeline:
  """Batches of one split for one process.

  Attributes:
    options: the preprocessing options resolved from the config and the dataset's defaults.
    buckets: the (height, width) detection batches are padded to, smallest area first (S x S only when
      letterboxing; only the largest with several processes).
    per_process_batch_size: leading dim of every batch.

  Keys read from `config.dataset` (None or absent = the default):
    name (str), task ('classification' | 'detection' | 'segmentation'), config_name (TFDS builder config),
    image_size (int, model input side; default: the dataset's native/usual size),
    augment (bool, True; training only), crop_scale ((lo, hi), dataset default), crop_ratio ((lo, hi),
    (3/4, 4/3)), flip (bool, dataset default), eval_crop_fraction (float, dataset default),
    max_boxes (int, dataset default), num_threads (int, 2), prefetch (int, 4 batches),
    masks (bool, False; detection: batches also carry instance `masks`, see the module docstring; `shapes`
    detection configs and `coco_folder` with `segmentation` have them, TFDS `coco` has none and refuses it),
    panoptic (bool, False; segmentation: batches also carry `panoptic` maps), max_segments (int, 0; with
    panoptic: batches also carry MaskFormer's targets, `segmentation_transforms.panoptic_segments`),
    for `shapes` only: num_examples ({split: count}), generation_seed (int, 0),
    for `coco_folder` only: path (str), folders ({split: (images_dir, annotation_file)}).
  Classification, paper augmentation (`preprocessing.classification_image`; unset/None, () or 0 = off):
    scale_range ((low, high) ints, image_size <= low <= high: shorter side jittered in [low, high], then a
    random image_size crop, instead of the random resized crop, so crop_scale/crop_ratio must stay unset or
    default), eval_resize (int >= image_size: shorter side resized to it, then the central image_size crop,
    instead of eval_crop_fraction, which must then be unset), pca_lighting (float >= 0, AlexNet PCA lighting
    noise std, e.g. 0.1).
  Detection, DETR multi-scale mode (all unset = letterbox every image to image_size x image_size):
    scales ((int, ...), shorter sides for training, e.g. (480, 512, ..., 800)), max_size (int, 1333, cap on
    the longer side), eval_scale (int, max(scales)), crop_prob (float, 0.5), crop_resize_scales ((int, ...),
    (400, 500, 600)), crop_size ((min, max), (384, 600)), buckets (((h, w), ...), default
    `batching.default_buckets`; the largest must hold max_size x max_size, so every image fits).
  """

  def __init__(self, source: DatasetSource, dataset_config, *, batch_size: int, seed: int, train: bool,
               process_index: int = 0, process_count: int = 1):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f'process_index must be in [0, process_count); got {process_index} of {process_count}')
    if batch_size < 1 or batch_size % process_count:
      raise ValueError(f'config.batch_size={batch_size} must be a positive multiple of process_count='
                       f'{process_count}: each process loads batch_size // process_count examples')
    if not 0 <= seed < 2**63:
      raise ValueError(f'config.seed must be a non-negative integer, got {seed}')
    self._source = source
    self._train = bool(train)
    self._seed = int(seed)
    self._process_index, self._process_count = process_index, process_count
    self.per_process_batch_size = batch_size // process_count
    num = len(source.records)
    self._shard = (process_index * num // process_count, (process_index + 1) * num // process_count)
    if self._shard[1] <= self._shard[0]:
      raise ValueError(f'dataset {source.name!r} split {source.split!r} has {num} examples, too few for '
                       f'{process_count} processes')
    image_size = int(_option(dataset_config, 'image_size', source.image_size))
    masks = bool(_option(dataset_config, 'masks', False))
    panoptic = bool(_option(dataset_config, 'panoptic', False))
    if panoptic and not source.panoptic:
      raise ValueError(f'config.dataset.panoptic=True, but dataset {source.name!r} gives no instance maps; '
                       'shapes (task segmentation) and coco_panoptic do')
    self._panoptic = panoptic
    self._max_segments = int(_option(dataset_config, 'max_segments', 0))
    if self._max_segments and not panoptic:
      raise ValueError('config.dataset.max_segments (mask-classification targets) needs config.dataset.panoptic')
    if masks and source.task != 'detection':
      raise ValueError(f'config.dataset.masks (instance masks) applies to detection, not {source.task}')
    if masks and not source.masks:
      raise ValueError(f'config.dataset.masks=True, but dataset {source.name!r} gives no instance masks; '
                       'shapes detection configs and COCO-format folders (coco_folder) with segmentation do')
    self.options = preprocessing.Options(
        image_size=image_size,
        augment=self._train and bool(_option(dataset_config, 'augment', True)),
        crop_scale=tuple(_option(dataset_config, 'crop_scale', source.crop_scale)),
        crop_ratio=tuple(_option(dataset_config, 'crop_ratio', (3.0 / 4.0, 4.0 / 3.0))),
        flip=bool(_option(dataset_config, 'flip', source.flip)),
        eval_crop_fraction=float(_option(dataset_config, 'eval_crop_fraction', source.eval_crop_fraction)),
        max_boxes=int(_option(dataset_config, 'max_boxes', source.max_boxes)),
        **_multiscale_options(dataset_config, source.task),
        masks=masks, **_classification_options(dataset_config, source.task, image_size))
    self.buckets = _buckets(dataset_config, self.options)
    if process_count > 1:
      # One global array needs one shape on every process, and agreeing on a per-batch bucket would take a
      # collective per step (which blocks asynchronous dispatch): several processes pad to the largest.
      self.buckets = self.buckets[-1:]
    self._num_threads = int(_option(dataset_config, 'num_threads', 2))
    self._prefetch_batches = int(_option(dataset_config, 'prefetch', 4))
    self._dropped_boxes = 0
    self._skipped: set[int] = set()
    self._lock = threading.Lock()
    self._batch_fn = (functools.partial(batching.collate_detection, buckets=self.buckets)
                      if source.task == 'detection' else None)

  @property
  def task(self) -> str:
    """'classification', 'detection' or 'segmentation': the form of the batches (module docstring)."""
    return self._source.task

  @property
  def class_names(self) -> tuple[str, ...]:
    """The name of each label value, in label order."""
    return self._source.class_names

  @property
  def num_classes(self) -> int:
    """How many label values there are (detection: object classes, no background)."""
    return len(self._source.class_names)

  @property
  def num_examples(self) -> int:
    """Examples in this split, over all processes."""
    return len(self._source.records)

  @property
  def things(self) -> tuple[int, ...]:
    """Segmentation: the label values that are things (countable instances); the others are stuff."""
    return self._source.things

  @property
  def category_ids(self) -> tuple[int, ...] | None:
    """The dataset's original category id of each label (COCO ids), or None when it has none."""
    return self._source.category_ids

  @property
  def ground_truth(self):
    """None, or a zero-argument callable returning the split's annotations as a COCO-format dict (datasets
    with annotation files: COCO-format folders, TFDS coco), for COCO evaluation by the official protocol."""
    return self._source.ground_truth

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """Model input shape: S x S x 3 when letterboxing, else the largest bucket's."""
    height, width = self.buckets[-1]
    return (height, width, 3)

  @property
  def num_batches(self) -> int | None:
    """Batches of one evaluation pass (the same on every process); None for the infinite train stream."""
    if self._train:
      return None
    longest_shard = math.ceil(self.num_examples / self._process_count)
    return math.ceil(longest_shard / self.per_process_batch_size)

  @property
  def dropped_boxes(self) -> int:
    """Boxes dropped so far because an example had more than `max_boxes` (detection)."""
    return self._dropped_boxes

  @property
  def skipped_images(self) -> int:
    """Distinct undecodable images skipped so far (datasets with `skip_corrupt` only)."""
    return len(self._skipped)

  def _example(self, index: int, rng: np.random.Generator | None) -> dict | None:
    """Preprocessed record `index` of the split (module docstring), or None for a skipped corrupt image."""
    where = f'dataset {self._source.name!r}, split {self._source.split!r}, record {index}'
    try:
      record = self._source.parse(self._source.records[index])
      if 'file_name' in record:
        where += f' ({record["file_name"]})'
      image = preprocessing.decode_image(record['image'], where)
    except preprocessing.ImageDecodeError as error:
      if not self._source.skip_corrupt:
        raise
      self._skip(index, error)
      return None
    except Exception as error:
      raise RuntimeError(f'{where}: cannot read the record: {error}') from error
    if self.task == 'classification':
      return {'image': preprocessing.classification_image(image, rng, self.options),
              'label': np.int32(record['label']), 'mask': np.bool_(True)}
    if self.task == 'segmentation':
      example = segmentation_transforms.segmentation_example(
          image, record['label_map'], rng, self.options,
          instance_map=record['instance_map'] if self._panoptic else None)
      if self._max_segments:
        example.update(segmentation_transforms.panoptic_segments(example['panoptic'], self._source.things,
                                                                 self._max_segments))
      example.update(image_id=np.int32(record.get('image_id', index)), mask=np.bool_(True))
      return example
    example, dropped = preprocessing.detection_example(
        image, record['boxes'], record['labels'], rng, self.options, area=record.get('area'),
        masks=record['masks'] if self.options.masks else None)
    if dropped:
      self._count_dropped(dropped, where)
    example.update(image_id=np.int32(record['image_id']), mask=np.bool_(True))
    return example

  def _count_dropped(self, dropped: int, where: str) -> None:
    with self._lock:
      first = self._dropped_boxes == 0
      self._dropped_boxes += dropped
    if first:
      logging.warning('%s has %d boxes, more than max_boxes=%d: keeping the first %d (and their masks). Further '
                      'truncations are not logged; Pipeline.dropped_boxes counts them.', where,
                      self.options.max_boxes + dropped, self.options.max_boxes, self.options.max_boxes)

  def _skip(self, index: int, error: Exception) -> None:
    with self._lock:
      first = index not in self._skipped
      self._skipped.add(index)
      everything = len(self._skipped) == self._shard[1] - self._shard[0]
    if first:
      logging.warning('skipping an undecodable image: %s', error)
    if everything:  # Else a training stream would filter forever.
      raise RuntimeError(f'dataset {self._source.name!r} split {self._source.split!r}: every image of this '
                         f'process\'s shard (records {self._shard[0]}..{self._shard[1] - 1}) is undecodable'
                         ) from error

  def _train_dataset(self) -> grain.IterDataset:
    start, stop = self._shard
    length = stop - start
    shuffle_seed = int(np.random.SeedSequence([self._seed, _SHUFFLE_STREAM]).generate_state(1)[0])

    def example(position: int, local_index: int) -> dict:
      index, epoch = start + local_index, position // length
      rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, index, epoch])
      return self._example(index, rng if self.options.augment else None)

    # shuffle-then-repeat draws a fresh permutation per epoch (grain seeds each epoch with seed + epoch).
    positions = grain.MapDataset.range(length).shuffle(seed=shuffle_seed).repeat()
    # Batching after the filter keeps batches full when corrupt images are skipped; the iterator state is
    # then the number of examples read, still exact to resume from.
    read_options = grain.ReadOptions(num_threads=self._num_threads,
                                     prefetch_buffer_size=self._prefetch_batches * self.per_process_batch_size)
    examples = positions.map_with_index(example).to_iter_dataset(read_options)
    return examples.filter(lambda e: e is not None).batch(self.per_process_batch_size, drop_remainder=True,
                                                         batch_fn=self._batch_fn)

  def _eval_dataset(self) -> grain.IterDataset:
    start, stop = self._shard
    padding = (segmentation_transforms.padding_example(self.options, self._panoptic, self._max_segments)
               if self.task == 'segmentation' else preprocessing.padding_example(self.task, self.options))

    def example(local_index: int) -> dict:
      if start + local_index >= stop:
        return padding
      real = self._example(start + local_index, None)
      return padding if real is None else real  # A skipped corrupt image leaves a masked row.

    total = self.num_batches * self.per_process_batch_size
    batches = grain.MapDataset.range(total).map(example).batch(self.per_process_batch_size,
                                                               batch_fn=self._batch_fn)
    return batches.to_iter_dataset(grain.ReadOptions(num_threads=self._num_threads,
                                                     prefetch_buffer_size=self._prefetch_batches))

  def _fingerprint(self) -> dict:
    """What a saved iterator state must match to be restored into this pipeline."""
    return {'dataset': self._source.name, 'split': self._source.split, 'train': self._train,
            'seed': self._seed, 'num_examples': self.num_examples, 'batch_size': self.per_process_batch_size,
            'process_index': self._process_index, 'process_count': self._process_count}

  def iterator(self, state: dict | None = None) -> PipelineIterator:
    """A fresh iterator over the batches; with `state` from `get_state()` it resumes exactly there."""
    dataset = self._train_dataset() if self._train else self._eval_dataset()
    iterator = PipelineIterator(iter(dataset), self._fingerprint())
    if state is not None:
      iterator.set_state(state)
    return iterator


class PipelineIterator:
  """Iterator of batches whose position is a small JSON-serialisable dict."""

  def __init__(self, grain_iterator: grain.DatasetIterator, fingerprint: dict):
    self._iterator = grain_iterator
    self._fingerprint = fingerprint

  def __iter__(self) -> PipelineIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._iterator)

  def get_state(self) -> dict[str, Any]:
    """The position: JSON-serialisable, with the pipeline's fingerprint so a mismatched restore is caught."""
    return {'pipeline': dict(self._fingerprint), 'grain': self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position from `get_state`; ValueError naming the differences if it is another pipeline's."""
    saved = state.get('pipeline', {}) if isinstance(state, dict) else {}
    mismatched = {key: (saved.get(key), value) for key, value in self._fingerprint.items()
                  if saved.get(key) != value}
    if mismatched:
      details = ', '.join(f'{key}: saved {old!r}, now {new!r}' for key, (old, new) in mismatched.items())
      raise ValueError(f'the iterator state belongs to a different pipeline ({details})')
    self._iterator.set_state(state['grain'])
