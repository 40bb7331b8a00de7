"""Box formats, areas, IoU / GIoU and the Faster R-CNN box coder (torchvision semantics).

Conventions: boxes are ``[..., 4]`` float arrays. ``xyxy`` is ``(x1, y1, x2, y2)`` in absolute (or
normalised) coordinates with areas ``(x2 - x1) * (y2 - y1)`` -- no ``+1`` -- as in torchvision. ``xywh`` is
``(x1, y1, w, h)`` and ``cxcywh`` is ``(cx, cy, w, h)`` (DETR). Every function accepts leading batch
dimensions, is jit-able and vmap-able, and is differentiable.

Degenerate boxes (zero area, or ``x2 < x1``, invalid input for DETR: facebookresearch/detr#101): torchvision
divides ``0 / 0`` into NaN there. Here each IoU / GIoU denominator is floored at ``eps`` (default ``1e-7``),
so such pairs give a finite IoU (0 for two empty boxes) and finite gradients, while every pair whose union and
enclosing area are at least ``eps`` gets torchvision's value unchanged. ``eps=0`` reproduces torchvision
exactly, NaN included (``nms`` relies on that).
"""

from __future__ import annotations

import math
from typing import Sequence, Tuple

import jax.numpy as jnp

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")
DEFAULT_EPS = 1e-7
# torchvision's BoxCoder clamps the log-scale deltas at log(1000 / 16) so exp() cannot overflow.
DEFAULT_SCALE_CLAMP = math.log(1000.0 / 16)


def _check_boxes(boxes: jnp.ndarray, name: str) -> jnp.ndarray:
  boxes = jnp.asarray(boxes)
  if boxes.ndim < 1 or boxes.shape[-1] != 4:
    raise ValueError(f"{name} must have shape [..., 4]; got shape {boxes.shape}")
  if not jnp.issubdtype(boxes.dtype, jnp.floating):
    boxes = boxes.astype(jnp.float32)
  return boxes


def box_convert(boxes: jnp.ndarray, in_fmt: str, out_fmt: str) -> jnp.ndarray:
  """Converts ``[..., 4]`` boxes between ``'xyxy'``, ``'xywh'`` and ``'cxcywh'`` (torchvision.ops.box_convert)."""
  for name, fmt in (("in_fmt", in_fmt), ("out_fmt", out_fmt)):
    if fmt not in BOX_FORMATS:
      raise ValueError(f"{name} must be one of {BOX_FORMATS}; got {fmt!r}")
  boxes = _check_boxes(boxes, "boxes")
  if in_fmt == out_fmt:
    return boxes
  a, b, c, d = jnp.unstack(boxes, axis=-1)
  if in_fmt == "xywh":
    a, b, c, d = a, b, a + c, b + d
  elif in_fmt == "cxcywh":
    a, b, c, d = a - 0.5 * c, b - 0.5 * d, a + 0.5 * c, b + 0.5 * d
  # (a, b, c, d) is now xyxy.
  if out_fmt == "xywh":
    a, b, c, d = a, b, c - a, d - b
  elif out_fmt == "cxcywh":
    a, b, c, d = (a + c) / 2, (b + d) / 2, c - a, d - b
  return jnp.stack([a, b, c, d], axis=-1)


def box_area(boxes: jnp.ndarray) -> jnp.ndarray:
  """Areas ``(x2 - x1) * (y2 - y1)`` of ``[..., 4]`` xyxy boxes, shape ``[...]`` (negative if inverted)."""
  boxes = _check_boxes(boxes, "boxes")
  return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def _floor(x: jnp.ndarray, eps: float) -> jnp.ndarray:
  # A static branch keeps eps=0 bit-exact with torchvision, NaN for 0 / 0 included.
  return jnp.maximum(x, eps) if eps > 0 else x


def _iou_terms(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """(intersection, union, enclosing area) of broadcastable xyxy boxes, in torchvision's operation order.

  Coordinates are handled one at a time (no ``[..., 2]`` slices) so XLA vectorises the pairwise ``[N, M]``
  loops: about 10x faster on CPU than the same math on ``[N, M, 2]`` intermediates.
  """
  x1, y1, x2, y2 = (boxes1[..., k] for k in range(4))
  u1, v1, u2, v2 = (boxes2[..., k] for k in range(4))
  area1, area2 = (x2 - x1) * (y2 - y1), (u2 - u1) * (v2 - v1)
  inter = (jnp.maximum(jnp.minimum(x2, u2) - jnp.maximum(x1, u1), 0)
           * jnp.maximum(jnp.minimum(y2, v2) - jnp.maximum(y1, v1), 0))
  union = area1 + area2 - inter
  enclosing = (jnp.maximum(jnp.maximum(x2, u2) - jnp.minimum(x1, u1), 0)
               * jnp.maximum(jnp.maximum(y2, v2) - jnp.minimum(y1, v1), 0))
  return inter, union, enclosing


def _pairwise(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  boxes1, boxes2 = _check_boxes(boxes1, "boxes1"), _check_boxes(boxes2, "boxes2")
  if boxes1.ndim < 2 or boxes2.ndim < 2:
    raise ValueError(f"pairwise IoU needs boxes1 [..., N, 4] and boxes2 [..., M, 4]; got shapes "
                     f"{boxes1.shape} and {boxes2.shape}")
  return boxes1[..., :, None, :], boxes2[..., None, :, :]


def _paired(boxes1: jnp.ndarray, boxes2: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
  boxes1, boxes2 = _check_boxes(boxes1, "boxes1"), _check_boxes(boxes2, "boxes2")
  if boxes1.shape != boxes2.shape:
    raise ValueError(f"elementwise IoU needs boxes1 and boxes2 of the same shape [..., 4]; got "
                     f"{boxes1.shape} and {boxes2.shape}")
  return boxes1, boxes2


def _iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float) -> jnp.ndarray:
  inter, union, _ = _iou_terms(boxes1, boxes2)
  return inter / _floor(union, eps)


def _giou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float) -> jnp.ndarray:
  inter, union, enclosing = _iou_terms(boxes1, boxes2)
  iou = inter / _floor(union, eps)
  return iou - (enclosing - union) / _floor(enclosing, eps)


def box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """Pairwise IoU of xyxy boxes ``[..., N, 4]`` x ``[..., M, 4]`` -> ``[..., N, M]`` (torchvision.ops.box_iou).

  The union is floored at ``eps`` (see the module docstring); ``eps=0`` is torchvision bit for bit.
  """
  return _iou(*_pairwise(boxes1, boxes2), eps)


def generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """Pairwise GIoU ``IoU - (C - union) / C``, ``C`` the enclosing box area: ``[..., N, M]``, in ``[-1, 1]``.

  Matches torchvision.ops.generalized_box_iou (and DETR's) for xyxy boxes; union and ``C`` are floored at
  ``eps``.
  """
  return _giou(*_pairwise(boxes1, boxes2), eps)


def elementwise_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray, eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """IoU of paired xyxy boxes ``[..., N, 4]``, ``[..., N, 4]`` -> ``[..., N]`` (the diagonal of ``box_iou``)."""
  return _iou(*_paired(boxes1, boxes2), eps)


def elementwise_generalized_box_iou(boxes1: jnp.ndarray, boxes2: jnp.ndarray,
                                    eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """GIoU of paired xyxy boxes ``[..., N, 4]``, ``[..., N, 4]`` -> ``[..., N]``."""
  return _giou(*_paired(boxes1, boxes2), eps)


def _centers_and_sizes(boxes: jnp.ndarray) -> Tuple[jnp.ndarray, ...]:
  widths = boxes[..., 2] - boxes[..., 0]
  heights = boxes[..., 3] - boxes[..., 1]
  return boxes[..., 0] + 0.5 * widths, boxes[..., 1] + 0.5 * heights, widths, heights


def _check_weights(weights: Sequence[float]) -> Tuple[float, float, float, float]:
  if len(weights) != 4:
    raise ValueError(f"weights must be 4 numbers (wx, wy, ww, wh); got {weights!r}")
  return tuple(weights)


def encode_boxes(reference_boxes: jnp.ndarray, proposals: jnp.ndarray,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)) -> jnp.ndarray:
  """Faster R-CNN regression targets ``(dx, dy, dw, dh)`` of ground truth w.r.t. proposals.

  torchvision ``BoxCoder(weights).encode_single(reference_boxes, proposals)``:
  ``dx = wx * (gt_cx - p_cx) / p_w``, ``dw = ww * log(gt_w / p_w)`` (likewise y, h).

  Args:
    reference_boxes: ``[..., 4]`` xyxy ground-truth boxes.
    proposals: ``[..., 4]`` xyxy anchors or proposals, broadcastable against ``reference_boxes``. Widths and
      heights must be positive: as in torchvision there is no eps (detectors drop empty proposals first), so an
      empty proposal gives inf / NaN codes.
    weights: ``(wx, wy, ww, wh)``; ``(10, 10, 5, 5)`` for the Faster R-CNN box head.

  Returns:
    ``[..., 4]`` codes in the dtype of the inputs.
  """
  reference_boxes = _check_boxes(reference_boxes, "reference_boxes")
  proposals = _check_boxes(proposals, "proposals")
  wx, wy, ww, wh = _check_weights(weights)
  p_cx, p_cy, p_w, p_h = _centers_and_sizes(proposals)
  g_cx, g_cy, g_w, g_h = _centers_and_sizes(reference_boxes)
  return jnp.stack([wx * (g_cx - p_cx) / p_w, wy * (g_cy - p_cy) / p_h,
                    ww * jnp.log(g_w / p_w), wh * jnp.log(g_h / p_h)], axis=-1)


def decode_boxes(rel_codes: jnp.ndarray, boxes: jnp.ndarray,
                 weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
                 clamp: float = DEFAULT_SCALE_CLAMP) -> jnp.ndarray:
  """Inverse of ``encode_boxes``: applies ``(dx, dy, dw, dh)`` codes to xyxy boxes -> ``[..., 4]`` xyxy.

  torchvision ``BoxCoder(weights, bbox_xform_clip=clamp).decode_single``: ``dw`` and ``dh`` (after dividing
  by their weights) are clamped from above at ``clamp`` before ``exp``. For per-class codes ``[N, K * 4]``
  reshape to ``[N, K, 4]`` and pass ``boxes[:, None]``.

  Args:
    rel_codes: ``[..., 4]`` codes.
    boxes: ``[..., 4]`` xyxy reference boxes (anchors / proposals), broadcastable against ``rel_codes``.
    weights: ``(wx, wy, ww, wh)`` as given to ``encode_boxes``.
    clamp: upper bound on the log-scale deltas.
  """
  rel_codes = _check_boxes(rel_codes, "rel_codes")
  boxes = _check_boxes(boxes, "boxes").astype(rel_codes.dtype)
  wx, wy, ww, wh = _check_weights(weights)
  cx, cy, w, h = _centers_and_sizes(boxes)
  dx, dy = rel_codes[..., 0] / wx, rel_codes[..., 1] / wy
  dw = jnp.minimum(rel_codes[..., 2] / ww, clamp)
  dh = jnp.minimum(rel_codes[..., 3] / wh, clamp)
  pred_cx, pred_cy = dx * w + cx, dy * h + cy
  half_w, half_h = 0.5 * (jnp.exp(dw) * w), 0.5 * (jnp.exp(dh) * h)
  return jnp.stack([pred_cx - half_w, pred_cy - half_h, pred_cx + half_w, pred_cy + half_h], axis=-1)
