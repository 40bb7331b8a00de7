"""Semantic segmentation: per-pixel softmax cross-entropy with an ignore label (and an auxiliary head);
evaluation by the split's confusion matrix (mIoU, per-class IoU, pixel accuracy) and PNGs of predictions.

Reads the model's ``{'logits': [B, H, W, K]}`` (and ``aux_logits``) and the batch's ``label_map [B, H, W]``
(255 = ignore, also on padding pixels and padding rows): see ``cvjax.data.segmentation_transforms``.

Config keys (``config.task``): ``aux_weight`` (0.5: the auxiliary head's loss weight, as torchvision's
reference scripts), ``ignore_index`` (255), ``num_visualizations`` (4 images drawn per evaluation).
"""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp

from cvjax.evaluation.segmentation import SegmentationEvaluator, confusion_matrix
from cvjax.tasks.base import TASKS, Task


def pixel_cross_entropy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255):
  """Summed softmax cross-entropy over the pixels whose label is not ``ignore_index``, and their count.

  Args:
    logits: ``[..., K]`` float.
    labels: ``[...]`` int, in ``[0, K)`` or ``ignore_index`` (other values: also ignored).

  Returns:
    ``(sum, count)``: ``sum / max(count, 1)`` is PyTorch's ``cross_entropy(..., ignore_index=...)`` mean; an
    all-ignored batch gives ``(0, 0)`` (no NaN).
  """
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  num_classes = logits.shape[-1]
  valid = (labels >= 0) & (labels < num_classes) & (labels != ignore_index)
  safe = jnp.where(valid, labels, 0)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, safe[..., None], axis=-1)[..., 0]
  return jnp.sum(jnp.where(valid, nll, 0.0)), jnp.sum(valid).astype(jnp.float32)


@TASKS.register("semantic_segmentation")
class SemanticSegmentationTask(Task):
  """Batch keys: ``image``, ``label_map [B, H, W]`` int (255 = ignore), ``mask [B]``."""

  @property
  def ignore_index(self) -> int:
    return int(self.config.task.get("ignore_index", 255))

  def loss(self, outputs, batch):
    labels = batch["label_map"]
    total, count = pixel_cross_entropy(outputs["logits"], labels, self.ignore_index)
    loss = total / jnp.maximum(count, 1.0)
    correct = jnp.sum((jnp.argmax(outputs["logits"], -1) == labels) & (labels != self.ignore_index))
    metrics = {"loss": (total, count), "pixel_accuracy": (correct.astype(jnp.float32), count)}
    if "aux_logits" in outputs:
      aux_total, _ = pixel_cross_entropy(outputs["aux_logits"], labels, self.ignore_index)
      metrics["aux_loss"] = (aux_total, count)
      loss = loss + self.config.task.get("aux_weight", 0.5) * aux_total / jnp.maximum(count, 1.0)
    return loss, metrics

  def eval_outputs(self, outputs, batch) -> Dict[str, jax.Array]:
    prediction = jnp.argmax(outputs["logits"], -1).astype(jnp.int32)
    labels = jnp.where(batch["mask"][:, None, None], batch["label_map"], self.ignore_index)
    per_image = jax.vmap(lambda p, t: confusion_matrix(p, t, self.num_classes, self.ignore_index))
    return {"confusion": per_image(prediction, labels), "prediction": prediction, "mask": batch["mask"]}

  def evaluator(self):
    return SegmentationEvaluator(self.num_classes, self.class_names, ignore_index=self.ignore_index,
                                 num_visualizations=int(self.config.task.get("num_visualizations", 4)))
