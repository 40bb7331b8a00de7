"""grain pipelines over small `shapes` splits: batches, sharding, determinism, resume, augmentation."""

import io
import json
import logging

import numpy as np
import pytest
from PIL import Image

from cvjax.data import create_pipeline, preprocessing, shapes
from cvjax.data.datasets import DatasetSource
from cvjax.data.pipeline import Pipeline
from cvjax.train.config import load_config_file

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _unnormalize(image):
  return np.rint((image * STD + MEAN) * 255.0)


def _take(iterator, count):
  return [next(iterator) for _ in range(count)]


def _assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_classification_batches_and_metadata(shapes_dir, make_config):
  pipe = create_pipeline(make_config(shapes_dir, batch_size=8), 'train', train=True, process_index=0,
                         process_count=2)
  assert pipe.num_classes == 6 and pipe.class_names == shapes.CLASS_NAMES
  assert pipe.num_examples == 48 and pipe.image_shape == (32, 32, 3)
  batch = next(pipe.iterator())
  assert batch['image'].shape == (4, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32 and batch['label'].shape == (4,)
  assert batch['mask'].dtype == bool and batch['mask'].all()
  assert np.all((batch['label'] >= 0) & (batch['label'] < 6))


def test_detection_batches(shapes_dir, make_config):
  config = make_config(shapes_dir, task='detection', config_name='detection_32', max_boxes=5)
  batch = next(create_pipeline(config, 'train', train=True, process_index=0, process_count=1).iterator())
  expected = {'image': ((8, 32, 32, 3), np.float32), 'boxes': ((8, 5, 4), np.float32),
              'labels': ((8, 5), np.int32), 'valid': ((8, 5), bool), 'area': ((8, 5), np.float32),
              'pixel_mask': ((8, 32, 32), bool),
              'image_id': ((8,), np.int32), 'orig_size': ((8, 2), np.int32), 'mask': ((8,), bool)}
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
  assert batch['pixel_mask'].all() and (batch['orig_size'] == 32).all()
  assert not batch['boxes'][~batch['valid']].any() and not batch['labels'][~batch['valid']].any()
  assert not batch['area'][~batch['valid']].any() and (batch['area'][batch['valid']] > 0).all()


def test_eval_images_are_normalised_records_in_order(shapes_dir, make_config, shapes_records):
  pipe = create_pipeline(make_config(shapes_dir), 'validation', train=False, process_index=0, process_count=1)
  batches = list(pipe.iterator())
  assert len(batches) == pipe.num_batches == 5  # ceil(37 / 8)
  images = np.concatenate([b['image'][b['mask']] for b in batches])
  labels = np.concatenate([b['label'][b['mask']] for b in batches])
  records = shapes_records('classification_32', 'validation')
  np.testing.assert_array_equal(_unnormalize(images), np.stack([r['image'] for r in records]))
  np.testing.assert_array_equal(labels, [r['label'] for r in records])
  padding = np.concatenate([b['image'][~b['mask']] for b in batches])
  assert len(padding) == 5 * 8 - 37 and not padding.any()


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_shards_cover_split_exactly_once(shapes_dir, make_config, process_count):
  config = make_config(shapes_dir, batch_size=2 * process_count, task='detection', config_name='detection_32')
  ids, num_batches = [], set()
  for index in range(process_count):
    pipe = create_pipeline(config, 'validation', train=False, process_index=index, process_count=process_count)
    batches = list(pipe.iterator())
    num_batches.add(len(batches))
    for batch in batches:
      assert batch['image'].shape[0] == 2
      ids.extend(batch['image_id'][batch['mask']].tolist())
      assert (batch['image_id'][~batch['mask']] == -1).all() and not batch['valid'][~batch['mask']].any()
  assert sorted(ids) == list(range(37))
  assert len(num_batches) == 1  # Every process runs the same number of eval steps.


def test_train_is_deterministic_and_seeded(shapes_dir, make_config):
  first = _take(create_pipeline(make_config(shapes_dir, seed=3), 'train', True, 0, 1).iterator(), 4)
  again = _take(create_pipeline(make_config(shapes_dir, seed=3), 'train', True, 0, 1).iterator(), 4)
  other = _take(create_pipeline(make_config(shapes_dir, seed=4), 'train', True, 0, 1).iterator(), 4)
  _assert_batches_equal(first, again)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def _train_ids(shapes_dir, make_config, process_index, process_count, num_batches, **kw):
  config = make_config(shapes_dir, batch_size=4 * process_count, task='detection', config_name='detection_32',
                       augment=False, **kw)
  pipe = create_pipeline(config, 'train', train=True, process_index=process_index, process_count=process_count)
  return np.concatenate([b['image_id'] for b in _take(pipe.iterator(), num_batches)])


def test_train_epochs_are_permutations_of_disjoint_shards(shapes_dir, make_config):
  shard_ids = []
  for index in range(2):
    ids = _train_ids(shapes_dir, make_config, index, 2, num_batches=12)  # Two epochs of a 24-example shard.
    epoch0, epoch1 = ids[:24], ids[24:]
    assert sorted(epoch0) == sorted(epoch1) == list(range(24 * index, 24 * index + 24))
    assert not np.array_equal(epoch0, epoch1)  # Reshuffled every epoch.
    assert not np.array_equal(epoch0, np.sort(epoch0))
    shard_ids.append(set(epoch0.tolist()))
  assert not shard_ids[0] & shard_ids[1]


def test_resume_from_state_reproduces_next_batches(shapes_dir, make_config):
  config = make_config(shapes_dir, task='detection', config_name='detection_32', seed=11)
  pipe = create_pipeline(config, 'train', True, 0, 1)
  iterator = pipe.iterator()
  _take(iterator, 7)  # Past the end of the first 48-example epoch.
  state = json.loads(json.dumps(iterator.get_state()))
  expected = _take(iterator, 4)
  resumed = create_pipeline(config, 'train', True, 0, 1).iterator(state)
  _assert_batches_equal(_take(resumed, 4), expected)


def test_resume_eval_and_reject_foreign_state(shapes_dir, make_config):
  pipe = create_pipeline(make_config(shapes_dir), 'validation', False, 0, 1)
  iterator = pipe.iterator()
  next(iterator)
  state = iterator.get_state()
  _assert_batches_equal(list(pipe.iterator(state)), list(iterator))
  other = create_pipeline(make_config(shapes_dir, seed=1), 'validation', False, 0, 1)
  with pytest.raises(ValueError, match='seed: saved 0, now 1'):
    other.iterator(state)


def test_flip_moves_boxes_with_the_image(shapes_dir, make_config):
  detection_config = lambda **kw: make_config(shapes_dir, task='detection', config_name='detection_32', seed=2, **kw)
  plain = _take(create_pipeline(detection_config(augment=False), 'train', True, 0, 1).iterator(), 3)
  augmented = _take(create_pipeline(detection_config(augment=True, flip=True), 'train', True, 0, 1).iterator(), 3)
  flips = []
  for p, a in zip(plain, augmented):
    np.testing.assert_array_equal(p['image_id'], a['image_id'])
    for i in range(len(p['image'])):
      flipped = not np.array_equal(a['image'][i], p['image'][i])
      flips.append(flipped)
      if flipped:
        np.testing.assert_array_equal(a['image'][i], p['image'][i][:, ::-1])
        valid = p['valid'][i]
        expected = p['boxes'][i][valid].copy()
        expected[:, 0] = 1.0 - expected[:, 0]
        np.testing.assert_allclose(a['boxes'][i][valid], expected, atol=1e-6)
      else:
        np.testing.assert_array_equal(a['boxes'][i], p['boxes'][i])
      np.testing.assert_array_equal(a['labels'][i], p['labels'][i])
  assert any(flips) and not all(flips)


def test_boxes_are_cxcywh_of_the_tfds_boxes(shapes_dir, make_config, shapes_records):
  config = make_config(shapes_dir, task='detection', config_name='detection_32', max_boxes=8)
  batch = next(create_pipeline(config, 'validation', False, 0, 1).iterator())
  records = shapes_records('detection_32', 'validation')
  for i, image_id in enumerate(batch['image_id']):
    yxyx = np.array(records[image_id]['objects']['bbox']).reshape(-1, 4)
    n = len(yxyx)
    assert batch['valid'][i].sum() == n
    ymin, xmin, ymax, xmax = yxyx.T
    reference = np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], axis=1)
    np.testing.assert_allclose(batch['boxes'][i][:n], reference, atol=1e-6)
    np.testing.assert_array_equal(batch['labels'][i][:n], records[image_id]['objects']['label'])
    np.testing.assert_array_equal(batch['area'][i][:n], records[image_id]['objects']['area'])  # Visible pixels.


def test_max_boxes_truncates_counts_and_warns_once(shapes_dir, make_config, shapes_records, caplog):
  config = make_config(shapes_dir, task='detection', config_name='detection_32', max_boxes=1, num_threads=0)
  pipe = create_pipeline(config, 'validation', False, 0, 1)
  records = shapes_records('detection_32', 'validation')
  with caplog.at_level(logging.WARNING):
    batches = list(pipe.iterator())
  boxes = np.concatenate([b['boxes'][b['mask']] for b in batches])
  valid = np.concatenate([b['valid'][b['mask']] for b in batches])
  assert boxes.shape == (37, 1, 4) and valid.all()
  first = np.array([r['objects']['bbox'][0] for r in records])
  np.testing.assert_allclose(boxes[:, 0], preprocessing.yxyx_to_cxcywh(first), atol=1e-6)
  assert pipe.dropped_boxes == sum(len(r['objects']['label']) - 1 for r in records) > 0
  assert len([r for r in caplog.records if 'max_boxes=1' in r.getMessage()]) == 1


def test_batch_size_must_divide_over_processes(shapes_dir, make_config):
  with pytest.raises(ValueError, match='batch_size=10 must be a positive multiple of process_count=4'):
    create_pipeline(make_config(shapes_dir, batch_size=10), 'train', True, 0, 4)


def test_task_must_match_shapes_config(shapes_dir, make_config):
  with pytest.raises(ValueError, match="supports task 'classification'"):
    create_pipeline(make_config(shapes_dir, task='detection'), 'train', True, 0, 1)


def test_image_size_resizes(shapes_dir, make_config):
  pipe = create_pipeline(make_config(shapes_dir, image_size=24), 'test', False, 0, 1)
  assert pipe.image_shape == (24, 24, 3) and next(pipe.iterator())['image'].shape == (8, 24, 24, 3)


def test_paper_augmentation_options_reach_the_examples(shapes_dir, make_config, shapes_records):
  config = make_config(shapes_dir, scale_range=(32, 48), pca_lighting=0.1, eval_resize=40)
  train = create_pipeline(config, 'train', True, 0, 1)
  assert (train.options.scale_range, train.options.pca_lighting, train.options.eval_resize) == ((32, 48), 0.1, 40)
  assert train.options.augment and next(train.iterator())['image'].shape == (8, 32, 32, 3)
  # Evaluation: each record's shorter side resized to 40, then the central 32 x 32 (no jitter, no lighting).
  evaluation = create_pipeline(config, 'validation', False, 0, 1)
  batch = next(evaluation.iterator())
  records = shapes_records('classification_32', 'validation')[:8]
  expected = [preprocessing.classification_image(r['image'], None, evaluation.options) for r in records]
  np.testing.assert_array_equal(batch['image'], np.stack(expected))
  plain = next(create_pipeline(make_config(shapes_dir), 'validation', False, 0, 1).iterator())
  assert not np.allclose(batch['image'], plain['image'])


@pytest.mark.parametrize('keys,message', [
    ({'scale_range': (48, 40)}, r'config.dataset.scale_range must be \(low, high\) with image_size=32 <= low'),
    ({'scale_range': (16, 40)}, r'config.dataset.scale_range must be \(low, high\) with image_size=32 <= low'),
    ({'scale_range': (40,)}, r'config.dataset.scale_range must be 2 positive integers'),
    ({'scale_range': (32, 48), 'crop_scale': (0.35, 1.0)},
     r'config.dataset.scale_range=\(32, 48\) replaces the random resized crop, so '
     r'config.dataset.crop_scale=\(0.35, 1.0\) would have no effect'),
    ({'scale_range': (32, 48), 'crop_ratio': (1.0, 1.0)}, r'config.dataset.crop_ratio=\(1.0, 1.0\) would have'),
    ({'eval_resize': 16}, r'config.dataset.eval_resize=16 must be at least image_size=32'),
    ({'eval_resize': 'big'}, r'config.dataset.eval_resize must be a positive integer'),
    ({'eval_resize': 40, 'eval_crop_fraction': 0.875}, r'config.dataset.eval_resize=40 replaces the central crop '
                                                       r'of config.dataset.eval_crop_fraction=0.875'),
    ({'pca_lighting': -0.1}, r'config.dataset.pca_lighting must be a non-negative standard deviation'),
    ({'pca_lighting': 'strong'}, r'config.dataset.pca_lighting must be a non-negative standard deviation'),
    ({'task': 'detection', 'config_name': 'detection_32', 'pca_lighting': 0.1},
     r'config.dataset.pca_lighting applies to classification, not detection'),
])
def test_paper_augmentation_bad_values_name_the_key(shapes_dir, make_config, keys, message):
  with pytest.raises(ValueError, match=message):
    create_pipeline(make_config(shapes_dir, **keys), 'train', True, 0, 1)


def test_paper_augmentation_off_values_and_default_crop_keys_are_accepted(shapes_dir, make_config):
  # () and 0 are how the command line switches a preset's value off; default crop keys are not a conflict.
  off = create_pipeline(make_config(shapes_dir, scale_range=(), eval_resize=0, pca_lighting=0.0), 'train', True,
                        0, 1).options
  assert (off.scale_range, off.eval_resize, off.pca_lighting) == (None, None, 0.0)
  config = make_config(shapes_dir, scale_range=(32, 40), crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3))
  assert create_pipeline(config, 'train', True, 0, 1).options.scale_range == (32, 40)


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


@pytest.mark.parametrize('spec,scale_range,pca_lighting,eval_resize', [
    ('configs/resnet.py:imagenet_r50', (256, 480), 0.1, 256),
    ('configs/vgg.py:imagenet_vgg16', (256, 512), 0.1, 384),
    ('configs/vit.py:imagenet_vit_b16', None, 0.0, None),
    ('configs/swin.py:imagenet_swin_t', None, 0.0, None),
])
def test_imagenet_presets_resolve_their_augmentation(spec, scale_range, pca_lighting, eval_resize):
  # ImageNet is not here: two tiny stand-in records with the registry's imagenet2012 defaults.
  rng = np.random.default_rng(0)
  records = [{'image': _png(rng.integers(0, 256, shape, dtype=np.uint8)), 'label': i}
             for i, shape in enumerate([(30, 40, 3), (50, 20, 3)])]
  source = DatasetSource(name='imagenet2012', split='train', task='classification', records=records,
                         parse=dict, class_names=('a', 'b'), image_size=224, eval_crop_fraction=0.875)
  dataset = load_config_file(spec).dataset
  for train in (True, False):
    pipe = Pipeline(source, dataset, batch_size=2, seed=0, train=train)
    options = pipe.options
    assert (options.scale_range, options.pca_lighting, options.eval_resize) == (scale_range, pca_lighting,
                                                                                 eval_resize)
    assert options.image_size == 224 and options.flip and options.augment == train
    assert next(pipe.iterator())['image'].shape == (2, 224, 224, 3)
