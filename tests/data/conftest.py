"""Fixtures for cvjax.data tests: small generated `shapes` splits and tiny stand-ins for real TFDS datasets."""

import io

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cvjax.data import shapes

# Small split sizes keep generation to a second or two; 37 is odd so that evaluation needs padding.
SMALL_SPLITS = {'train': 48, 'validation': 37, 'test': 20}


@pytest.fixture(scope='session')
def shapes_dir(tmp_path_factory) -> str:
  """A data_dir with small `classification_32` and `detection_32` variants prepared."""
  data_dir = str(tmp_path_factory.mktemp('shapes_data'))
  for name in ('classification_32', 'detection_32'):
    shapes.prepare_shapes(data_dir, shapes.shapes_config(name, SMALL_SPLITS))
  return data_dir


@pytest.fixture(scope='session')
def shapes_records(shapes_dir):
  """`shapes_records(config_name, split, decoders=None)` -> list of the split's TFDS records in `shapes_dir`."""

  def records(config_name: str, split: str, decoders=None) -> list:
    builder = shapes.prepare_shapes(shapes_dir, shapes.shapes_config(config_name, SMALL_SPLITS))
    source = builder.as_data_source(split, decoders=decoders)
    return [source[i] for i in range(len(source))]

  return records


def _make_config(data_dir: str, batch_size: int = 8, seed: int = 0, **dataset) -> ml_collections.ConfigDict:
  dataset = {'name': 'shapes', 'task': 'classification', 'config_name': 'classification_32',
             'num_examples': dict(SMALL_SPLITS), 'num_threads': 2, **dataset}
  return ml_collections.ConfigDict({'data_dir': data_dir, 'batch_size': batch_size, 'seed': seed,
                                    'dataset': dataset})


@pytest.fixture(scope='session')
def make_config():
  """`make_config(data_dir, batch_size=8, seed=0, **dataset_keys)` -> ConfigDict for small `shapes` splits."""
  return _make_config


def _png(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def _fake_builder(name: str, features: dict, examples: dict, config: str | None = None):
  """A TFDS builder class named like a real dataset that writes the given examples ({split: [dict]})."""

  class Fake(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version('1.0.0')
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config)] if config else []

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
      return None

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features),
                                   disable_shuffling=True)

    def _split_generators(self, dl_manager):
      return {split: self._generate_examples(rows) for split, rows in examples.items()}

    def _generate_examples(self, rows):
      yield from enumerate(rows)

  Fake.name = name
  return Fake


# Index of the undecodable image in the fake cifar10 'test' split.
CORRUPT_CIFAR_RECORD = 2


@pytest.fixture(scope='session')
def fake_real_dir(tmp_path_factory) -> str:
  """A data_dir with tiny array_record stand-ins for mnist, cifar10 (one corrupt test image) and coco/2017.

  They carry the features of the real TFDS datasets, so the registry entries read them as they would the
  real ones.
  """
  data_dir = str(tmp_path_factory.mktemp('fake_tfds'))
  rng = np.random.default_rng(0)
  mnist = [{'image': _png(rng.integers(0, 256, (28, 28), dtype=np.uint8)), 'label': i % 10} for i in range(12)]
  cifar = [{'image': _png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)), 'label': i % 10}
           for i in range(6)]
  cifar_test = list(cifar)
  cifar_test[CORRUPT_CIFAR_RECORD] = {'image': b'\x89PNG\r\n\x1a\n truncated', 'label': 0}
  coco = []
  for i, (h, w) in enumerate([(30, 60), (50, 25), (40, 40)]):
    coco.append({
        'image': _png(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)), 'image/id': 1000 + i,
        'objects': {'bbox': [tfds.features.BBox(0.1, 0.2, 0.5, 0.9), tfds.features.BBox(0.0, 0.0, 1.0, 1.0),
                             tfds.features.BBox(0.3, 0.3, 0.6, 0.4)],
                    'label': [3, 7, 79], 'is_crowd': [False, True, False], 'area': [1, 2, 3], 'id': [1, 2, 3]}})
  label10 = lambda: tfds.features.ClassLabel(num_classes=10)
  builders = [
      _fake_builder('mnist', {'image': tfds.features.Image(shape=(28, 28, 1)), 'label': label10()},
                    {'train': mnist, 'test': mnist}),
      _fake_builder('cifar10', {'image': tfds.features.Image(shape=(32, 32, 3)), 'label': label10()},
                    {'train': cifar, 'test': cifar_test}),
      _fake_builder('coco', {
          'image': tfds.features.Image(shape=(None, None, 3)), 'image/id': tfds.features.Scalar(np.int64),
          'objects': tfds.features.Sequence({
              'bbox': tfds.features.BBoxFeature(), 'label': tfds.features.ClassLabel(num_classes=80),
              'is_crowd': tfds.features.Scalar(np.bool_), 'area': tfds.features.Scalar(np.int64),
              'id': tfds.features.Scalar(np.int64)})}, {'train': coco, 'validation': coco}, config='2017'),
  ]
  for builder_class in builders:
    builder = builder_class(data_dir=data_dir, file_format='array_record')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
        compute_stats=tfds.download.ComputeStatsMode.SKIP))
  return data_dir


@pytest.fixture(scope='session')
def coco_folder_config():
  """`coco_folder_config(path, batch_size=4, **dataset_keys)` -> ConfigDict reading a `coco_folder`."""

  def make(path: str, batch_size: int = 4, seed: int = 0, **dataset) -> ml_collections.ConfigDict:
    dataset = {'name': 'coco_folder', 'task': 'detection', 'path': path, 'num_threads': 0, **dataset}
    return ml_collections.ConfigDict({'data_dir': '/nonexistent', 'batch_size': batch_size, 'seed': seed,
                                      'dataset': dataset})

  return make
