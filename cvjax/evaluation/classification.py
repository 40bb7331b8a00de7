"""Host-side classification metrics: top-1/top-5, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import numpy as np


class ClassificationEvaluator:
  """Accumulates ``update({'top_k': [B, k], 'label': [B], 'loss': [B], 'mask': [B]})`` over a split."""

  def __init__(self, num_classes: int, class_names: Sequence[str]):
    self.num_classes = num_classes
    self.class_names = list(class_names) or [str(i) for i in range(num_classes)]
    self.confusion = np.zeros((num_classes, num_classes), np.int64)  # [true, predicted]
    self.top_k_correct = 0
    self.loss_sum = 0.0
    self.count = 0
    self.k = None

  def update(self, outputs: Dict[str, np.ndarray], inputs=None) -> None:
    """Adds one evaluation batch; rows with ``mask=False`` are padding. ``ValueError`` for labels outside
    ``[0, num_classes)``."""
    del inputs  # the host batch; classification metrics need only the outputs
    mask = np.asarray(outputs["mask"], bool)
    labels = np.asarray(outputs["label"])[mask]
    top_k = np.asarray(outputs["top_k"])[mask]
    if labels.size and (labels.min() < 0 or labels.max() >= self.num_classes):
      raise ValueError(f"eval labels must lie in [0, {self.num_classes}); got {labels.min()}..{labels.max()}")
    self.k = top_k.shape[-1]
    np.add.at(self.confusion, (labels, top_k[:, 0]), 1)
    self.top_k_correct += int((top_k == labels[:, None]).any(-1).sum())
    self.loss_sum += float(np.asarray(outputs["loss"])[mask].sum())
    self.count += int(mask.sum())

  def result(self) -> Tuple[Dict[str, float], Dict]:
    """``(scalars, details)``: scalars for logging; details with per-class metrics and the confusion matrix."""
    n = max(self.count, 1)
    tp = np.diag(self.confusion).astype(np.float64)
    predicted = self.confusion.sum(0)
    actual = self.confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    scalars = {
        "top1": float(tp.sum() / n),
        f"top{self.k or 5}": float(self.top_k_correct / n),
        "loss": self.loss_sum / n,
        "macro_f1": float(f1[actual > 0].mean()) if (actual > 0).any() else 0.0,
        "num_examples": self.count,
    }
    details = {
        "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                      for name, p, r, f, s in zip(self.class_names, precision, recall, f1, actual)},
        "confusion_matrix": self.confusion.tolist(),
    }
    return scalars, details
