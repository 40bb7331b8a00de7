"""DETR end to end on a user's COCO-format folder: multi-scale + crop augmentation, bucketed padding, a corrupt
image skipped, COCOeval on the validation split, results JSON in the folder's own category ids, drawings."""

import json
import os

import numpy as np

import launch


def _images(rng, count, start_id, size=(40, 56)):
  images, annotations = [], []
  for n in range(count):
    image = rng.integers(0, 255, size + (3,), dtype=np.uint8)
    x, y = int(rng.integers(2, 20)), int(rng.integers(2, 14))
    image[y:y + 16, x:x + 20] = (255, 0, 0)
    image_id = start_id + n
    images.append((image_id, f"{image_id}.png", image))
    annotations.append({"image_id": image_id, "category_id": [3, 7][n % 2], "bbox": [x, y, 20, 16],
                        "area": 320.0, "iscrowd": 0})
  return images, annotations


def test_detr_trains_and_evaluates_on_a_coco_folder(load_config, write_coco_folder, tmp_path, caplog):
  rng = np.random.default_rng(0)
  categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "blue"}]
  train_images, train_annotations = _images(rng, 8, start_id=100)
  train_images.append((999, "999.png", b"not an image"))
  write_coco_folder(tmp_path / "coco", "train", train_images, train_annotations, categories)
  val_images, val_annotations = _images(rng, 3, start_id=500, size=(56, 40))
  write_coco_folder(tmp_path / "coco", "val", val_images, val_annotations, categories)

  config = load_config("configs/detr.py", "tiny", **{
      "dataset.name": "coco_folder", "dataset.path": str(tmp_path / "coco"), "dataset.config_name": "",
      "dataset.eval_split": "val", "dataset.scales": (32, 40), "dataset.max_size": 64,
      "dataset.crop_resize_scales": (32,), "dataset.crop_size": (24, 32),
      "eval_steps": -1, "batch_size": 4, "task.num_visualizations": 2,
      "init.pretrain_config": ""})
  workdir = str(tmp_path / "run")
  summary = launch.run(config, workdir, "train")
  assert summary["step"] == 2
  assert summary["eval/num_images"] == 3
  assert any("999.png" in record.getMessage() for record in caplog.records)   # skipped, and said so
  with open(os.path.join(workdir, "eval", "detections_step_2.json")) as f:
    detections = json.load(f)
  assert {d["image_id"] for d in detections} == {500, 501, 502}
  assert {d["category_id"] for d in detections} <= {3, 7}
  pngs = sorted(p for p in os.listdir(os.path.join(workdir, "eval")) if p.endswith(".png"))
  assert pngs == ["step_2_image_500.png", "step_2_image_501.png"]
