"""cvjax.ops.paste_masks_in_image against torchvision's roi_heads.paste_masks_in_image."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cvjax.ops.masks import paste_masks_in_image  # noqa: E402


def _reference(torchvision, masks, boxes, size):
  from torchvision.models.detection.roi_heads import paste_masks_in_image as reference
  out = reference(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), size)
  return out[:, 0].numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_torchvision_on_random_and_edge_boxes(torchvision, seed):
  rng = np.random.default_rng(seed)
  height, width = 37, 50
  xy = rng.uniform(-5, 35, (12, 2))
  wh = rng.uniform(6, 30, (12, 2))
  boxes = np.concatenate([xy, xy + wh], 1)
  boxes = np.concatenate([boxes, [[0, 0, 0.5, 0.3], [45, 30, 60, 45], [0, 0, width, height]]])
  boxes = boxes.astype(np.float32)
  masks = rng.random((len(boxes), 28, 28)).astype(np.float32)
  ours = np.asarray(paste_masks_in_image(masks, boxes, (height, width)))
  theirs = _reference(torchvision, masks, boxes, (height, width))
  # (torchvision fails on a box entirely outside the image; detections are clipped to it first.)
  assert theirs.max() > 0.5  # not vacuous
  np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_no_boxes():
  out = paste_masks_in_image(np.zeros((0, 28, 28), np.float32), np.zeros((0, 4), np.float32), (8, 9))
  assert out.shape == (0, 8, 9)
