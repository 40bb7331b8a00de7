"""Detections drawn over their image: predictions (solid, 'class score') against ground truth (dashed)."""

from __future__ import annotations

import math
from typing import Optional, Sequence

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from cvjax.viz.image import check_image, new_figure, save_figure

PREDICTION_COLOR = "#ff2d55"    # red-pink: predictions
GROUND_TRUTH_COLOR = "#30d158"  # green: ground truth


def _boxes(boxes: Optional[np.ndarray], name: str) -> np.ndarray:
  """``boxes`` as float64 ``[N, 4]`` (None -> no boxes), or a ValueError naming ``name``."""
  boxes = np.zeros((0, 4)) if boxes is None else np.asarray(boxes, np.float64)
  if boxes.size == 0:
    return np.zeros((0, 4))
  if boxes.ndim != 2 or boxes.shape[1] != 4:
    raise ValueError(f"{name} must be absolute (x1, y1, x2, y2) pixel boxes [N, 4], got shape {boxes.shape}")
  return boxes


def _per_box(values: Optional[np.ndarray], count: int, name: str, boxes_name: str) -> np.ndarray:
  values = np.zeros((0,)) if values is None else np.asarray(values).reshape(-1)
  if len(values) != count:
    raise ValueError(f"{name} has {len(values)} entries for {count} boxes in {boxes_name}")
  return values


def _class_name(label: int, class_names: Optional[Sequence[str]]) -> str:
  """The name of ``label``; the number itself when unnamed (e.g. DETR's 'no object' index)."""
  label = int(label)
  return class_names[label] if class_names is not None and 0 <= label < len(class_names) else str(label)


def draw_detections(image_uint8: np.ndarray, pred_boxes_xyxy: Optional[np.ndarray],
                    pred_scores: Optional[np.ndarray], pred_labels: Optional[np.ndarray],
                    gt_boxes_xyxy: Optional[np.ndarray], gt_labels: Optional[np.ndarray],
                    class_names: Optional[Sequence[str]], path: str, score_threshold: float = 0.5, *,
                    display_px: int = 512, pred_masks: Optional[np.ndarray] = None) -> str:
  """Writes a PNG of the image with its predicted and ground-truth boxes.

  Predictions with ``score >= score_threshold`` are solid rectangles labelled 'class score' inside their
  top-left corner (highest score drawn last, i.e. on top); ground-truth boxes are dashed, in a second colour,
  labelled with the class inside their bottom-left corner. A legend names the two styles.

  Args:
    image_uint8: uint8 ``[H, W, 3]`` RGB (``cvjax.viz.unnormalize_image`` undoes the pipeline normalisation).
    pred_boxes_xyxy: float ``[P, 4]`` absolute pixel (x1, y1, x2, y2) in this image's coordinates (pixel
      ``i`` spans ``[i, i + 1)``, torchvision's convention); None for none.
    pred_scores: ``[P]`` confidences.
    pred_labels: ``[P]`` int class indices into ``class_names``.
    gt_boxes_xyxy: float ``[G, 4]`` in the same convention; None for none.
    gt_labels: ``[G]`` int class indices.
    class_names: names of the class indices; None (or an index past the end) draws the number.
    path: the PNG to write; its directory is created.
    score_threshold: predictions below it are not drawn.
    pred_masks: optional bool ``[P, H, W]`` instance masks of the predictions, drawn as translucent overlays
      (one colour per prediction) under the boxes of those drawn.
    display_px: the image is enlarged by the integer factor ``s = max(1, ceil(display_px / max(H, W)))`` so
      that labels stay legible on small images.

  Returns:
    ``path``. The PNG is ``[s * H, s * W]`` pixels: image pixel ``(y, x)`` covers output pixels
    ``[s * y, s * y + s) x [s * x, s * x + s)``.
  """
  image = check_image(image_uint8)
  pred_boxes = _boxes(pred_boxes_xyxy, "pred_boxes_xyxy")
  pred_scores = _per_box(pred_scores, len(pred_boxes), "pred_scores", "pred_boxes_xyxy").astype(np.float64)
  pred_labels = _per_box(pred_labels, len(pred_boxes), "pred_labels", "pred_boxes_xyxy")
  gt_boxes = _boxes(gt_boxes_xyxy, "gt_boxes_xyxy")
  gt_labels = _per_box(gt_labels, len(gt_boxes), "gt_labels", "gt_boxes_xyxy")

  height, width = image.shape[:2]
  scale = max(1, math.ceil(display_px / max(height, width)))
  figure = new_figure(scale * width, scale * height)
  axes = figure.add_axes((0.0, 0.0, 1.0, 1.0))
  # extent puts pixel i over [i, i + 1), so box coordinates are drawn exactly where they point.
  axes.imshow(image, extent=(0, width, height, 0), interpolation="nearest")
  axes.set_xlim(0, width)
  axes.set_ylim(height, 0)
  axes.set_axis_off()

  def draw(box, color, linestyle, text, corner_y, va):
    x1, y1, x2, y2 = box
    axes.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=color, linewidth=2.0,
                             linestyle=linestyle))
    axes.text(x1, corner_y, text, color="black", fontsize=8, va=va, ha="left", clip_on=True,
              bbox=dict(facecolor=color, alpha=0.7, edgecolor="none", pad=1.0))

  for box, label in zip(gt_boxes, gt_labels):
    draw(box, GROUND_TRUTH_COLOR, (0, (4, 3)), _class_name(label, class_names), box[3], "bottom")
  keep = np.flatnonzero(pred_scores >= score_threshold)
  if pred_masks is not None:
    pred_masks = np.asarray(pred_masks, bool)
    if pred_masks.shape != (len(pred_boxes), height, width):
      raise ValueError(f"pred_masks must be [P, H, W] = {(len(pred_boxes), height, width)}, got {pred_masks.shape}")
    colours = matplotlib.colormaps["tab10"]
    for n, i in enumerate(keep):
      overlay = np.zeros((height, width, 4))
      overlay[pred_masks[i]] = (*colours(n % 10)[:3], 0.45)
      axes.imshow(overlay, extent=(0, width, height, 0), interpolation="nearest")
  for i in keep[np.argsort(pred_scores[keep], kind="stable")]:
    text = f"{_class_name(pred_labels[i], class_names)} {pred_scores[i]:.2f}"
    draw(pred_boxes[i], PREDICTION_COLOR, "-", text, pred_boxes[i][1], "top")
  handles = [Line2D([], [], color=PREDICTION_COLOR, linewidth=2.0,
                    label=f"prediction (score >= {score_threshold:g})"),
             Line2D([], [], color=GROUND_TRUTH_COLOR, linewidth=2.0, linestyle=(0, (4, 3)),
                    label="ground truth")]
  axes.legend(handles=handles, loc="lower right", fontsize=7, framealpha=0.6)
  return save_figure(figure, path)
