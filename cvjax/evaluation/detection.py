"""Host-side COCO detection metrics through pycocotools' COCOeval (never re-implemented here).

The evaluator accumulates the per-image detections and ground truth of a whole validation pass (already
gathered over processes by the train loop), builds an in-memory COCO ground-truth object from it and runs
COCOeval (bbox): AP, AP50, AP75, APs/m/l and AR1/10/100 (APs/m/l and ARs/m/l use the ground truth's ``area``:
the annotation's area when the dataset provides it, else the box area). Crowd regions are not part of the
ground truth (the pipelines drop them), so detections on crowds count as false positives.

Category ids in the results JSON are the dataset's original ids when it has them (COCO), else ``label + 1``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class DetectionEvaluator:
  """Accumulates ``update(outputs, inputs)`` over a split; ``result()`` runs COCOeval.

  ``outputs`` (leading batch axis, see ``DetectionTask.eval_outputs``): ``scores [B, Q]``, ``labels [B, Q]``,
  ``boxes [B, Q, 4]`` absolute xyxy in original-image pixels, ``gt_boxes [B, M, 4]`` (same convention),
  ``gt_labels [B, M]``, ``gt_valid [B, M]``, ``gt_area [B, M]``, ``image_id [B]``, ``orig_size [B, 2]`` (h, w),
  ``mask [B]``. ``inputs``: this process's host batch (``image``, ``pixel_mask``, ``image_id``), used only to
  keep the first ``num_visualizations`` images for drawing.
  """

  def __init__(self, class_names: Sequence[str], category_ids: Optional[Sequence[int]] = None,
               num_visualizations: int = 4):
    self.class_names = list(class_names)
    if category_ids is not None and len(category_ids) != len(self.class_names):
      raise ValueError(f"category_ids has {len(category_ids)} entries for {len(self.class_names)} classes")
    self.category_ids = (list(map(int, category_ids)) if category_ids is not None
                         else list(range(1, len(self.class_names) + 1)))
    self.num_visualizations = num_visualizations
    self._images: List[dict] = []
    self._annotations: List[dict] = []
    self._detections: List[dict] = []
    self._seen = set()
    self._drawable: Dict[int, np.ndarray] = {}  # image_id -> uint8 real region of the model input

  def update(self, outputs: Dict[str, np.ndarray], inputs: Optional[Dict[str, np.ndarray]] = None) -> None:
    outputs = {key: np.asarray(value) for key, value in outputs.items()}
    for b in np.flatnonzero(outputs["mask"]):
      image_id = int(outputs["image_id"][b])
      if image_id in self._seen:
        raise ValueError(f"image_id {image_id} appears twice in the evaluation split; ids must be unique")
      self._seen.add(image_id)
      height, width = (int(v) for v in outputs["orig_size"][b])
      self._images.append({"id": image_id, "height": height, "width": width})
      for box, label, area in zip(outputs["gt_boxes"][b][outputs["gt_valid"][b]],
                                  outputs["gt_labels"][b][outputs["gt_valid"][b]],
                                  outputs["gt_area"][b][outputs["gt_valid"][b]]):
        # COCO annotation ids must be non-zero.
        self._annotations.append({"id": len(self._annotations) + 1, "image_id": image_id,
                                  "category_id": self.category_ids[int(label)], "bbox": _xywh(box),
                                  "area": float(area), "iscrowd": 0})
      for box, label, score in zip(outputs["boxes"][b], outputs["labels"][b], outputs["scores"][b]):
        self._detections.append({"image_id": image_id, "category_id": self.category_ids[int(label)],
                                 "bbox": _xywh(box), "score": float(score)})
    if inputs is not None and len(self._drawable) < self.num_visualizations:
      self._keep_images(outputs, inputs)

  def _keep_images(self, outputs, inputs) -> None:
    from cvjax.viz.image import unnormalize_image  # deferred: matplotlib is only needed for drawing

    for b in np.flatnonzero(np.asarray(inputs["mask"])):
      if len(self._drawable) >= self.num_visualizations:
        break
      real = np.asarray(inputs["pixel_mask"][b])
      h, w = int(real.any(1).sum()), int(real.any(0).sum())
      self._drawable[int(inputs["image_id"][b])] = unnormalize_image(np.asarray(inputs["image"][b])[:h, :w])

  def coco_ground_truth(self) -> dict:
    """The accumulated ground truth as a COCO instances dict."""
    categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
    return {"images": self._images, "annotations": self._annotations, "categories": categories}

  def result(self) -> Tuple[Dict[str, float], Dict]:
    """``(scalars, details)``: the 12 COCO stats (-1 where undefined, e.g. no small objects) and per-class AP."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    scalars = {name: 0.0 for name in COCO_STATS}
    scalars["num_images"] = len(self._images)
    details: Dict = {"per_class_AP": {}}
    if not self._images or not self._detections:
      return scalars, details
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):  # pycocotools prints its progress and table
      ground_truth = COCO()
      ground_truth.dataset = self.coco_ground_truth()
      ground_truth.createIndex()
      # loadRes mutates its input (adds ids/areas): hand it copies.
      detections = ground_truth.loadRes([dict(d) for d in self._detections])
      coco_eval = COCOeval(ground_truth, detections, "bbox")
      coco_eval.evaluate()
      coco_eval.accumulate()
      coco_eval.summarize()
    scalars.update({name: float(value) for name, value in zip(COCO_STATS, coco_eval.stats)})
    # precision [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no ground truth.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    for k, cid in enumerate(coco_eval.params.catIds):
      values = precision[:, :, k]
      name = self.class_names[self.category_ids.index(cid)]
      details["per_class_AP"][name] = float(values[values > -1].mean()) if (values > -1).any() else -1.0
    details["coco_summary"] = summary.getvalue().splitlines()[-12:]
    return scalars, details

  def write_files(self, directory: str, step: int, score_threshold: float = 0.5) -> List[str]:
    """Writes the COCO results JSON and PNGs of predicted vs ground-truth boxes; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"detections_step_{step}.json")]
    with open(paths[0], "w") as f:
      json.dump(self._detections, f)
    if not self._drawable:
      return paths
    from cvjax.viz.detection import draw_detections

    sizes = {image["id"]: (image["height"], image["width"]) for image in self._images}
    for image_id, image in self._drawable.items():
      if image_id not in sizes:
        continue
      height, width = sizes[image_id]
      # Boxes are in original pixels; the kept image is the model input's real region.
      scale = np.array([image.shape[1] / width, image.shape[0] / height] * 2)
      preds = [d for d in self._detections if d["image_id"] == image_id]
      gts = [a for a in self._annotations if a["image_id"] == image_id]
      path = os.path.join(directory, f"step_{step}_image_{image_id}.png")
      names = dict(zip(self.category_ids, self.class_names))
      draw_detections(
          image,
          pred_boxes_xyxy=np.array([_xyxy(d["bbox"]) for d in preds]).reshape(-1, 4) * scale,
          pred_scores=np.array([d["score"] for d in preds]),
          pred_labels=np.array([self.category_ids.index(d["category_id"]) for d in preds], int),
          gt_boxes_xyxy=np.array([_xyxy(a["bbox"]) for a in gts]).reshape(-1, 4) * scale,
          gt_labels=np.array([self.category_ids.index(a["category_id"]) for a in gts], int),
          class_names=[names[c] for c in self.category_ids], path=path, score_threshold=score_threshold)
      paths.append(path)
    return paths


def _xywh(box: np.ndarray) -> List[float]:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def _xyxy(bbox: Sequence[float]) -> List[float]:
  x, y, w, h = bbox
  return [x, y, x + w, y + h]
