"""cvjax.viz.draw_detections: the PNG's size and where its boxes land, on a flat grey image."""

import numpy as np
import pytest
from PIL import Image

from cvjax.viz import draw_detections

GREY = 128
SCALE = 16  # a 32x32 image is drawn at 512x512 (display_px=512)


def _draw(path, **kwargs):
  image = np.full((32, 32, 3), GREY, np.uint8)
  args = dict(pred_boxes_xyxy=[[16, 4, 30, 14], [2, 18, 12, 28]], pred_scores=[0.9, 0.2], pred_labels=[0, 1],
              gt_boxes_xyxy=[[2, 2, 12, 14]], gt_labels=[1], class_names=["circle", "square"], path=str(path))
  args.update(kwargs)
  return draw_detections(image, **args)


def test_boxes_are_drawn_where_their_pixel_coordinates_point(tmp_path):
  path = _draw(tmp_path / "sub" / "det.png")
  with Image.open(path) as png:
    assert png.format == "PNG" and png.size == (32 * SCALE, 32 * SCALE)
    pixels = np.asarray(png.convert("RGB"), np.int32)
  differs = lambda region: np.abs(region - GREY).max(axis=-1) > 40
  # The kept prediction's right edge (x = 30), away from its label: solid, red.
  right_edge = pixels[6 * SCALE:13 * SCALE, 30 * SCALE - 2:30 * SCALE + 2]
  assert differs(right_edge).any(axis=1).all()
  red = right_edge[differs(right_edge)]
  assert (red[:, 0] > red[:, 1] + 80).all()
  # The ground truth's top edge (y = 2): dashed (gaps along it), green.
  top_edge = pixels[2 * SCALE - 2:2 * SCALE + 2, 3 * SCALE:11 * SCALE]
  drawn = differs(top_edge).any(axis=0)
  assert 0.3 < drawn.mean() < 0.95
  green = top_edge[differs(top_edge)]
  assert (green[:, 1] > green[:, 0] + 80).all()
  # The prediction below score_threshold is not drawn; the middle of the image is untouched background.
  np.testing.assert_array_equal(pixels[19 * SCALE:27 * SCALE, 12 * SCALE - 3:12 * SCALE + 3], GREY)
  np.testing.assert_array_equal(pixels[16 * SCALE:17 * SCALE, 16 * SCALE:28 * SCALE], GREY)


def test_lower_threshold_draws_more_and_no_boxes_still_writes(tmp_path):
  pixels = lambda p: np.asarray(Image.open(p).convert("RGB"), np.int32)
  low = pixels(_draw(tmp_path / "low.png", score_threshold=0.1))
  assert np.abs(low[19 * SCALE:27 * SCALE, 12 * SCALE - 2:12 * SCALE + 2] - GREY).max() > 40
  empty = pixels(_draw(tmp_path / "empty.png", pred_boxes_xyxy=None, pred_scores=None, pred_labels=None,
                       gt_boxes_xyxy=np.zeros((0, 4)), gt_labels=[], class_names=None))
  assert empty.shape == (512, 512, 3)


def test_inputs_are_checked(tmp_path):
  with pytest.raises(ValueError, match=r"pred_boxes_xyxy must be absolute \(x1, y1, x2, y2\)"):
    _draw(tmp_path / "x.png", pred_boxes_xyxy=[[1, 2, 3]], pred_scores=[0.9], pred_labels=[0])
  with pytest.raises(ValueError, match="pred_scores has 1 entries for 2 boxes"):
    _draw(tmp_path / "x.png", pred_scores=[0.9])
  with pytest.raises(ValueError, match="image_uint8 must be a uint8"):
    draw_detections(np.zeros((32, 32)), None, None, None, None, None, None, str(tmp_path / "x.png"))
