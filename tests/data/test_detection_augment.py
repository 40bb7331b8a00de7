"""DETR multi-scale resize and random crop, bucketed batch padding, and cross-process shape agreement."""

import numpy as np
import pytest

from cvjax.data import batching, create_pipeline, detection_transforms, preprocessing

MEAN, STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


def _detr_get_size(image_size, size, max_size=None):
  """facebookresearch/detr datasets/transforms.py get_size_with_aspect_ratio, verbatim ((w, h) in, (h, w) out)."""
  w, h = image_size
  if max_size is not None:
    min_original_size = float(min((w, h)))
    max_original_size = float(max((w, h)))
    if max_original_size / min_original_size * size > max_size:
      size = int(round(max_size * min_original_size / max_original_size))
  if (w <= h and w == size) or (h <= w and h == size):
    return (h, w)
  if w < h:
    ow = size
    oh = int(size * h / w)
  else:
    oh = size
    ow = int(size * w / h)
  return (oh, ow)


def test_shorter_side_size_matches_detr_and_caps_the_longer_side():
  rng = np.random.default_rng(0)
  for _ in range(500):
    h, w = (int(v) for v in rng.integers(20, 2000, 2))
    size, max_size = int(rng.choice([480, 608, 800])), int(rng.choice([1000, 1333]))
    out = detection_transforms.shorter_side_size(h, w, size, max_size)
    reference = _detr_get_size((w, h), size, max_size)
    assert max(out) <= max_size
    assert out == tuple(min(v, max_size) for v in reference)  # DETR's size, clamped where it rounds over.
    if max(h, w) / min(h, w) * size <= max_size:
      assert min(out) == size  # Not capped: the shorter side is the drawn scale.
  assert detection_transforms.shorter_side_size(30, 60, 40) == (40, 80)  # No max_size: aspect kept.


def _rectangle_image():
  image = np.zeros((60, 80, 3), np.uint8)
  image[10:40, 20:50, 0] = 255  # A red rectangle: x 20..50, y 10..40.
  return image, np.array([[10 / 60, 20 / 80, 40 / 60, 50 / 80]], np.float32)


def test_random_crop_and_resize_keep_boxes_on_their_pixels():
  image, box = _rectangle_image()
  options = preprocessing.Options(image_size=64, augment=True, max_boxes=2, scales=(24, 32, 40), max_size=48,
                                   crop_prob=1.0, crop_resize_scales=(40, 50, 60), crop_size=(20, 60))
  seen = {'kept': 0, 'vanished': 0}
  for seed in range(40):
    features, _ = preprocessing.detection_example(image, box, np.array([1]), np.random.default_rng(seed),
                                                  options, area=np.array([900.0]))
    height, width = features['image'].shape[:2]
    # The shorter side is a drawn scale, unless max_size shrank it (then the longer side is 48 up to DETR's
    # int() truncation, which loses at most the aspect ratio in pixels).
    short, long = sorted((height, width))
    assert short in (24, 32, 40) or long >= 48 - long / short
    assert max(height, width) <= 48 and features['pixel_mask'].all()
    red = (features['image'] * STD + MEAN)[..., 0] > 0.5
    if not features['valid'][0]:
      seen['vanished'] += 1
      assert not red.any()
      continue
    seen['kept'] += 1
    cx, cy, w, h = features['boxes'][0]
    x0, x1, y0, y1 = (cx - w / 2) * width, (cx + w / 2) * width, (cy - h / 2) * height, (cy + h / 2) * height
    cols, rows = np.flatnonzero(red.any(0)), np.flatnonzero(red.any(1))
    if min(x1 - x0, y1 - y0) >= 3:  # Thinner slivers may blur below the threshold.
      # The red pixels are where the box says, up to a pixel of interpolation at each edge.
      np.testing.assert_allclose([cols[0], cols[-1] + 1, rows[0], rows[-1] + 1], [x0, x1, y0, y1], atol=1.01)
    # The annotation area shrinks with the part of the box cut off (in original pixels).
    assert 0 < features['area'][0] <= 900.0 + 1e-3
  assert seen['kept'] > 10 and seen['vanished'] > 0


def test_eval_resize_is_shorter_side_to_eval_scale():
  image, box = _rectangle_image()
  options = preprocessing.Options(image_size=64, scales=(16, 24), max_size=1333, eval_scale=30)
  features, _ = preprocessing.detection_example(image, box, np.array([1]), None, options)
  assert features['image'].shape == (30, 40, 3) and features['orig_size'].tolist() == [60, 80]
  np.testing.assert_allclose(features['boxes'][0], preprocessing.yxyx_to_cxcywh(box)[0], atol=1e-6)
  assert features['area'][0] == 900.0  # The box's area in original pixels.


def test_collate_pads_to_the_smallest_fitting_bucket():
  buckets = batching.check_buckets([(32, 32), (32, 64), (64, 32)])
  assert buckets == ((32, 32), (32, 64), (64, 32), (64, 64))  # Closed under element-wise max.

  def example(h, w, label):
    return {'image': np.full((h, w, 3), label, np.float32), 'pixel_mask': np.ones((h, w), bool),
            'labels': np.array([label], np.int32)}

  batch = batching.collate_detection([example(20, 30, 1), example(25, 10, 2)], buckets)
  assert batch['image'].shape == (2, 32, 32, 3) and batch['labels'].tolist() == [[1], [2]]
  expected = np.zeros((2, 32, 32), bool)
  expected[0, :20, :30], expected[1, :25, :10] = True, True
  np.testing.assert_array_equal(batch['pixel_mask'], expected)
  np.testing.assert_array_equal(batch['image'][..., 0], expected * np.array([1, 2])[:, None, None])
  assert batching.collate_detection([example(40, 20, 1)], buckets)['image'].shape == (1, 64, 32, 3)
  assert batching.collate_detection([example(40, 20, 1), example(8, 50, 1)], buckets)['image'].shape[1:3] == \
      (64, 64)
  with pytest.raises(ValueError, match=r'does not fit the largest bucket \(64, 64\)'):
    batching.collate_detection([example(65, 8, 1)], buckets)
  levels = (800, 1088, 1344)
  assert batching.default_buckets(800, 1333) == tuple((h, w) for h in levels for w in levels)


def test_multiscale_pipeline_batches_are_bucketed(shapes_dir, make_config):
  config = make_config(shapes_dir, batch_size=2, task='detection', config_name='detection_32', seed=1,
                       scales=(16, 24, 32), max_size=32, buckets=((16, 16), (24, 24), (32, 32)))
  pipe = create_pipeline(config, 'train', True, 0, 1)
  assert pipe.image_shape == (32, 32, 3)
  shapes = set()
  for batch in [next(iter_) for iter_ in [pipe.iterator()] for _ in range(12)]:
    mask = batch['pixel_mask']
    sides = [(int(m.any(1).sum()), int(m.any(0).sum())) for m in mask]
    for m, (h, w) in zip(mask, sides):
      assert m[:h, :w].all() and m.sum() == h * w  # Real pixels are one top-left block.
    side = min(level for level in (16, 24, 32) if level >= np.max(sides))  # The smallest bucket that fits.
    assert mask.shape[1:] == (side, side)
    assert not batch['image'][~mask].any()
    shapes.add(mask.shape[1:])
  assert len(shapes) > 1
  eval_batch = next(create_pipeline(config, 'validation', False, 0, 1).iterator())
  assert eval_batch['image'].shape == (2, 32, 32, 3) and eval_batch['pixel_mask'].all()  # eval_scale = 32.


def test_multiscale_keys_need_scales_and_buckets_must_hold_max_size(shapes_dir, make_config):
  config = lambda **kw: make_config(shapes_dir, task='detection', config_name='detection_32', **kw)
  with pytest.raises(ValueError, match='config.dataset.eval_scale only applies to DETR multi-scale'):
    create_pipeline(config(eval_scale=32), 'train', True, 0, 1)
  with pytest.raises(ValueError, match=r'largest bucket \(24, 24\) must be at least max_size x max_size = 32'):
    create_pipeline(config(scales=(24,), max_size=32, buckets=((24, 24),)), 'train', True, 0, 1)


def test_several_processes_pad_every_batch_to_the_largest_bucket(shapes_dir, make_config):
  """With several processes one global array needs one shape: each pads to the largest bucket, so they agree
  without exchanging shapes (a single process uses the smallest bucket that fits)."""
  config = make_config(shapes_dir, task='detection', config_name='detection_32', batch_size=4, scales=(16, 24),
                       max_size=32, eval_scale=24, buckets=((16, 16), (24, 24), (32, 32)))
  single = create_pipeline(config, 'train', True, 0, 1)
  assert single.buckets == ((16, 16), (24, 24), (32, 32))
  for index in (0, 1):
    pipe = create_pipeline(config, 'train', True, index, 2)
    assert pipe.buckets == ((32, 32),)
    iterator = pipe.iterator()
    for batch in (next(iterator) for _ in range(3)):
      assert batch['image'].shape == (2, 32, 32, 3) and batch['pixel_mask'].shape == (2, 32, 32)
    eval_batch = next(create_pipeline(config, 'validation', False, index, 2).iterator())
    assert eval_batch['image'].shape == (2, 32, 32, 3)
