"""Shared by the NMS tests: a float64 NumPy port of torchvision's greedy NMS and random integer boxes."""

import numpy as np


def reference_nms(boxes, scores, iou_threshold, classes=None, score_threshold=-np.inf):
  """Greedy NMS in float64: stable score-descending order, suppress float32(IoU) > threshold (a double), NaN
  never suppresses."""
  boxes = np.asarray(boxes, np.float64)
  scores = np.asarray(scores, np.float64)
  classes = np.zeros(len(boxes)) if classes is None else np.asarray(classes)
  order = np.argsort(-scores, kind="stable")
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  suppressed = ~(scores > score_threshold)
  keep = []
  for i in order:
    if suppressed[i]:
      continue
    keep.append(i)
    w = np.maximum(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0)
    h = np.maximum(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0)
    inter = w * h
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = (inter / (areas[i] + areas - inter)).astype(np.float32).astype(np.float64)
    suppressed |= (iou > iou_threshold) & (classes == classes[i])
  return np.array(keep, np.int64)


def integer_boxes(rng, n, canvas=64, max_size=24):
  xy = rng.integers(0, canvas, (n, 2))
  wh = rng.integers(1, max_size, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)
