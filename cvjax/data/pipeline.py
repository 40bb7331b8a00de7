"""Input pipelines on grain: deterministic, sharded per process, resumable from a JSON-serialisable state.

`create_pipeline(config, split, train)` is what the train loop calls. Training streams are infinite: each
process reads its contiguous shard of the split, shuffled with `config.seed` (a new permutation every epoch),
augmented with randomness seeded by (seed, record index, epoch), batched with `drop_remainder`. Evaluation
streams make exactly one ordered pass over the process's shard; every process yields the same number of
batches (so collective eval steps line up) and rows past the real examples have `mask=False`.

Batches are dicts of NumPy arrays with leading dim `config.batch_size // process_count`:
  classification: image float32 [b, S, S, 3] (ImageNet-normalised), label int32 [b], mask bool [b].
  detection: image, boxes float32 [b, M, 4] normalised cxcywh, labels int32 [b, M], valid bool [b, M],
    pixel_mask bool [b, S, S], image_id int32 [b], orig_size int32 [b, 2] (h, w), mask bool [b].
"""

from __future__ import annotations

import math
import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from cvjax.data import preprocessing
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


class Pipeline:
  """Batches of one split for one process.

  Keys read from `config.dataset` (None or absent = the default):
    name (str), task ('classification' | 'detection'), config_name (TFDS builder config),
    image_size (int, model input side; default: the dataset's native/usual size),
    augment (bool, True; training only), crop_scale ((lo, hi), dataset default), crop_ratio ((lo, hi),
    (3/4, 4/3)), flip (bool, dataset default), eval_crop_fraction (float, dataset default),
    max_boxes (int, dataset default), num_threads (int, 2), prefetch (int, 4 batches),
    and for `shapes` only: num_examples ({split: count}), generation_seed (int, 0).
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
    self.options = preprocessing.Options(
        image_size=int(_option(dataset_config, 'image_size', source.image_size)),
        augment=self._train and bool(_option(dataset_config, 'augment', True)),
        crop_scale=tuple(_option(dataset_config, 'crop_scale', source.crop_scale)),
        crop_ratio=tuple(_option(dataset_config, 'crop_ratio', (3.0 / 4.0, 4.0 / 3.0))),
        flip=bool(_option(dataset_config, 'flip', source.flip)),
        eval_crop_fraction=float(_option(dataset_config, 'eval_crop_fraction', source.eval_crop_fraction)),
        max_boxes=int(_option(dataset_config, 'max_boxes', source.max_boxes)))
    self._read_options = grain.ReadOptions(num_threads=int(_option(dataset_config, 'num_threads', 2)),
                                           prefetch_buffer_size=int(_option(dataset_config, 'prefetch', 4)))
    self._dropped_boxes = 0
    self._dropped_lock = threading.Lock()

  @property
  def task(self) -> str:
    return self._source.task

  @property
  def class_names(self) -> tuple[str, ...]:
    return self._source.class_names

  @property
  def num_classes(self) -> int:
    return len(self._source.class_names)

  @property
  def num_examples(self) -> int:
    """Examples in this split, over all processes."""
    return len(self._source.records)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.options.image_size, self.options.image_size, 3)

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

  def _example(self, index: int, rng: np.random.Generator | None) -> dict:
    """Preprocessed record `index` of the split (see the module docstring for the features)."""
    where = f'dataset {self._source.name!r}, split {self._source.split!r}, record {index}'
    try:
      record = self._source.parse(self._source.records[index])
    except Exception as error:
      raise RuntimeError(f'{where}: cannot read the record: {error}') from error
    image = preprocessing.decode_image(record['image'], where)
    if self.task == 'classification':
      return {'image': preprocessing.classification_image(image, rng, self.options),
              'label': np.int32(record['label']), 'mask': np.bool_(True)}
    example, dropped = preprocessing.detection_example(image, record['boxes'], record['labels'], rng,
                                                       self.options)
    if dropped:
      self._count_dropped(dropped, where, len(record['boxes']))
    example.update(image_id=np.int32(record['image_id']), mask=np.bool_(True))
    return example

  def _count_dropped(self, dropped: int, where: str, total: int) -> None:
    with self._dropped_lock:
      first = self._dropped_boxes == 0
      self._dropped_boxes += dropped
    if first:
      logging.warning('%s has %d boxes, more than max_boxes=%d: keeping the first %d. Further truncations are '
                      'not logged; Pipeline.dropped_boxes counts them.', where, total, self.options.max_boxes,
                      self.options.max_boxes)

  def _train_dataset(self) -> grain.MapDataset:
    start, stop = self._shard
    length = stop - start
    shuffle_seed = int(np.random.SeedSequence([self._seed, _SHUFFLE_STREAM]).generate_state(1)[0])

    def example(position: int, local_index: int) -> dict:
      index, epoch = start + local_index, position // length
      rng = np.random.default_rng([self._seed, _AUGMENT_STREAM, index, epoch])
      return self._example(index, rng if self.options.augment else None)

    # shuffle-then-repeat draws a fresh permutation per epoch (grain seeds each epoch with seed + epoch).
    positions = grain.MapDataset.range(length).shuffle(seed=shuffle_seed).repeat()
    return positions.map_with_index(example).batch(self.per_process_batch_size, drop_remainder=True)

  def _eval_dataset(self) -> grain.MapDataset:
    start, stop = self._shard
    padding = preprocessing.padding_example(self.task, self.options)

    def example(local_index: int) -> dict:
      return self._example(start + local_index, None) if start + local_index < stop else padding

    total = self.num_batches * self.per_process_batch_size
    return grain.MapDataset.range(total).map(example).batch(self.per_process_batch_size)

  def _fingerprint(self) -> dict:
    """What a saved iterator state must match to be restored into this pipeline."""
    return {'dataset': self._source.name, 'split': self._source.split, 'train': self._train,
            'seed': self._seed, 'num_examples': self.num_examples, 'batch_size': self.per_process_batch_size,
            'process_index': self._process_index, 'process_count': self._process_count}

  def iterator(self, state: dict | None = None) -> PipelineIterator:
    """A fresh iterator over the batches; with `state` from `get_state()` it resumes exactly there."""
    dataset = self._train_dataset() if self._train else self._eval_dataset()
    iterator = PipelineIterator(iter(dataset.to_iter_dataset(self._read_options)), self._fingerprint())
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
    return {'pipeline': dict(self._fingerprint), 'grain': self._iterator.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    saved = state.get('pipeline', {}) if isinstance(state, dict) else {}
    mismatched = {key: (saved.get(key), value) for key, value in self._fingerprint.items()
                  if saved.get(key) != value}
    if mismatched:
      details = ', '.join(f'{key}: saved {old!r}, now {new!r}' for key, (old, new) in mismatched.items())
      raise ValueError(f'the iterator state belongs to a different pipeline ({details})')
    self._iterator.set_state(state['grain'])
