"""The COCOeval-backed detection evaluator: ground truth assembled from eval batches, results JSON, drawings."""

import json
import os

import numpy as np
import pytest

from cvjax.evaluation.detection import COCO_STATS, DetectionEvaluator

CLASSES = ("square", "circle", "triangle")


def _outputs(pred_boxes, pred_labels, pred_scores, gt_boxes, gt_labels, image_ids, size=(64, 80)):
  """One eval batch of images with the same number of predictions (Q) and padded ground truth (M)."""
  batch = len(image_ids)
  m = max(len(g) for g in gt_boxes) or 1
  padded = np.zeros((batch, m, 4), np.float32)
  labels = np.zeros((batch, m), np.int32)
  valid = np.zeros((batch, m), bool)
  for b, (boxes, classes) in enumerate(zip(gt_boxes, gt_labels)):
    padded[b, :len(boxes)], labels[b, :len(boxes)], valid[b, :len(boxes)] = boxes, classes, True
  area = (padded[..., 2] - padded[..., 0]) * (padded[..., 3] - padded[..., 1])
  return {"boxes": np.asarray(pred_boxes, np.float32), "labels": np.asarray(pred_labels, np.int32),
          "scores": np.asarray(pred_scores, np.float32), "gt_boxes": padded, "gt_labels": labels,
          "gt_valid": valid, "gt_area": area, "image_id": np.asarray(image_ids, np.int32),
          "orig_size": np.tile(np.array(size, np.int32), (batch, 1)), "mask": np.ones((batch,), bool)}


GT = [np.array([[10, 10, 40, 40], [50, 5, 70, 30]], np.float32), np.array([[0, 0, 20, 60]], np.float32)]
GT_LABELS = [np.array([0, 2]), np.array([1])]


def _perfect(extra_score=0.0):
  boxes = np.stack([GT[0], np.concatenate([GT[1], [[1, 1, 2, 2]]])])
  labels = np.stack([GT_LABELS[0], np.concatenate([GT_LABELS[1], [0]])])
  scores = np.array([[0.9, 0.8], [0.95, extra_score]])
  return _outputs(boxes, labels, scores, GT, GT_LABELS, [3, 7])


def test_perfect_detections_give_ap_one():
  evaluator = DetectionEvaluator(CLASSES)
  evaluator.update(_perfect(extra_score=0.01))
  scalars, details = evaluator.result()
  for name in ("AP", "AP50", "AP75", "AR100"):
    assert scalars[name] == pytest.approx(1.0), name
  assert scalars["num_images"] == 2
  assert details["per_class_AP"] == {"square": pytest.approx(1.0), "circle": pytest.approx(1.0),
                                     "triangle": pytest.approx(1.0)}
  assert set(COCO_STATS) <= set(scalars)


def test_shifted_box_fails_strict_thresholds_only():
  outputs = _perfect()
  # IoU of the shifted box with its ground truth: 750 / (900 + 900 - 750) = 0.714 (> 0.5, < 0.75).
  outputs["boxes"][0, 0] = [10, 15, 40, 45]
  evaluator = DetectionEvaluator(CLASSES)
  evaluator.update(outputs)
  scalars, details = evaluator.result()
  assert scalars["AP50"] == pytest.approx(1.0)
  assert scalars["AP75"] < 1.0
  assert details["per_class_AP"]["square"] < 0.99
  assert details["per_class_AP"]["circle"] == pytest.approx(1.0)


def test_wrong_class_is_a_miss_and_padding_rows_are_ignored():
  outputs = _perfect()
  outputs["labels"][1, 0] = 2                  # the circle predicted as a triangle
  outputs = {k: np.concatenate([v, v[:1]]) for k, v in outputs.items()}  # a padding row ...
  outputs["mask"][-1] = False
  outputs["image_id"][-1] = -1                 # ... with the padding example's id
  evaluator = DetectionEvaluator(CLASSES)
  evaluator.update(outputs)
  scalars, details = evaluator.result()
  assert scalars["num_images"] == 2
  assert details["per_class_AP"]["circle"] == pytest.approx(0.0)


def test_images_without_objects_and_original_category_ids(tmp_path):
  outputs = _outputs([[[5, 5, 20, 20]], [[0, 0, 10, 10]]], [[1], [0]], [[0.7], [0.6]],
                     [np.array([[5, 5, 20, 20]], np.float32), np.zeros((0, 4), np.float32)],
                     [np.array([1]), np.array([], int)], [11, 12])
  evaluator = DetectionEvaluator(CLASSES, category_ids=[1, 5, 9])
  evaluator.update(outputs)
  scalars, _ = evaluator.result()
  # The detection on the empty image is a false positive ranked below the true one: AP stays 1.
  assert scalars["AP50"] == pytest.approx(1.0)
  ground_truth = evaluator.coco_ground_truth()
  assert [a["category_id"] for a in ground_truth["annotations"]] == [5]
  assert [a["id"] for a in ground_truth["annotations"]] == [1]   # COCO ids must be non-zero
  paths = evaluator.write_files(str(tmp_path), step=3)
  with open(paths[0]) as f:
    results = json.load(f)
  assert {r["category_id"] for r in results} == {1, 5}
  assert results[0]["bbox"] == [5.0, 5.0, 15.0, 15.0]   # xywh


def test_duplicate_image_ids_are_an_error():
  evaluator = DetectionEvaluator(CLASSES)
  evaluator.update(_perfect())
  with pytest.raises(ValueError, match="image_id 3 appears twice"):
    evaluator.update(_perfect())


def test_nothing_to_evaluate_gives_zeros():
  scalars, _ = DetectionEvaluator(CLASSES).result()
  assert scalars["AP"] == 0.0 and scalars["num_images"] == 0


def test_drawings_of_kept_images(tmp_path):
  outputs = _perfect()
  image = np.random.default_rng(0).normal(size=(2, 32, 40, 3)).astype(np.float32)
  pixel_mask = np.zeros((2, 32, 40), bool)
  pixel_mask[:, :32, :40] = True
  inputs = {"image": image, "pixel_mask": pixel_mask, "image_id": outputs["image_id"], "mask": outputs["mask"]}
  evaluator = DetectionEvaluator(CLASSES, num_visualizations=1)
  evaluator.update(outputs, inputs=inputs)
  evaluator.result()
  paths = evaluator.write_files(str(tmp_path), step=5)
  pngs = [p for p in paths if p.endswith(".png")]
  assert [os.path.basename(p) for p in pngs] == ["step_5_image_3.png"]
  from PIL import Image
  with Image.open(pngs[0]) as drawn:
    assert drawn.size[0] > 0
