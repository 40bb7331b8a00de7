"""cvjax.ops.proposals against torchvision: Matcher, BalancedPositiveNegativeSampler and
RegionProposalNetwork.filter_proposals, on random inputs with ties, padding and degenerate images.

The sampler draws with jax.random, so it is checked for torchvision's exact counts, candidates only, determinism
in the key and rough uniformity, not for torch's draw.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.ops.proposals import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, balanced_sample, match_boxes,
                                 sampled_indices, select_proposals)

MATCHER_SETTINGS = [(0.7, 0.3, True), (0.5, 0.5, False), (0.5, 0.4, True)]


def random_boxes(rng, n, canvas=48.0, max_size=20.0):
  xy = rng.uniform(-8, canvas, (n, 2))
  wh = rng.uniform(0.5, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


def box_iou(torchvision, gt, anchors):
  return torchvision.ops.box_iou(torch.from_numpy(gt), torch.from_numpy(anchors)).numpy()


def torchvision_matches(torchvision, quality, high, low, allow_low):
  from torchvision.models.detection._utils import Matcher
  return Matcher(high, low, allow_low)(torch.from_numpy(quality)).numpy()


def ious_with_ties(torchvision, rng, num_gt, num_anchors):
  """``[num_gt, num_anchors]`` IoUs with duplicated anchors and a duplicated GT (ties both ways)."""
  anchors = random_boxes(rng, num_anchors)
  gt = random_boxes(rng, num_gt)
  # Jittered GT boxes give IoUs across (0, 1), in every band of the thresholds.
  anchors[3:23] = gt[rng.integers(0, num_gt, 20)] + rng.uniform(-4, 4, (20, 4)).astype(np.float32)
  anchors[1::7] = anchors[0::7][:len(anchors[1::7])]  # duplicate anchors
  gt[-1] = gt[0]  # duplicate GT: the first index must win
  anchors[2] = gt[1]  # an exact match, IoU 1
  return box_iou(torchvision, gt, anchors)


@pytest.mark.parametrize("high,low,allow_low", MATCHER_SETTINGS)
@pytest.mark.parametrize("seed", range(3))
def test_match_boxes_matches_torchvision(torchvision, seed, high, low, allow_low):
  rng = np.random.default_rng(seed)
  quality = ious_with_ties(torchvision, rng, 5, 60)
  expected = torchvision_matches(torchvision, quality, high, low, allow_low)
  result = np.asarray(match_boxes(quality, np.ones(5, bool), high, low, allow_low))
  assert result.dtype == np.int32 and result.shape == (60,)
  np.testing.assert_array_equal(result, expected)
  assert (expected >= 0).any() and (expected == BELOW_LOW_THRESHOLD).any()  # not vacuous
  assert (expected == BETWEEN_THRESHOLDS).any() or high - low < 0.3


@pytest.mark.parametrize("high,low,allow_low", MATCHER_SETTINGS)
@pytest.mark.parametrize("seed", range(2))
def test_match_boxes_ignores_padding_rows(torchvision, seed, high, low, allow_low):
  # Padding rows interleaved with the real ones and holding IoUs that would otherwise win every match.
  rng = np.random.default_rng(10 + seed)
  quality = ious_with_ties(torchvision, rng, 4, 50)
  gt_valid = np.array([False, True, True, False, True, True, False])
  padded = np.full((7, 50), 0.0, np.float32)
  padded[gt_valid] = quality
  padded[~gt_valid] = rng.uniform(0.9, 1.0, (3, 50))
  expected = torchvision_matches(torchvision, quality, high, low, allow_low)
  expected = np.where(expected >= 0, np.flatnonzero(gt_valid)[np.maximum(expected, 0)], expected)
  np.testing.assert_array_equal(match_boxes(padded, gt_valid, high, low, allow_low), expected)


def test_match_boxes_gt_with_zero_max_iou_takes_all_zero_anchors(torchvision):
  # GT 1 overlaps nothing: its maximum is 0, attained by every anchor with IoU 0 to it, and torchvision gives
  # each of those its own best GT -- GT 0 when it overlaps it, else index 0 too (argmax of an all-zero column).
  rng = np.random.default_rng(3)
  anchors = random_boxes(rng, 40)
  gt = np.array([anchors[5] + 1, [500, 500, 510, 510]], np.float32)
  quality = box_iou(torchvision, gt, anchors)
  expected = torchvision_matches(torchvision, quality, 0.7, 0.3, True)
  assert (expected == 0).all()
  np.testing.assert_array_equal(match_boxes(quality, np.ones(2, bool), 0.7, 0.3, True), expected)
  # Without the low-quality rule they are background.
  assert (np.asarray(match_boxes(quality, np.ones(2, bool), 0.7, 0.3, False)) < 0).sum() >= 39


@pytest.mark.parametrize("allow_low", [True, False])
def test_match_boxes_without_valid_gt_is_all_background(allow_low):
  quality = np.random.default_rng(0).uniform(0, 1, (3, 20)).astype(np.float32)
  result = match_boxes(quality, np.zeros(3, bool), 0.7, 0.3, allow_low)
  np.testing.assert_array_equal(result, np.full(20, BELOW_LOW_THRESHOLD))
  no_rows = match_boxes(np.zeros((0, 20), np.float32), np.zeros(0, bool), 0.7, 0.3, allow_low)
  np.testing.assert_array_equal(no_rows, np.full(20, BELOW_LOW_THRESHOLD))


def test_match_boxes_jit_vmap_over_images(torchvision):
  rng = np.random.default_rng(7)
  qualities = np.stack([ious_with_ties(torchvision, rng, 5, 40) for _ in range(3)])
  gt_valid = np.array([[True] * 5, [True, True, True, False, False], [False] * 5])
  matched = jax.jit(jax.vmap(lambda q, v: match_boxes(q, v, 0.7, 0.3, True)))(qualities, gt_valid)
  for quality, valid, result in zip(qualities, gt_valid, np.asarray(matched)):
    expected = (torchvision_matches(torchvision, quality[valid], 0.7, 0.3, True) if valid.any()
                else np.full(40, BELOW_LOW_THRESHOLD))
    np.testing.assert_array_equal(result, expected)
  assert BETWEEN_THRESHOLDS in np.asarray(matched)


def test_match_boxes_rejects_bad_thresholds():
  with pytest.raises(ValueError, match="low_threshold"):
    match_boxes(np.zeros((2, 3)), np.ones(2, bool), 0.3, 0.7, True)


# Sampler ---------------------------------------------------------------------------------------------------


def torchvision_counts(torchvision, labels, num_samples, positive_fraction):
  from torchvision.models.detection._utils import BalancedPositiveNegativeSampler
  sampler = BalancedPositiveNegativeSampler(num_samples, positive_fraction)
  (positive,), (negative,) = sampler([torch.from_numpy(np.asarray(labels, np.int64))])
  return int(positive.sum()), int(negative.sum())


# (N, #positives, #negatives, num_samples, positive_fraction): enough of both, few positives, few negatives,
# more samples than anchors, a fraction that does not divide evenly (int() truncates), class labels >= 1.
# One N for all cases: each N compiles its own permutation.
SAMPLER_CASES = [(200, 40, 120, 64, 0.5), (200, 3, 150, 64, 0.5), (200, 120, 10, 64, 0.25),
                 (200, 5, 20, 256, 0.5), (200, 50, 100, 37, 0.3), (200, 0, 80, 16, 0.5)]


@pytest.mark.parametrize("case", SAMPLER_CASES)
def test_balanced_sample_counts_match_torchvision(torchvision, case):
  n, num_pos, num_neg, num_samples, fraction = case
  rng = np.random.default_rng(n + num_pos)
  labels = np.full(n, -1, np.int32)
  labels[:num_pos] = rng.integers(1, 4, num_pos)  # positive: any label >= 1, as torchvision
  labels[num_pos:num_pos + num_neg] = 0
  labels[num_pos + num_neg:] = rng.choice([-1, -2], n - num_pos - num_neg)
  labels = rng.permutation(labels)
  positive, negative = (np.asarray(m) for m in balanced_sample(labels, num_samples, fraction,
                                                                jax.random.key(0)))
  assert positive.dtype == bool and positive.shape == (n,)
  assert (positive.sum(), negative.sum()) == torchvision_counts(torchvision, labels, num_samples, fraction)
  assert (labels[positive] >= 1).all() and (labels[negative] == 0).all()


def test_balanced_sample_is_a_function_of_the_key():
  labels = np.random.default_rng(0).choice([-1, 0, 1], 200, p=[0.2, 0.6, 0.2])
  draw = lambda key: np.concatenate([np.asarray(m) for m in balanced_sample(labels, 32, 0.5, key)])
  np.testing.assert_array_equal(draw(jax.random.key(1)), draw(jax.random.key(1)))
  assert (draw(jax.random.key(1)) != draw(jax.random.key(2))).any()


def test_balanced_sample_is_uniform_among_candidates():
  # 10 positives of which 4 are drawn, 20 negatives of which 12: each candidate's frequency over 2000 draws
  # must be near 0.4 / 0.6 (5 standard deviations ~ 0.055); a biased choice (first k, by index) is far off.
  labels = np.array([1] * 10 + [0] * 20 + [-1] * 10)
  keys = jax.random.split(jax.random.key(0), 2000)
  positive, negative = jax.jit(jax.vmap(lambda k: balanced_sample(labels, 16, 0.25, k)))(keys)
  positive_rate, negative_rate = np.asarray(positive).mean(0), np.asarray(negative).mean(0)
  np.testing.assert_allclose(positive_rate[:10], 0.4, atol=0.055)
  np.testing.assert_allclose(negative_rate[10:30], 0.6, atol=0.055)
  assert (positive_rate[10:] == 0).all() and (negative_rate[:10] == 0).all() and (negative_rate[30:] == 0).all()


def test_sampled_indices_gathers_positives_then_negatives():
  rng = np.random.default_rng(0)
  labels = rng.choice([-1, 0, 1], 200, p=[0.7, 0.25, 0.05])
  batch_labels = np.stack([labels, np.full(200, -1)])  # the second image has nothing to sample
  keys = jax.random.split(jax.random.key(3), 2)

  def sample(labels, key):
    positive, negative = balanced_sample(labels, 24, 0.25, key)
    return (positive, negative), sampled_indices(positive, negative, 24)

  (positive, negative), (indices, is_positive, valid) = jax.jit(jax.vmap(sample))(batch_labels, keys)
  for b in range(2):
    pos, neg = np.flatnonzero(positive[b]), np.flatnonzero(negative[b])
    count = len(pos) + len(neg)
    assert indices.dtype == np.int32 and indices.shape == (2, 24)
    np.testing.assert_array_equal(indices[b, :count], np.concatenate([pos, neg]))
    np.testing.assert_array_equal(indices[b, count:], 0)
    np.testing.assert_array_equal(is_positive[b], np.arange(24) < len(pos))
    np.testing.assert_array_equal(valid[b], np.arange(24) < count)
  assert 0 < len(np.flatnonzero(positive[0])) < 24 and not np.asarray(valid[1]).any()


# Proposals -------------------------------------------------------------------------------------------------


def torchvision_proposals(torchvision, boxes, objectness, image_shapes, level_sizes, pre_nms_top_n,
                          post_nms_top_n, nms_threshold, score_threshold):
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.rpn import RegionProposalNetwork
  rpn = RegionProposalNetwork(AnchorGenerator(), torch.nn.Identity(), 0.7, 0.3, 256, 0.5,
                              dict(training=pre_nms_top_n, testing=pre_nms_top_n),
                              dict(training=post_nms_top_n, testing=post_nms_top_n), nms_threshold,
                              score_threshold).eval()
  final_boxes, final_scores = rpn.filter_proposals(torch.from_numpy(boxes), torch.from_numpy(objectness),
                                                   [tuple(s) for s in image_shapes], list(level_sizes))
  return [b.numpy() for b in final_boxes], [s.numpy() for s in final_scores]


def random_rpn_outputs(rng, num_images, level_sizes, canvas=48.0):
  n = sum(level_sizes)
  # Boxes reach past the image on all sides (clipping matters) and some lie fully outside it (empty after
  # clipping); logits stay well below float32 sigmoid saturation so scores have no ties.
  boxes = np.stack([random_boxes(rng, n, canvas=canvas + 16, max_size=24) - 8 for _ in range(num_images)])
  objectness = rng.normal(0, 2, (num_images, n)).astype(np.float32)
  return boxes, objectness


def assert_same_as_torchvision(result, expected_boxes, expected_scores, post_nms_top_n):
  proposals, scores, valid = (np.asarray(x) for x in result)
  k = len(expected_scores)
  assert proposals.shape == (post_nms_top_n, 4) and scores.shape == valid.shape == (post_nms_top_n,)
  np.testing.assert_array_equal(valid, np.arange(post_nms_top_n) < k)
  np.testing.assert_allclose(proposals[:k], expected_boxes, rtol=1e-6, atol=1e-5)
  np.testing.assert_allclose(scores[:k], expected_scores, rtol=1e-6, atol=1e-7)
  assert (proposals[k:] == 0).all() and (scores[k:] == 0).all()


# (level sizes, pre_nms_top_n, post_nms_top_n, nms threshold, score threshold): the last level is smaller than
# pre_nms_top_n; post_nms_top_n cuts the survivors in the first case and pads them in the second, where a
# score threshold removes boxes too. (Each case compiles once: two keep the file fast.)
PROPOSAL_CASES = [((96, 48, 12), 20, 12, 0.7, 0.0), ((96, 48, 12), 64, 100, 0.5, 0.6)]


@pytest.mark.parametrize("case", PROPOSAL_CASES)
@pytest.mark.parametrize("seed", range(3))
def test_select_proposals_matches_torchvision_jit_vmap(torchvision, seed, case):
  level_sizes, pre_nms_top_n, post_nms_top_n, nms_threshold, score_threshold = case
  rng = np.random.default_rng(seed)
  boxes, objectness = random_rpn_outputs(rng, 3, level_sizes)
  image_sizes = np.array([[48, 48], [40, 32], [30, 45]], np.int32)
  expected_boxes, expected_scores = torchvision_proposals(
      torchvision, boxes, objectness, image_sizes, level_sizes, pre_nms_top_n, post_nms_top_n, nms_threshold,
      score_threshold)
  select = jax.jit(jax.vmap(lambda b, o, s: select_proposals(
      b, o, level_sizes, s, pre_nms_top_n=pre_nms_top_n, post_nms_top_n=post_nms_top_n,
      nms_threshold=nms_threshold, score_threshold=score_threshold)))
  result = select(boxes, objectness, image_sizes)
  for b in range(3):
    assert_same_as_torchvision([x[b] for x in result], expected_boxes[b], expected_scores[b], post_nms_top_n)
  counts = [len(s) for s in expected_scores]
  assert 0 < min(counts) and (max(counts) == post_nms_top_n) == (post_nms_top_n == 12)


def test_select_proposals_removes_small_boxes_and_clips(torchvision):
  # Half the boxes are narrower than min_size = 1e-3 (or clipped to empty), none of those may survive.
  rng = np.random.default_rng(5)
  boxes, objectness = random_rpn_outputs(rng, 1, (40, 20))
  boxes[0, ::2, 2] = boxes[0, ::2, 0] + 5e-4
  boxes[0, 1::4, :] += 100  # entirely outside the 48 x 48 image: empty after clipping
  args = dict(pre_nms_top_n=30, post_nms_top_n=30, nms_threshold=0.7)
  expected_boxes, expected_scores = torchvision_proposals(torchvision, boxes, objectness, [(48, 48)], (40, 20),
                                                          30, 30, 0.7, 0.0)
  result = select_proposals(boxes[0], objectness[0], (40, 20), (48, 48), **args)
  assert_same_as_torchvision(result, expected_boxes[0], expected_scores[0], 30)
  proposals = np.asarray(result[0])[np.asarray(result[2])]
  assert (proposals >= 0).all() and (proposals <= 48).all() and len(proposals) > 0


def test_select_proposals_with_no_survivor_is_all_padding():
  boxes = np.tile(np.array([[10, 10, 10.0001, 20]], np.float32), (60, 1))  # width 1e-4 < min_size
  objectness = np.linspace(-3, 3, 60).astype(np.float32)
  proposals, scores, valid = (np.asarray(x) for x in select_proposals(
      boxes, objectness, (40, 20), (32, 32), pre_nms_top_n=30, post_nms_top_n=30, nms_threshold=0.7))
  assert not valid.any() and (proposals == 0).all() and (scores == 0).all()
  assert np.isfinite(proposals).all() and np.isfinite(scores).all()


def test_select_proposals_has_no_gradient():
  rng = np.random.default_rng(0)
  boxes, objectness = random_rpn_outputs(rng, 1, (40, 20))

  def total(boxes, objectness):
    proposals, scores, _ = select_proposals(boxes, objectness, (40, 20), (48, 48), pre_nms_top_n=30,
                                            post_nms_top_n=30, nms_threshold=0.7)
    return proposals.sum() + scores.sum()

  grads = jax.grad(total, argnums=(0, 1))(jnp.asarray(boxes[0]), jnp.asarray(objectness[0]))
  assert all((np.asarray(g) == 0).all() for g in grads)
