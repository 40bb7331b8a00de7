"""COCO-format folders with awkward contents: empty images, degenerate and outside boxes, too many boxes,
corrupt files, missing files; plus the records, category ids and areas the detection evaluator needs."""

import json
import logging
import os

import numpy as np
import pytest

from cvjax.data import DATASETS, create_pipeline

CATEGORIES = [{'id': 7, 'name': 'seven'}, {'id': 3, 'name': 'three'}, {'id': 12, 'name': 'twelve'}]
BAD_BYTES = b'\xff\xd8\xff\xe0 this is not a JPEG'


def _image(h, w, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _truncated_png():
  import io
  from PIL import Image
  buffer = io.BytesIO()
  Image.fromarray(_image(20, 20, 9)).save(buffer, format='PNG')
  return buffer.getvalue()[:80]  # A readable header, but the pixel data is cut off.


@pytest.fixture
def folder(tmp_path, write_coco_folder):
  images = [(101, 'a.png', _image(30, 40)), (102, 'b.jpg', _image(24, 20, 1)), (103, 'bad.jpg', BAD_BYTES),
            (104, 'c.png', _image(20, 20, 2)), (105, 'trunc.png', _truncated_png()),
            (106, 'd.png', _image(16, 16, 3))]
  annotations = [
      {'image_id': 101, 'category_id': 7, 'bbox': [4, 3, 10, 12], 'area': 100.0, 'iscrowd': 0},
      {'image_id': 101, 'category_id': 3, 'bbox': [0, 0, 40, 30], 'area': 900.0, 'iscrowd': 1},  # Crowd.
      {'image_id': 101, 'category_id': 3, 'bbox': [20, 10, 15, 15]},  # No area: the box's.
      {'image_id': 104, 'category_id': 12, 'bbox': [5, 5, 0, 4]},  # Zero width: removed.
      {'image_id': 104, 'category_id': 12, 'bbox': [15, 15, 10, 10]},  # Half outside: clipped.
      {'image_id': 104, 'category_id': 3, 'bbox': [25, 25, 5, 5]},  # Entirely outside: removed.
      {'image_id': 104, 'category_id': 7, 'bbox': [-5, -5, 10, 10]},  # Clipped at the origin.
  ] + [{'image_id': 106, 'category_id': 3, 'bbox': [i, i, 4, 4]} for i in range(5)]  # 5 > max_boxes = 3.
  return write_coco_folder(tmp_path, 'val', images, annotations, CATEGORIES)


def _eval_batches(config, caplog):
  pipe = create_pipeline(config, 'val', False, 0, 1)
  with caplog.at_level(logging.WARNING):
    batches = list(pipe.iterator())
  return pipe, batches


def test_folder_eval_skips_corrupt_files_and_fixes_boxes(folder, coco_folder_config, caplog):
  config = coco_folder_config(folder, image_size=40, max_boxes=3)
  pipe, batches = _eval_batches(config, caplog)
  assert pipe.num_examples == 6 and len(batches) == pipe.num_batches == 2
  assert pipe.class_names == ('three', 'seven', 'twelve') and pipe.category_ids == (3, 7, 12)
  with open(os.path.join(folder, 'annotations', 'instances_val.json')) as f:
    assert pipe.ground_truth() == json.load(f)  # evaluation reads the annotation file itself
  rows = {int(i): (b, n) for b in batches for n, i in enumerate(b['image_id']) if b['mask'][n]}
  assert sorted(rows) == [101, 102, 104, 106]  # The corrupt files are left out, everything else once.
  masked = np.concatenate([b['image_id'][~b['mask']] for b in batches])
  assert masked.tolist() == [-1] * 4  # Two corrupt files + two padding rows of the last batch.

  get = lambda image_id, key: rows[image_id][0][key][rows[image_id][1]]
  # a.png (30 x 40): crowd dropped, json order kept, labels mapped from sorted category ids, areas.
  assert get(101, 'valid').tolist() == [True, True, False] and get(101, 'labels')[:2].tolist() == [1, 0]
  np.testing.assert_allclose(get(101, 'boxes')[:2], [[9 / 40, 9 / 30, 10 / 40, 12 / 30],
                                                     [27.5 / 40, 17.5 / 30, 15 / 40, 15 / 30]], atol=1e-6)
  np.testing.assert_allclose(get(101, 'area'), [100, 225, 0])
  assert get(101, 'orig_size').tolist() == [30, 40]
  # b.jpg has no objects: nothing valid, but it is a real (evaluated) example.
  assert not get(102, 'valid').any() and not get(102, 'area').any() and get(102, 'pixel_mask').any()
  # c.png (20 x 20): the degenerate and the outside box are gone; the others are clipped to the image.
  assert get(104, 'valid').tolist() == [True, True, False] and get(104, 'labels')[:2].tolist() == [2, 1]
  np.testing.assert_allclose(get(104, 'boxes')[:2], [[0.875, 0.875, 0.25, 0.25], [0.125, 0.125, 0.25, 0.25]],
                             atol=1e-6)
  np.testing.assert_allclose(get(104, 'area')[:2], [25, 25])  # Box areas after clipping (no json area).
  # d.png: the first max_boxes of its 5 boxes, the rest counted and reported once, naming the file.
  np.testing.assert_allclose(get(106, 'boxes')[:, :2], [[2 / 16, 2 / 16], [3 / 16, 3 / 16], [4 / 16, 4 / 16]])
  assert pipe.dropped_boxes == 2
  messages = [r.getMessage() for r in caplog.records]
  assert len([m for m in messages if 'max_boxes=3' in m and 'd.png' in m]) == 1
  for name in ('bad.jpg', 'trunc.png'):
    assert len([m for m in messages if 'skipping an undecodable image' in m and name in m]) == 1
  assert pipe.skipped_images == 2


def test_folder_train_stream_filters_corrupt_files_and_resumes(folder, coco_folder_config, caplog):
  config = coco_folder_config(folder, batch_size=2, seed=5, image_size=32, scales=(24, 32), max_size=32)
  pipe = create_pipeline(config, 'val', True, 0, 1)
  iterator = pipe.iterator()
  with caplog.at_level(logging.WARNING):
    first = [next(iterator) for _ in range(3)]
  state = json.loads(json.dumps(iterator.get_state()))
  expected = [next(iterator) for _ in range(3)]
  ids = np.concatenate([b['image_id'] for b in first + expected])
  assert sorted(ids[:4]) == sorted(ids[4:8]) == [101, 102, 104, 106]  # Epochs of the 4 decodable images.
  assert all(b['mask'].all() for b in first)
  assert len([r for r in caplog.records if 'bad.jpg' in r.getMessage()]) == 1  # Once, not once per epoch.
  resumed = create_pipeline(config, 'val', True, 0, 1).iterator(state)
  for a, b in zip(expected, [next(resumed) for _ in range(3)]):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_every_image_corrupt_is_an_error(tmp_path, write_coco_folder, coco_folder_config):
  path = write_coco_folder(tmp_path, 'val', [(1, 'x.jpg', BAD_BYTES)], [], CATEGORIES)
  pipe = create_pipeline(coco_folder_config(path, batch_size=1), 'val', True, 0, 1)
  with pytest.raises(RuntimeError, match='every image .* is undecodable'):
    next(pipe.iterator())


def test_missing_annotation_file_and_images_name_the_path_and_layout(tmp_path, write_coco_folder,
                                                                      coco_folder_config):
  load = lambda split, **kw: DATASETS.get('coco_folder')(coco_folder_config(str(tmp_path), **kw).dataset,
                                                         '', split)
  with pytest.raises(FileNotFoundError, match=r"annotation file .*annotations/instances_train\.json' does not "
                                              r'exist\. Expected config\.dataset\.path=<root>'):
    load('train')
  write_coco_folder(tmp_path, 'val', [(1, 'a.png', _image(8, 8))], [], CATEGORIES)
  os.remove(tmp_path / 'val' / 'a.png')
  with pytest.raises(FileNotFoundError, match=r"1 of 1 images listed in .*instances_val\.json are missing from "
                                              r".*val, e\.g\. \['a\.png'\]"):
    load('val')
  os.rmdir(tmp_path / 'val')
  with pytest.raises(FileNotFoundError, match=r"images folder .*/val' does not exist"):
    load('val')
  with pytest.raises(ValueError, match="no location for split 'val'"):
    DATASETS.get('coco_folder')(coco_folder_config(None).dataset, '', 'val')
  with pytest.raises(ValueError, match='TFDS slicing'):
    load('val[:50%]')


def test_bad_annotations_name_the_entry(tmp_path, write_coco_folder, coco_folder_config):
  path = write_coco_folder(tmp_path, 'val', [(1, 'a.png', _image(8, 8))],
                           [{'image_id': 1, 'category_id': 99, 'bbox': [0, 0, 2, 2]}], CATEGORIES)
  with pytest.raises(ValueError, match=r'annotations\[0\] is not a valid COCO annotation: KeyError\(99\)'):
    create_pipeline(coco_folder_config(path), 'val', False, 0, 1)


def test_explicit_folders_for_any_layout(tmp_path, write_coco_folder, coco_folder_config):
  write_coco_folder(tmp_path, 'imgs', [(5, 'a.png', _image(8, 8))],
                    [{'image_id': 5, 'category_id': 3, 'bbox': [0, 0, 4, 4], 'area': 10}], CATEGORIES)
  annotation_file = str(tmp_path / 'annotations' / 'instances_imgs.json')
  config = coco_folder_config(None, folders={'validation': (str(tmp_path / 'imgs'), annotation_file)})
  pipe = create_pipeline(config, 'validation', False, 0, 1)
  batch = next(pipe.iterator())
  assert batch['image_id'][0] == 5 and batch['area'][0, 0] == 10 and pipe.ground_truth()['images'][0]['id'] == 5
