"""Instance masks through the detection pipeline (`config.dataset.masks`): shapes and COCO-format folders,
letterbox, flip, DETR multi-scale resize + crop, bucket padding, eval padding rows and max_boxes truncation."""

import json
import os

import numpy as np
import pytest
from pycocotools import coco as coco_api
from pycocotools import mask as mask_utils

from cvjax.data import DATASETS, create_pipeline, preprocessing

SPLITS = {'train': 16, 'validation': 8, 'test': 8}
DETECTION_KEYS = {'image', 'boxes', 'labels', 'valid', 'area', 'pixel_mask', 'image_id', 'orig_size', 'mask'}


def _shapes_config(make_config, data_dir, batch_size=4, **dataset):
  return make_config(data_dir, batch_size=batch_size, task='detection', config_name='detection_64',
                     num_examples=SPLITS, **dataset)


def _one_pass(config, split='train'):
  """Every batch of one evaluation pass of `split`, concatenated, plus the pipeline."""
  pipeline = create_pipeline(config, split, train=False, process_index=0, process_count=1)
  batches = list(pipeline.iterator())
  return {key: np.concatenate([b[key] for b in batches]) for key in batches[0]}, pipeline


def _pixel_boxes(batch):
  """Absolute (x0, y0, x1, y1) [b, M, 4] of the normalised cxcywh boxes, in pixels of each real region."""
  real_h = batch['pixel_mask'].any(2).sum(1)[:, None].astype(np.float64)
  real_w = batch['pixel_mask'].any(1).sum(1)[:, None].astype(np.float64)
  cx, cy, w, h = np.moveaxis(batch['boxes'].astype(np.float64), -1, 0)
  return np.stack([(cx - w / 2) * real_w, (cy - h / 2) * real_h, (cx + w / 2) * real_w, (cy + h / 2) * real_h],
                  -1)


def _tight_box(mask):
  rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
  return np.array([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1], np.float64)


def _assert_masks_inside_boxes(batch, tolerance):
  """Each valid row's mask pixel centres lie in its box (+- tolerance pixels); nothing off real pixels."""
  assert batch['masks'].dtype == np.uint8 and set(np.unique(batch['masks'])) <= {0, 1}
  assert batch['masks'].shape == (*batch['valid'].shape, *batch['image'].shape[1:3])
  assert not batch['masks'][~batch['valid']].any()  # Padding rows (and padding examples) are empty.
  assert not (batch['masks'] * ~batch['pixel_mask'][:, None]).any()  # So are padding pixels.
  boxes = _pixel_boxes(batch)
  nonempty = 0
  for i, m in zip(*np.nonzero(batch['valid'])):
    ys, xs = np.nonzero(batch['masks'][i, m])
    if len(ys):
      nonempty += 1
      x0, y0, x1, y1 = boxes[i, m]
      assert (xs + 0.5 >= x0 - tolerance).all() and (xs + 0.5 <= x1 + tolerance).all(), (i, m)
      assert (ys + 0.5 >= y0 - tolerance).all() and (ys + 0.5 <= y1 + tolerance).all(), (i, m)
  return nonempty


def test_shapes_masks_are_the_boxes_shapes_in_the_letterbox_frame(make_config, data_dir):
  native, _ = _one_pass(_shapes_config(make_config, data_dir, batch_size=3, masks=True), 'validation')
  assert native['masks'].shape == (9, 6, 64, 64) and not native['mask'][-1]  # 8 examples + 1 padding row.
  # At the native 64 x 64 every box is the tight box of its mask, exactly.
  boxes = _pixel_boxes(native)
  for i, m in zip(*np.nonzero(native['valid'])):
    np.testing.assert_allclose(_tight_box(native['masks'][i, m]), boxes[i, m], atol=1e-3)
  assert _assert_masks_inside_boxes(native, tolerance=1e-3) == native['valid'].sum()
  # Letterboxed down to 48: nearest-neighbour masks keep their pixel centres inside the scaled boxes, and
  # still reach their sides up to the resampling (a sharp tip can fall between sampled rows or columns).
  small, _ = _one_pass(_shapes_config(make_config, data_dir, batch_size=3, masks=True, image_size=48),
                       'validation')
  assert small['masks'].shape == (9, 6, 48, 48)
  assert _assert_masks_inside_boxes(small, tolerance=1e-3) == small['valid'].sum()
  boxes = _pixel_boxes(small)
  for i, m in zip(*np.nonzero(small['valid'])):
    np.testing.assert_allclose(_tight_box(small['masks'][i, m]), boxes[i, m], atol=2.0)


def test_flip_flips_masks_with_image_and_boxes(make_config, data_dir):
  config = _shapes_config(make_config, data_dir, masks=True)
  reference, _ = _one_pass(config)
  by_id = {int(image_id): n for n, image_id in enumerate(reference['image_id'])}
  pipeline = create_pipeline(config, 'train', train=True, process_index=0, process_count=1)
  iterator = pipeline.iterator()
  flipped = kept = 0
  for _ in range(4):  # One epoch of 16 examples.
    batch = next(iterator)
    for i, image_id in enumerate(batch['image_id']):
      n = by_id[int(image_id)]
      mirrored = not np.array_equal(batch['image'][i], reference['image'][n])
      image, masks, boxes = reference['image'][n], reference['masks'][n], reference['boxes'][n].copy()
      if mirrored:
        image, masks, boxes[:, 0] = image[:, ::-1], masks[:, :, ::-1], np.where(reference['valid'][n],
                                                                                 1 - boxes[:, 0], 0)
      np.testing.assert_array_equal(batch['image'][i], image)
      np.testing.assert_array_equal(batch['masks'][i], masks)
      np.testing.assert_allclose(batch['boxes'][i], boxes, atol=1e-6)
      flipped, kept = flipped + mirrored, kept + (not mirrored)
  assert flipped and kept


def test_masks_off_gives_todays_batches(make_config, data_dir):
  with_masks, _ = _one_pass(_shapes_config(make_config, data_dir, masks=True))
  without, pipeline = _one_pass(_shapes_config(make_config, data_dir))
  assert set(without) == DETECTION_KEYS and set(with_masks) == DETECTION_KEYS | {'masks'}
  assert not pipeline.options.masks and 'masks' not in preprocessing.padding_example('detection', pipeline.options)
  for key in DETECTION_KEYS:
    np.testing.assert_array_equal(with_masks[key], without[key], err_msg=key)


def test_multiscale_crop_keeps_masks_in_their_boxes(make_config, data_dir):
  multiscale = dict(masks=True, scales=(40, 48, 56), max_size=64, crop_prob=1.0, crop_resize_scales=(48, 64),
                    crop_size=(20, 40), buckets=((48, 48), (64, 64)))
  config = _shapes_config(make_config, data_dir, batch_size=4, **multiscale)
  iterator = create_pipeline(config, 'train', train=True, process_index=0, process_count=1).iterator()
  nonempty = 0
  for _ in range(4):
    batch = next(iterator)
    nonempty += _assert_masks_inside_boxes(batch, tolerance=1.0)
  assert nonempty > 20
  # Without the crop (eval: resized to eval_scale 40, padded to the 48 x 48 bucket, a 1 x 1 padding
  # example padded too) masks still reach their boxes' sides up to the resampling.
  config = _shapes_config(make_config, data_dir, batch_size=3, **multiscale, eval_scale=40)
  batch, _ = _one_pass(config, 'validation')
  assert batch['masks'].shape == (9, 6, 48, 48) and not batch['masks'][-1].any()
  assert _assert_masks_inside_boxes(batch, tolerance=1e-3) == batch['valid'].sum()
  boxes = _pixel_boxes(batch)
  for i, m in zip(*np.nonzero(batch['valid'])):
    np.testing.assert_allclose(_tight_box(batch['masks'][i, m]), boxes[i, m], atol=2.0)


def test_max_boxes_drops_masks_with_their_boxes(make_config, data_dir):
  full, _ = _one_pass(_shapes_config(make_config, data_dir, masks=True))
  cut, pipeline = _one_pass(_shapes_config(make_config, data_dir, masks=True, max_boxes=2))
  assert pipeline.dropped_boxes == (full['valid'].sum(1) - 2).clip(0).sum() > 0
  assert cut['masks'].shape == (16, 2, 64, 64)
  np.testing.assert_array_equal(cut['masks'], full['masks'][:, :2])
  np.testing.assert_array_equal(cut['boxes'], full['boxes'][:, :2])
  # Degenerate boxes go with their masks, so the rows stay aligned.
  image = np.zeros((8, 8, 3), np.uint8)
  boxes = np.array([[0.5, 0.5, 0.5, 0.75], [0.0, 0.0, 0.5, 0.25]])  # The first one has no height.
  masks = np.zeros((2, 8, 8), np.uint8)
  masks[0, 4, 4:6] = 1
  masks[1, :4, :2] = 1
  features, _ = preprocessing.detection_example(image, boxes, np.array([1, 2]), None,
                                                preprocessing.Options(image_size=8, max_boxes=3, masks=True),
                                                masks=masks)
  assert features['labels'].tolist() == [2, 0, 0]
  np.testing.assert_array_equal(features['masks'], [masks[1], np.zeros((8, 8)), np.zeros((8, 8))])


def _uncompressed_rle(mask):
  """COCO's uncompressed RLE of a binary mask: run lengths in column-major order, starting with zeros."""
  flat = mask.flatten(order='F')
  changes = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
  return {'counts': ([0] if flat[0] else []) + runs, 'size': list(mask.shape)}


def test_coco_folder_masks_match_pycocotools(tmp_path, write_coco_folder, coco_folder_config):
  height, width = 40, 50
  blob = np.zeros((height, width), np.uint8)
  blob[5:20, 30:45] = 1
  blob[8:12, 33:40] = 0  # A hole, which polygons cannot draw.
  disc = (np.hypot(*np.mgrid[:height, :width] - np.array([30, 12])[:, None, None]) < 7).astype(np.uint8)
  compressed = mask_utils.encode(np.asfortranarray(disc))
  annotations = [
      {'image_id': 1, 'category_id': 1, 'bbox': [2, 2, 20, 16], 'iscrowd': 0,
       'segmentation': [[2, 2, 22, 3, 12, 17.5], [15, 5, 21, 5, 21, 11, 15, 11]]},  # Two parts.
      {'image_id': 1, 'category_id': 1, 'bbox': [0, 0, width, height], 'iscrowd': 1,
       'segmentation': _uncompressed_rle(np.ones((height, width), np.uint8))},  # A crowd: no target.
      {'image_id': 1, 'category_id': 2, 'bbox': [30, 5, 15, 15], 'iscrowd': 0,
       'segmentation': _uncompressed_rle(blob)},
      {'image_id': 1, 'category_id': 2, 'bbox': [5, 23, 14, 14], 'iscrowd': 0,
       'segmentation': {'counts': compressed['counts'].decode(), 'size': [height, width]}},
  ]
  image = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
  root = write_coco_folder(tmp_path / 'coco', 'val', [(1, '1.png', image)], annotations,
                           [{'id': 1, 'name': 'a'}, {'id': 2, 'name': 'b'}])
  config = coco_folder_config(root, batch_size=1, masks=True, image_size=width, max_boxes=4)
  batch = next(create_pipeline(config, 'val', train=False, process_index=0, process_count=1).iterator())
  ground_truth = coco_api.COCO(os.path.join(root, 'annotations', 'instances_val.json'))
  expected = [ground_truth.annToMask(ground_truth.anns[i]) for i in (1, 3, 4)]  # Not the crowd (id 2).
  assert batch['valid'][0].tolist() == [True, True, True, False] and batch['masks'].shape == (1, 4, width, width)
  np.testing.assert_array_equal(batch['masks'][0, :3, :height], expected)
  np.testing.assert_array_equal(expected[1:], [blob, disc])  # Both RLE forms round-trip.
  assert not batch['masks'][0, :, height:].any() and not batch['masks'][0, 3].any()

  # Without a segmentation there is no mask to give: the error names the file and the annotation.
  del annotations[2]['segmentation']
  root = write_coco_folder(tmp_path / 'bad', 'val', [(1, '1.png', image)], annotations, [{'id': 1, 'name': 'a'},
                                                                                           {'id': 2, 'name': 'b'}])
  with pytest.raises(ValueError, match=r"instances_val\.json: annotation id 3 .*no 'segmentation'"):
    create_pipeline(coco_folder_config(root, masks=True), 'val', train=False, process_index=0, process_count=1)
  with open(os.path.join(root, 'annotations', 'instances_val.json')) as f:
    assert 'segmentation' not in json.load(f)['annotations'][2]
  create_pipeline(coco_folder_config(root), 'val', train=False, process_index=0, process_count=1)  # Masks off.


def test_tfds_coco_and_classification_refuse_masks(make_config, shapes_dir):
  config = make_config('/nonexistent', name='coco', task='detection', config_name='2017', masks=True)
  with pytest.raises(ValueError, match='no instance masks.*coco_folder'):  # Before looking for the data.
    DATASETS.get('coco')(config.dataset, config.data_dir, 'train')
  with pytest.raises(ValueError, match='masks .*applies to detection, not classification'):
    create_pipeline(make_config(shapes_dir, masks=True), 'train', train=False, process_index=0, process_count=1)
