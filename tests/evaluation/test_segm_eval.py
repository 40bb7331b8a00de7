"""COCO ``segm`` evaluation in the one detection evaluator: cvjax's mask AP equals pycocotools run directly on
the same ground truth and the same results JSON, against a dataset's annotations (polygons, RLE, a crowd
region) and against ground truth rebuilt from the batches; better masks score higher."""

import contextlib
import io
import json

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvjax.evaluation.detection import COCO_STATS, DetectionEvaluator

SIZE, D = 40, 4
OBJECTS = {1: [(3, 4, 15, 12, 0), (22, 20, 12, 16, 1)], 2: [(5, 22, 18, 10, 1)]}  # x, y, w, h, label


def _rectangle_rle(x, y, w, h):
  mask = np.zeros((SIZE, SIZE), np.uint8)
  mask[y:y + h, x:x + w] = 1
  rle = mask_utils.encode(np.asfortranarray(mask))
  return dict(rle, counts=rle["counts"].decode("ascii"))


def _dataset_ground_truth():
  annotations = []
  for image_id, objects in OBJECTS.items():
    for n, (x, y, w, h, label) in enumerate(objects):
      segmentation = ([[x, y, x + w, y, x + w, y + h, x, y + h]] if n == 0 else _rectangle_rle(x, y, w, h))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                          "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0, "segmentation": segmentation})
  crowd = mask_utils.frPyObjects([[28, 2, 38, 2, 38, 10, 28, 10]], SIZE, SIZE)[0]
  annotations.append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [28, 2, 10, 8], "area": 80.0,
                      "iscrowd": 1, "segmentation": dict(crowd, counts=crowd["counts"].decode("ascii"))})
  return {"images": [{"id": i, "height": SIZE, "width": SIZE} for i in OBJECTS],
          "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _outputs(shift: float, with_batch_ground_truth: bool):
  """One batch of both images: per object a detection whose box (and so pasted mask) is shifted by ``shift``
  pixels, plus one detection inside the crowd region of image 2 (ignored, not a false positive)."""
  batch = len(OBJECTS)
  out = {"boxes": np.zeros((batch, D, 4), np.float32), "scores": np.zeros((batch, D), np.float32),
         "labels": np.zeros((batch, D), np.int32), "valid": np.zeros((batch, D), bool),
         "mask_probs": np.zeros((batch, D, 28, 28), np.float32), "image_id": np.array(list(OBJECTS)),
         "orig_size": np.full((batch, 2), SIZE, np.int32), "mask": np.ones((batch,), bool)}
  for b, objects in enumerate(OBJECTS.values()):
    rows = [(x + shift, y, x + w + shift, y + h, label) for x, y, w, h, label in objects]
    if b == 1:
      rows.append((29, 3, 37, 9, 0))
    for d, (*box, label) in enumerate(rows):
      out["boxes"][b, d], out["labels"][b, d], out["valid"][b, d] = box, label, True
      out["scores"][b, d] = 0.9 - 0.1 * d
      out["mask_probs"][b, d, 1:-1, 1:-1] = 1.0  # the box's inside (paste expands boxes by 30/28)
  if with_batch_ground_truth:
    m = 2
    out.update(gt_boxes=np.zeros((batch, m, 4), np.float32), gt_labels=np.zeros((batch, m), np.int32),
               gt_valid=np.zeros((batch, m), bool), gt_area=np.zeros((batch, m), np.float32),
               gt_masks=np.zeros((batch, m, SIZE, SIZE), np.uint8), input_size=np.full((batch, 2), SIZE))
    for b, objects in enumerate(OBJECTS.values()):
      for n, (x, y, w, h, label) in enumerate(objects):
        out["gt_boxes"][b, n] = (x, y, x + w, y + h)
        out["gt_labels"][b, n], out["gt_valid"][b, n], out["gt_area"][b, n] = label, True, w * h
        out["gt_masks"][b, n, y:y + h, x:x + w] = 1
  return out


def _pycocotools_segm(ground_truth, results):
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO()
    coco.dataset = ground_truth
    coco.createIndex()
    evaluation = COCOeval(coco, coco.loadRes(results), "segm")
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return dict(zip(COCO_STATS, evaluation.stats))


@pytest.mark.parametrize("source", ["dataset", "batches"])
def test_mask_ap_equals_pycocotools_on_the_same_results(source, tmp_path):
  scores = {}
  for shift in (0.0, 4.0):
    ground_truth = _dataset_ground_truth() if source == "dataset" else None
    evaluator = DetectionEvaluator(["a", "b"], ground_truth=ground_truth)
    evaluator.update(_outputs(shift, with_batch_ground_truth=ground_truth is None))
    scalars, details = evaluator.result()
    paths = evaluator.write_files(str(tmp_path / f"{source}_{shift}"), step=1)
    with open(next(p for p in paths if "segmentations" in p)) as f:
      results = json.load(f)
    assert len(results) == (4 if source == "dataset" else 4)
    expected = _pycocotools_segm(evaluator.coco_ground_truth(), results)
    for name, value in expected.items():
      assert scalars[f"mask_{name}"] == pytest.approx(value, abs=1e-12), name
    assert set(details["per_class_mask_AP"]) == {"a", "b"}
    scores[shift] = scalars["mask_AP"]
  assert scores[0.0] > 0.6 and scores[4.0] < scores[0.0] - 0.2


def test_no_detections_gives_zeros_not_nan():
  evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth())
  outputs = _outputs(0.0, with_batch_ground_truth=False)
  outputs["valid"][:] = False
  evaluator.update(outputs)
  scalars, _ = evaluator.result()
  assert all(np.isfinite(v) for v in scalars.values())
  assert scalars["AP"] == 0.0


def test_drawings_overlay_the_predicted_masks(tmp_path):
  from PIL import Image
  inputs = {"image": np.zeros((2, SIZE, SIZE, 3), np.float32), "pixel_mask": np.ones((2, SIZE, SIZE), bool),
            "image_id": np.array(list(OBJECTS)), "mask": np.ones((2,), bool)}
  drawn = {}
  for with_masks in (True, False):
    evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth(), num_visualizations=1)
    outputs = _outputs(0.0, with_batch_ground_truth=False)
    if not with_masks:
      del outputs["mask_probs"]
    evaluator.update(outputs, inputs=inputs)
    evaluator.result()
    (png,) = [p for p in evaluator.write_files(str(tmp_path / str(with_masks)), step=3) if p.endswith(".png")]
    drawn[with_masks] = np.asarray(Image.open(png).convert("RGB"), np.float64)
  # The overlay colours the inside of image 1's first object (x 3..18, y 4..16 of 40 -> the PNG's scale).
  scale = drawn[True].shape[0] / SIZE
  inside = (slice(int(7 * scale), int(13 * scale)), slice(int(6 * scale), int(15 * scale)))
  assert np.abs(drawn[True][inside] - drawn[False][inside]).mean() > 20
