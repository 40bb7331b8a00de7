"""DETR's objective (Carion et al. 2020): Hungarian matching, the set criterion and post-processing.

Reference: facebookresearch/detr ``models/matcher.py`` and ``models/detr.py`` (``SetCriterion``,
``PostProcess``), equal to HF's ``HungarianMatcher`` / ``ImageLoss`` / ``post_process_object_detection``.
Conventions: predictions and targets are normalised ``cxcywh`` relative to the real (unpadded) image region;
targets are padded to ``M = max_boxes`` with a boolean ``valid`` mask. The class head has ``num_classes + 1``
logits, the last one "no object".

Everything here runs inside the jitted train step on the *global* batch (the loop's arrays are sharded over
the mesh), so the box count that normalises the box losses is summed over all devices and processes without an
explicit collective.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from cvjax.ops.boxes import box_convert, elementwise_generalized_box_iou, generalized_box_iou
from cvjax.ops.losses import weighted_softmax_cross_entropy
from cvjax.ops.matching import match_sets
from cvjax.tasks.base import TASKS, Metrics
from cvjax.tasks.detection import DetectionTask, to_absolute_xyxy


@dataclasses.dataclass(frozen=True)
class CriterionWeights:
  """DETR's matcher and loss weights (the paper's defaults).

  Attributes:
    class_weight: matcher cost of ``-p(target class)`` and weight of the classification loss.
    bbox_weight: L1 on normalised ``cxcywh`` (matcher cost and loss).
    giou_weight: ``-GIoU`` matcher cost / ``1 - GIoU`` loss on ``xyxy``.
    eos_coef: cross-entropy class weight of "no object" (the other classes weigh 1).
  """
  class_weight: float = 1.0
  bbox_weight: float = 5.0
  giou_weight: float = 2.0
  eos_coef: float = 0.1


def match_class_cost(pred_logits: jax.Array, labels: jax.Array) -> jax.Array:
  """The matcher's class cost ``-softmax(pred_logits)[label]``, ``[B, Q, M]`` (DETR's and MaskFormer's).

  Args:
    pred_logits: ``[B, Q, K + 1]``.
    labels: ``[B, M]`` int in ``[0, K)``; padded entries may hold anything (clipped, their cost is unused).
  """
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(prob, jnp.clip(labels, 0, prob.shape[-1] - 1)[:, None, :], axis=-1)


def set_classification_loss(logits: jax.Array, match: jax.Array, labels: jax.Array, example_mask: jax.Array,
                            eos_coef: float) -> Tuple[jax.Array, jax.Array]:
  """The set criterion's classification terms given a matching (DETR's and MaskFormer's ``loss_labels``).

  Args:
    logits: ``[B, Q, K + 1]`` class logits, the last "no object".
    match: ``[B, Q]`` int32 matched target index or -1 (``match_sets``).
    labels: ``[B, M]`` int target classes in ``[0, K)``.
    example_mask: ``[B]`` bool, False for padding examples (their queries do not count).
    eos_coef: cross-entropy class weight of "no object" (the other classes weigh 1).

  Returns:
    ``(loss_ce, class_error)``: PyTorch's weighted-mean cross-entropy over all queries of the real examples
    (matched queries -> their target's class, the rest -> "no object"), and the percentage of matched queries
    whose argmax over all ``K + 1`` logits is not their target's class (no gradient; 0 when none matched).
  """
  num_classes = logits.shape[-1] - 1
  matched = match >= 0
  matched_labels = jnp.take_along_axis(labels, jnp.maximum(match, 0), axis=1)
  target_classes = jnp.where(matched, matched_labels, num_classes)
  class_weights = jnp.ones((num_classes + 1,), jnp.float32).at[num_classes].set(eos_coef)
  query_mask = jnp.broadcast_to(example_mask[:, None], target_classes.shape)
  loss_ce = weighted_softmax_cross_entropy(logits.astype(jnp.float32), target_classes, class_weights,
                                           mask=query_mask)
  # As DETR logs it: a matched query that predicts "no object" counts as wrong.
  correct = (jnp.argmax(logits, -1) == matched_labels) & matched
  return loss_ce, 100.0 * (1.0 - correct.sum() / jnp.maximum(matched.sum(), 1))


def hungarian_match(pred_logits: jax.Array, pred_boxes: jax.Array, boxes: jax.Array, labels: jax.Array,
                    valid: jax.Array, weights: CriterionWeights = CriterionWeights(),
                    backend: str = "auto") -> jax.Array:
  """DETR's matcher: per query, the index of its target or -1.

  Cost ``[B, Q, M] = class_weight * -softmax(logits)[label] + bbox_weight * L1(cxcywh)
  + giou_weight * -GIoU(xyxy)``, solved exactly per image over the valid targets (``cvjax.ops.match_sets``).

  Args:
    pred_logits: ``[B, Q, K + 1]``.
    pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
    boxes: ``[B, M, 4]`` target boxes, normalised cxcywh.
    labels: ``[B, M]`` int target classes in ``[0, K)``.
    valid: ``[B, M]`` bool, real targets.
    weights: matcher weights.
    backend: ``match_sets`` backend ('auto' | 'jax' | 'scipy').

  Returns:
    ``[B, Q]`` int32 target index in ``[0, M)`` or -1 (unmatched), without gradient.
  """
  pred_logits, pred_boxes = jax.lax.stop_gradient((pred_logits, pred_boxes))
  class_cost = match_class_cost(pred_logits, labels)
  l1_cost = jnp.abs(pred_boxes[:, :, None, :] - boxes[:, None, :, :]).sum(-1)
  giou_cost = -generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                   box_convert(boxes, "cxcywh", "xyxy"))
  cost = (weights.class_weight * class_cost + weights.bbox_weight * l1_cost
          + weights.giou_weight * giou_cost)
  # The train loop's batch axis: on a mesh, each device's images go to its own host's scipy.
  return match_sets(cost, valid, backend=backend, batch_axis="data")


def _layer_losses(logits: jax.Array, pred_boxes: jax.Array, boxes: jax.Array, labels: jax.Array,
                  valid: jax.Array, example_mask: jax.Array, num_boxes: jax.Array, weights: CriterionWeights,
                  backend: str) -> Dict[str, jax.Array]:
  """The three DETR losses of one decoder layer's predictions (see `detr_loss`)."""
  valid = valid & example_mask[:, None]
  match = hungarian_match(logits, pred_boxes, boxes, labels, valid, weights, backend)  # [B, Q]
  loss_ce, class_error = set_classification_loss(logits, match, labels, example_mask, weights.eos_coef)
  matched = match >= 0
  index = jnp.maximum(match, 0)
  target_boxes = jnp.take_along_axis(boxes, index[..., None], axis=1)  # [B, Q, 4]
  pair = matched.astype(jnp.float32)
  pred_boxes = pred_boxes.astype(jnp.float32)
  loss_bbox = (jnp.abs(pred_boxes - target_boxes).sum(-1) * pair).sum() / num_boxes
  giou = elementwise_generalized_box_iou(box_convert(pred_boxes, "cxcywh", "xyxy"),
                                         box_convert(target_boxes, "cxcywh", "xyxy"))
  loss_giou = ((1.0 - giou) * pair).sum() / num_boxes
  return {"loss_ce": loss_ce, "loss_bbox": loss_bbox, "loss_giou": loss_giou, "class_error": class_error}


def detr_loss(outputs: Mapping[str, Any], batch: Mapping[str, jax.Array],
              weights: CriterionWeights = CriterionWeights(), matcher_backend: str = "auto"
              ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """DETR's set criterion on the final and every auxiliary decoder output.

  Per layer: weighted cross-entropy over all queries (matched queries -> their target's class, the rest ->
  "no object" with weight ``eos_coef``; PyTorch's weighted mean), plus over matched pairs the L1 distance of
  the cxcywh boxes and ``1 - GIoU``, each summed and divided by the number of valid target boxes in the
  global batch (at least 1). Total = sum over layers of ``class_weight * ce + bbox_weight * l1 +
  giou_weight * (1 - giou)``.

  Args:
    outputs: the model's ``{'pred_logits': [B, Q, K + 1], 'pred_boxes': [B, Q, 4], 'aux_outputs': [...]}``.
    batch: ``boxes [B, M, 4]`` normalised cxcywh, ``labels [B, M]`` int, ``valid [B, M]`` bool, optional
      ``mask [B]`` bool (False = a padding example, ignored entirely).
    weights: matcher and loss weights.
    matcher_backend: ``cvjax.ops.match_sets`` backend.

  Returns:
    ``(loss, terms)``: the scalar total and the final layer's ``loss_ce``, ``loss_bbox`` (unweighted L1),
    ``loss_giou``, ``class_error`` (percent of matched queries with the wrong class) and ``num_boxes``.
  """
  boxes = jnp.asarray(batch["boxes"], jnp.float32)
  labels = jnp.asarray(batch["labels"], jnp.int32)
  valid = jnp.asarray(batch["valid"], bool)
  if boxes.ndim != 3 or boxes.shape[-1] != 4 or labels.shape != boxes.shape[:2] or valid.shape != labels.shape:
    raise ValueError(f"batch boxes must be [B, M, 4] with labels and valid [B, M]; got boxes {boxes.shape}, "
                     f"labels {labels.shape}, valid {valid.shape}")
  example_mask = jnp.asarray(batch.get("mask", jnp.ones(boxes.shape[:1], bool)), bool)
  num_boxes = jnp.maximum((valid & example_mask[:, None]).sum().astype(jnp.float32), 1.0)
  layers = [outputs] + list(outputs.get("aux_outputs", []))
  total = jnp.zeros((), jnp.float32)
  final = None
  for layer in layers:
    terms = _layer_losses(layer["pred_logits"], layer["pred_boxes"], boxes, labels, valid, example_mask,
                          num_boxes, weights, matcher_backend)
    total = total + (weights.class_weight * terms["loss_ce"] + weights.bbox_weight * terms["loss_bbox"]
                     + weights.giou_weight * terms["loss_giou"])
    final = terms if final is None else final
  return total, dict(final, num_boxes=num_boxes)


def postprocess(pred_logits: jax.Array, pred_boxes: jax.Array,
                image_size: jax.Array) -> Dict[str, jax.Array]:
  """DETR inference: per query the most likely real class, its probability, and an absolute xyxy box.

  Args:
    pred_logits: ``[B, Q, K + 1]`` (the last class is "no object": softmax over all, then dropped).
    pred_boxes: ``[B, Q, 4]`` normalised cxcywh.
    image_size: ``[B, 2]`` (height, width) the boxes are scaled to, e.g. the original image size.

  Returns:
    ``scores [B, Q]`` float32, ``labels [B, Q]`` int32 in ``[0, K)``, ``boxes [B, Q, 4]`` absolute xyxy.
  """
  prob = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., :-1]
  return {"scores": prob.max(-1), "labels": prob.argmax(-1).astype(jnp.int32),
          "boxes": to_absolute_xyxy(pred_boxes, image_size)}


@TASKS.register("detr")
@TASKS.register("detection")  # the name in configs written before the tasks were split per objective
class DETRTask(DetectionTask):
  """DETR set prediction. Config keys ``task.{class_weight, bbox_weight, giou_weight, eos_coef,
  matcher_backend, num_visualizations}``.

  Batch keys: ``image [B, H, W, 3]``, ``pixel_mask [B, H, W]``, ``boxes [B, M, 4]`` normalised cxcywh,
  ``labels [B, M]``, ``valid [B, M]``, ``area [B, M]`` (annotation areas in original pixels, for COCO's size
  ranges), ``image_id [B]``, ``orig_size [B, 2]`` (h, w), ``mask [B]``.
  """

  def __init__(self, config, num_classes, class_names, category_ids=None, ground_truth=None, things=()):
    super().__init__(config, num_classes, class_names, category_ids, ground_truth, things)
    task = config.task
    self.weights = CriterionWeights(
        class_weight=float(task.get("class_weight", 1.0)), bbox_weight=float(task.get("bbox_weight", 5.0)),
        giou_weight=float(task.get("giou_weight", 2.0)), eos_coef=float(task.get("eos_coef", 0.1)))
    self.matcher_backend = task.get("matcher_backend", "auto")

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    loss, terms = detr_loss(outputs, batch, self.weights, self.matcher_backend)
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    return loss, metrics

  def detections(self, outputs, batch) -> Dict[str, jax.Array]:
    """Every query is a detection (``valid`` all True), as DETR's evaluation keeps all 100."""
    detections = postprocess(outputs["pred_logits"], outputs["pred_boxes"], batch["orig_size"])
    return dict(detections, valid=jnp.ones(detections["scores"].shape, bool))
