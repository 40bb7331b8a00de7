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


def _nms(boxes: jnp.ndarray, scores: jnp.ndarray, classes: Optional[jnp.ndarray], iou_threshold,
         max_output_size: int, score_threshold) -> Tuple[jnp.ndarray, jnp.ndarray]:
  boxes = _check_boxes(boxes, "boxes")
  if boxes.ndim != 2:
    raise ValueError(f"boxes must have shape [N, 4] (vmap for batches); got {boxes.shape}")
  n = boxes.shape[0]
  scores = jnp.asarray(scores)
  if scores.shape != (n,):
    raise ValueError(f"scores must have shape [N] = [{n}] to match boxes; got {scores.shape}")
  if classes is not None and jnp.shape(classes) != (n,):
    raise ValueError(f"classes must have shape [N] = [{n}] to match boxes; got {jnp.shape(classes)}")
  if not isinstance(max_output_size, int) or max_output_size < 0:
    raise ValueError(f"max_output_size must be a static int >= 0; got {max_output_size!r}")
  if n == 0 or max_output_size == 0:
    return jnp.full((max_output_size,), -1, jnp.int32), jnp.zeros((), jnp.int32)
  scores = scores.astype(jnp.promote_types(scores.dtype, jnp.float32))
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


callable_module(__name__, nms)  # `cvjax.ops.nms(...)` calls the op; the module stays reachable
