"""Registry entries of real TFDS datasets, read from tiny stand-ins with the real datasets' features."""

import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cvjax.data import DATASETS, create_pipeline, preprocessing

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _config(make_config, data_dir, name, **dataset):
  return make_config(data_dir, batch_size=4, name=name, config_name=None, num_examples=None, **dataset)


def test_registry_names_and_unknown_name(make_config, tmp_path):
  assert {'shapes', 'mnist', 'cifar10', 'imagenet2012', 'coco', 'coco_folder'} <= set(DATASETS.names())
  with pytest.raises(KeyError, match='valid dataset names: .*cifar10.*shapes'):
    create_pipeline(_config(make_config, str(tmp_path), 'svhn'), 'train', True, 0, 1)


@pytest.mark.parametrize('name,task,tfds_name', [('mnist', 'classification', 'mnist'),
                                                 ('cifar10', 'classification', 'cifar10'),
                                                 ('imagenet2012', 'classification', 'imagenet2012'),
                                                 ('coco', 'detection', 'coco/2017')])
def test_missing_dataset_says_how_to_prepare_it(make_config, tmp_path, name, task, tfds_name):
  config = _config(make_config, str(tmp_path), name, task=task)
  with pytest.raises(FileNotFoundError) as error:
    create_pipeline(config, 'train', True, 0, 1)
  message = str(error.value)
  assert f'tfds build {tfds_name} --data_dir={tmp_path} --file_format=array_record' in message
  assert 'never downloads' in message
  assert not any(tmp_path.iterdir())  # Nothing was fetched or created.


def test_non_array_record_dataset_is_rejected(make_config, fake_real_dir, monkeypatch):
  tfrecord_info = types.SimpleNamespace(file_format=tfds.core.FileFormat.TFRECORD)
  monkeypatch.setattr(tfds, 'builder_from_directory', lambda path: types.SimpleNamespace(info=tfrecord_info))
  with pytest.raises(ValueError, match='stored as tfrecord.*convert_format'):
    create_pipeline(_config(make_config, fake_real_dir, 'mnist'), 'train', True, 0, 1)


def test_mnist_grayscale_becomes_three_equal_channels(make_config, fake_real_dir):
  pipe = create_pipeline(_config(make_config, fake_real_dir, 'mnist'), 'test', False, 0, 1)
  assert pipe.num_classes == 10 and pipe.image_shape == (28, 28, 3) and pipe.num_examples == 12
  batch = next(pipe.iterator())
  pixels = np.rint((batch['image'] * STD + MEAN) * 255.0)
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 1])
  np.testing.assert_array_equal(pixels[..., 0], pixels[..., 2])
  assert batch['label'].tolist() == [0, 1, 2, 3]


def test_unknown_split_lists_available_splits(make_config, fake_real_dir):
  with pytest.raises(ValueError, match=r"no split 'validation'; available splits: \['test', 'train'\]"):
    create_pipeline(_config(make_config, fake_real_dir, 'mnist'), 'validation', False, 0, 1)


def test_corrupt_image_error_names_dataset_split_and_record(make_config, fake_real_dir):
  pipe = create_pipeline(_config(make_config, fake_real_dir, 'cifar10'), 'test', False, 0, 1)
  with pytest.raises(preprocessing.ImageDecodeError, match="dataset 'cifar10', split 'test', record 2"):
    list(pipe.iterator())


def test_coco_letterbox_drops_crowds_and_keeps_ids(make_config, fake_real_dir):
  config = _config(make_config, fake_real_dir, 'coco', task='detection', image_size=40, max_boxes=4)
  pipe = create_pipeline(config, 'validation', False, 0, 1)
  assert pipe.num_classes == 80
  assert len(pipe.category_ids) == 80 and pipe.category_ids[:12] == (*range(1, 12), 13)  # COCO's ids, 12 unused.
  assert pipe.category_ids[-1] == 90 and list(pipe.category_ids) == sorted(set(pipe.category_ids))
  batch = next(pipe.iterator())
  assert batch['image_id'][:3].tolist() == [1000, 1001, 1002] and batch['mask'].tolist() == [1, 1, 1, 0]
  assert batch['orig_size'][:3].tolist() == [[30, 60], [50, 25], [40, 40]]
  # Longer side -> 40: (30, 60) -> 20 x 40 rows x cols; (50, 25) -> 40 x 20.
  assert batch['pixel_mask'][0].sum(axis=0).max() == 20 and batch['pixel_mask'][0].sum(axis=1).max() == 40
  assert batch['pixel_mask'][1].sum(axis=0).max() == 40 and batch['pixel_mask'][1].sum(axis=1).max() == 20
  assert batch['pixel_mask'][2].all()
  # The crowd box (label 7) is gone; the others keep their order and labels.
  np.testing.assert_array_equal(batch['valid'][:3], [[True, True, False, False]] * 3)
  np.testing.assert_array_equal(batch['labels'][:3, :2], [[3, 79]] * 3)
  np.testing.assert_array_equal(batch['area'][:3], [[1, 3, 0, 0]] * 3)  # TFDS `objects/area`, crowd gone.
  np.testing.assert_allclose(batch['boxes'][0, :2], [[0.55, 0.3, 0.7, 0.4], [0.35, 0.45, 0.1, 0.3]],
                             atol=1e-6)
  raw = tfds.builder_from_directory(f'{fake_real_dir}/coco/2017/1.0.0').as_data_source('validation')[1]
  resized = np.asarray(Image.fromarray(raw['image']).resize((20, 40), Image.BILINEAR))
  np.testing.assert_allclose(batch['image'][1, :, :20], preprocessing.normalize(resized), atol=1e-5)


def test_coco_rejects_classification(make_config, fake_real_dir):
  with pytest.raises(ValueError, match="'coco/2017' supports task 'detection'"):
    create_pipeline(_config(make_config, fake_real_dir, 'coco', task='classification'), 'train', True, 0, 1)


def test_coco_ground_truth_keeps_every_annotation_with_crowds_and_image_sizes(make_config, fake_real_dir):
  """Evaluation's ground truth is the dataset's own annotations, crowds included (targets drop them)."""
  config = _config(make_config, fake_real_dir, 'coco', task='detection', image_size=40, max_boxes=1)
  truth = create_pipeline(config, 'validation', False, 0, 1).ground_truth()
  assert [(i['id'], i['height'], i['width']) for i in truth['images']] == [
      (1000, 30, 60), (1001, 50, 25), (1002, 40, 40)]
  assert len(truth['categories']) == 80 and truth['categories'][7]['id'] == 8
  first = [a for a in truth['annotations'] if a['image_id'] == 1000]
  # All three objects although max_boxes=1; the crowd one flagged, areas from TFDS, boxes in pixels (x, y, w, h).
  assert [(a['category_id'], a['iscrowd'], a['area']) for a in first] == [(4, 0, 1.0), (8, 1, 2.0), (90, 0, 3.0)]
  np.testing.assert_allclose(first[0]['bbox'], [0.2 * 60, 0.1 * 30, 0.7 * 60, 0.4 * 30], atol=1e-4)
  assert len({a['id'] for a in truth['annotations']}) == 9 and min(a['id'] for a in truth['annotations']) >= 1
