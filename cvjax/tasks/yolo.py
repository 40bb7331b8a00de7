"""YOLOv1's objective (Redmon et al. 2016, eq. 3): one sum-squared error over the output tensor.

The model (``cvjax.models.detection.yolo``) assigns objects to cells and responsible predictors inside the
jitted step and returns the targets with its predictions; per image, over cells i and predictors j:

  coordinates    lambda_coord * sum_ij 1obj_ij [(x - x^)^2 + (y - y^)^2 + (sqrt w - sqrt w^)^2 + (sqrt h - sqrt h^)^2]
  object         sum_ij 1obj_ij (C_ij - C^_ij)^2           (C the IoU of the responsible box, or 1)
  no_object      lambda_noobj * sum_ij 1noobj_ij C^_ij^2   (every predictor that is not responsible)
  class          sum_i 1obj_i sum_c (p_i(c) - p^_i(c))^2   (one-hot targets)

with lambda_coord = 5 and lambda_noobj = 0.5; each term is the sum over the image's cells, averaged over the
batch's real images (the global batch). An image without objects trains only the no-object term; never NaN.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from cvjax.tasks.base import TASKS, Metrics
from cvjax.tasks.detection import AnchorDetectionTask


def yolo_v1_losses(outputs: Dict[str, jax.Array], example_mask: jax.Array, lambda_coord: float = 5.0,
                   lambda_noobj: float = 0.5) -> Dict[str, jax.Array]:
  """The four terms of the module docstring (``coordinates``, ``object``, ``no_object``, ``class``), each
  ``lambda``-weighted, from the model's training outputs.

  Args:
    outputs: ``predictions [B, S, S, 5 B + C]``, ``confidence [B, S, S, B]``, ``class_scores [B, S, S, C]``,
      ``object_mask [B, S, S]``, ``responsible [B, S, S, B]``, ``box_targets [B, S, S, 4]``,
      ``class_targets [B, S, S]``, ``confidence_targets [B, S, S, B]``.
    example_mask: ``[B]`` bool, the real (not padding) images.
  """
  responsible = outputs["responsible"].astype(jnp.float32)
  boxes_per_cell = responsible.shape[-1]
  predictions = outputs["predictions"].astype(jnp.float32)
  raw = predictions[..., :5 * boxes_per_cell].reshape(*predictions.shape[:3], boxes_per_cell, 5)
  coordinates = ((raw[..., :4] - outputs["box_targets"][..., None, :]) ** 2).sum(-1)
  confidence = outputs["confidence"].astype(jnp.float32)
  object_error = (confidence - outputs["confidence_targets"]) ** 2
  scores = outputs["class_scores"].astype(jnp.float32)
  class_error = ((scores - jax.nn.one_hot(outputs["class_targets"], scores.shape[-1])) ** 2).sum(-1)
  per_image = lambda x: x.reshape(x.shape[0], -1).sum(-1)
  terms = {"coordinates": lambda_coord * per_image(responsible * coordinates),
           "object": per_image(responsible * object_error),
           "no_object": lambda_noobj * per_image((1.0 - responsible) * confidence ** 2),
           "class": per_image(outputs["object_mask"].astype(jnp.float32) * class_error)}
  images = example_mask.astype(jnp.float32)
  return {name: (value * images).sum() / jnp.maximum(images.sum(), 1.0) for name, value in terms.items()}


@TASKS.register("yolo")
class YOLOTask(AnchorDetectionTask):
  """YOLOv1. Config keys ``task.lambda_coord`` (5), ``task.lambda_noobj`` (0.5), ``task.num_visualizations``."""

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    task = self.config.task
    example_mask = jnp.asarray(batch.get("mask", jnp.ones(batch["image"].shape[:1], bool)), bool)
    terms = yolo_v1_losses(outputs, example_mask, float(task.get("lambda_coord", 5.0)),
                           float(task.get("lambda_noobj", 0.5)))
    loss = sum(terms.values())
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    responsible = outputs["responsible"]
    mean_iou = (outputs["confidence_targets"] * responsible).sum() / jnp.maximum(responsible.sum(), 1)
    metrics["responsible_iou"] = (mean_iou, one)
    return loss, metrics
