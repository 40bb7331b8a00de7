"""cvjax.ops.nms / batched_nms against a float64 NumPy port of torchvision's greedy NMS (REFERENCE.md).

Random boxes have integer coordinates: IoUs are then ratios of small integers, which differ from a threshold
with two decimals by far more than float32 rounding, so the float32 kernel and the float64 port must agree
exactly (not just "almost always").
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# The package attribute cvjax.ops.nms is the function (as in torchvision), so import from the module path.
from cvjax.ops.nms import batched_nms as batched_nms_op
from cvjax.ops.nms import nms as nms_op

nms = jax.jit(nms_op, static_argnums=3)
batched_nms = jax.jit(batched_nms_op, static_argnums=4)


def reference_nms(boxes, scores, iou_threshold, classes=None, score_threshold=-np.inf):
  """Greedy NMS in float64: stable score-descending order, suppress IoU > threshold, NaN never suppresses."""
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.zeros(len(boxes)) if classes is None else np.asarray(classes)
  order = np.argsort(-scores, kind="stable")
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = ~(scores > score_threshold)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    w = np.maximum(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0)
    h = np.maximum(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = inter / (areas[i] + areas - inter)
    suppressed |= (iou > iou_threshold) & (classes == classes[i])
  return np.array(keep, np.int64)


def assert_same_as_reference(result, expected, max_output_size):
  indices, num_valid = (np.asarray(x) for x in result)
  expected = expected[:max_output_size]
  assert indices.shape == (max_output_size,) and indices.dtype == np.int32
  assert int(num_valid) == len(expected)
  np.testing.assert_array_equal(indices[:len(expected)], expected)
  assert (indices[len(expected):] == -1).all()


def integer_boxes(rng, n, canvas=64, max_size=24):
  xy = rng.integers(0, canvas, (n, 2))
  wh = rng.integers(1, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


@pytest.mark.parametrize("iou_threshold", [0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
@pytest.mark.parametrize("n", [1, 40, 300])
def test_random_boxes_all_thresholds(n, iou_threshold):
  rng = np.random.default_rng(n)
  boxes, scores = integer_boxes(rng, n), rng.random(n).astype(np.float32)
  expected = reference_nms(boxes, scores, iou_threshold)
  for max_output_size in (n, 5):
    assert_same_as_reference(nms(boxes, scores, iou_threshold, max_output_size), expected, max_output_size)


def test_many_kept_boxes_across_tiles_and_buffer_chunks():
  # Sparse boxes on a large canvas: most of 1100 survive, so kept boxes fill several 256-box chunks.
  rng = np.random.default_rng(0)
  boxes, scores = integer_boxes(rng, 1100, canvas=2000, max_size=40), rng.random(1100).astype(np.float32)
  expected = reference_nms(boxes, scores, 0.3)
  assert len(expected) > 600
  for max_output_size in (1100, 1200, 300):
    assert_same_as_reference(nms(boxes, scores, 0.3, max_output_size), expected, max_output_size)


def test_chain_below_one_half_is_greedy():
  # IoU(0, 1) = IoU(1, 2) = 4/10, IoU(0, 2) = 1/13: greedy at 0.3 keeps {0, 2} (REFERENCE.md; the tiled TPU
  # NMS with its hard-coded 0.5 keeps {0}).
  boxes = np.array([[0, 0, 7, 1], [3, 0, 10, 1], [6, 0, 13, 1]], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  expected = reference_nms(boxes, scores, 0.3)
  np.testing.assert_array_equal(expected, [0, 2])
  assert_same_as_reference(nms(boxes, scores, 0.3, 3), expected, 3)


@pytest.mark.parametrize("iou_threshold", [0.3, 0.45])
def test_long_suppression_chain_across_tiles(iou_threshold):
  # Each box overlaps the next with IoU 0.5 and the one after with 0.2: greedy keeps every other box, and
  # the in-tile fixpoint needs one pass per link of the chain.
  n = 600
  x = np.arange(n, dtype=np.float32) * 10
  boxes = np.stack([x, np.zeros(n), x + 30, np.full(n, 10)], 1).astype(np.float32)
  scores = np.linspace(1, 0.1, n).astype(np.float32)
  expected = reference_nms(boxes, scores, iou_threshold)
  assert len(expected) == n // 2
  assert_same_as_reference(nms(boxes, scores, iou_threshold, n), expected, n)


def test_score_ties_keep_the_lower_index():
  boxes = np.array([[0, 0, 10, 10]] * 4 + [[20, 20, 30, 30]] * 2, np.float32)
  scores = np.array([0.5, 0.9, 0.9, 0.5, 0.7, 0.7], np.float32)
  expected = reference_nms(boxes, scores, 0.5)
  np.testing.assert_array_equal(expected, [1, 4])
  assert_same_as_reference(nms(boxes, scores, 0.5, 6), expected, 6)


@pytest.mark.parametrize("iou_threshold", [-0.5, 0.0, 0.5, 1.0])
def test_zero_area_boxes_and_threshold_extremes(iou_threshold):
  boxes = np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 4, 4], [0, 0, 4, 4], [2, 2, 2, 6], [3, 0, 9, 4]],
                   np.float32)
  scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4], np.float32)
  expected = reference_nms(boxes, scores, iou_threshold)
  assert_same_as_reference(nms(boxes, scores, iou_threshold, 6), expected, 6)
  if iou_threshold >= 0:
    assert {0, 1} <= set(expected.tolist())  # 0 / 0 IoU of the empty pair never suppresses


def test_class_separation_is_exact():
  rng = np.random.default_rng(1)
  boxes, scores = integer_boxes(rng, 200), rng.random(200).astype(np.float32)
  classes = rng.integers(0, 4, 200)
  for iou_threshold in (0.0, 0.3, 0.6):
    expected = reference_nms(boxes, scores, iou_threshold, classes)
    assert_same_as_reference(batched_nms(boxes, scores, classes, iou_threshold, 200), expected, 200)
  # Identical boxes of different classes never suppress each other, even at a negative threshold.
  same = np.array([[0, 0, 5, 5]] * 3, np.float32)
  out = batched_nms(same, np.array([0.3, 0.2, 0.1], np.float32), np.array([0, 1, 0]), -1.0, 3)
  assert_same_as_reference(out, np.array([0, 1]), 3)


def test_score_threshold_and_non_finite_scores():
  rng = np.random.default_rng(2)
  boxes, scores = integer_boxes(rng, 60), rng.random(60).astype(np.float32)
  scores[[3, 7]] = np.nan
  scores[[5]] = -np.inf
  for score_threshold in (-np.inf, 0.5):
    expected = reference_nms(boxes, scores, 0.5, score_threshold=score_threshold)
    assert not {3, 5, 7} & set(expected.tolist())
    assert_same_as_reference(nms(boxes, scores, 0.5, 60, score_threshold), expected, 60)


def test_nan_boxes_do_not_disturb_the_others():
  rng = np.random.default_rng(3)
  boxes, scores = integer_boxes(rng, 30), rng.random(30).astype(np.float32)
  boxes[[0, 4]] = np.nan
  boxes[9, 2] = np.inf
  expected = reference_nms(boxes, scores, 0.4)
  assert_same_as_reference(nms(boxes, scores, 0.4, 30), expected, 30)


def test_fewer_boxes_than_max_output_size_and_empty_input():
  boxes = np.array([[0, 0, 2, 2], [1, 0, 3, 2]], np.float32)  # IoU 1/3
  assert_same_as_reference(nms(boxes, np.array([0.1, 0.2], np.float32), 0.2, 10), np.array([1]), 10)
  indices, num_valid = nms_op(jnp.zeros((0, 4)), jnp.zeros((0,)), 0.5, 4)
  np.testing.assert_array_equal(indices, [-1] * 4)
  assert int(num_valid) == 0


def test_vmap_and_traced_threshold():
  rng = np.random.default_rng(4)
  boxes = np.stack([integer_boxes(rng, 50) for _ in range(3)])
  scores = rng.random((3, 50)).astype(np.float32)
  thresholds = np.array([0.2, 0.5, 0.8], np.float32)
  indices, num_valid = jax.jit(jax.vmap(lambda b, s, t: nms_op(b, s, t, 20)))(boxes, scores, thresholds)
  for b, s, t, i, k in zip(boxes, scores, thresholds, indices, num_valid):
    assert_same_as_reference((i, k), reference_nms(b, s, float(t)), 20)


def test_rejects_bad_shapes():
  with pytest.raises(ValueError, match="scores"):
    nms_op(jnp.zeros((3, 4)), jnp.zeros((2,)), 0.5, 3)
  with pytest.raises(ValueError, match="classes"):
    batched_nms_op(jnp.zeros((3, 4)), jnp.zeros((3,)), jnp.zeros((4,), jnp.int32), 0.5, 3)
  with pytest.raises(ValueError, match="max_output_size"):
    nms_op(jnp.zeros((3, 4)), jnp.zeros((3,)), 0.5, -1)
