"""COCO ``segm`` evaluation in the one detection evaluator: cvjax's mask AP equals pycocotools run directly on
the same ground-truth file and the same results JSON, against a dataset's annotations (polygons, RLE, an
uncompressed-RLE crowd region) and against ground truth rebuilt from the batches' masks; perfect masks score
1.0 and shifted ones less; empty batches give zeros, not NaN."""

import contextlib
import io
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from cvjax.evaluation.detection import COCO_STATS, DetectionEvaluator

HEIGHT, WIDTH = 80, 96  # original image size (non-square: a transposed mask would not fit)
D = 4
# x, y, w, h, label: pixels [x, x + w) x [y, y + h). Sides are 28k + 1 so that a uniform 28 x 28 mask above 0.5
# in the box [x, y, x + w - 1, y + h - 1] pastes (box expanded by 30/28, torchvision's +1 pixel) to exactly them.
OBJECTS = {1: [(3, 4, 29, 29, 0), (38, 20, 57, 29, 1)], 2: [(5, 40, 29, 29, 1), (50, 10, 29, 57, 0)]}
CROWD = (2, 2, 38, 28)  # image 2, label 0


def _rectangle(x, y, w, h, size=(HEIGHT, WIDTH)):
  mask = np.zeros(size, np.uint8)
  mask[y:y + h, x:x + w] = 1
  return mask


def _compressed_rle(mask):
  rle = mask_utils.encode(np.asfortranarray(mask))
  return dict(rle, counts=rle["counts"].decode("ascii"))


def _uncompressed_rle(mask):
  """COCO's crowd format: run lengths (starting with zeros) of the column-major pixels, as a list."""
  flat = mask.flatten(order="F")
  edges = np.flatnonzero(np.diff(flat)) + 1
  runs = np.diff(np.concatenate([[0], edges, [flat.size]])).tolist()
  return {"counts": ([0] if flat[0] else []) + runs, "size": list(mask.shape)}


def _dataset_ground_truth(with_segmentation=True):
  annotations = []
  for image_id, objects in OBJECTS.items():
    for n, (x, y, w, h, label) in enumerate(objects):
      segmentation = ([[x, y, x + w, y, x + w, y + h, x, y + h]] if n == 0
                      else _compressed_rle(_rectangle(x, y, w, h)))
      annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                          "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0})
      if with_segmentation:
        annotations[-1]["segmentation"] = segmentation
  x, y, w, h = CROWD
  annotations.append({"id": 99, "image_id": 2, "category_id": 1, "bbox": [x, y, w, h], "area": float(w * h),
                      "iscrowd": 1, "segmentation": _uncompressed_rle(_rectangle(x, y, w, h))})
  return {"images": [{"id": i, "height": HEIGHT, "width": WIDTH} for i in OBJECTS],
          "annotations": annotations, "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}


def _outputs(shift=0.0, batch_ground_truth=False, frame=112, scale=1):
  """One batch of both images: per object a detection whose box (and so its pasted mask, 0.6 everywhere) is
  shifted by ``shift`` pixels, plus one inside image 2's crowd region (ignored there, not a false positive). With
  ``batch_ground_truth`` also the objects as ``gt_*`` outputs, masks in a ``frame`` x ``frame`` model input
  whose real region is the original image downscaled by ``scale``; the padding is filled with ones, which the
  evaluator must crop away."""
  batch = len(OBJECTS)
  out = {"boxes": np.zeros((batch, D, 4), np.float32), "scores": np.zeros((batch, D), np.float32),
         "labels": np.zeros((batch, D), np.int32), "valid": np.zeros((batch, D), bool),
         "mask_probs": np.zeros((batch, D, 28, 28), np.float32), "image_id": np.array(list(OBJECTS)),
         "orig_size": np.tile([HEIGHT, WIDTH], (batch, 1)).astype(np.int32), "mask": np.ones((batch,), bool)}
  for b, objects in enumerate(OBJECTS.values()):
    rows = [(x + shift, y, x + w - 1 + shift, y + h - 1, label) for x, y, w, h, label in objects]
    if b == 1:
      rows.append((8, 6, 30, 24, 0))
    for d, (*box, label) in enumerate(rows):
      out["boxes"][b, d], out["labels"][b, d], out["valid"][b, d] = box, label, True
      out["scores"][b, d] = 0.9 - 0.1 * d
      out["mask_probs"][b, d] = 0.6  # above the 0.5 threshold: the whole box
  if batch_ground_truth:
    m, real = 3, (HEIGHT // scale, WIDTH // scale)
    out.update(gt_boxes=np.zeros((batch, m, 4), np.float32), gt_labels=np.zeros((batch, m), np.int32),
               gt_valid=np.zeros((batch, m), bool), gt_area=np.zeros((batch, m), np.float32),
               gt_masks=np.ones((batch, m, frame, frame), np.uint8), input_size=np.tile(real, (batch, 1)))
    for b, objects in enumerate(OBJECTS.values()):
      for n, (x, y, w, h, label) in enumerate(objects):
        out["gt_boxes"][b, n] = (x, y, x + w, y + h)
        out["gt_labels"][b, n], out["gt_valid"][b, n], out["gt_area"][b, n] = label, True, w * h
        out["gt_masks"][b, n, :real[0], :real[1]] = _rectangle(x // scale, y // scale, w // scale, h // scale,
                                                               real)
  return out


def _pycocotools(ground_truth_file, results_file, iou_type="segm"):
  with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO(ground_truth_file)
    evaluation = COCOeval(coco, coco.loadRes(results_file), iou_type)
    evaluation.evaluate()
    evaluation.accumulate()
    evaluation.summarize()
  return dict(zip(COCO_STATS, evaluation.stats))


@pytest.mark.parametrize("source", ["dataset", "batches"])
def test_mask_ap_equals_pycocotools_on_the_same_files(source, tmp_path):
  mask_ap = {}
  for shift in (0.0, 4.0):
    ground_truth = _dataset_ground_truth() if source == "dataset" else None
    evaluator = DetectionEvaluator(["a", "b"], ground_truth=ground_truth)
    evaluator.update(_outputs(shift, batch_ground_truth=ground_truth is None))
    scalars, details = evaluator.result()
    directory = tmp_path / f"{source}_{shift}"
    paths = evaluator.write_files(str(directory), step=7)
    assert [p.rsplit("/", 1)[1] for p in paths] == ["detections_step_7.json", "segmentations_step_7.json"]
    ground_truth_file = directory / "instances.json"
    ground_truth_file.write_text(json.dumps(evaluator.coco_ground_truth()))
    results = json.loads(open(paths[1]).read())
    assert len(results) == 5 and all(isinstance(r["segmentation"]["counts"], str) for r in results)
    assert all(r["segmentation"]["size"] == [HEIGHT, WIDTH] and "bbox" not in r for r in results)
    segm = _pycocotools(str(ground_truth_file), paths[1])
    bbox = _pycocotools(str(ground_truth_file), paths[0], "bbox")
    for name in COCO_STATS:
      assert scalars[f"mask_{name}"] == segm[name], name
      assert scalars[name] == bbox[name], name   # the bbox stats keep their names and values
    assert set(details["per_class_mask_AP"]) == {"a", "b"} and set(details["per_class_AP"]) == {"a", "b"}
    mask_ap[shift] = scalars["mask_AP"]
  assert source == "batches" or evaluator.coco_ground_truth() == _dataset_ground_truth()  # not mutated by COCOeval
  assert mask_ap[0.0] == 1.0 and mask_ap[4.0] < 0.8


def test_batch_ground_truth_is_the_real_region_resized_to_the_original_size():
  """gt_masks at half resolution in a padded 64 x 64 frame: the ground truth's segmentations are the objects at
  the original size, pixel for pixel (even coordinates, so nearest-neighbour upsampling is exact)."""
  objects = {1: [(4, 6, 20, 30, 0), (40, 50, 50, 24, 1)], 2: [(0, 0, 96, 80, 1)]}
  outputs = _outputs(batch_ground_truth=True, frame=64, scale=2)
  outputs["gt_valid"][:] = False
  outputs["gt_masks"][:, :, :40, :48] = 0
  for b, rows in enumerate(objects.values()):
    for n, (x, y, w, h, label) in enumerate(rows):
      outputs["gt_boxes"][b, n], outputs["gt_labels"][b, n] = (x, y, x + w, y + h), label
      outputs["gt_valid"][b, n], outputs["gt_area"][b, n] = True, w * h
      outputs["gt_masks"][b, n, :40, :48] = _rectangle(x // 2, y // 2, w // 2, h // 2, (40, 48))
  evaluator = DetectionEvaluator(["a", "b"])
  evaluator.update(outputs)
  annotations = evaluator.coco_ground_truth()["annotations"]
  expected = [(image_id, _rectangle(x, y, w, h)) for image_id, rows in objects.items() for x, y, w, h, _ in rows]
  assert len(annotations) == len(expected)
  for annotation, (image_id, mask) in zip(annotations, expected):
    rle = dict(annotation["segmentation"], counts=annotation["segmentation"]["counts"].encode("ascii"))
    assert annotation["image_id"] == image_id
    np.testing.assert_array_equal(mask_utils.decode(rle), mask)
  scalars, _ = evaluator.result()
  assert 0 <= scalars["mask_AP"] <= 1


@pytest.mark.parametrize("source", ["dataset", "batches"])
@pytest.mark.parametrize("empty", ["invalid", "no_rows"])
def test_no_detections_gives_zeros_not_nan(source, empty, tmp_path):
  outputs = _outputs(batch_ground_truth=source == "batches")
  if empty == "invalid":
    outputs["valid"][:] = False
  else:  # D = 0
    for key in ("boxes", "scores", "labels", "valid", "mask_probs"):
      outputs[key] = outputs[key][:, :0]
  evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth() if source == "dataset" else None)
  evaluator.update(outputs)
  scalars, details = evaluator.result()
  assert set(scalars) == {"num_images"} | set(COCO_STATS) | {f"mask_{name}" for name in COCO_STATS}
  assert all(np.isfinite(v) for v in scalars.values()) and scalars["mask_AP"] == 0.0
  assert "per_class_mask_AP" in details
  segmentations = [p for p in evaluator.write_files(str(tmp_path), step=1) if "segmentations" in p]
  assert json.loads(open(segmentations[0]).read()) == []


def test_without_mask_outputs_no_segm_and_missing_mask_ground_truth_is_an_error(tmp_path):
  outputs = _outputs()
  del outputs["mask_probs"]
  evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth())
  evaluator.update(outputs)
  scalars, details = evaluator.result()
  assert not any(name.startswith("mask_") for name in scalars) and "per_class_mask_AP" not in details
  assert [p.rsplit("/", 1)[1] for p in evaluator.write_files(str(tmp_path), step=1)] == ["detections_step_1.json"]

  evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth(with_segmentation=False))
  evaluator.update(_outputs())
  with pytest.raises(ValueError, match=r"annotations \[1, 2, 3, 4\] \(of 4\) have no 'segmentation'"):
    evaluator.result()
  outputs = _outputs(batch_ground_truth=True)
  del outputs["gt_masks"]
  with pytest.raises(ValueError, match=r"mask_probs but not gt_masks \[B, M, h, w\] and input_size"):
    DetectionEvaluator(["a", "b"]).update(outputs)


def test_drawings_overlay_the_predicted_masks(tmp_path):
  inputs = {"image": np.zeros((2, HEIGHT, WIDTH, 3), np.float32), "pixel_mask": np.ones((2, HEIGHT, WIDTH), bool),
            "image_id": np.array(list(OBJECTS)), "mask": np.ones((2,), bool)}
  drawn = {}
  for with_masks in (True, False):
    evaluator = DetectionEvaluator(["a", "b"], ground_truth=_dataset_ground_truth(), num_visualizations=1)
    outputs = _outputs()
    if not with_masks:
      del outputs["mask_probs"]
    evaluator.update(outputs, inputs=inputs)
    (png,) = [p for p in evaluator.write_files(str(tmp_path / str(with_masks)), step=3) if p.endswith(".png")]
    drawn[with_masks] = np.asarray(Image.open(png).convert("RGB"), np.float64)
  # The overlay colours the inside of image 1's first object (x 3..31, y 4..32), away from box edges and labels.
  scale = drawn[True].shape[0] // HEIGHT
  inside = (slice(14 * scale, 28 * scale), slice(8 * scale, 28 * scale))
  assert np.abs(drawn[True][inside] - drawn[False][inside]).mean() > 20
  outside = (slice(60 * scale, 75 * scale), slice(10 * scale, 30 * scale))
  np.testing.assert_array_equal(drawn[True][outside], drawn[False][outside])
