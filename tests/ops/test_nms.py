"""cvjax.ops.nms / batched_nms against torchvision.ops.nms / batched_nms and a float64 NumPy port of
torchvision's greedy NMS (``nms_kernel.cpp``: stable score-descending order, suppress on ``IoU > threshold``).

Random boxes mostly have integer coordinates: IoUs are then ratios of small integers, which differ from a
threshold with two decimals by far more than float32 rounding or equal it (IoU 1/10 at 0.1). The port computes
IoU in float64, rounds it to float32 as the kernel's IoU is, and compares that with the threshold as a double,
as torchvision does (so IoU 1/10 is suppressed at 0.1: float32(0.1) > 0.1); the float32 kernel and the port
must then agree exactly (not just "almost always"). Against torchvision, which computes the same float32 IoUs,
real-valued boxes must agree index for index too.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.ops.nms import batched_nms as batched_nms_op
from cvjax.ops.nms import nms as nms_op
from nms_reference import integer_boxes, reference_nms  # tests/helpers

# Called eagerly with Python-float thresholds, which are compared as torchvision compares them, as doubles (a
# traced threshold is a float32 array); the eager op compiles once per shape, whatever the threshold. Inside a
# jitted step, a Python-float threshold is static: `test_iou_equal_to_the_float32_threshold_as_in_torchvision`
# checks that path takes the same decisions.
nms = nms_op
batched_nms = batched_nms_op


def assert_same_as_reference(result, expected, max_output_size):
  indices, num_valid = (np.asarray(x) for x in result)
  expected = expected[:max_output_size]
  assert indices.shape == (max_output_size,) and indices.dtype == np.int32
  assert int(num_valid) == len(expected)
  np.testing.assert_array_equal(indices[:len(expected)], expected)
  assert (indices[len(expected):] == -1).all()


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
  # IoU(0, 1) = IoU(1, 2) = 4/10, IoU(0, 2) = 1/13: greedy at 0.3 keeps {0, 2} (box 1 is suppressed by 0, so it
  # cannot suppress 2); the tiled TPU NMS with its hard-coded 0.5 in the in-tile step keeps {0}.
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


# ---------------------------------------------------------------------------------- torchvision.ops itself
def tie_heavy_problem(rng, n, integer):
  """``(boxes [N, 4], scores [N])`` float32 with exact duplicates (IoU 1) and scores on a 1/20 grid (ties)."""
  if integer:
    boxes = integer_boxes(rng, n)
  else:
    xy = rng.uniform(0, 64, (n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(0.5, 24, (n, 2))], 1).astype(np.float32)
  boxes[1::5] = boxes[0::5][:len(boxes[1::5])]
  scores = (rng.integers(0, 20, n) / 20).astype(np.float32)
  scores[2::5] = scores[1::5][:len(scores[2::5])]  # a duplicate box with its original's score, at times
  return boxes, scores


def torchvision_keep(torchvision, boxes, scores, iou_threshold, classes=None):
  boxes, scores = torch.from_numpy(boxes), torch.from_numpy(scores)
  if classes is None:
    return torchvision.ops.nms(boxes, scores, iou_threshold).numpy()
  return torchvision.ops.batched_nms(boxes, scores, torch.from_numpy(classes), iou_threshold).numpy()


# Exact in float32 (0.25, 0.5), rounded down (0.35, 0.45, 0.7) and rounded up (0.1, 0.3): torchvision compares
# the float IoU with the threshold as a double, which cvjax reproduces for all three.
THRESHOLDS = (0.0, 0.1, 0.25, 0.3, 0.35, 0.45, 0.5, 0.7, 1.0)


@pytest.mark.parametrize("integer", [True, False])
@pytest.mark.parametrize("n", [40, 300, 1100])
def test_nms_is_torchvision_index_for_index(torchvision, n, integer):
  rng = np.random.default_rng(n + integer)
  boxes, scores = tie_heavy_problem(rng, n, integer)
  for iou_threshold in THRESHOLDS:
    expected = torchvision_keep(torchvision, boxes, scores, iou_threshold)
    assert 0 < len(expected) < n or iou_threshold == 1.0  # something is suppressed, below 1 at least
    for max_output_size in (n, 7):
      assert_same_as_reference(nms(boxes, scores, iou_threshold, max_output_size), expected, max_output_size)


# Up to 1000 boxes torchvision's batched_nms runs one nms over class-offset boxes; above, one nms per class and
# an unstable sort of the kept scores, so score ties between classes have no defined order there: distinct
# scores for that case.
@pytest.mark.parametrize("n,ties", [(300, True), (1500, False)])
def test_batched_nms_is_torchvision_index_for_index(torchvision, n, ties):
  rng = np.random.default_rng(n)
  boxes, scores = tie_heavy_problem(rng, n, integer=True)
  if not ties:
    scores = rng.permutation(n).astype(np.float32) / n
  classes = rng.integers(0, 5, n)
  for iou_threshold in THRESHOLDS[:-1]:
    expected = torchvision_keep(torchvision, boxes, scores, iou_threshold, classes)
    assert len(expected) > len(torchvision_keep(torchvision, boxes, scores, iou_threshold))  # classes matter
    assert_same_as_reference(batched_nms(boxes, scores, classes, iou_threshold, n), expected, n)


# IoU width / 10 between these two boxes is exactly float32(t): above t for 0.1, 0.2, 0.3, below it for 0.7.
EQUAL_IOU_CASES = [(0.1, 1), (0.2, 2), (0.3, 3), (0.7, 7)]
def equal_iou_problem(width):
  return np.array([[0, 0, 10, 1], [0, 0, width, 1]], np.float32), np.array([0.9, 0.8], np.float32)


@pytest.mark.parametrize("iou_threshold,width", EQUAL_IOU_CASES)
def test_torchvision_compares_the_float_iou_with_the_double_threshold(torchvision, iou_threshold, width):
  boxes, scores = equal_iou_problem(width)
  suppressed = float(np.float32(width) / np.float32(10)) > iou_threshold
  np.testing.assert_array_equal(torchvision_keep(torchvision, boxes, scores, iou_threshold),
                                [0] if suppressed else [0, 1])


@pytest.mark.parametrize("iou_threshold,width", EQUAL_IOU_CASES)
def test_iou_equal_to_the_float32_threshold_as_in_torchvision(torchvision, iou_threshold, width):
  boxes, scores = equal_iou_problem(width)
  expected = torchvision_keep(torchvision, boxes, scores, iou_threshold)
  assert_same_as_reference(nms(boxes, scores, iou_threshold, 2), expected, 2)
  in_jit = jax.jit(nms_op, static_argnums=(2, 3))(boxes, scores, iou_threshold, 2)  # static Python float
  assert_same_as_reference(in_jit, expected, 2)
  # A traced threshold takes the same decision as the Python number it holds, when that is exact in float32.
  exact = jax.jit(lambda t: nms_op(boxes, scores, t, 2))(np.float32(iou_threshold))
  if float(np.float32(iou_threshold)) == iou_threshold:
    assert_same_as_reference(exact, expected, 2)
