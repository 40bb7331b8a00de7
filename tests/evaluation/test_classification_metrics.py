"""Host evaluator: top-k, per-class precision/recall/F1 and the confusion matrix, against direct counting."""

import numpy as np
import pytest

from cvjax.evaluation.classification import ClassificationEvaluator


def test_metrics_equal_direct_counts_over_several_masked_updates():
  rng = np.random.RandomState(0)
  k, n = 4, 300
  labels = rng.randint(0, k, n)
  scores = rng.randn(n, k) + 1.5 * np.eye(k)[labels]
  top = np.argsort(-scores, axis=1)[:, :3]
  mask = rng.rand(n) > 0.2
  ev = ClassificationEvaluator(k, list("abcd"))
  for chunk in np.array_split(np.arange(n), 7):
    ev.update({"top_k": top[chunk], "label": labels[chunk], "loss": np.ones(len(chunk)), "mask": mask[chunk]})
  scalars, details = ev.result()
  y, p, t3 = labels[mask], top[mask, 0], top[mask]
  assert scalars["num_examples"] == mask.sum()
  assert scalars["top1"] == pytest.approx(np.mean(y == p))
  assert scalars["top3"] == pytest.approx(np.mean([yy in row for yy, row in zip(y, t3)]))
  f1s = []
  for c, name in enumerate("abcd"):
    tp = np.sum((p == c) & (y == c))
    precision, recall = tp / np.sum(p == c), tp / np.sum(y == c)
    f1s.append(2 * precision * recall / (precision + recall))
    got = details["per_class"][name]
    assert got["precision"] == pytest.approx(precision) and got["recall"] == pytest.approx(recall)
    assert got["f1"] == pytest.approx(f1s[-1]) and got["support"] == np.sum(y == c)
    assert details["confusion_matrix"][c] == [int(np.sum((y == c) & (p == j))) for j in range(k)]
  assert scalars["macro_f1"] == pytest.approx(np.mean(f1s))


def test_out_of_range_label_is_a_clear_error():
  ev = ClassificationEvaluator(3, ["a", "b", "c"])
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
    ev.update({"top_k": np.zeros((2, 1), int), "label": np.array([0, 3]), "loss": np.zeros(2),
               "mask": np.ones(2, bool)})
