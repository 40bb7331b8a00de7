"""The generated `shapes` TFDS dataset: determinism, annotation consistency, splits, safe preparation."""

import glob
import hashlib
import io
import os
import sys
import threading

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cvjax.data import shapes, shapes_render

SPLITS = {'train': 48, 'validation': 37, 'test': 20}  # As prepared by the `shapes_dir` fixture.


def _file_digests(data_dir):
  files = sorted(glob.glob(os.path.join(data_dir, 'shapes', '*', '*', '*.array_record*')))
  assert files, f'no array_record files under {data_dir}'
  return {os.path.basename(f): hashlib.sha256(open(f, 'rb').read()).hexdigest() for f in files}


def test_same_seed_gives_identical_files_and_other_seed_differs(tmp_path):
  sizes = {'train': 6, 'validation': 3, 'test': 3}
  for directory in ('a', 'b'):
    shapes.prepare_shapes(str(tmp_path / directory), shapes.shapes_config('detection_32', sizes, seed=5))
  shapes.prepare_shapes(str(tmp_path / 'c'), shapes.shapes_config('detection_32', sizes, seed=6))
  digests_a, digests_b = _file_digests(str(tmp_path / 'a')), _file_digests(str(tmp_path / 'b'))
  assert digests_a == digests_b
  assert set(_file_digests(str(tmp_path / 'c')).values()).isdisjoint(digests_a.values())


def test_tensorflow_is_never_imported(shapes_records):
  shapes_records('detection_32', 'train')
  assert 'tensorflow' not in sys.modules


@pytest.mark.parametrize('name', ['classification_32', 'detection_32'])
def test_splits_have_requested_sizes_and_disjoint_content(shapes_records, name):
  digests = {}
  for split, size in SPLITS.items():
    records = shapes_records(name, split, decoders={'image': tfds.decode.SkipDecoding()})
    assert len(records) == size
    assert [r['image_id'] for r in records] == list(range(size))
    digests[split] = {hashlib.sha256(r['image']).hexdigest() for r in records}
    assert len(digests[split]) == size
  assert not digests['train'] & digests['validation']
  assert not digests['train'] & digests['test']
  assert not digests['validation'] & digests['test']


def test_classification_has_one_label_per_image_and_all_classes(tmp_path):
  builder = shapes.prepare_shapes(
      str(tmp_path), shapes.shapes_config('classification_32', {'train': 200, 'validation': 1, 'test': 1}))
  source = builder.as_data_source('train')
  labels = np.array([source[i]['label'] for i in range(len(source))])
  assert source[0]['image'].shape == (32, 32, 3) and source[0]['image'].dtype == np.uint8
  assert set(labels.tolist()) == set(range(len(shapes.CLASS_NAMES)))
  assert builder.info.features['label'].names == list(shapes.CLASS_NAMES)


def _mask_box(mask):
  """Reference tight box of a bool mask [H, W] in normalised pixel-edge coordinates (ymin, xmin, ymax, xmax)."""
  ys, xs = np.nonzero(mask)
  h, w = mask.shape
  return np.array([ys.min() / h, xs.min() / w, (ys.max() + 1) / h, (xs.max() + 1) / w])


def test_detection_annotations_agree_with_masks_and_maps(shapes_records):
  seen_labels = set()
  for record in shapes_records('detection_32', 'train'):
    objects = record['objects']
    masks = np.array(objects['mask'], bool).reshape(-1, 32, 32)
    labels = np.array(objects['label'], np.int64).reshape(-1)
    boxes = np.array(objects['bbox'], np.float32).reshape(-1, 4)
    assert len(labels) >= 1
    assert np.all((labels >= 0) & (labels < len(shapes.CLASS_NAMES)))
    seen_labels.update(labels.tolist())
    assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, :2] < boxes[:, 2:])
    # Visible masks are disjoint, non-empty, and their pixel counts are the stored areas.
    assert masks.sum(axis=0).max() <= 1
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), np.array(objects['area']).reshape(-1))
    for box, mask in zip(boxes, masks):
      np.testing.assert_allclose(box, _mask_box(mask), atol=1e-6)  # Within a pixel: exact.
    semantic = (masks * (labels[:, None, None] + 1)).sum(axis=0)
    panoptic = (masks * np.arange(1, len(labels) + 1)[:, None, None]).sum(axis=0)
    np.testing.assert_array_equal(record['segmentation'][..., 0], semantic)
    np.testing.assert_array_equal(record['panoptic'][..., 0], panoptic)
  assert seen_labels == set(range(len(shapes.CLASS_NAMES)))


def test_renderer_drops_mostly_hidden_shapes_and_keeps_visible_ones():
  options = shapes_render.RenderOptions(image_size=32, min_objects=6, max_objects=6, radius_range=(0.2, 0.4),
                                        min_visible_fraction=0.3, min_visible_pixels=6)
  dropped = 0
  for i in range(30):
    drawn = shapes_render.render(np.random.default_rng(i), options)
    dropped += 6 - len(drawn.labels)
    for mask, label in zip(drawn.masks, drawn.labels):
      # The full (unoccluded) shape cannot be recovered here, but each kept shape is visible enough.
      assert mask.sum() >= options.min_visible_pixels
      assert label in range(len(shapes.CLASS_NAMES))
  assert dropped > 0  # Six large shapes on 32x32 must hide some of each other.


def test_shape_polygons_are_centred_with_requested_radius():
  for label in range(len(shapes.CLASS_NAMES)):
    polygon = shapes_render.shape_polygon(label, (10.0, 20.0), radius=5.0, angle=0.3, aspect=0.5)
    distances = np.linalg.norm(polygon - (10.0, 20.0), axis=1)
    assert distances.max() == pytest.approx(5.0)
    np.testing.assert_allclose(polygon.mean(axis=0), (10.0, 20.0), atol=1e-9)


def test_coverage_matches_disc_area():
  cover = shapes_render.coverage(shapes_render.shape_polygon(0, (16.0, 16.0), 8.0, 0.0, 1.0), 32)
  # A 48-gon inscribed in a circle of radius 8: area = 0.5 * n * r^2 * sin(2 pi / n).
  expected = 0.5 * 48 * 64 * np.sin(2 * np.pi / 48)
  assert cover.sum() == pytest.approx(expected, rel=0.02)
  assert cover.min() >= 0 and cover.max() <= 1


def test_concurrent_prepare_generates_once(tmp_path, monkeypatch):
  calls = []
  original = shapes.Shapes._generate_examples

  def counting(self, split, count):
    calls.append(split)
    yield from original(self, split, count)

  monkeypatch.setattr(shapes.Shapes, '_generate_examples', counting)
  config = shapes.shapes_config('classification_32', {'train': 20, 'validation': 2, 'test': 2}, seed=9)
  builders, errors = [], []

  def prepare():
    try:
      builders.append(shapes.prepare_shapes(str(tmp_path), config))
    except Exception as error:  # Reported below; a thread cannot fail the test by itself.
      errors.append(error)

  threads = [threading.Thread(target=prepare) for _ in range(3)]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join()
  assert not errors
  assert sorted(calls) == ['test', 'train', 'validation']
  assert all(len(b.as_data_source('train')) == 20 for b in builders) and len(builders) == 3


def test_shapes_config_validates_overrides():
  with pytest.raises(ValueError, match='unknown shapes config'):
    shapes.shapes_config('detection_7')
  with pytest.raises(ValueError, match='unknown splits'):
    shapes.shapes_config('classification_32', {'training': 5})
  with pytest.raises(ValueError, match='positive'):
    shapes.shapes_config('classification_32', {'train': 0})
  assert shapes.shapes_config('classification_32') is shapes.shapes_config('classification_32', {'train': 10_000})
  assert shapes.shapes_config('classification_32', {'train': 5}).name == 'classification_32_n5-1000-1000_seed0'


def test_png_images_decode_to_the_rendered_pixels():
  options = shapes.shapes_config('detection_32').render_options()
  example = shapes.render_example('detection', options, seed=3, split='validation', index=4)
  drawn = shapes_render.render(np.random.default_rng([3, 1, 4]), options)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example['image']))), drawn.image)
  np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(example['panoptic']))), drawn.panoptic)
