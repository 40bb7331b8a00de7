"""RetinaNet's objective: sigmoid focal loss and an L1 box loss, each normalised by the image's foreground.

Reference: torchvision ``models/detection/retinanet.py`` (``RetinaNetClassificationHead.compute_loss``,
``RetinaNetRegressionHead.compute_loss``). The model (``cvjax.models.detection.retinanet``) matches anchors to
the ground truth inside the jitted step and returns ``anchor_labels`` (class, -1 background, -2 ignored) and
``box_targets``; per image ``i`` with ``F_i`` foreground anchors:

  classification_i = sum over non-ignored anchors and all K classes of focal(logit, one-hot target) / max(1, F_i)
  bbox_regression_i = sum over foreground anchors of |deltas - targets| (4 coordinates) / max(1, F_i)

and each term is the mean over the batch's real images (the global batch: arrays are sharded). ``alpha`` /
``gamma`` are Lin et al.'s (0.25 / 2; gamma 0 with alpha is alpha-balanced cross-entropy, the focal-loss
ablation's baseline). An image without objects trains its classifier on negatives only; never NaN.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp

from cvjax.ops.losses import sigmoid_focal_loss, smooth_l1_loss
from cvjax.ops.proposals import BETWEEN_THRESHOLDS
from cvjax.tasks.base import TASKS, Metrics
from cvjax.tasks.detection import AnchorDetectionTask

BOX_LOSSES = ("l1", "smooth_l1")


def retinanet_losses(outputs: Dict[str, jax.Array], example_mask: jax.Array, alpha: float = 0.25,
                     gamma: float = 2.0, box_loss: str = "l1", beta: float = 1.0) -> Dict[str, jax.Array]:
  """``classification`` and ``bbox_regression`` (module docstring) from the model's training outputs.

  Args:
    outputs: ``cls_logits [B, N, K]``, ``bbox_regression [B, N, 4]``, ``anchor_labels [B, N]``,
      ``box_targets [B, N, 4]``.
    example_mask: ``[B]`` bool, the real (not padding) images.
    alpha, gamma: focal loss parameters (``cvjax.ops.sigmoid_focal_loss``).
    box_loss: ``'l1'`` (torchvision's RetinaNet) or ``'smooth_l1'`` with ``beta``.

  Returns:
    ``{'classification', 'bbox_regression', 'num_foreground'}``: the two loss terms and the mean foreground
    anchors per image.
  """
  if box_loss not in BOX_LOSSES:
    raise ValueError(f"box_loss must be one of {BOX_LOSSES}, got {box_loss!r}")
  logits = outputs["cls_logits"].astype(jnp.float32)
  labels = outputs["anchor_labels"]
  foreground = labels >= 0
  counted = (labels != BETWEEN_THRESHOLDS).astype(jnp.float32)
  targets = jax.nn.one_hot(jnp.where(foreground, labels, -1), logits.shape[-1], dtype=jnp.float32)
  focal = sigmoid_focal_loss(logits, targets, alpha, gamma).sum(-1)
  deltas = outputs["bbox_regression"].astype(jnp.float32)
  if box_loss == "l1":
    box = jnp.abs(deltas - outputs["box_targets"]).sum(-1)
  else:
    box = smooth_l1_loss(deltas, outputs["box_targets"], beta, reduction="none").sum(-1)
  num_foreground = foreground.sum(-1).astype(jnp.float32)
  per_image = jnp.maximum(num_foreground, 1.0)
  images = example_mask.astype(jnp.float32)
  mean = lambda x: (x * images).sum() / jnp.maximum(images.sum(), 1.0)
  return {"classification": mean((focal * counted).sum(-1) / per_image),
          "bbox_regression": mean(jnp.where(foreground, box, 0.0).sum(-1) / per_image),
          "num_foreground": mean(num_foreground)}


@TASKS.register("retinanet")
class RetinaNetTask(AnchorDetectionTask):
  """RetinaNet. Config keys ``task.focal_alpha`` (0.25), ``task.focal_gamma`` (2.0), ``task.box_loss``
  (``'l1'``), ``task.box_beta`` (smooth-L1's beta, 1.0), ``task.num_visualizations``."""

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    task = self.config.task
    example_mask = jnp.asarray(batch.get("mask", jnp.ones(batch["image"].shape[:1], bool)), bool)
    terms = retinanet_losses(outputs, example_mask, float(task.get("focal_alpha", 0.25)),
                             float(task.get("focal_gamma", 2.0)), str(task.get("box_loss", "l1")),
                             float(task.get("box_beta", 1.0)))
    loss = terms["classification"] + terms["bbox_regression"]
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    return loss, metrics
