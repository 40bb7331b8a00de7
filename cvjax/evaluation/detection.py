"""Host-side COCO detection metrics through pycocotools' COCOeval (never re-implemented here).

The evaluator accumulates the per-image detections of a whole validation pass (already gathered over
processes by the train loop) and runs COCOeval (bbox): AP, AP50, AP75, APs/m/l and AR1/10/100/s/m/l. The
ground truth is, by the official protocol, the dataset's own annotations when it has them (a COCO annotation
file, or TFDS ``coco``'s records): every annotation of each evaluated image, crowd regions as ``iscrowd=1``
ignore regions, the annotation's ``area`` for the size ranges, the original image ids and sizes -- restricted
to the images of this pass (all of the split, or the first ``eval_steps`` batches). Only for generated data
without annotation files is it rebuilt from the evaluation batches' boxes (``gt_*`` outputs), which are then
all there is.

Category ids in the results JSON are the dataset's original ids when it has them (COCO), else ``label + 1``.

Instance segmentation (``segm``): when the outputs carry ``mask_probs [B, D, m, m]`` (each detection's
box-relative mask probabilities, Mask R-CNN's 28x28), the evaluator pastes them at the original image size
into the detection boxes (``cvjax.ops.masks.paste_masks_in_image``, as torchvision's postprocessing),
keeps the pixels above 0.5 (torchvision's COCO evaluation: ``masks > 0.5``), RLE-encodes them
(``pycocotools.mask.encode``) and runs COCOeval ``segm`` as well, on the same ground truth: the dataset's
annotations carry ``segmentation`` (polygons, RLE, crowd RLE), and ground truth rebuilt from batches takes each
object's mask from ``gt_masks [B, M, h, w]`` (the model-input frame, real region top-left, of size ``input_size
[B, 2]``), resized to the original size by nearest neighbour at pixel centres. Its 12 stats are ``mask_AP``,
``mask_AP50``, ... ``mask_ARl`` (the bbox ones keep their names), per-class AP ``details['per_class_mask_AP']``,
results ``segmentations_step_N.json`` beside the bbox ``detections_step_N.json``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

MASK_THRESHOLD = 0.5  # pasted mask probabilities above it are the instance (torchvision's COCO evaluation)
_PASTE_PIXELS = 2**24  # float32 pasted-mask elements per paste_masks_in_image call (64 MiB)
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
GroundTruth = Union[Dict[str, Any], Callable[[], Dict[str, Any]]]


class DetectionEvaluator:
  """Accumulates ``update(outputs, inputs)`` over a split; ``result()`` runs COCOeval.

  ``outputs`` (leading batch axis, see ``cvjax.tasks.detection.DetectionTask.eval_outputs``): ``boxes
  [B, D, 4]`` absolute xyxy in original-image pixels, ``scores [B, D]``, ``labels [B, D]`` (0-based), optional
  ``valid [B, D]`` (all True if absent), ``image_id [B]``, ``orig_size [B, 2]`` (h, w), ``mask [B]``, and
  without ``ground_truth`` also ``gt_boxes [B, M, 4]`` (same convention), ``gt_labels [B, M]``, ``gt_valid
  [B, M]``, ``gt_area [B, M]``. Instance-segmentation models add ``mask_probs [B, D, m, m]`` (float, each
  detection's box-relative mask probabilities), and without ``ground_truth`` also ``gt_masks [B, M, h, w]``
  (uint8, nonzero inside the object, in the model-input frame with the real region top-left) and
  ``input_size [B, 2]`` (that real region's (h, w), e.g. from ``pixel_mask``). ``inputs``: this process's
  host batch (``image``, ``pixel_mask``, ``image_id``, ``mask``), used only to keep the first
  ``num_visualizations`` images for drawing.

  Args:
    class_names: one name per label.
    category_ids: the dataset's category id of each label (results JSON and ground truth use them); default
      ``label + 1``.
    num_visualizations: images kept for ``write_files``' drawings.
    ground_truth: the split's annotations as a COCO-format dict (``images`` with ``id``/``height``/``width``,
      ``annotations`` with ``image_id``/``category_id``/``bbox``/``area``/``iscrowd``, and ``segmentation``
      (polygons or RLE) for ``mask_probs`` outputs, ``categories``), or a
      zero-argument callable returning it (built when ``result`` first needs it); None rebuilds it from the
      ``gt_*`` outputs.
  """

  def __init__(self, class_names: Sequence[str], category_ids: Optional[Sequence[int]] = None,
               num_visualizations: int = 4, ground_truth: Optional[GroundTruth] = None):
    self.class_names = list(class_names)
    if category_ids is not None and len(category_ids) != len(self.class_names):
      raise ValueError(f"category_ids has {len(category_ids)} entries for {len(self.class_names)} classes")
    self.category_ids = (list(map(int, category_ids)) if category_ids is not None
                         else list(range(1, len(self.class_names) + 1)))
    self.num_visualizations = num_visualizations
    self._ground_truth = ground_truth
    self._images: List[dict] = []
    self._annotations: List[dict] = []
    self._detections: List[dict] = []
    self._segmentations: List[dict] = []
    self._with_masks = False  # some outputs carried mask_probs: segm stats are reported (0 when undefined)
    self._seen: Dict[int, Tuple[int, int]] = {}  # image id -> original (height, width), in evaluation order
    self._drawable: Dict[int, np.ndarray] = {}  # image_id -> uint8 real region of the model input

  def update(self, outputs: Dict[str, np.ndarray], inputs: Optional[Dict[str, np.ndarray]] = None) -> None:
    """Adds one evaluation batch (rows with ``mask=False`` are padding and ignored)."""
    outputs = {key: np.asarray(value) for key, value in outputs.items()}
    if "mask_probs" in outputs:
      self._with_masks = True
      if self._ground_truth is None and not {"gt_masks", "input_size"} <= set(outputs):
        raise ValueError("outputs carry mask_probs but not gt_masks [B, M, h, w] and input_size [B, 2], which the "
                         "segm ground truth is rebuilt from when the dataset has no annotation file")
    valid = outputs.get("valid", np.ones(outputs["scores"].shape, bool))
    for b in np.flatnonzero(outputs["mask"]):
      image_id = int(outputs["image_id"][b])
      if image_id in self._seen:
        raise ValueError(f"image_id {image_id} appears twice in the evaluation split; ids must be unique")
      self._seen[image_id] = tuple(int(v) for v in outputs["orig_size"][b])
      if self._ground_truth is None:
        self._add_batch_ground_truth(outputs, b, image_id, with_masks="mask_probs" in outputs)
      keep = valid[b]
      for box, label, score in zip(outputs["boxes"][b][keep], outputs["labels"][b][keep],
                                   outputs["scores"][b][keep]):
        self._detections.append({"image_id": image_id, "category_id": self.category_ids[int(label)],
                                 "bbox": _xywh(box), "score": float(score)})
      if "mask_probs" in outputs:
        self._add_segmentations(outputs, b, image_id, keep)
    if inputs is not None and len(self._drawable) < self.num_visualizations:
      self._keep_images(inputs)

  def _add_segmentations(self, outputs: Dict[str, np.ndarray], b: int, image_id: int, keep: np.ndarray) -> None:
    from cvjax.ops.masks import paste_masks_in_image  # deferred: jax is only needed for masks

    height, width = self._seen[image_id]
    boxes = outputs["boxes"][b][keep].astype(np.float32)
    probs = outputs["mask_probs"][b][keep]
    chunk = max(1, _PASTE_PIXELS // (height * width))  # bounds the float32 [chunk, H, W] of large images
    rles = []
    for start in range(0, len(boxes), chunk):  # NumPy arrays: pasted by NumPy, nothing compiled per image size
      pasted = paste_masks_in_image(probs[start:start + chunk], boxes[start:start + chunk], (height, width))
      rles += _encode(pasted > MASK_THRESHOLD)
    for rle, label, score in zip(rles, outputs["labels"][b][keep], outputs["scores"][b][keep]):
      self._segmentations.append({"image_id": image_id, "category_id": self.category_ids[int(label)],
                                  "segmentation": rle, "score": float(score)})

  def _add_batch_ground_truth(self, outputs: Dict[str, np.ndarray], b: int, image_id: int,
                              with_masks: bool) -> None:
    height, width = self._seen[image_id]
    self._images.append({"id": image_id, "height": height, "width": width})
    real = outputs["gt_valid"][b]
    segmentations = [None] * int(real.sum())
    if with_masks:
      h, w = (int(v) for v in outputs["input_size"][b])  # the real region of the model-input frame
      segmentations = _encode(_nearest_resize(outputs["gt_masks"][b][real][:, :h, :w], (height, width)) > 0)
    for box, label, area, segmentation in zip(outputs["gt_boxes"][b][real], outputs["gt_labels"][b][real],
                                              outputs["gt_area"][b][real], segmentations):
      # COCO annotation ids must be non-zero.
      annotation = {"id": len(self._annotations) + 1, "image_id": image_id,
                    "category_id": self.category_ids[int(label)], "bbox": _xywh(box), "area": float(area),
                    "iscrowd": 0}
      if segmentation is not None:
        annotation["segmentation"] = segmentation
      self._annotations.append(annotation)

  def _keep_images(self, inputs) -> None:
    from cvjax.viz.image import unnormalize_image  # deferred: matplotlib is only needed for drawing

    for b in np.flatnonzero(np.asarray(inputs["mask"])):
      if len(self._drawable) >= self.num_visualizations:
        break
      real = np.asarray(inputs["pixel_mask"][b])
      h, w = int(real.any(1).sum()), int(real.any(0).sum())
      self._drawable[int(inputs["image_id"][b])] = unnormalize_image(np.asarray(inputs["image"][b])[:h, :w])

  def coco_ground_truth(self) -> dict:
    """The ground truth COCOeval runs against, as a COCO instances dict: the dataset's annotations (all of
    the split; ``result`` restricts COCOeval to the evaluated images) or the one rebuilt from the batches."""
    if self._ground_truth is not None:
      if callable(self._ground_truth):
        self._ground_truth = self._ground_truth()
      return self._ground_truth
    categories = [{"id": cid, "name": name} for cid, name in zip(self.category_ids, self.class_names)]
    return {"images": self._images, "annotations": self._annotations, "categories": categories}

  def result(self) -> Tuple[Dict[str, float], Dict]:
    """``(scalars, details)``: the 12 COCO stats (-1 where undefined, e.g. no small objects) and per-class AP.

    Raises:
      ValueError: an evaluated image id is not in the dataset's ground truth.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    prefixes = ("", "mask_") if self._with_masks else ("",)
    scalars = {prefix + name: 0.0 for prefix in prefixes for name in COCO_STATS}
    scalars["num_images"] = len(self._seen)
    details: Dict = {f"per_class_{prefix}AP": {} for prefix in prefixes}
    if not self._seen or not self._detections:
      return scalars, details
    summary = io.StringIO()
    with contextlib.redirect_stdout(summary):  # pycocotools prints its progress and table
      ground_truth = COCO()
      # COCOeval writes into the annotations ('ignore'; segm turns polygons into RLE with bytes counts): hand it
      # copies, so that the dataset's ground truth stays as it was (and JSON-serialisable).
      dataset = self.coco_ground_truth()
      ground_truth.dataset = dict(dataset, annotations=[dict(a) for a in dataset["annotations"]])
      ground_truth.createIndex()
      unknown = [i for i in self._seen if i not in ground_truth.imgs]
      if unknown:
        raise ValueError(f"evaluated image ids {unknown[:5]} are not in the dataset's ground truth")
      if self._with_masks:
        _check_segmentations(ground_truth, sorted(self._seen))
      runs = [("bbox", self._detections, "")] + ([("segm", self._segmentations, "mask_")]
                                                  if self._with_masks else [])
      for iou_type, results, prefix in runs:
        # loadRes mutates its input (adds ids/areas): hand it copies.
        coco_eval = COCOeval(ground_truth, ground_truth.loadRes([dict(d) for d in results]), iou_type)
        coco_eval.params.imgIds = sorted(self._seen)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        scalars.update({prefix + name: float(value) for name, value in zip(COCO_STATS, coco_eval.stats)})
        details[f"per_class_{prefix}AP"] = self._per_class_ap(coco_eval)
    details["coco_summary"] = [line for line in summary.getvalue().splitlines()
                               if line.lstrip().startswith("Average")]
    return scalars, details

  def _per_class_ap(self, coco_eval) -> Dict[str, float]:
    # precision [IoU thresholds, recall points, categories, area ranges, max dets]; -1 = no ground truth.
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]
    names = dict(zip(self.category_ids, self.class_names))
    per_class = {}
    for k, cid in enumerate(coco_eval.params.catIds):
      values = precision[:, :, k]
      per_class[names.get(cid, str(cid))] = float(values[values > -1].mean()) if (values > -1).any() else -1.0
    return per_class

  def write_files(self, directory: str, step: int, score_threshold: float = 0.5) -> List[str]:
    """Writes the COCO results JSON (bbox; with masks also segm) and PNGs of predicted vs ground-truth boxes
    (and the predicted masks); returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, f"detections_step_{step}.json")]
    with open(paths[0], "w") as f:
      json.dump(self._detections, f)
    if self._with_masks:
      paths.append(os.path.join(directory, f"segmentations_step_{step}.json"))
      with open(paths[-1], "w") as f:
        json.dump(self._segmentations, f)
    if not self._drawable:
      return paths
    from cvjax.viz.detection import draw_detections

    ground_truth = self.coco_ground_truth()
    label_of = {cid: label for label, cid in enumerate(self.category_ids)}
    for image_id, image in self._drawable.items():
      if image_id not in self._seen:
        continue
      height, width = self._seen[image_id]
      # Boxes are in original pixels; the kept image is the model input's real region.
      scale = np.array([image.shape[1] / width, image.shape[0] / height] * 2)
      preds = [d for d in self._detections if d["image_id"] == image_id]
      masks = None
      if self._with_masks:
        # Segmentations are appended in the order of the detections; drawn at the kept image's size.
        masks = _nearest_resize(_decode([d["segmentation"] for d in self._segmentations
                                         if d["image_id"] == image_id], (height, width)), image.shape[:2]) > 0
      gts = [a for a in ground_truth["annotations"]
             if a["image_id"] == image_id and not a.get("iscrowd", 0) and a["category_id"] in label_of]
      path = os.path.join(directory, f"step_{step}_image_{image_id}.png")
      draw_detections(
          image,
          pred_boxes_xyxy=np.array([_xyxy(d["bbox"]) for d in preds]).reshape(-1, 4) * scale,
          pred_scores=np.array([d["score"] for d in preds]),
          pred_labels=np.array([label_of[d["category_id"]] for d in preds], int),
          gt_boxes_xyxy=np.array([_xyxy(a["bbox"]) for a in gts]).reshape(-1, 4) * scale,
          gt_labels=np.array([label_of[a["category_id"]] for a in gts], int),
          class_names=self.class_names, path=path, score_threshold=score_threshold, pred_masks=masks)
      paths.append(path)
    return paths


def _check_segmentations(ground_truth, image_ids: Sequence[int]) -> None:
  """ValueError unless every annotation of the evaluated images has a ``segmentation`` (segm needs them)."""
  missing = [a["id"] for i in image_ids for a in ground_truth.imgToAnns.get(i, []) if "segmentation" not in a]
  if missing:
    raise ValueError(f"outputs carry mask_probs, but ground-truth annotations {missing[:5]} (of {len(missing)}) "
                     "have no 'segmentation' (polygons or RLE) for the segm evaluation; evaluate against "
                     "instance masks or drop the mask head")


def _nearest_resize(masks: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
  """``[N, h, w]`` -> ``[N, *size]`` by nearest neighbour at pixel centres (as the pipeline resized the masks,
  ``cvjax.data.preprocessing.resize_masks``)."""
  (h, w), (height, width) = masks.shape[1:], size
  rows = np.minimum((np.arange(height) + 0.5) * (h / height), h - 1).astype(int)
  columns = np.minimum((np.arange(width) + 0.5) * (w / width), w - 1).astype(int)
  return masks[:, rows[:, None], columns[None, :]]


def _decode(rles: List[dict], size: Tuple[int, int]) -> np.ndarray:
  """uint8 ``[N, *size]`` masks of ``_encode``'s RLEs."""
  from pycocotools import mask as mask_utils

  if not rles:
    return np.zeros((0, *size), np.uint8)
  return np.moveaxis(mask_utils.decode([dict(r, counts=r["counts"].encode("ascii")) for r in rles]), -1, 0)


def _encode(masks: np.ndarray) -> List[dict]:
  """COCO RLEs (``counts`` as str, JSON-ready) of bool masks ``[N, H, W]``."""
  from pycocotools import mask as mask_utils

  rles = mask_utils.encode(np.asfortranarray(np.moveaxis(masks, 0, -1).astype(np.uint8))) if len(masks) else []
  return [dict(rle, counts=rle["counts"].decode("ascii")) for rle in rles]


def _xywh(box: np.ndarray) -> List[float]:
  x1, y1, x2, y2 = (float(v) for v in box)
  return [x1, y1, x2 - x1, y2 - y1]


def _xyxy(bbox: Sequence[float]) -> List[float]:
  x, y, w, h = bbox
  return [x, y, x + w, y + h]
