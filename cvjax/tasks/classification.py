"""Image classification: softmax cross-entropy with label smoothing; top-1/top-5, per-class P/R/F1."""

from __future__ import annotations

from typing import Dict

import jax
import jax.numpy as jnp
import optax

from cvjax.evaluation.classification import ClassificationEvaluator
from cvjax.tasks.base import TASKS, Task


def smoothed_cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Per-example cross-entropy ``[B]`` of ``logits [B, K]`` against integer ``labels [B]`` whose one-hot
  targets are mixed with the uniform distribution: ``(1 - s) * onehot + s / K`` (PyTorch semantics)."""
  num_classes = logits.shape[-1]
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 logits: loss in float32
  targets = optax.smooth_labels(jax.nn.one_hot(labels, num_classes, dtype=logits.dtype), label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


@TASKS.register("classification")
class ClassificationTask(Task):
  """Batch keys: ``image [B, H, W, 3]``, ``label [B]`` int, ``mask [B]`` bool (False = padding)."""

  def loss(self, logits, batch):
    mask = batch["mask"].astype(jnp.float32)
    ce = smoothed_cross_entropy(logits, batch["label"], self.config.task.get("label_smoothing", 0.0))
    count = jnp.maximum(mask.sum(), 1.0)
    correct = (jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32)
    metrics = {"loss": ((ce * mask).sum(), mask.sum()), "accuracy": ((correct * mask).sum(), mask.sum())}
    return (ce * mask).sum() / count, metrics

  def eval_outputs(self, logits, batch) -> Dict[str, jax.Array]:
    k = min(5, logits.shape[-1])
    return {
        "top_k": jax.lax.top_k(logits, k)[1].astype(jnp.int32),
        "label": batch["label"].astype(jnp.int32),
        "loss": smoothed_cross_entropy(logits, batch["label"], 0.0),
        "mask": batch["mask"],
    }

  def evaluator(self):
    return ClassificationEvaluator(self.num_classes, self.class_names)
