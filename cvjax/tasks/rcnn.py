"""Faster / Mask R-CNN's objective: the RPN, box-head and mask losses with torchvision's normalisations.

Reference: torchvision ``models/detection/rpn.py`` (``RegionProposalNetwork.compute_loss``) and
``roi_heads.py`` (``fastrcnn_loss``, ``maskrcnn_loss``). The model (``cvjax.models.detection.rcnn``) assigns
and samples the targets inside the jitted step and returns them with its predictions; the losses here are
pure functions of those tensors:

  RPN:  BCE of the objectness logits over the sampled anchors + smooth-L1 (beta 1/9, summed) of the deltas of
        the sampled positives, both divided by the number of sampled anchors in the batch;
  box:  cross-entropy over the sampled RoIs (mean) + smooth-L1 (beta 1/9, summed) of the target class's deltas
        over the positive RoIs, divided by the number of sampled RoIs;
  mask: per-pixel BCE of the target class's 28x28 mask logits against the RoIAligned GT masks, mean over the
        pixels of the positive RoIs.

Every sum runs over the global batch (the train loop's arrays are sharded), so the normalisations are the
batch's, as torchvision's over its concatenated images. A batch without any sampled element (or without
positives) gives zero for that term, never NaN.
"""

from __future__ import annotations

from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import optax

from cvjax.ops.losses import smooth_l1_loss
from cvjax.tasks.base import TASKS, Metrics
from cvjax.tasks.detection import AnchorDetectionTask

BOX_BETA = 1.0 / 9.0


def _safe_mean(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.maximum(count, 1.0)


def rpn_losses(outputs: Dict[str, jax.Array], example_mask: jax.Array) -> Dict[str, jax.Array]:
  """``loss_objectness`` and ``loss_rpn_box_reg`` from the model's ``rpn_*`` outputs (module docstring)."""
  labels = jnp.where(example_mask[:, None], outputs["rpn_labels"], -1)
  sampled = (labels >= 0).astype(jnp.float32)
  positive = (labels == 1).astype(jnp.float32)
  count = sampled.sum()
  bce = optax.sigmoid_binary_cross_entropy(outputs["rpn_logits"].astype(jnp.float32),
                                           positive)
  box = smooth_l1_loss(outputs["rpn_deltas"].astype(jnp.float32), outputs["rpn_targets"], BOX_BETA,
                       reduction="none").sum(-1)
  return {"loss_objectness": _safe_mean((bce * sampled).sum(), count),
          "loss_rpn_box_reg": _safe_mean((box * positive).sum(), count)}


def box_losses(outputs: Dict[str, jax.Array], example_mask: jax.Array) -> Dict[str, jax.Array]:
  """``loss_classifier`` and ``loss_box_reg`` from the model's ``roi_*`` outputs (module docstring)."""
  labels = jnp.where(example_mask[:, None], outputs["roi_labels"], -1)
  sampled = (labels >= 0).astype(jnp.float32)
  positive = (labels > 0).astype(jnp.float32)
  count = sampled.sum()
  logits = outputs["roi_logits"].astype(jnp.float32)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  box = smooth_l1_loss(outputs["roi_deltas"].astype(jnp.float32), outputs["roi_targets"], BOX_BETA,
                       reduction="none").sum(-1)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
  return {"loss_classifier": _safe_mean((nll * sampled).sum(), count),
          "loss_box_reg": _safe_mean((box * positive).sum(), count),
          "roi_accuracy": _safe_mean((correct * sampled).sum(), count)}


def mask_loss(outputs: Dict[str, jax.Array], example_mask: jax.Array) -> jax.Array:
  """``loss_mask``: mean BCE over the 28x28 pixels of the positive RoIs (0 without positives)."""
  valid = (outputs["mask_valid"] & example_mask[:, None]).astype(jnp.float32)
  bce = optax.sigmoid_binary_cross_entropy(outputs["mask_logits"].astype(jnp.float32),
                                           outputs["mask_targets"]).mean((-2, -1))
  return _safe_mean((bce * valid).sum(), valid.sum())


@TASKS.register("rcnn")
class RCNNTask(AnchorDetectionTask):
  """Faster / Mask R-CNN. Config keys ``task.num_visualizations``.

  Batches as ``cvjax.tasks.detection`` describes, plus ``masks [B, M, H, W]`` (uint8, image frame) for Mask
  R-CNN (``config.dataset.masks=True``).
  """

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    example_mask = jnp.asarray(batch.get("mask", jnp.ones(batch["image"].shape[:1], bool)), bool)
    terms = dict(rpn_losses(outputs, example_mask), **box_losses(outputs, example_mask))
    if "mask_logits" in outputs:
      terms["loss_mask"] = mask_loss(outputs, example_mask)
    loss = sum(value for name, value in terms.items() if name.startswith("loss_"))
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    metrics["num_positive_rois"] = ((outputs["roi_labels"] > 0).sum().astype(jnp.float32), one)
    return loss, metrics

