"""COCO evaluation by the official protocol: a dataset with an annotation file is evaluated against that file
(every annotation, crowds as ignore regions, original ids and sizes), exactly as pycocotools run on it directly."""

import contextlib
import io
import json
import os

import numpy as np
import pytest
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvjax.evaluation.detection import COCO_STATS
from cvjax.train import trainer

CATEGORIES = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
MAX_BOXES = 3
DETECTIONS_PER_IMAGE = 10


def _annotations():
  """Image 500 has six objects (twice max_boxes) and a crowd region; 501 one object that leaves the image
  (the file's box is not clipped) and one the detector misses; 502 none."""
  boxes_500 = [[2, 2, 10, 8], [14, 2, 10, 8], [26, 2, 10, 8], [2, 20, 10, 8], [14, 20, 10, 8], [26, 20, 10, 8]]
  annotations = [{"image_id": 500, "category_id": 3 if i % 2 else 7, "bbox": box, "area": 80.0, "iscrowd": 0}
                 for i, box in enumerate(boxes_500)]
  annotations.append({"image_id": 500, "category_id": 3, "bbox": [2, 34, 30, 10], "area": 250.0, "iscrowd": 1})
  annotations += [{"image_id": 501, "category_id": 7, "bbox": [30, 10, 20, 12], "area": 200.0, "iscrowd": 0},
                  {"image_id": 501, "category_id": 3, "bbox": [4, 30, 12, 12], "area": 144.0, "iscrowd": 0}]
  return annotations


def _oracle_detections(image_id):
  """(boxes xyxy, labels, scores): near-perfect on every real object of 500, three on the crowd region (to be
  ignored, not false positives), on 501 the leaving object and a wrong-class box, on 502 one false positive."""
  label = {3: 0, 7: 1}
  rows = []
  for n, a in enumerate(a for a in _annotations() if a["image_id"] == image_id and not a["iscrowd"]):
    x, y, w, h = a["bbox"]
    if image_id == 501 and n == 1:
      continue                                   # missed
    rows.append(([x + 0.5, y, x + w + 0.5, y + h], label[a["category_id"]], 0.9 - 0.05 * n))
  if image_id == 500:
    rows += [([4 + 9 * k, 35, 12 + 9 * k, 43], 0, 0.95) for k in range(3)]   # inside the crowd region
  if image_id == 501:
    rows.append(([4, 30, 16, 42], 1, 0.3))      # right place, wrong class
  if image_id == 502:
    rows.append(([5, 5, 20, 20], 0, 0.5))
  boxes = np.zeros((DETECTIONS_PER_IMAGE, 4), np.float32)
  labels = np.zeros((DETECTIONS_PER_IMAGE,), np.int32)
  scores = np.zeros((DETECTIONS_PER_IMAGE,), np.float32)
  valid = np.zeros((DETECTIONS_PER_IMAGE,), bool)
  for k, (box, cls, score) in enumerate(rows):
    boxes[k], labels[k], scores[k], valid[k] = box, cls, score, True
  return boxes, labels, scores, valid


def _with_oracle(eval_step):
  """The experiment's eval step with its detections replaced by the oracle's (image ids, sizes and the
  padding mask still come from the real pipeline and task)."""

  def step(state, batch):
    outputs = {k: np.asarray(v) for k, v in eval_step(state, batch).items()}
    per_image = [_oracle_detections(int(i)) for i in outputs["image_id"]]
    for key, values in zip(("boxes", "labels", "scores", "valid"), zip(*per_image)):
      outputs[key] = np.stack(values)
    return outputs

  return step


def _pycocotools_stats(annotation_file, detections_file):
  with contextlib.redirect_stdout(io.StringIO()):
    ground_truth = COCO(annotation_file)
    coco_eval = COCOeval(ground_truth, ground_truth.loadRes(detections_file), "bbox")
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
  return dict(zip(COCO_STATS, coco_eval.stats))


def test_ap_equals_pycocotools_on_the_annotation_file(load_config, write_coco_folder, tmp_path):
  rng = np.random.default_rng(0)
  images = [(500 + n, f"{500 + n}.png", rng.integers(0, 255, (48, 56, 3), dtype=np.uint8)) for n in range(3)]
  root = write_coco_folder(tmp_path / "coco", "val", images, _annotations(), CATEGORIES)
  write_coco_folder(tmp_path / "coco", "train", images, _annotations(), CATEGORIES)
  annotation_file = os.path.join(root, "annotations", "instances_val.json")
  config = load_config("configs/detr.py", "tiny", **{
      "dataset.name": "coco_folder", "dataset.path": root, "dataset.config_name": "", "dataset.eval_split": "val",
      "dataset.image_size": 32, "dataset.max_boxes": MAX_BOXES, "eval_steps": -1, "batch_size": 2,
      "init.pretrain_config": "", "init.mapping": ()})
  exp = trainer.Experiment(config, str(tmp_path / "run"), train=False)
  exp.eval_step = _with_oracle(exp.eval_step)
  state, _ = exp.initial_state()
  scalars, _ = exp.evaluate(state)
  exp.checkpointer.close()

  expected = _pycocotools_stats(annotation_file, os.path.join(tmp_path, "run", "eval", "detections_step_0.json"))
  assert scalars["num_images"] == 3
  for name in COCO_STATS:
    assert scalars[name] == pytest.approx(expected[name], abs=1e-12), name
  # Not a vacuous agreement: the oracle is good but not perfect, and the file's ground truth matters -- with
  # the crowd dropped and image 500 cut to max_boxes objects (the batches' targets) AP would be far lower.
  assert 0.5 < scalars["AP50"] < 1.0
  with open(annotation_file) as f:
    truncated = json.load(f)
  kept = {500: 0}
  annotations = []
  for a in truncated["annotations"]:
    if a["iscrowd"] or (a["image_id"] == 500 and kept[500] == MAX_BOXES):
      continue
    kept[500] += a["image_id"] == 500
    annotations.append(a)
  truncated["annotations"] = annotations
  with open(tmp_path / "batch_truth.json", "w") as f:
    json.dump(truncated, f)
  batch_truth = _pycocotools_stats(str(tmp_path / "batch_truth.json"),
                                   os.path.join(tmp_path, "run", "eval", "detections_step_0.json"))
  assert batch_truth["AP50"] < scalars["AP50"] - 0.1
