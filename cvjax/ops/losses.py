"""Detection losses as pure jnp functions: focal, dice, GIoU, smooth-L1 and class-weighted cross-entropy.

Each follows a named reference (torchvision / PyTorch / DETR) including its default ``reduction``; ``'none'``
returns the elementwise (or per-row) loss, ``'mean'`` and ``'sum'`` reduce over all of it. ``'mean'`` over
zero elements (no boxes, no masks: an image without objects) is 0 with a zero gradient, not NaN, as in
torchvision's ``generalized_box_iou_loss`` (PyTorch's own ``mean`` of an empty tensor is NaN). All are jit-able,
vmap-able and differentiable with stable log-space formulations.
"""

from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp

from cvjax.ops.boxes import DEFAULT_EPS, elementwise_generalized_box_iou

REDUCTIONS = ("none", "mean", "sum")


def _reduce(loss: jnp.ndarray, reduction: str) -> jnp.ndarray:
  if reduction == "none":
    return loss
  if reduction == "mean":
    # Shapes are static, so this is a trace-time branch: the empty sum is an exact 0 whose gradient is zero,
    # where mean() would divide it by 0 (NaN, poisoning a total loss that adds it).
    return loss.mean() if loss.size else loss.sum()
  if reduction == "sum":
    return loss.sum()
  raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")


def _same_shape(a: jnp.ndarray, b: jnp.ndarray, names: str) -> None:
  if jnp.shape(a) != jnp.shape(b):
    raise ValueError(f"{names} must have the same shape; got {jnp.shape(a)} and {jnp.shape(b)}")


def sigmoid_focal_loss(logits: jnp.ndarray, targets: jnp.ndarray, alpha: float = 0.25, gamma: float = 2.0,
                       reduction: str = "none") -> jnp.ndarray:
  """Focal loss of RetinaNet (torchvision.ops.sigmoid_focal_loss), elementwise on any shape.

  ``loss = alpha_t * (1 - p_t) ** gamma * BCE(logits, targets)`` with ``p = sigmoid(logits)``,
  ``p_t = p * t + (1 - p) * (1 - t)`` and ``alpha_t = alpha * t + (1 - alpha) * (1 - t)``; ``alpha < 0``
  disables the alpha weighting.

  Args:
    logits: float array of any shape.
    targets: same shape, binary labels (soft labels in [0, 1] also work).
    alpha: positive-class weight in [0, 1], or negative for none.
    gamma: focusing exponent >= 0.
    reduction: ``'none'`` (default, as torchvision), ``'mean'`` (0 for empty inputs, where torchvision gives
      NaN) or ``'sum'``.
  """
  _same_shape(logits, targets, "logits and targets")
  logits = jnp.asarray(logits)
  targets = jnp.asarray(targets, logits.dtype)
  prob = jax.nn.sigmoid(logits)
  # Stable BCE-with-logits: max(x, 0) - x * t + log(1 + exp(-|x|)).
  ce = jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  # gamma == 0 skips the factor: d/dx x**0 at x = 0 would be 0 * inf = NaN where p_t saturates to 1.
  loss = ce * (1 - p_t) ** gamma if gamma != 0 else ce
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return _reduce(loss, reduction)


def dice_loss(inputs: jnp.ndarray, targets: jnp.ndarray, from_logits: bool = True, smooth: float = 1.0,
              reduction: str = "none") -> jnp.ndarray:
  """Soft dice loss per mask, DETR's panoptic ``dice_loss`` (without its division by ``num_boxes``).

  Each row is flattened: ``1 - (2 * sum(p * t) + smooth) / (sum(p) + sum(t) + smooth)``.

  Args:
    inputs: ``[N, ...]`` mask logits (``from_logits=True``, the DETR convention: sigmoid is applied here) or
      probabilities in [0, 1] (``from_logits=False``).
    targets: ``[N, ...]`` binary (or soft) masks, same shape.
    from_logits: whether ``inputs`` are logits.
    smooth: additive smoothing of numerator and denominator (DETR: 1).
    reduction: ``'none'`` -> ``[N]`` (default), ``'mean'`` or ``'sum'`` over masks; DETR's value is
      ``dice_loss(..., reduction='sum') / num_boxes``. ``N = 0`` gives ``[0]``, and 0 for ``'mean'``.
  """
  _same_shape(inputs, targets, "inputs and targets")
  inputs = jnp.asarray(inputs)
  if inputs.ndim < 1:
    raise ValueError("inputs must have shape [N, ...]; got a scalar")
  probs = jax.nn.sigmoid(inputs) if from_logits else inputs
  # The row size spelled out: reshape(0, -1) cannot infer it when N = 0.
  probs = probs.reshape(probs.shape[0], math.prod(probs.shape[1:]))
  targets = jnp.asarray(targets, probs.dtype).reshape(probs.shape)
  numerator = 2 * (probs * targets).sum(axis=-1)
  denominator = probs.sum(axis=-1) + targets.sum(axis=-1)
  return _reduce(1 - (numerator + smooth) / (denominator + smooth), reduction)


def giou_loss(boxes1: jnp.ndarray, boxes2: jnp.ndarray, reduction: str = "none",
              eps: float = DEFAULT_EPS) -> jnp.ndarray:
  """``1 - GIoU`` of paired xyxy boxes ``[..., 4]`` -> ``[...]`` (torchvision.ops.generalized_box_iou_loss).

  Values lie in [0, 2]. Denominators are floored at ``eps`` (see cvjax.ops.boxes); torchvision instead adds
  its ``eps=1e-7`` to them, a relative difference of about ``eps / area`` on non-degenerate boxes.
  ``reduction='mean'`` of no boxes (``[0, 4]``) is 0, as in torchvision.
  """
  return _reduce(1 - elementwise_generalized_box_iou(boxes1, boxes2, eps=eps), reduction)


def smooth_l1_loss(inputs: jnp.ndarray, targets: jnp.ndarray, beta: float = 1.0,
                   reduction: str = "mean") -> jnp.ndarray:
  """Huber-style smooth L1 (``torch.nn.functional.smooth_l1_loss``), elementwise on any shape.

  ``0.5 * d**2 / beta`` where ``|d| < beta``, else ``|d| - 0.5 * beta``; ``beta = 0`` is exactly L1.
  Default reduction ``'mean'`` as in PyTorch, except that the mean of empty inputs is 0 (PyTorch: NaN).
  """
  _same_shape(inputs, targets, "inputs and targets")
  if beta < 0:
    raise ValueError(f"beta must be >= 0; got {beta}")
  diff = jnp.asarray(inputs) - jnp.asarray(targets)
  # |d| as d * sign(d): same value, and gradient sign(d) = 0 at d = 0 like PyTorch (jnp.abs gives 1 there).
  diff = diff * jnp.sign(diff)
  if beta == 0:
    return _reduce(diff, reduction)
  return _reduce(jnp.where(diff < beta, 0.5 * diff**2 / beta, diff - 0.5 * beta), reduction)


def weighted_softmax_cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray,
                                   class_weights: Optional[jnp.ndarray] = None,
                                   mask: Optional[jnp.ndarray] = None, reduction: str = "mean") -> jnp.ndarray:
  """Softmax cross-entropy with per-class weights (``F.cross_entropy(logits, labels, weight=w)``).

  Per element ``w[y] * -log_softmax(logits)[y]``. ``'mean'`` is PyTorch's weighted mean
  ``sum(w[y] * nll) / sum(w[y])`` over the unmasked elements -- DETR's classification loss with
  ``w[no_object] = eos_coef`` -- and is 0 (not NaN) when that weight sum is 0, e.g. everything masked.

  Args:
    logits: ``[..., C]`` float logits.
    labels: ``[...]`` int class indices in ``[0, C)`` (an out-of-range label gives a NaN loss).
    class_weights: ``[C]`` weights, or None for 1.
    mask: ``[...]`` bool (or 0/1) of elements that count, or None for all -- for padding, like PyTorch's
      ``ignore_index``.
    reduction: ``'mean'`` (default, weighted mean), ``'sum'`` (weighted sum) or ``'none'`` (``[...]``
      weighted per-element losses, 0 where masked).
  """
  logits = jnp.asarray(logits)
  labels = jnp.asarray(labels)
  if logits.ndim < 1 or labels.shape != logits.shape[:-1]:
    raise ValueError(f"labels must have shape logits.shape[:-1]; got logits {logits.shape}, labels {labels.shape}")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices; got dtype {labels.dtype}")
  num_classes = logits.shape[-1]
  nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[..., None], axis=-1)[..., 0]
  if class_weights is None:
    weight = jnp.ones(labels.shape, nll.dtype)
  else:
    class_weights = jnp.asarray(class_weights, nll.dtype)
    if class_weights.shape != (num_classes,):
      raise ValueError(f"class_weights must have shape [C] = [{num_classes}]; got {class_weights.shape}")
    weight = class_weights[labels]
  if mask is not None:
    if jnp.shape(mask) != labels.shape:
      raise ValueError(f"mask must have the shape of labels {labels.shape}; got {jnp.shape(mask)}")
    weight = jnp.where(jnp.asarray(mask, bool), weight, 0)
  loss = weight * nll
  if reduction != "mean":
    return _reduce(loss, reduction)
  total_weight = weight.sum()
  return jnp.where(total_weight > 0, loss.sum() / jnp.where(total_weight > 0, total_weight, 1), 0)
