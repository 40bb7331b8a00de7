"""Two-stage detector plumbing with static shapes: anchor / proposal matching, balanced sampling, RPN proposals.

Conventions: boxes are absolute xyxy float arrays in input pixels (torchvision's). Ground truth is padded to a
fixed ``M`` with a boolean ``gt_valid [M]``; outputs whose length depends on the data (sampled anchors,
proposals) are padded to a static length and returned with a boolean ``valid`` mask. Every function works on
one image; ``jax.vmap`` it over a batch. All are jit-able and contain no host round-trips.

References (torchvision.models.detection):
- ``match_boxes``: ``_utils.Matcher`` (RPN 0.7 / 0.3 with low-quality matches; box head 0.5 / 0.5 without).
- ``balanced_sample``: ``_utils.BalancedPositiveNegativeSampler`` (the counts exactly; the draw is
  jax.random's, so it cannot equal torch's).
- ``select_proposals``: ``rpn.RegionProposalNetwork.filter_proposals`` for one image.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp

from cvjax.ops.boxes import _check_boxes
from cvjax.ops.nms import batched_nms

# torchvision Matcher's codes for unmatched predictions.
BELOW_LOW_THRESHOLD = -1
BETWEEN_THRESHOLDS = -2


def match_boxes(quality: jnp.ndarray, gt_valid: jnp.ndarray, high_threshold: float, low_threshold: float,
                allow_low_quality_matches: bool) -> jnp.ndarray:
  """The ground truth matched to each prediction: torchvision ``Matcher(high, low, allow_low)(quality)``.

  Each prediction takes its best valid GT (``argmax`` over GT, first index on ties); if that quality is
  ``< low_threshold`` it gets ``BELOW_LOW_THRESHOLD`` (-1), if in ``[low_threshold, high_threshold)``
  ``BETWEEN_THRESHOLDS`` (-2). With ``allow_low_quality_matches``, for every valid GT each prediction
  attaining that GT's highest quality (ties included, even when that maximum is 0) is given back its own
  best GT -- which, on ties across GT, need not be that GT (torchvision's rule, kept as is).

  Padding GT rows (``gt_valid`` False) never match and never trigger the low-quality rule. With no valid GT
  every prediction is ``BELOW_LOW_THRESHOLD`` (torchvision raises there; its callers make such an image all
  background).

  Args:
    quality: ``[M, N]`` float, e.g. ``box_iou(gt_boxes, anchors)`` (torchvision's ``match_quality_matrix``).
    gt_valid: ``[M]`` bool.
    high_threshold, low_threshold: finite floats with ``low_threshold <= high_threshold``.
    allow_low_quality_matches: static bool.

  Returns:
    ``[N]`` int32: a GT index in ``[0, M)``, or -1 / -2.
  """
  quality = jnp.asarray(quality)
  if quality.ndim != 2:
    raise ValueError(f"quality must have shape [M, N] (GT x predictions; vmap for batches); got {quality.shape}")
  num_gt, num_pred = quality.shape
  gt_valid = jnp.asarray(gt_valid)
  if gt_valid.shape != (num_gt,):
    raise ValueError(f"gt_valid must have shape [M] = [{num_gt}] to match quality; got {gt_valid.shape}")
  if not low_threshold <= high_threshold:
    raise ValueError(f"low_threshold ({low_threshold}) must be <= high_threshold ({high_threshold})")
  if num_gt == 0 or num_pred == 0:
    return jnp.full((num_pred,), BELOW_LOW_THRESHOLD, jnp.int32)
  gt_valid = gt_valid.astype(bool)
  # Padding rows get quality -inf: a prediction without a valid GT falls below any finite low threshold.
  masked = jnp.where(gt_valid[:, None], quality, -jnp.inf)
  best_quality = masked.max(axis=0)
  best_gt = jnp.argmax(masked, axis=0).astype(jnp.int32)
  matches = jnp.where(best_quality < low_threshold, BELOW_LOW_THRESHOLD,
                      jnp.where(best_quality < high_threshold, BETWEEN_THRESHOLDS, best_gt))
  if allow_low_quality_matches:
    best_for_gt = masked.max(axis=1, keepdims=True)
    attains = (masked == best_for_gt) & gt_valid[:, None]
    matches = jnp.where(attains.any(axis=0), best_gt, matches)
  return matches.astype(jnp.int32)


def _choose_first(candidates: jnp.ndarray, count: jnp.ndarray, permutation: jnp.ndarray) -> jnp.ndarray:
  """``[N]`` bool: the first ``count`` candidates in the order of ``permutation`` (a uniform draw)."""
  in_order = candidates[permutation]
  chosen = in_order & (jnp.cumsum(in_order) <= count)
  return jnp.zeros_like(candidates).at[permutation].set(chosen)


def balanced_sample(labels: jnp.ndarray, num_samples: int, positive_fraction: float,
                    rng: jax.Array) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Random positives and negatives in torchvision ``BalancedPositiveNegativeSampler``'s numbers.

  As torchvision, ``labels >= 1`` are positive candidates (1 for RPN anchors; a class index for the box
  head), ``labels == 0`` negative ones, and anything else (-1 ignore, -2 between thresholds) neither.
  ``num_pos = min(int(num_samples * positive_fraction), #positives)`` and
  ``num_neg = min(num_samples - num_pos, #negatives)`` are chosen, each uniformly without replacement among
  their candidates: the candidates ranked by one ``jax.random.permutation`` of ``[N]``.

  Args:
    labels: ``[N]`` int labels.
    num_samples: static int, torchvision's ``batch_size_per_image``.
    positive_fraction: static float in ``[0, 1]``.
    rng: a ``jax.random`` key.

  Returns:
    ``(positive, negative)``: ``[N]`` bool masks of the chosen positives and negatives.
  """
  labels = jnp.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f"labels must have shape [N] (vmap for batches); got {labels.shape}")
  if not isinstance(num_samples, int) or num_samples < 0:
    raise ValueError(f"num_samples must be a static int >= 0; got {num_samples!r}")
  if not 0 <= positive_fraction <= 1:
    raise ValueError(f"positive_fraction must be in [0, 1]; got {positive_fraction!r}")
  positive, negative = labels >= 1, labels == 0
  num_pos = jnp.minimum(int(num_samples * positive_fraction), positive.sum())
  num_neg = jnp.minimum(num_samples - num_pos, negative.sum())
  # One permutation serves both: the orders it induces on two disjoint subsets are independent and uniform.
  permutation = jax.random.permutation(rng, labels.shape[0])
  return _choose_first(positive, num_pos, permutation), _choose_first(negative, num_neg, permutation)


def sampled_indices(positive: jnp.ndarray, negative: jnp.ndarray,
                    num_samples: int) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Gathers the positions of ``balanced_sample``'s masks into a fixed number of rows.

  Rows hold the positives (in index order), then the negatives (in index order), then padding (index 0,
  ``valid`` False). If the masks hold more than ``num_samples`` positions together, the last ones are cut.

  Args:
    positive, negative: ``[N]`` bool masks (disjoint).
    num_samples: static int, the number of rows.

  Returns:
    ``(indices [num_samples] int32, is_positive [num_samples] bool, valid [num_samples] bool)``.
  """
  positive, negative = jnp.asarray(positive, bool), jnp.asarray(negative, bool)
  if positive.ndim != 1 or positive.shape != negative.shape:
    raise ValueError(f"positive and negative must be [N] masks of one shape; got {positive.shape} and "
                     f"{negative.shape}")
  positive_rows = jnp.flatnonzero(positive, size=num_samples, fill_value=0)
  negative_rows = jnp.flatnonzero(negative, size=num_samples, fill_value=0)
  num_pos = positive.sum(dtype=jnp.int32)
  slot = jnp.arange(num_samples, dtype=jnp.int32)
  is_positive = slot < num_pos
  valid = slot < num_pos + negative.sum(dtype=jnp.int32)
  indices = jnp.where(is_positive, positive_rows, negative_rows[jnp.maximum(slot - num_pos, 0)])
  return jnp.where(valid, indices, 0).astype(jnp.int32), is_positive, valid


def _clip_to_image(boxes: jnp.ndarray, image_size) -> jnp.ndarray:
  """torchvision ``clip_boxes_to_image``: x clamped to ``[0, W]``, y to ``[0, H]``; ``image_size = (H, W)``."""
  height, width = (jnp.asarray(s, boxes.dtype) for s in (image_size[0], image_size[1]))
  x1, y1, x2, y2 = jnp.unstack(boxes, axis=-1)
  return jnp.stack([jnp.clip(x1, 0, width), jnp.clip(y1, 0, height),
                    jnp.clip(x2, 0, width), jnp.clip(y2, 0, height)], axis=-1)


def select_proposals(boxes: jnp.ndarray, objectness: jnp.ndarray, level_sizes: Sequence[int],
                     image_size: Union[jnp.ndarray, Tuple[int, int]], *, pre_nms_top_n: int,
                     post_nms_top_n: int, nms_threshold: float, min_size: float = 1e-3,
                     score_threshold: float = 0.0) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """RPN proposals of one image: torchvision ``RegionProposalNetwork.filter_proposals``.

  Per level, the ``min(pre_nms_top_n, level size)`` anchors with the highest objectness logits; their
  ``sigmoid`` is the score. Boxes are clipped to the image, those with width or height ``< min_size`` are
  removed and so are scores ``< score_threshold``; NMS at ``nms_threshold`` runs per level (levels are the
  classes of ``batched_nms``) and the first ``post_nms_top_n`` kept boxes in decreasing score order are the
  proposals. Nothing is differentiated (torchvision detaches objectness and decodes detached deltas).

  Score ties (equal logits, or logits past float32 sigmoid saturation, ~17) are broken by lower candidate
  index (level, then rank in the level's top-k); torchvision's sort leaves their order unspecified.

  Args:
    boxes: ``[N, 4]`` decoded xyxy proposals, one per anchor (``decode_boxes(deltas, anchors)``).
    objectness: ``[N]`` logits.
    level_sizes: static per-level anchor counts (``multilevel_anchors``); the levels are contiguous in ``N``.
    image_size: ``(H, W)`` of the image before padding, a pair or a ``[2]`` array (traced under vmap).
    pre_nms_top_n: static int, candidates per level (torchvision: 2000 train / 1000 test with FPN).
    post_nms_top_n: static int, the number of output rows.
    nms_threshold: IoU threshold of the per-level NMS (0.7).
    min_size: smallest kept width and height after clipping.
    score_threshold: smallest kept score (``>=``, as torchvision).

  Returns:
    ``(proposals [post_nms_top_n, 4], scores [post_nms_top_n], valid [post_nms_top_n] bool)``; padding rows
    are zero boxes with score 0 and ``valid`` False.
  """
  boxes = _check_boxes(boxes, "boxes")
  objectness = jnp.asarray(objectness)
  level_sizes = tuple(int(s) for s in level_sizes)
  if boxes.ndim != 2 or objectness.shape != boxes.shape[:1]:
    raise ValueError(f"boxes must be [N, 4] and objectness [N] (vmap for batches); got {boxes.shape} and "
                     f"{objectness.shape}")
  if sum(level_sizes) != boxes.shape[0] or any(s <= 0 for s in level_sizes):
    raise ValueError(f"level_sizes must be positive and sum to N = {boxes.shape[0]}; got {level_sizes}")
  for name, value in (("pre_nms_top_n", pre_nms_top_n), ("post_nms_top_n", post_nms_top_n)):
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a static int > 0; got {value!r}")
  boxes, objectness = jax.lax.stop_gradient(boxes), jax.lax.stop_gradient(objectness)

  candidates, levels, start = [], [], 0
  for level, size in enumerate(level_sizes):  # static: one top-k per level
    k = min(pre_nms_top_n, size)
    candidates.append(jax.lax.top_k(objectness[start:start + size], k)[1] + start)
    levels.append(jnp.full((k,), level, jnp.int32))
    start += size
  candidates, levels = jnp.concatenate(candidates), jnp.concatenate(levels)
  candidate_boxes = _clip_to_image(boxes[candidates], image_size)
  scores = jax.nn.sigmoid(objectness[candidates])
  widths = candidate_boxes[:, 2] - candidate_boxes[:, 0]
  heights = candidate_boxes[:, 3] - candidate_boxes[:, 1]
  kept = (widths >= min_size) & (heights >= min_size) & (scores >= score_threshold)
  # batched_nms only considers scores > -inf: removed candidates never survive nor suppress.
  keep, _ = batched_nms(candidate_boxes, jnp.where(kept, scores, -jnp.inf), levels, nms_threshold,
                        post_nms_top_n)
  valid = keep >= 0
  rows = jnp.maximum(keep, 0)
  proposals = jnp.where(valid[:, None], candidate_boxes[rows], 0)
  return proposals, jnp.where(valid, scores[rows], 0), valid
