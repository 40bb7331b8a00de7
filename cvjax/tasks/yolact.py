"""YOLACT's objective (Bolya et al. 2019; the official ``MultiBoxLoss`` with the paper's weights).

The model (``cvjax.models.detection.yolact``) matches anchors, picks the mask-trained positives and assembles
their mask logits and targets inside the jitted step; the terms here are pure functions of what it returns.
With ``P`` the positive anchors of the batch's real images (every term but the semantic one is divided by
``max(1, P)``; the semantic one by the number of real images):

  classification  softmax cross-entropy (background at index 0) over the positives and, per image, the
                  ``negpos_ratio`` x (its positives) background anchors with the highest background loss
                  (online hard negative mining; anchors between the thresholds never count), summed;
  box             ``box_weight`` (1.5) x smooth-L1 (beta 1) of the positives' deltas, summed;
  mask            ``mask_weight`` (6.125) x, per trained positive, the per-pixel BCE of its mask logits
                  against the object's mask, summed over the pixels inside the object's box and divided by
                  that box's area (prototype pixels); when an image has more positives than the model trains
                  masks for, its sum is scaled by positives / trained (as the official code);
  semantic        ``semantic_weight`` (1) x per-pixel BCE of the ``C`` semantic-segmentation logits against
                  the per-class union of the object masks, summed over classes and divided by the map's pixels.

An image without objects has no positives and so no hard negatives: only its semantic term trains (on an
all-background target). Never NaN.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from cvjax.ops.losses import smooth_l1_loss
from cvjax.tasks.base import TASKS, Metrics
from cvjax.tasks.detection import AnchorDetectionTask


def hard_negatives(background_loss: jax.Array, negative: jax.Array, num_positive: jax.Array,
                   ratio: float) -> jax.Array:
  """Online hard negative mining: ``[B, N]`` bool, per image the ``floor(ratio * num_positive)`` anchors
  among ``negative [B, N]`` with the highest ``background_loss [B, N]`` (ties: lower index first)."""
  ranked = jnp.where(negative, background_loss, -jnp.inf)
  order = jnp.argsort(-ranked, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  count = jnp.floor(ratio * num_positive.astype(jnp.float32))[:, None]
  return negative & (rank < count)


def yolact_losses(outputs: Dict[str, jax.Array], example_mask: jax.Array, negpos_ratio: float = 3.0,
                  box_weight: float = 1.5, mask_weight: float = 6.125,
                  semantic_weight: float = 1.0) -> Dict[str, jax.Array]:
  """``classification``, ``box``, ``mask`` and ``semantic`` (module docstring) and ``num_positive`` (mean
  positives per real image) from the model's training outputs; ``example_mask [B]`` marks the real images."""
  images = example_mask.astype(jnp.float32)
  labels = outputs["anchor_labels"]
  positive = (labels >= 0) & example_mask[:, None]
  num_positive = positive.sum(-1)
  total = jnp.maximum(num_positive.sum().astype(jnp.float32), 1.0)
  log_probs = jax.nn.log_softmax(outputs["cls_logits"].astype(jnp.float32), -1)
  target = jnp.where(positive, labels + 1, 0)
  nll = -jnp.take_along_axis(log_probs, target[..., None], -1)[..., 0]
  negative = (labels == -1) & example_mask[:, None]
  counted = positive | hard_negatives(-log_probs[..., 0], negative, num_positive, negpos_ratio)
  classification = jnp.where(counted, nll, 0.0).sum() / total

  box = smooth_l1_loss(outputs["bbox_regression"].astype(jnp.float32), outputs["box_targets"], 1.0,
                       reduction="none").sum(-1)
  box = box_weight * jnp.where(positive, box, 0.0).sum() / total

  trained = outputs["mask_valid"] & example_mask[:, None]
  bce = optax.sigmoid_binary_cross_entropy(outputs["mask_logits"].astype(jnp.float32), outputs["mask_targets"])
  per_mask = (bce * outputs["mask_crop"]).sum((-2, -1)) / jnp.maximum(outputs["mask_box_area"], 1e-6)
  num_trained = trained.sum(-1)
  scale = num_positive / jnp.maximum(num_trained, 1)
  mask = mask_weight * (jnp.where(trained, per_mask, 0.0).sum(-1) * scale).sum() / total

  segm = optax.sigmoid_binary_cross_entropy(outputs["segm_logits"].astype(jnp.float32), outputs["segm_targets"])
  pixels = segm.shape[1] * segm.shape[2]
  semantic = semantic_weight * (segm.sum((1, 2, 3)) / pixels * images).sum() / jnp.maximum(images.sum(), 1.0)
  return {"classification": classification, "box": box, "mask": mask, "semantic": semantic,
          "num_positive": num_positive.sum() / jnp.maximum(images.sum(), 1.0)}


@TASKS.register("yolact")
class YolactTask(AnchorDetectionTask):
  """YOLACT. Config keys ``task.negpos_ratio`` (3), ``task.box_weight`` (1.5), ``task.mask_weight`` (6.125),
  ``task.semantic_weight`` (1), ``task.num_visualizations``. Batches need instance ``masks``
  (``config.dataset.masks=True``)."""

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    task = self.config.task
    example_mask = jnp.asarray(batch.get("mask", jnp.ones(batch["image"].shape[:1], bool)), bool)
    terms = yolact_losses(outputs, example_mask, float(task.get("negpos_ratio", 3.0)),
                          float(task.get("box_weight", 1.5)), float(task.get("mask_weight", 6.125)),
                          float(task.get("semantic_weight", 1.0)))
    loss = terms["classification"] + terms["box"] + terms["mask"] + terms["semantic"]
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    return loss, metrics
