"""Host preprocessing functions against NumPy references written from their definitions."""

import dataclasses
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


def _ramps(height, width):
  """uint8 [H, W, 3] (sides <= 64) whose red grows 4 per column and green 4 per row: a bilinear resize keeps
  the ramps (away from the borders) with slopes divided by the resize factors, so a crop shows its scale."""
  assert max(height, width) <= 64
  y, x = np.mgrid[:height, :width]
  return np.stack([4 * x, 4 * y, np.full_like(x, 128)], axis=-1).astype(np.uint8)


def _slope(profile):
  """Slope of a 1-D profile from the means of its halves, skipping the outermost pixel at each end (a crop
  at the image border sees the filter clipped there)."""
  half = (len(profile) - 2) // 2
  return (profile[-1 - half:-1].mean() - profile[1:1 + half].mean()) / (len(profile) - 2 - half)


def _unnormalize(image):
  return (image * preprocessing.IMAGENET_STD + preprocessing.IMAGENET_MEAN) * 255.0


@pytest.mark.parametrize('height,width', [(40, 60), (60, 40)])
def test_scale_jitter_crops_from_shorter_side_resized_within_range(height, width):
  image = _ramps(height, width)
  options = preprocessing.Options(image_size=16, augment=True, scale_range=(20, 36))
  shorter = min(height, width)
  sides, flips = [], []
  for seed in range(40):
    out = preprocessing.classification_image(image, np.random.default_rng(seed), options)
    assert out.shape == (16, 16, 3) and out.dtype == np.float32
    pixels = _unnormalize(out)
    # Both ramps give the resize factor L / shorter: rows resize by H' / H, columns by W' / W (the same up to
    # the truncation of the longer side).
    row_slope, column_slope = _slope(pixels[:, 8, 1]), _slope(pixels[8, :, 0])
    flips.append(column_slope < 0)
    side_from_rows = 4 * shorter / row_slope
    side_from_columns = 4 * shorter / abs(column_slope)
    assert 20 - 0.75 <= side_from_rows <= 36 + 0.75 and abs(side_from_columns - side_from_rows) < 1, seed
    sides.append(side_from_rows)
  assert min(sides) < 23 and max(sides) > 33  # The whole range is drawn from.
  assert any(flips) and not all(flips)


def _windows(reference, size):
  """All size x size windows of `reference` [h, w, 3]: [h - size + 1, w - size + 1, size, size, 3]."""
  return np.lib.stride_tricks.sliding_window_view(reference, (size, size), axis=(0, 1)).transpose(0, 1, 3, 4, 2)


def test_scale_jitter_equals_resize_then_random_crop():
  # A fixed scale (S = L, as VGG's single-scale training): each output must be one window of the image resized
  # to shorter side L (PIL, bilinear), or of its mirror image, and the windows must vary.
  image = np.random.default_rng(8).integers(0, 256, (30, 45, 3), dtype=np.uint8)
  resized = np.asarray(Image.fromarray(image).resize((int(24 * 45 / 30), 24), Image.BILINEAR)).astype(np.float32)
  options = preprocessing.Options(image_size=12, augment=True, scale_range=(24, 24))
  positions = set()
  for seed in range(12):
    pixels = _unnormalize(preprocessing.classification_image(image, np.random.default_rng(seed), options))
    for flipped in (False, True):
      errors = np.abs(_windows(resized, 12) - (pixels[:, ::-1] if flipped else pixels)).max(axis=(2, 3, 4))
      if errors.min() <= 2.5:  # PIL's rounding differs by a grey level or two between the two ways.
        positions.add(np.unravel_index(errors.argmin(), errors.shape))
        break
    else:
      raise AssertionError(f'seed {seed}: the output is no window of the resized image')
  assert len(positions) > 6


@pytest.mark.parametrize('height,width,expected_rows,expected_cols', [(30, 50, (4, 16), (10, 22)),
                                                                      (50, 30, (10, 22), (4, 16))])
def test_eval_resize_then_central_crop(height, width, expected_rows, expected_cols):
  image = np.random.default_rng(9).integers(0, 256, (height, width, 3), dtype=np.uint8)
  options = preprocessing.Options(image_size=12, eval_resize=20)
  # Shorter side 20, the longer int(20 * 50 / 30) = 33; the central 12 x 12 window starts at (20 - 12) // 2 = 4
  # and (33 - 12) // 2 = 10.
  resized_hw = (20, 33) if height < width else (33, 20)
  resized = np.asarray(Image.fromarray(image).resize(resized_hw[::-1], Image.BILINEAR))
  window = resized[slice(*expected_rows), slice(*expected_cols)]
  out = preprocessing.classification_image(image, None, options)
  np.testing.assert_allclose(_unnormalize(out), window, atol=2.5)
  # Training options do not change evaluation, and the old central-fraction path is unused.
  trained = preprocessing.Options(image_size=12, eval_resize=20, eval_crop_fraction=0.5, scale_range=(20, 30),
                                  pca_lighting=0.1)
  np.testing.assert_array_equal(preprocessing.classification_image(image, None, trained), out)


def test_eval_resize_keeps_the_centre_of_a_ramp():
  # The centre of the crop is the centre of the image: on a ramp the crop's mean is the image's central value.
  image = _ramps(40, 60)
  out = _unnormalize(preprocessing.classification_image(image, None,
                                                        preprocessing.Options(image_size=16, eval_resize=24)))
  np.testing.assert_allclose(out[..., 0].mean(), 4 * (60 - 1) / 2, atol=4 * 0.5 * 60 / 36 + 0.5)
  np.testing.assert_allclose(out[..., 1].mean(), 4 * (40 - 1) / 2, atol=4 * 0.5 * 40 / 24 + 0.5)


def test_pca_lighting_adds_eigenvector_noise_of_the_documented_size():
  image = np.random.default_rng(10).integers(0, 256, (8, 8, 3), dtype=np.uint8)
  plain = preprocessing.Options(image_size=8, augment=True, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
  lit = dataclasses.replace(plain, pca_lighting=0.1)
  alphas = []
  for seed in range(400):
    base = preprocessing.classification_image(image, np.random.default_rng(seed), plain)
    out = preprocessing.classification_image(image, np.random.default_rng(seed), lit)
    # The same geometry and flip (drawn first), then one RGB offset on the [0, 1] scale for every pixel.
    shift = ((out - base) * preprocessing.IMAGENET_STD).reshape(-1, 3)
    np.testing.assert_allclose(shift, np.broadcast_to(shift[0], shift.shape), atol=1e-5)
    # offset = EIGVEC @ (alpha * EIGVAL), alpha ~ N(0, 0.1^2) [3].
    alphas.append(np.linalg.solve(preprocessing.IMAGENET_PCA_EIGVEC, shift[0]) / preprocessing.IMAGENET_PCA_EIGVAL)
  alphas = np.array(alphas)
  np.testing.assert_allclose(alphas.std(axis=0), 0.1, rtol=0.15)
  np.testing.assert_allclose(alphas.mean(axis=0), 0.0, atol=3 * 0.1 / np.sqrt(len(alphas)))


def test_pca_lighting_is_deterministic_per_seed_and_training_only():
  image = np.random.default_rng(11).integers(0, 256, (20, 20, 3), dtype=np.uint8)
  options = preprocessing.Options(image_size=16, augment=True, scale_range=(16, 24), pca_lighting=0.1)
  first = preprocessing.classification_image(image, np.random.default_rng(5), options)
  np.testing.assert_array_equal(preprocessing.classification_image(image, np.random.default_rng(5), options), first)
  assert not np.allclose(preprocessing.classification_image(image, np.random.default_rng(6), options), first)
  # Off (0) draws nothing: the output and the stream are those of the options without lighting.
  off = dataclasses.replace(options, pca_lighting=0.0)
  without = preprocessing.Options(image_size=16, augment=True, scale_range=(16, 24))
  rng_off, rng_without = np.random.default_rng(5), np.random.default_rng(5)
  np.testing.assert_array_equal(preprocessing.classification_image(image, rng_off, off),
                                preprocessing.classification_image(image, rng_without, without))
  assert rng_off.random() == rng_without.random()
  evaluated = preprocessing.classification_image(image, None, dataclasses.replace(options, augment=False))
  np.testing.assert_array_equal(evaluated, preprocessing.classification_image(
      image, None, preprocessing.Options(image_size=16)))
