"""Semantic / panoptic segmentation data: shapes label maps through the pipeline, geometry applied to labels with
nearest-neighbour sampling, letterbox padding ignored, and the real-dataset readers' label conventions."""

import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from cvjax.data import create_pipeline, preprocessing, segmentation_datasets, segmentation_transforms
from cvjax.data.segmentation_transforms import IGNORE_LABEL, segmentation_example


def _config(data_dir, **dataset):
  dataset = dict(name="shapes", task="segmentation", config_name="detection_32",
                 num_examples={"train": 64, "validation": 16, "test": 16}, **dataset)
  return ml_collections.ConfigDict(dict(data_dir=data_dir, batch_size=8, seed=0, dataset=dataset))


@pytest.mark.parametrize("train", [False, True])
def test_shapes_label_maps_match_the_instance_masks(data_dir, train):
  pipeline = create_pipeline(_config(data_dir, panoptic=True), "validation", train=train, process_index=0,
                             process_count=1)
  assert pipeline.task == "segmentation" and pipeline.num_classes == 7 and pipeline.things == (1, 2, 3, 4, 5, 6)
  batch = next(iter(pipeline.iterator()))
  assert batch["image"].shape == (8, 32, 32, 3) and batch["label_map"].shape == (8, 32, 32)
  assert batch["panoptic"].shape == (8, 32, 32, 2) and batch["label_map"].dtype == np.int32
  labels, instances = batch["label_map"], batch["panoptic"][..., 1]
  np.testing.assert_array_equal(batch["panoptic"][..., 0], labels)
  assert set(np.unique(labels)) <= set(range(7))       # square images: no padding, nothing ignored
  # Every shape pixel belongs to an instance and background to none; an instance has one class.
  np.testing.assert_array_equal(instances > 0, labels > 0)
  for b in range(8):
    for instance in np.unique(instances[b])[1:]:
      assert len(np.unique(labels[b][instances[b] == instance])) == 1


def test_evaluation_label_maps_are_the_datasets(data_dir):
  """Unaugmented 32x32 examples are the stored maps, pixel for pixel (the identity letterbox)."""
  pipeline = create_pipeline(_config(data_dir), "validation", train=False, process_index=0, process_count=1)
  batch = next(iter(pipeline.iterator()))
  source = segmentation_datasets.shapes_segmentation(_config(data_dir).dataset, data_dir, "validation")
  for b in range(3):
    stored = source.parse(source.records[b])["label_map"]
    np.testing.assert_array_equal(batch["label_map"][b], stored)


def _image_and_labels(h=24, w=40):
  """An image whose red channel encodes the column and green the row, and labels = column // 8."""
  yy, xx = np.mgrid[0:h, 0:w]
  image = np.stack([xx * 6, yy * 10, np.zeros_like(xx)], -1).astype(np.uint8)
  return image, (xx // 8).astype(np.int32), (yy // 6 + 1).astype(np.int32)


def test_evaluation_letterboxes_and_ignores_the_padding():
  image, labels, instances = _image_and_labels()
  options = preprocessing.Options(image_size=20)
  out = segmentation_example(image, labels, None, options, instance_map=instances)
  # 24 x 40 -> 12 x 20 on a 20 x 20 canvas: rows 12.. are padding, ignored and without instances.
  assert (out["label_map"][12:] == IGNORE_LABEL).all() and (out["panoptic"][12:, :, 1] == 0).all()
  # Nearest neighbour at pixel centres: output column j samples input column 2j + 1 (scale 2).
  np.testing.assert_array_equal(out["label_map"][:12], np.broadcast_to((2 * np.arange(20) + 1) // 8, (12, 20)))
  assert set(np.unique(out["label_map"])) <= set(range(5)) | {IGNORE_LABEL}


def test_training_geometry_moves_labels_with_their_pixels():
  """Flip and random resized crop: every output pixel's label is the label of the input pixel its colour came
  from (labels = column // 8, colour = column), so a flip or crop applied to one but not the other fails."""
  image, labels, _ = _image_and_labels(32, 40)
  options = preprocessing.Options(image_size=32, augment=True, crop_scale=(0.3, 1.0))
  flipped = 0
  for seed in range(12):
    out = segmentation_example(image, labels, np.random.default_rng(seed), options)
    pixels = np.clip(np.round((out["image"] * preprocessing.IMAGENET_STD + preprocessing.IMAGENET_MEAN) * 255),
                     0, 255)
    source_column = pixels[..., 0] / 6
    # Bilinear image vs nearest labels: compare away from label boundaries (columns 8k - 1 .. 8k).
    interior = np.abs(source_column % 8 - 3.5) < 2.5
    np.testing.assert_array_equal(out["label_map"][interior], (source_column[interior] // 8).astype(int))
    flipped += int(source_column[0, 0] > source_column[0, -1])
  assert 0 < flipped < 12     # both flipped and unflipped draws happened


def test_bad_maps_are_named():
  image, labels, _ = _image_and_labels()
  with pytest.raises(ValueError, match="label_map has shape"):
    segmentation_example(image, labels[:-1], None, preprocessing.Options(image_size=16))


def test_padding_rows_are_all_ignore():
  example = segmentation_transforms.padding_example(preprocessing.Options(image_size=8), panoptic=True)
  assert not example["mask"] and (example["label_map"] == IGNORE_LABEL).all()
  assert example["panoptic"].shape == (8, 8, 2)


def test_dataset_label_conventions():
  # ADE20K: 0 ("other") ignored, 1..150 -> 0..149; Cityscapes: label ids -> train ids, others and -1 ignored.
  ade = np.array([[0, 1, 150]])
  np.testing.assert_array_equal(segmentation_datasets.lookup(ade, {v: v - 1 for v in range(1, 151)}),
                                [[IGNORE_LABEL, 0, 149]])
  city = np.array([[7, 26, 0, -1, 33]])
  np.testing.assert_array_equal(segmentation_datasets.lookup(city, segmentation_datasets.CITYSCAPES_TRAIN_IDS),
                                [[0, 13, IGNORE_LABEL, IGNORE_LABEL, 18]])
  # COCO panoptic: id = R + 256 G + 256^2 B; things numbered, stuff instance 0, crowd and void ignored.
  ids = np.array([[0, 5, 5], [300, 300, 70000]])
  rgb = np.stack([ids % 256, ids // 256 % 256, ids // 65536], -1)
  labels, instances = segmentation_datasets.coco_panoptic_maps(rgb, [5, 300, 70000], [3, 100, 7],
                                                               [False, False, True])
  np.testing.assert_array_equal(labels, [[IGNORE_LABEL, 3, 3], [100, 100, IGNORE_LABEL]])
  np.testing.assert_array_equal(instances, [[0, 1, 1], [0, 0, 0]])


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def test_segmentation_folder(tmp_path):
  root = tmp_path / "data"
  rng = np.random.default_rng(0)
  for name in ("a", "b"):
    _write_png(str(root / "images" / "train" / f"{name}.png"), rng.integers(0, 255, (16, 24, 3), dtype=np.uint8))
    _write_png(str(root / "labels" / "train" / f"{name}.png"), rng.integers(0, 3, (16, 24), dtype=np.uint8))
  config = ml_collections.ConfigDict(dict(data_dir="unused", batch_size=2, seed=0, dataset=dict(
      name="segmentation_folder", task="segmentation", path=str(root), image_size=24)))
  with pytest.raises(FileNotFoundError, match="classes.txt"):
    create_pipeline(config, "train", train=False, process_index=0, process_count=1)
  (root / "classes.txt").write_text("sky\nroad\ncar\n")
  pipeline = create_pipeline(config, "train", train=False, process_index=0, process_count=1)
  assert pipeline.class_names == ("sky", "road", "car")
  batch = next(iter(pipeline.iterator()))
  stored = np.asarray(Image.open(root / "labels" / "train" / "a.png"))
  np.testing.assert_array_equal(batch["label_map"][0][:16], stored)
  assert (batch["label_map"][0][16:] == IGNORE_LABEL).all()
  with pytest.raises(FileNotFoundError, match="no .*validation"):
    create_pipeline(config, "validation", train=False, process_index=0, process_count=1)


def test_missing_real_datasets_say_how_to_prepare(tmp_path):
  for name in ("scene_parse150", "cityscapes", "coco_panoptic"):
    config = ml_collections.ConfigDict(dict(data_dir=str(tmp_path), batch_size=2, seed=0,
                                            dataset=dict(name=name, task="segmentation")))
    with pytest.raises(FileNotFoundError, match="never downloads"):
      create_pipeline(config, "train", train=False, process_index=0, process_count=1)
  config = ml_collections.ConfigDict(dict(data_dir=str(tmp_path), batch_size=2, seed=0, dataset=dict(
      name="voc_segmentation", task="segmentation", path=str(tmp_path))))
  with pytest.raises(FileNotFoundError, match="SegmentationClass"):
    create_pipeline(config, "train", train=False, process_index=0, process_count=1)


def test_panoptic_segments_are_mask_classification_targets(data_dir):
  """One segment per thing instance and per stuff category, each mask the pixels of its (category, instance),
  padded to max_segments; the segments tile every labelled pixel exactly once."""
  pipeline = create_pipeline(_config(data_dir, panoptic=True, max_segments=6), "validation", train=True,
                             process_index=0, process_count=1)
  batch = next(iter(pipeline.iterator()))
  assert batch["segment_masks"].shape == (8, 6, 32, 32) and batch["segment_labels"].shape == (8, 6)
  for b in range(8):
    valid = batch["segment_valid"][b]
    masks, labels = batch["segment_masks"][b][valid], batch["segment_labels"][b][valid]
    categories, instances = batch["panoptic"][b, ..., 0], batch["panoptic"][b, ..., 1]
    assert len(masks) == len(np.unique(instances)) - 1 + int((categories == 0).any())
    np.testing.assert_array_equal(masks.sum(0), (categories != IGNORE_LABEL).astype(int))
    for mask, label in zip(masks, labels):
      assert (categories[mask > 0] == label).all()
      assert len(np.unique(instances[mask > 0])) == 1
  crowded = segmentation_transforms.panoptic_segments(
      np.stack([np.array([[0, 1, 1, 2]]), np.array([[0, 1, 2, 3]])], -1), things=(1, 2), max_segments=2)
  assert crowded["segment_valid"].all() and list(crowded["segment_labels"]) == [0, 1]   # stuff, then things
