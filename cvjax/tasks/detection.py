"""What every object-detection task shares: eval outputs in one convention, and the one COCO evaluator.

A detection task (DETR's set prediction, and the region-based and one-stage families after it) subclasses
``DetectionTask`` and implements ``detections(outputs, batch)``: per image, padded, ``boxes [B, D, 4]``
absolute ``xyxy`` in original-image pixels, ``scores [B, D]``, ``labels [B, D]`` (0-based object classes, no
background) and ``valid [B, D]``. ``eval_outputs`` adds what the evaluator reads, and ``evaluator`` builds
``cvjax.evaluation.detection.DetectionEvaluator``: against the dataset's own ground truth when it has one
(a COCO annotation file: every annotation, crowds as ignore regions), otherwise (generated data) against the
boxes of the evaluation batches.

Detection batches (``cvjax.data.pipeline``): ``boxes [B, M, 4]`` normalised ``cxcywh`` of the real image
region, ``labels [B, M]``, ``valid [B, M]``, ``area [B, M]``, ``image_id [B]``, ``orig_size [B, 2]`` (h, w),
``mask [B]``.
"""

from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp

from cvjax.evaluation.detection import DetectionEvaluator
from cvjax.ops.boxes import box_convert
from cvjax.tasks.base import Task


def to_absolute_xyxy(boxes: jax.Array, image_size: jax.Array) -> jax.Array:
  """Normalised ``cxcywh`` ``[B, N, 4]`` -> absolute ``xyxy`` ``[B, N, 4]`` float32 in pixels of
  ``image_size [B, 2]`` (height, width) per image."""
  height, width = (image_size[:, i].astype(jnp.float32) for i in (0, 1))
  scale = jnp.stack([width, height, width, height], axis=-1)[:, None, :]
  return box_convert(boxes.astype(jnp.float32), "cxcywh", "xyxy") * scale


def real_sizes(batch: Dict[str, jax.Array]) -> jax.Array:
  """``[B, 2]`` int (height, width) of each image's real region, from the batch's ``pixel_mask [B, H, W]``."""
  return jnp.stack([batch["pixel_mask"].any(2).sum(1), batch["pixel_mask"].any(1).sum(1)], -1)


class DetectionTask(Task):
  """Base of the detection tasks. Config key ``task.num_visualizations`` (images drawn per evaluation).

  Subclasses implement ``loss`` and ``detections``; ``model_inputs`` passes ``pixel_mask`` when the batch has
  one, for models that need it.
  """

  def model_inputs(self, batch):
    return (batch["image"],), {"pixel_mask": batch["pixel_mask"]}

  def detections(self, outputs: Any, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """``{'boxes' [B, D, 4] xyxy original pixels, 'scores' [B, D], 'labels' [B, D] int32, 'valid' [B, D]}``."""
    raise NotImplementedError

  def eval_outputs(self, outputs, batch) -> Dict[str, jax.Array]:
    """The detections plus ``image_id``, ``orig_size`` and ``mask``; without dataset ground truth also the
    batch's boxes as ``gt_boxes`` (absolute xyxy), ``gt_labels``, ``gt_valid`` and ``gt_area``."""
    result = dict(self.detections(outputs, batch), image_id=batch["image_id"], orig_size=batch["orig_size"],
                  mask=batch["mask"])
    if self.ground_truth is None:
      result.update(gt_boxes=to_absolute_xyxy(batch["boxes"], batch["orig_size"]),
                    gt_labels=batch["labels"].astype(jnp.int32), gt_valid=batch["valid"],
                    gt_area=batch["area"].astype(jnp.float32))
    return result

  def evaluator(self) -> DetectionEvaluator:
    return DetectionEvaluator(self.class_names, category_ids=self.category_ids,
                              num_visualizations=int(self.config.task.get("num_visualizations", 4)),
                              ground_truth=self.ground_truth)


class AnchorDetectionTask(DetectionTask):
  """Base of the detectors that take padded ground truth in input pixels and return detections there (the
  region-based and one-stage families): ``model_inputs`` adds ``gt_boxes`` (absolute xyxy of each image's real
  region), ``gt_labels``, ``gt_valid`` and, when the batch has them, ``gt_masks``; ``detections`` scales the
  model's ``boxes`` to original-image pixels."""

  def model_inputs(self, batch):
    """Images, the pixel mask and (when the batch has them) the targets as the model takes them: boxes in
    absolute xyxy input pixels of each image's real region."""
    kwargs = {"pixel_mask": batch["pixel_mask"]}
    if "boxes" not in batch:  # e.g. an image-only batch for init or inference
      return (batch["image"],), kwargs
    sizes = real_sizes(batch)
    kwargs.update(gt_boxes=to_absolute_xyxy(batch["boxes"], sizes), gt_labels=batch["labels"],
                  gt_valid=batch["valid"])
    if "masks" in batch:
      kwargs["gt_masks"] = batch["masks"]
    return (batch["image"],), kwargs

  def eval_outputs(self, outputs, batch) -> Dict[str, jax.Array]:
    """The detection task's outputs, plus (generated data, instance-segmentation models) the batch's masks
    as ``gt_masks`` with their real region's ``input_size`` for the segm ground truth."""
    result = super().eval_outputs(outputs, batch)
    if self.ground_truth is None and "masks" in batch and "mask_probs" in outputs:
      result["gt_masks"] = batch["masks"]
      result["input_size"] = real_sizes(batch)
    return result

  def detections(self, outputs, batch) -> Dict[str, jax.Array]:
    """The model's detections with boxes scaled from input pixels to original-image pixels."""
    real = real_sizes(batch)
    scale = batch["orig_size"].astype(jnp.float32) / jnp.maximum(real.astype(jnp.float32), 1.0)
    boxes = outputs["boxes"] * jnp.stack([scale[:, 1], scale[:, 0]] * 2, -1)[:, None, :]
    result = {"boxes": boxes, "scores": outputs["scores"], "labels": outputs["labels"], "valid": outputs["valid"]}
    if "mask_probs" in outputs:
      result["mask_probs"] = outputs["mask_probs"]
    return result


def __getattr__(name: str):
  # DETR's criterion lived here before the tasks were split one per objective: keep its names importable.
  if name in ("CriterionWeights", "detr_loss", "hungarian_match", "postprocess"):
    from cvjax.tasks import detr  # pylint: disable=import-outside-toplevel
    return getattr(detr, name)
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
