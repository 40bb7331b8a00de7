"""cvjax.ops.anchors against torchvision's AnchorGenerator: bit-exact anchors, layout and strides."""

import numpy as np
import pytest
import torch

from cvjax.ops.anchors import base_anchors, grid_anchors, multilevel_anchors


def torchvision_anchors(torchvision, image_size, feature_sizes, sizes, aspect_ratios):
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.image_list import ImageList
  generator = AnchorGenerator(sizes=tuple(tuple(s) for s in sizes),
                              aspect_ratios=tuple(tuple(r) for r in aspect_ratios))
  images = ImageList(torch.zeros(1, 3, *image_size), [tuple(image_size)])
  features = [torch.zeros(1, 2, h, w) for h, w in feature_sizes]
  return generator(images, features)[0].numpy()


@pytest.mark.parametrize("seed", range(4))
def test_base_anchors_match_torchvision(torchvision, seed):
  rng = np.random.default_rng(seed)
  # Odd integer sizes with ratio 1 give halves (5 / 2 = 2.5), which torch.round rounds to even.
  sizes = [5.0, 7.0] + list(rng.uniform(8, 300, 2).round(1))
  ratios = [1.0, 0.5, 2.0] + list(rng.uniform(0.2, 4, 2))
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  expected = AnchorGenerator().generate_anchors(sizes, ratios).numpy()
  result = base_anchors(sizes, ratios)
  assert result.dtype == np.float32 and result.shape == (len(ratios) * len(sizes), 4)
  np.testing.assert_array_equal(result, expected)


def test_base_anchors_round_half_to_even():
  # 5 / 2 = 2.5 -> 2 and 3 / 2 = 1.5 -> 2 (torch.round), not 3 / 2 as round-half-away would give.
  np.testing.assert_array_equal(base_anchors([5.0, 3.0], [1.0]), [[-2, -2, 2, 2], [-2, -2, 2, 2]])


def test_grid_anchors_layout():
  # Location-major (row, then column), then anchor; x shifts by the column times sx, y by the row times sy.
  base = np.array([[-1, -2, 1, 2], [-3, -1, 3, 1]], np.float32)
  anchors = grid_anchors(base, (2, 3), (5, 7))
  assert anchors.shape == (2 * 3 * 2, 4) and anchors.dtype == np.float32
  for i in range(2):
    for j in range(3):
      for a in range(2):
        np.testing.assert_array_equal(anchors[(i * 3 + j) * 2 + a], base[a] + [7 * j, 5 * i, 7 * j, 5 * i])


@pytest.mark.parametrize("seed", range(3))
def test_multilevel_anchors_match_torchvision(torchvision, seed):
  rng = np.random.default_rng(seed)
  # Image sizes that are not multiples of the feature sizes: the stride is H // h, as in torchvision.
  image_size = (int(rng.integers(40, 70)), int(rng.integers(40, 70)))
  feature_sizes = [(-(-image_size[0] // s), -(-image_size[1] // s)) for s in (4, 8, 16)]
  sizes = [tuple(rng.uniform(4, 64, n).round(1)) for n in (1, 2, 3)]
  ratios = [tuple(rng.uniform(0.3, 3, n)) for n in (3, 1, 2)]
  anchors, level_sizes = multilevel_anchors(image_size, feature_sizes, sizes, ratios)
  expected = torchvision_anchors(torchvision, image_size, feature_sizes, sizes, ratios)
  assert isinstance(anchors, np.ndarray) and anchors.dtype == np.float32
  np.testing.assert_array_equal(anchors, expected)
  assert level_sizes == tuple(h * w * len(s) * len(r) for (h, w), s, r in zip(feature_sizes, sizes, ratios))


def test_multilevel_anchors_rejects_mismatched_levels():
  with pytest.raises(ValueError, match="one entry per level"):
    multilevel_anchors((32, 32), [(8, 8), (4, 4)], [(32,)], [(1.0,)])
  with pytest.raises(ValueError, match="aspect_ratios"):
    base_anchors([32], [])
