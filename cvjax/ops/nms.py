"""Exact greedy non-maximum suppression with static output shapes (torchvision.ops.nms / batched_nms).

Semantics (torchvision's): boxes are absolute xyxy with areas ``(x2 - x1) * (y2 - y1)``; visit boxes by score,
descending (ties: lower index first); keep a box unless a box kept before it overlaps it with
``IoU > iou_threshold`` (strict). IoU is computed in the boxes' dtype exactly as torchvision computes it, and
compared with the threshold as torchvision does, as a double: a Python-number threshold becomes the largest
value of the boxes' dtype not above it (``float32(0.1) > 0.1``, so an IoU equal to ``float32(0.1)`` is
suppressed, as in torchvision); an array threshold is used in the boxes' dtype. A NaN IoU (degenerate union
``0 / 0``, or NaN coordinates) never suppresses. ``batched_nms`` only lets boxes of the same class suppress
each other -- by masking the suppression matrix with class equality (exact), not torchvision's
coordinate-offset trick (which loses precision for large coordinates in low precision).

Only boxes with ``score > score_threshold`` (strict, as torchvision's detection heads and TF filter) are
candidates, so NaN scores are never kept, and neither are -inf scores under the default ``-inf`` threshold.

Algorithm, exact at every threshold: sort once, then walk the sorted boxes in tiles of 256 inside a
``lax.while_loop``. Each tile is first suppressed by the boxes kept so far (kept boxes are compacted into a
buffer, so the work is ``O(N * kept)`` IoUs, never the full ``N x N`` matrix), then resolved internally by
iterating ``keep_j = candidate_j and not any_{i<j}(keep_i and S_ij)`` to its fixpoint. That system is
triangular, so its fixpoint is unique and is the greedy answer (the tiled TPU NMS of TF Model Garden / MLPerf
hard-codes 0.5 in this step instead, which is not greedy NMS below 0.5). The fixpoint takes as many passes as
the longest suppression chain inside a tile (a few on real detections). The loop stops once
``max_output_size`` boxes are kept or the candidates run out.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops._args import callable_module
from cvjax.ops.boxes import _check_boxes, _iou

_TILE = 256


def _resolve_tile(candidates: jnp.ndarray, suppresses: jnp.ndarray) -> jnp.ndarray:
  """Greedy keep mask of one tile: ``candidates [T]`` bool, ``suppresses [T, T]`` (``i < j`` only) bool."""

  def body(state):
    keep, _ = state
    new_keep = candidates & ~(suppresses & keep[:, None]).any(axis=0)
    return new_keep, (new_keep != keep).any()

  return jax.lax.while_loop(lambda state: state[1], body, (candidates, jnp.array(True)))[0]


def _threshold_in(threshold, dtype) -> jnp.ndarray:
  """``threshold`` in ``dtype`` such that ``iou > result`` equals ``iou > threshold`` evaluated exactly (the
  largest ``dtype`` value not above a Python number; an array is cast as it is)."""
  if not isinstance(threshold, (int, float, np.integer, np.floating)):
    return jnp.asarray(threshold, dtype)
  rounded = np.asarray(threshold, dtype)
  if float(rounded) > float(threshold):
    rounded = np.nextafter(rounded, np.asarray(-np.inf, dtype))
  return jnp.asarray(rounded)


def _check_nms_inputs(boxes, scores, max_output_size) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """``(boxes [N, 4], scores [N] in at least float32)`` checked, with a clear error naming the bad input."""
  boxes = _check_boxes(boxes, "boxes")
  if boxes.ndim != 2:
    raise ValueError(f"boxes must have shape [N, 4] (vmap for batches); got {boxes.shape}")
  n = boxes.shape[0]
  scores = jnp.asarray(scores)
  if scores.shape != (n,):
    raise ValueError(f"scores must have shape [N] = [{n}] to match boxes; got {scores.shape}")
  if not isinstance(max_output_size, int) or max_output_size < 0:
    raise ValueError(f"max_output_size must be a static int >= 0; got {max_output_size!r}")
  return boxes, scores.astype(jnp.promote_types(scores.dtype, jnp.float32))


def _nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: Optional[jnp.ndarray], iou_threshold,
         max_output_size: int, score_threshold) -> Tuple[jnp.ndarray, jnp.ndarray]:
  boxes, scores = _check_nms_inputs(boxes, scores, max_output_size)
  n = boxes.shape[0]
  if classes is not None and jnp.shape(classes) != (n,):
    raise ValueError(f"classes must have shape [N] = [{n}] to match boxes; got {jnp.shape(classes)}")
  if n == 0 or max_output_size == 0:
    return jnp.full((max_output_size,), -1, jnp.int32), jnp.zeros((), jnp.int32)
  class_aware = classes is not None
  classes = jnp.asarray(classes) if class_aware else jnp.zeros((n,), jnp.int32)
  # The thresholds enter the kernel as arrays, so eager calls with other Python floats reuse its compilation.
  return _nms_kernel(boxes, scores, classes, _threshold_in(iou_threshold, boxes.dtype),
                     jnp.asarray(score_threshold, scores.dtype), max_output_size, class_aware)


@functools.partial(jax.jit, static_argnums=(5, 6))
def _nms_kernel(boxes, scores, classes, threshold, score_threshold, max_output_size: int, class_aware: bool):
  """The tiled greedy loop over validated inputs: ``threshold`` already in the boxes' dtype (``_threshold_in``)."""
  n = boxes.shape[0]
  order = jnp.argsort(-scores, stable=True).astype(jnp.int32)
  tile = min(_TILE, n)
  num_tiles = -(-n // tile)
  padded = num_tiles * tile
  # NaN padding boxes never suppress anything; they are never candidates either.
  sorted_boxes = jnp.pad(boxes[order], ((0, padded - n), (0, 0)), constant_values=jnp.nan)
  sorted_classes = jnp.pad(classes[order], (0, padded - n))
  candidate = jnp.pad(scores[order] > score_threshold, (0, padded - n))
  num_candidates = candidate.sum(dtype=jnp.int32)  # a prefix: NaN scores sort last
  # At least two tiles: with a one-tile buffer XLA:CPU compiles the chunk loop ~3x slower (measured).
  buffer_size = max(-(-min(max_output_size, n) // tile), 2) * tile
  later = jnp.arange(tile)[:, None] < jnp.arange(tile)[None, :]

  def suppression(boxes_i, classes_i, boxes_j, classes_j):
    """``[I, J]`` bool: box i would suppress box j (NaN IoU compares False)."""
    iou = _iou(boxes_i[:, None, :], boxes_j[None, :, :], eps=0.0)
    if class_aware:
      # Other classes get a NaN IoU, which never suppresses: exact at every threshold, and ~2x faster on
      # CPU than and-ing a separate equality mask (XLA keeps the select in the vectorised float loop).
      iou = jnp.where(classes_i[:, None] == classes_j[None, :], iou, jnp.nan)
    return iou > threshold

  def keep_going(state):
    t, _, _, _, count = state
    return (t < num_tiles) & (t * tile < num_candidates) & (count < max_output_size)

  def process_tile(state):
    t, kept_boxes, kept_classes, kept_index, count = state
    start = t * tile
    tile_boxes = jax.lax.dynamic_slice_in_dim(sorted_boxes, start, tile)
    tile_classes = jax.lax.dynamic_slice_in_dim(sorted_classes, start, tile)

    def by_kept_chunk(c, suppressed):
      chunk_boxes = jax.lax.dynamic_slice_in_dim(kept_boxes, c * tile, tile)
      chunk_classes = jax.lax.dynamic_slice_in_dim(kept_classes, c * tile, tile)
      # Reducing over the leading axis keeps the inner loop vectorised over the tile.
      return suppressed | suppression(chunk_boxes, chunk_classes, tile_boxes, tile_classes).any(axis=0)

    suppressed = jax.lax.fori_loop(0, (count + tile - 1) // tile, by_kept_chunk, jnp.zeros((tile,), bool))
    tile_candidates = jax.lax.dynamic_slice_in_dim(candidate, start, tile) & ~suppressed
    inside = suppression(tile_boxes, tile_classes, tile_boxes, tile_classes) & later
    keep = _resolve_tile(tile_candidates, inside)
    # Append the tile's kept boxes; slots past the buffer (beyond max_output_size) are dropped.
    slot = jnp.where(keep, count + jnp.cumsum(keep) - 1, buffer_size)
    kept_boxes = kept_boxes.at[slot].set(tile_boxes, mode="drop")
    kept_classes = kept_classes.at[slot].set(tile_classes, mode="drop")
    kept_index = kept_index.at[slot].set(order[jnp.minimum(start + jnp.arange(tile), n - 1)], mode="drop")
    return t + 1, kept_boxes, kept_classes, kept_index, count + keep.sum(dtype=jnp.int32)

  state = (jnp.zeros((), jnp.int32), jnp.full((buffer_size, 4), jnp.nan, boxes.dtype),
           jnp.zeros((buffer_size,), sorted_classes.dtype), jnp.full((buffer_size,), -1, jnp.int32),
           jnp.zeros((), jnp.int32))
  _, _, _, kept_index, count = jax.lax.while_loop(keep_going, process_tile, state)
  if buffer_size >= max_output_size:
    kept_index = kept_index[:max_output_size]
  else:
    kept_index = jnp.pad(kept_index, (0, max_output_size - buffer_size), constant_values=-1)
  return kept_index, jnp.minimum(count, max_output_size)


def nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold, max_output_size: int,
        score_threshold=-jnp.inf) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Greedy NMS: the kept boxes' indices in decreasing score order, padded to a static length.

  Args:
    boxes: ``[N, 4]`` absolute xyxy float boxes (vmap for a batch).
    scores: ``[N]`` scores.
    iou_threshold: suppress a box whose IoU with a kept higher-scored box is ``> iou_threshold``; a float or
      a traced scalar.
    max_output_size: static int, the length of the output (more kept boxes are cut, as ``keep[:k]``).
    score_threshold: only boxes with ``score > score_threshold`` are kept.

  Returns:
    ``(indices, num_valid)``: ``indices [max_output_size]`` int32 into ``boxes``, padded with -1, and the int32
    scalar count of kept ones. ``indices[:num_valid]`` equals torchvision's
    ``nms(boxes, scores, iou_threshold)[:max_output_size]`` over the candidates.
  """
  return _nms(boxes, scores, None, iou_threshold, max_output_size, score_threshold)


def batched_nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: jnp.ndarray, iou_threshold,
                max_output_size: int, score_threshold=-jnp.inf) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Class-aware NMS (torchvision.ops.batched_nms): boxes of different classes never suppress each other.

  Arguments and outputs as ``nms``, plus ``classes [N]`` int labels; the kept indices are in decreasing score
  order over all classes.
  """
  return _nms(boxes, scores, classes, iou_threshold, max_output_size, score_threshold)


def _fast_nms_sorted(boxes: jnp.ndarray, candidate: jnp.ndarray, threshold) -> jnp.ndarray:
  """Fast NMS keep mask of score-sorted ``boxes [K, 4]`` with ``candidate [K]`` bool: box j is kept iff it is
  a candidate and no candidate i < j overlaps it with IoU > ``threshold`` (one ``K x K`` IoU matrix, its
  upper triangle maxed over rows; NaN IoUs never suppress)."""
  k = boxes.shape[0]
  iou = _iou(boxes[:, None, :], boxes[None, :, :], eps=0.0)
  above = (jnp.arange(k)[:, None] < jnp.arange(k)[None, :]) & candidate[:, None]
  return candidate & ~(above & (iou > threshold)).any(axis=0)


def _top_sorted(scores: jnp.ndarray, top_k: int) -> jnp.ndarray:
  """Indices of the ``top_k`` highest scores, descending, ties lower index first (as ``nms``'s visit order)."""
  return jnp.argsort(-scores, stable=True)[:top_k].astype(jnp.int32)


def fast_nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold, max_output_size: int,
             score_threshold=-jnp.inf, top_k: Optional[int] = None) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Fast NMS (Bolya et al. 2019, YOLACT section 3.4): every box may suppress, kept or not.

  Of the ``top_k`` highest-scored boxes (all by default) with ``score > score_threshold``, box j is kept iff
  no higher-scored candidate i has ``IoU(i, j) > iou_threshold``: the column maxima of the upper triangle of
  one IoU matrix, computed at once instead of greedy NMS's sequential walk. How it differs from greedy
  ``nms``: greedy only lets *kept* boxes suppress; here a box that is itself suppressed still suppresses
  (boxes A > B > C with A~B and B~C overlapping but not A~C: greedy keeps A and C, Fast NMS only A). So its
  kept set is a subset of greedy's, equal when no suppressed box overlaps a lower-scored one above the
  threshold. IoU and threshold semantics (strict ``>``, the threshold rounded as ``nms``, NaN never
  suppresses) and the visit order (score descending, ties lower index first) are ``nms``'s.

  Args:
    boxes: ``[N, 4]`` absolute xyxy (vmap for a batch); ``scores [N]``.
    iou_threshold: float or traced scalar. ``max_output_size``: static output length.
    score_threshold: only boxes with ``score > score_threshold`` are candidates (they alone suppress).
    top_k: static; only the ``top_k`` highest-scored boxes are considered (YOLACT: 200), bounding the
      ``top_k x top_k`` IoU matrix. None: all ``N``.

  Returns:
    ``(indices [max_output_size] int32 padded with -1, num_valid)`` as ``nms``: the kept boxes in decreasing
    score order.
  """
  boxes, scores = _check_nms_inputs(boxes, scores, max_output_size)
  n = boxes.shape[0]
  if n == 0 or max_output_size == 0:
    return jnp.full((max_output_size,), -1, jnp.int32), jnp.zeros((), jnp.int32)
  order = _top_sorted(scores, n if top_k is None else min(int(top_k), n))
  keep = _fast_nms_sorted(boxes[order], scores[order] > score_threshold,
                          _threshold_in(iou_threshold, boxes.dtype))
  slot = jnp.where(keep, jnp.cumsum(keep) - 1, max_output_size)
  indices = jnp.full((max_output_size,), -1, jnp.int32).at[slot].set(order, mode="drop")
  return indices, jnp.minimum(keep.sum(dtype=jnp.int32), max_output_size)


def multiclass_fast_nms(boxes: jnp.ndarray, scores: jnp.ndarray, iou_threshold, top_k: int,
                        max_output_size: int, score_threshold=0.05) -> dict:
  """YOLACT's detection step: per class, ``fast_nms`` over the class's ``top_k`` scores; then the
  ``max_output_size`` highest-scored survivors over all classes.

  Per class c, the candidates are the boxes with ``scores[:, c] > score_threshold`` (YOLACT first drops boxes
  whose best class score is below the threshold and, with its default ``second_threshold=False``, may still
  return a surviving box at a sub-threshold score of another class; such boxes rank below every candidate and
  cannot suppress one, so the candidates' result is the same and they are simply not returned here).

  Args:
    boxes: ``[N, 4]`` absolute xyxy shared by the classes; ``scores [N, C]`` per class (no background column).
    iou_threshold, score_threshold: as ``fast_nms``. ``top_k``, ``max_output_size``: static ints.

  Returns:
    ``{'indices' [D] int32 box index into N (-1 padding), 'labels' [D] int32 class, 'scores' [D], 'valid' [D]
    bool}``, ``D = max_output_size``, in decreasing score order (ties: lower class, then lower rank).
  """
  boxes = _check_boxes(boxes, "boxes")
  scores = jnp.asarray(scores)
  if boxes.ndim != 2 or scores.ndim != 2 or scores.shape[0] != boxes.shape[0]:
    raise ValueError(f"boxes must be [N, 4] and scores [N, C] with the same N; got {boxes.shape} and "
                     f"{scores.shape}")
  if not isinstance(top_k, int) or top_k < 1 or not isinstance(max_output_size, int) or max_output_size < 0:
    raise ValueError(f"top_k must be a static int >= 1 and max_output_size a static int >= 0; got {top_k!r}, "
                     f"{max_output_size!r}")
  n, classes = scores.shape
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
  if n == 0 or classes == 0:
    return {"indices": jnp.full((max_output_size,), -1, jnp.int32),
            "labels": jnp.zeros((max_output_size,), jnp.int32),
            "scores": jnp.zeros((max_output_size,), scores.dtype), "valid": jnp.zeros((max_output_size,), bool)}
  k = min(top_k, n)
  threshold = _threshold_in(iou_threshold, boxes.dtype)

  def per_class(class_scores):
    order = _top_sorted(class_scores, k)
    ranked = class_scores[order]
    return order, jnp.where(_fast_nms_sorted(boxes[order], ranked > score_threshold, threshold), ranked, -jnp.inf)

  order, kept_scores = jax.vmap(per_class)(scores.T)  # [C, k] each
  flat = kept_scores.reshape(-1)
  best = _top_sorted(flat, min(max_output_size, flat.shape[0]))
  pad = max_output_size - best.shape[0]
  valid = jnp.pad(flat[best] > -jnp.inf, (0, pad))
  best = jnp.pad(best, (0, pad))
  return {"indices": jnp.where(valid, order.reshape(-1)[best], -1),
          "labels": jnp.where(valid, best // k, 0).astype(jnp.int32),
          "scores": jnp.where(valid, flat[best], 0.0), "valid": valid}


callable_module(__name__, nms)  # `cvjax.ops.nms(...)` calls the op; the module stays reachable
