"""Host preprocessing functions against NumPy references written from their definitions."""

import io

import numpy as np
import pytest
from PIL import Image

from cvjax.data import detection_transforms, preprocessing


def _png(array):
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format='PNG')
  return buffer.getvalue()


def test_decode_repeats_grayscale_to_rgb_and_names_bad_input():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  decoded = preprocessing.decode_image(_png(gray), 'somewhere')
  assert decoded.shape == (3, 4, 3) and decoded.dtype == np.uint8
  np.testing.assert_array_equal(decoded, np.repeat(gray[..., None], 3, axis=-1))
  with pytest.raises(preprocessing.ImageDecodeError, match="dataset 'x', split 'y', record 3: cannot decode"):
    preprocessing.decode_image(b'definitely not an image', "dataset 'x', split 'y', record 3")


def test_normalize_matches_imagenet_statistics():
  image = np.random.default_rng(0).integers(0, 256, (4, 5, 3), dtype=np.uint8)
  mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
  np.testing.assert_allclose(preprocessing.normalize(image), (image / 255.0 - mean) / std, rtol=1e-5, atol=1e-6)


def test_box_conversion_and_flip_against_corner_formulas():
  yxyx = np.random.default_rng(1).uniform(0, 1, (7, 4))
  yxyx = np.concatenate([np.minimum(yxyx[:, :2], yxyx[:, 2:]), np.maximum(yxyx[:, :2], yxyx[:, 2:])], axis=1)
  ymin, xmin, ymax, xmax = yxyx.T
  cxcywh = preprocessing.yxyx_to_cxcywh(yxyx)
  np.testing.assert_allclose(cxcywh, np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], 1),
                             atol=1e-6)  # float32 output.
  # Flipping the image maps x -> 1 - x, so the flipped box has corners (1 - xmax, 1 - xmin).
  flipped_yxyx = np.stack([ymin, 1 - xmax, ymax, 1 - xmin], 1)
  np.testing.assert_allclose(detection_transforms.hflip_yxyx(yxyx), flipped_yxyx, atol=1e-6)


def test_pad_boxes_pads_and_truncates():
  boxes = np.arange(12, dtype=np.float32).reshape(3, 4)
  labels = np.array([5, 6, 7])
  out_boxes, out_labels, valid, dropped = preprocessing.pad_boxes(boxes, labels, 5)
  np.testing.assert_array_equal(out_boxes[:3], boxes)
  assert not out_boxes[3:].any() and valid.tolist() == [True] * 3 + [False] * 2 and dropped == 0
  assert out_labels.tolist() == [5, 6, 7, 0, 0] and out_labels.dtype == np.int32
  out_boxes, out_labels, valid, dropped = preprocessing.pad_boxes(boxes, labels, 2)
  np.testing.assert_array_equal(out_boxes, boxes[:2])
  assert out_labels.tolist() == [5, 6] and valid.all() and dropped == 1


@pytest.mark.parametrize('height,width', [(40, 60), (64, 64), (10, 200)])
def test_random_resized_crop_box_respects_bounds(height, width):
  rng = np.random.default_rng(2)
  scale, ratio = (0.2, 0.9), (3 / 4, 4 / 3)
  for _ in range(200):
    x0, y0, x1, y1 = preprocessing.random_resized_crop_box(rng, height, width, scale, ratio)
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    w, h = x1 - x0, y1 - y0
    if (w, h) != (width, height) and height * width >= 100 and width / height <= 4:
      # A sampled window: area and aspect ratio within the ranges, up to rounding to whole pixels.
      assert scale[0] * height * width * 0.8 <= w * h <= scale[1] * height * width * 1.2
      assert ratio[0] * 0.8 <= w / h <= ratio[1] * 1.2


def test_random_resized_crop_box_falls_back_to_clamped_central_crop():
  # A 10x200 image admits no window with ratio in [3/4, 4/3] and area >= 90% of the image.
  box = preprocessing.random_resized_crop_box(np.random.default_rng(0), 10, 200, (0.9, 1.0), (3 / 4, 4 / 3))
  w = round(10 * 4 / 3)
  assert box == ((200 - w) // 2, 0, (200 - w) // 2 + w, 10)


def test_classification_eval_is_central_crop_resize():
  image = np.random.default_rng(3).integers(0, 256, (48, 64, 3), dtype=np.uint8)
  options = preprocessing.Options(image_size=24, eval_crop_fraction=0.5)
  out = preprocessing.classification_image(image, None, options)
  # Central 24x24 crop of the shorter side 48 -> rows 12..36, cols 20..44, already at the output size.
  np.testing.assert_allclose(out, preprocessing.normalize(image[12:36, 20:44]), atol=1e-5)


def test_classification_augmentation_is_seeded_and_flips():
  image = np.random.default_rng(4).integers(0, 256, (32, 32, 3), dtype=np.uint8)
  options = preprocessing.Options(image_size=32, augment=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  outs = [preprocessing.classification_image(image, np.random.default_rng(seed), options) for seed in range(20)]
  reference = preprocessing.normalize(image)
  flipped = [np.allclose(out, reference[:, ::-1]) for out in outs]
  unflipped = [np.allclose(out, reference) for out in outs]
  assert all(f != u for f, u in zip(flipped, unflipped)) and any(flipped) and any(unflipped)
  again = preprocessing.classification_image(image, np.random.default_rng(7), options)
  np.testing.assert_array_equal(again, outs[7])


def test_detection_example_letterboxes_non_square_images():
  image = np.random.default_rng(5).integers(0, 256, (30, 60, 3), dtype=np.uint8)
  boxes = np.array([[0.1, 0.2, 0.5, 0.9], [0.3, 0.3, 0.3, 0.6]])  # The second one is degenerate.
  options = preprocessing.Options(image_size=40, max_boxes=3)
  features, dropped = preprocessing.detection_example(image, boxes, np.array([4, 5]), None, options)
  assert dropped == 0
  expected_mask = np.zeros((40, 40), bool)
  expected_mask[:20, :40] = True
  np.testing.assert_array_equal(features['pixel_mask'], expected_mask)
  assert not features['image'][20:].any()
  resized = np.asarray(Image.fromarray(image).resize((40, 20), Image.BILINEAR))
  np.testing.assert_allclose(features['image'][:20], preprocessing.normalize(resized), atol=1e-5)
  np.testing.assert_allclose(features['boxes'][0], [0.55, 0.3, 0.7, 0.4], atol=1e-6)
  assert features['valid'].tolist() == [True, False, False] and features['labels'].tolist() == [4, 0, 0]
  assert features['orig_size'].tolist() == [30, 60]


def test_padding_example_matches_real_example_structure():
  options = preprocessing.Options(image_size=16, max_boxes=4)
  features, _ = preprocessing.detection_example(np.zeros((16, 16, 3), np.uint8), np.zeros((0, 4)),
                                                np.zeros((0,)), None, options)
  features.update(image_id=np.int32(0), mask=np.bool_(True))
  padding = preprocessing.padding_example('detection', options)
  assert padding.keys() == features.keys()
  for key in features:
    assert np.shape(padding[key]) == np.shape(features[key]) and np.asarray(padding[key]).dtype == \
        np.asarray(features[key]).dtype, key
  assert not padding['mask'] and not padding['valid'].any()
