"""MaskFormer inference: semantic and panoptic maps from ``pred_logits`` / ``pred_masks``, as pure jnp functions.

Both take a model's ``pred_logits [B, Q, K + 1]`` (the last class "no object") and ``pred_masks [B, Q, h, w]``
(mask logits) and match HF ``MaskFormerImageProcessor``'s ``post_process_semantic_segmentation`` and
``post_process_panoptic_segmentation``, including where resizing happens: bilinear, ``align_corners=False``
(PyTorch's ``F.interpolate``, not antialiased) of the semantic scores, and of the mask probabilities for
panoptic maps. (The reference implementation instead upsamples the mask logits before the sigmoid.)

Static arguments (``output_size``, ``label_ids_to_fuse``) fix the shapes: ``jax.jit(functools.partial(
semantic_inference, output_size=(H, W)))``. Every image of a batch is resized to the same ``output_size``
(HF allows one per image: crop the padded predictions first, or call per image).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
  """float32 ``[out_size, in_size]`` matrix of PyTorch's 1-D bilinear resize with ``align_corners=False``.

  Output ``i`` samples ``s = max((i + 0.5) * in / out - 0.5, 0)`` (float32, as PyTorch) from its two neighbours
  ``floor(s)`` and ``min(floor(s) + 1, in - 1)`` with weights ``1 - frac(s)`` and ``frac(s)``; no antialiasing
  when shrinking (``jax.image.resize`` antialiases).
  """
  scale = np.float32(in_size) / np.float32(out_size)
  source = np.maximum((np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5),
                      np.float32(0))
  first = np.minimum(np.floor(source).astype(np.int64), in_size - 1)
  weight = source - first.astype(np.float32)
  second = np.minimum(first + 1, in_size - 1)
  matrix = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(matrix, (rows, first), 1 - weight)
  np.add.at(matrix, (rows, second), weight)
  return matrix


def resize_bilinear(x: jnp.ndarray, output_size: Optional[Sequence[int]], axes: Tuple[int, int]) -> jnp.ndarray:
  """Resizes the two ``axes`` (height, width) of ``x`` to ``output_size`` as ``F.interpolate(mode='bilinear',
  align_corners=False)``: two matrix products at full float32 precision. ``None`` returns ``x``."""
  if output_size is None:
    return x
  height_axis, width_axis = axes
  out_h, out_w = (int(s) for s in output_size)
  rows = jnp.asarray(bilinear_resize_matrix(x.shape[height_axis], out_h))
  cols = jnp.asarray(bilinear_resize_matrix(x.shape[width_axis], out_w))
  x = jnp.moveaxis(jnp.tensordot(rows, x, axes=(1, height_axis), precision=_HIGHEST), 0, height_axis)
  return jnp.moveaxis(jnp.tensordot(cols, x, axes=(1, width_axis), precision=_HIGHEST), 0, width_axis)


def _check(pred_logits: jnp.ndarray, pred_masks: jnp.ndarray) -> None:
  if pred_logits.ndim != 3 or pred_masks.ndim != 4 or pred_logits.shape[:2] != pred_masks.shape[:2]:
    raise ValueError(f"pred_logits must be [B, Q, K + 1] and pred_masks [B, Q, h, w] with the same B, Q; got "
                     f"{pred_logits.shape} and {pred_masks.shape}")


def semantic_inference(pred_logits: jnp.ndarray, pred_masks: jnp.ndarray,
                       output_size: Optional[Sequence[int]] = None) -> Dict[str, jnp.ndarray]:
  """MaskFormer's semantic inference: ``einsum(softmax(class)[..., :K], sigmoid(masks))`` per pixel.

  Args:
    pred_logits: ``[B, Q, K + 1]`` class logits.
    pred_masks: ``[B, Q, h, w]`` mask logits.
    output_size: static ``(H, W)``: the scores are resized bilinearly (``align_corners=False``) after the
      einsum, as HF; ``None`` keeps ``(h, w)``.

  Returns:
    ``{'scores': [B, H, W, K]`` float32 per-pixel class scores (HF's ``segmentation_scores``, channels
    last), ``'labels': [B, H, W]`` int32 their argmax (first class on ties, as torch)``}``. Equal to HF's
    ``post_process_semantic_segmentation(outputs, target_sizes=[(H, W)] * B)``.
  """
  _check(pred_logits, pred_masks)
  classes = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  scores = jnp.einsum("bqk,bqhw->bhwk", classes, jax.nn.sigmoid(pred_masks.astype(jnp.float32)),
                      precision=_HIGHEST)
  scores = resize_bilinear(scores, output_size, axes=(1, 2))
  return {"scores": scores, "labels": jnp.argmax(scores, axis=-1).astype(jnp.int32)}


def panoptic_inference(pred_logits: jnp.ndarray, pred_masks: jnp.ndarray,
                       output_size: Optional[Sequence[int]] = None, *, threshold: float = 0.5,
                       mask_threshold: float = 0.5, overlap_mask_area_threshold: float = 0.8,
                       label_ids_to_fuse: Sequence[int] = ()) -> Dict[str, jnp.ndarray]:
  """MaskFormer's panoptic inference, as HF's ``post_process_panoptic_segmentation``.

  Per image: each query's label and score are the argmax and max of its class softmax; queries predicting
  "no object" or scoring ``<= threshold`` are dropped. The kept queries' mask probabilities (sigmoid, resized
  bilinearly to ``output_size``) are weighted by their scores and each pixel goes to the kept query of the
  largest weighted probability. A query makes a segment when it owns some pixels, some of its weighted
  probabilities are ``>= mask_threshold`` (HF thresholds the score-weighted probabilities) and the ratio of
  the two areas is ``> overlap_mask_area_threshold``. Segments are numbered 1, 2, ... in query order; the
  queries of one label in ``label_ids_to_fuse`` (stuff) share the segment of the first of them.

  HF differs in two corner cases: it numbers a segment that follows a fused repeat from the fused segment's
  id (so two segments can share an id; here ids stay distinct), and an image without kept queries gets all
  ``-1`` (here all segment id 0, category -1).

  Args:
    pred_logits: ``[B, Q, K + 1]`` class logits.
    pred_masks: ``[B, Q, h, w]`` mask logits.
    output_size: static ``(H, W)`` of the maps, or ``None`` for ``(h, w)``.
    threshold, mask_threshold, overlap_mask_area_threshold: as HF (0.5, 0.5, 0.8).
    label_ids_to_fuse: static class ids whose queries are merged into one segment.

  Returns:
    ``{'panoptic': [B, H, W, 2]`` int32 (category id, segment id) per pixel: (-1, 0) where no segment is;
    per query, ``'segment_ids': [B, Q]`` int32 its segment (0 when it makes none), ``'labels': [B, Q]`` int32
    its class (K = no object), ``'scores': [B, Q]`` float32, ``'fused': [B, Q]`` bool its segment is a fused
    one``}``. ``segments_info`` lists the segments as HF does.
  """
  _check(pred_logits, pred_masks)
  batch, num_queries = pred_logits.shape[:2]
  num_classes = pred_logits.shape[-1] - 1
  if any(int(i) < 0 for i in label_ids_to_fuse):
    raise ValueError(f"label_ids_to_fuse must be class ids >= 0, got {tuple(label_ids_to_fuse)}")
  fuse_table = jnp.asarray(np.isin(np.arange(num_classes + 1), np.asarray(label_ids_to_fuse, np.int64)))

  probabilities = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  scores, labels = probabilities.max(-1), jnp.argmax(probabilities, axis=-1).astype(jnp.int32)
  keep = (labels != num_classes) & (scores > threshold)
  masks = resize_bilinear(jax.nn.sigmoid(pred_masks.astype(jnp.float32)), output_size, axes=(2, 3))
  weighted = masks * scores[:, :, None, None]
  # Dropped queries rank below every kept one (weighted probabilities are >= 0).
  owner = jnp.argmax(jnp.where(keep[:, :, None, None], weighted, -1.0), axis=1)  # [B, H, W]
  area = jnp.sum(owner[:, None] == jnp.arange(num_queries)[None, :, None, None], axis=(2, 3))
  original_area = jnp.sum(weighted >= mask_threshold, axis=(2, 3))
  ratio = area.astype(jnp.float32) / jnp.maximum(original_area, 1).astype(jnp.float32)
  exists = keep & (area > 0) & (original_area > 0) & (ratio > overlap_mask_area_threshold)

  fused = exists & fuse_table[labels]
  earlier = jnp.arange(num_queries)[None, :] < jnp.arange(num_queries)[:, None]  # [q, q']: q' before q
  same_stuff = fused[:, :, None] & fused[:, None, :] & (labels[:, :, None] == labels[:, None, :]) & earlier
  new = exists & ~same_stuff.any(-1)
  new_ids = jnp.cumsum(new, axis=1) * new
  first = jnp.argmax(same_stuff, axis=-1)  # the first earlier query of the same fused label
  segment_ids = jnp.where(new, new_ids, jnp.where(exists, jnp.take_along_axis(new_ids, first, axis=1), 0))

  flat_owner = owner.reshape(batch, -1)
  segment_map = jnp.take_along_axis(segment_ids, flat_owner, axis=1).reshape(owner.shape)
  category_map = jnp.where(segment_map > 0, jnp.take_along_axis(labels, flat_owner, axis=1).reshape(owner.shape), -1)
  return {"panoptic": jnp.stack([category_map, segment_map], axis=-1).astype(jnp.int32),
          "segment_ids": segment_ids.astype(jnp.int32), "labels": labels, "scores": scores, "fused": fused}


def segments_info(result: Dict[str, Any]) -> List[List[Dict[str, Any]]]:
  """Per image, HF's ``segments_info`` of a ``panoptic_inference`` result (host side): one dict ``{'id',
  'label_id', 'was_fused', 'score'}`` per query that makes or joins a segment, in query order."""
  segment_ids, labels, scores, fused = (np.asarray(result[key]) for key in ("segment_ids", "labels", "scores",
                                                                              "fused"))
  return [[{"id": int(segment_ids[b, q]), "label_id": int(labels[b, q]), "was_fused": bool(fused[b, q]),
            "score": float(scores[b, q])} for q in np.flatnonzero(segment_ids[b])]
          for b in range(segment_ids.shape[0])]
