"""Segmentation metrics against torchmetrics: mIoU (``MulticlassJaccardIndex``) from confusion matrices over all
pixels, with absent classes, the ignore label, invalid predictions and on-device accumulation; panoptic quality
(``PanopticQuality``) with things, stuff, void, predictions over void and empty images, and against a direct
pixel-set transcription of panopticapi's rules where the two references differ (unassigned predicted pixels)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassJaccardIndex
from torchmetrics.detection import PanopticQuality

from cvjax.evaluation.segmentation import (PanopticQualityAccumulator, SemanticSegmentationAccumulator,
                                           confusion_matrix, mean_iou, miou_from_confusion, panoptic_quality)

IGNORE = 255


def _torch_jaccard(preds, targets, num_classes, **kwargs):
  metric = MulticlassJaccardIndex(num_classes, ignore_index=IGNORE, **kwargs)
  return metric(torch.from_numpy(preds), torch.from_numpy(targets)).numpy().astype(np.float64)


def _random_label_maps(seed, num_classes, shape=(3, 12, 10)):
  """Targets over a subset of the classes (some absent from GT, the last always absent from both) with ignored
  pixels; predictions that are right half the time and otherwise any class but the last."""
  rng = np.random.RandomState(seed)
  gt_classes = rng.choice(num_classes - 1, size=max(1, (num_classes - 1) // 2 + 1), replace=False)
  targets = rng.choice(gt_classes, shape)
  preds = np.where(rng.rand(*shape) < 0.5, targets, rng.randint(0, num_classes - 1, shape))
  targets[rng.rand(*shape) < 0.15] = IGNORE
  return preds, targets


@pytest.mark.parametrize("seed, num_classes", [(0, 3), (1, 5), (2, 8), (3, 21)])
def test_miou_matches_torchmetrics_with_absent_classes_and_ignored_pixels(seed, num_classes):
  preds, targets = _random_label_maps(seed, num_classes)
  got = mean_iou(preds, targets, num_classes)
  labelled = targets != IGNORE
  absent_from_both = ~np.isin(np.arange(num_classes), np.concatenate([preds[labelled], targets[labelled]]))
  assert absent_from_both[-1] and not absent_from_both.all()
  # torchmetrics' macro average leaves out classes absent from both, as cvjax does.
  np.testing.assert_allclose(got["miou"], _torch_jaccard(preds, targets, num_classes, average="macro"), rtol=1e-6)
  # Per class: torchmetrics with zero_division=nan is cvjax's convention; its default gives absent classes 0.
  np.testing.assert_allclose(got["per_class_iou"], _torch_jaccard(preds, targets, num_classes, average="none",
                                                                  zero_division=float("nan")), rtol=1e-6)
  default = _torch_jaccard(preds, targets, num_classes, average="none")
  assert np.array_equal(np.isnan(got["per_class_iou"]), absent_from_both)
  assert (default[absent_from_both] == 0).all()
  accuracy = MulticlassAccuracy(num_classes, average="micro", ignore_index=IGNORE)
  np.testing.assert_allclose(got["pixel_accuracy"], accuracy(torch.from_numpy(preds), torch.from_numpy(targets)),
                             rtol=1e-6)
  confusion = np.asarray(confusion_matrix(preds, targets, num_classes))
  reference = MulticlassConfusionMatrix(num_classes, ignore_index=IGNORE)(torch.from_numpy(preds),
                                                                          torch.from_numpy(targets)).numpy()
  np.testing.assert_array_equal(confusion[:, :num_classes], reference)
  assert confusion.shape == (num_classes, num_classes + 1) and (confusion[:, -1] == 0).all()


def test_perfect_and_all_background_predictions():
  _, targets = _random_label_maps(4, 6)
  perfect = mean_iou(targets, targets, 6)
  assert float(perfect["miou"]) == 1.0 and float(perfect["pixel_accuracy"]) == 1.0
  present = np.isin(np.arange(6), targets)
  np.testing.assert_array_equal(np.asarray(perfect["per_class_iou"])[present], 1.0)
  assert np.isnan(np.asarray(perfect["per_class_iou"])[~present]).all()

  background = np.zeros_like(targets)
  got = mean_iou(background, targets, 6)
  labelled = targets != IGNORE
  iou_0 = np.sum(targets == 0) / labelled.sum()  # TP = GT zeros, union = every labelled pixel
  np.testing.assert_allclose(got["per_class_iou"][0], iou_0, rtol=1e-6)
  np.testing.assert_array_equal(np.asarray(got["per_class_iou"])[1:][present[1:]], 0.0)
  np.testing.assert_allclose(got["miou"], iou_0 / (present | (np.arange(6) == 0)).sum(), rtol=1e-6)
  np.testing.assert_allclose(got["miou"], _torch_jaccard(background, targets, 6, average="macro"), rtol=1e-6)
  np.testing.assert_allclose(got["pixel_accuracy"], iou_0, rtol=1e-6)


def test_no_labelled_pixel_gives_zero_means_and_nan_classes():
  preds = np.random.RandomState(5).randint(0, 4, (2, 6, 6))
  targets = np.full_like(preds, IGNORE)
  got = mean_iou(preds, targets, 4)
  assert float(got["miou"]) == 0.0 and float(got["pixel_accuracy"]) == 0.0
  assert np.isnan(np.asarray(got["per_class_iou"])).all()
  # Where cvjax reports an empty split as 0.0, torchmetrics' macro average is NaN (documented difference).
  assert np.isnan(_torch_jaccard(preds, targets, 4, average="macro"))


def test_predictions_outside_the_classes_are_wrong():
  rng = np.random.RandomState(6)
  num_classes = 4
  targets = rng.randint(0, num_classes, (2, 9, 7))
  preds = np.where(rng.rand(*targets.shape) < 0.6, targets, rng.choice([-1, num_classes, IGNORE], targets.shape))
  preds[0, 0, :3] = 2
  targets[1, :2] = IGNORE
  got = mean_iou(preds, targets, num_classes)
  labelled = targets != IGNORE
  p, t = preds[labelled], targets[labelled]
  iou = [np.sum((p == c) & (t == c)) / np.sum((p == c) | (t == c)) for c in range(num_classes)]
  np.testing.assert_allclose(got["per_class_iou"], iou, rtol=1e-6)
  np.testing.assert_allclose(got["miou"], np.mean(iou), rtol=1e-6)
  np.testing.assert_allclose(got["pixel_accuracy"], np.mean(p == t), rtol=1e-6)
  confusion = np.asarray(confusion_matrix(preds, targets, num_classes))
  assert confusion[:, -1].sum() == np.sum((p < 0) | (p >= num_classes)) > 0
  np.testing.assert_array_equal(confusion.sum(1), np.bincount(t, minlength=num_classes))


def test_targets_outside_the_classes_raise_eagerly_and_are_excluded_under_jit():
  rng = np.random.RandomState(7)
  preds = rng.randint(0, 3, (2, 5, 5))
  targets = rng.randint(0, 3, (2, 5, 5))
  bad = targets.copy()
  bad[0, 0, :2] = (3, -2)
  with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\) or equal ignore_index 255"):
    confusion_matrix(preds, bad, 3)
  with pytest.raises(ValueError, match=r"targets must lie in \[0, 3\)"):
    SemanticSegmentationAccumulator(3).update(preds, bad)
  jitted = jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))
  excluded = np.where(np.isin(bad, [3, -2]), IGNORE, bad)
  np.testing.assert_array_equal(jitted(preds, bad, num_classes=3), confusion_matrix(preds, excluded, 3))


def test_invalid_arguments_are_clear_errors():
  labels = np.zeros((4, 4), np.int32)
  with pytest.raises(ValueError, match="ignore_index 0 is one of the 3 classes"):
    mean_iou(labels, labels, 3, ignore_index=0)
  with pytest.raises(ValueError, match="preds must be integer class labels"):
    confusion_matrix(labels.astype(np.float32), labels, 3)
  with pytest.raises(ValueError, match="same shape"):
    confusion_matrix(labels[:2], labels, 3)
  with pytest.raises(ValueError, match=r"\[K, K \+ 1\]"):
    miou_from_confusion(np.zeros((3, 5), np.int64))


def test_jitted_confusion_accumulated_over_batches_equals_the_concatenated_batch():
  preds, targets = _random_label_maps(8, 7, shape=(8, 10, 12))
  preds[2, 0, :4] = IGNORE  # an invalid prediction, counted in the last column
  num_classes = 7
  jitted = jax.jit(confusion_matrix, static_argnames=("num_classes", "ignore_index"))
  total = jnp.zeros((num_classes, num_classes + 1), jnp.int32)
  accumulator = SemanticSegmentationAccumulator(num_classes)
  for batch in np.split(np.arange(8), 4):
    total = total + jitted(jnp.asarray(preds[batch]), jnp.asarray(targets[batch]), num_classes=num_classes)
    accumulator.update(preds[batch], targets[batch])
  whole = confusion_matrix(preds, targets, num_classes)
  np.testing.assert_array_equal(total, whole)
  np.testing.assert_array_equal(accumulator.confusion, whole)
  assert int(whole.sum()) == np.sum(targets != IGNORE) and int(whole[:, -1].sum()) > 0
  # Per image ([H, W]) updates and device-reduced matrices add up to the same split.
  per_image = SemanticSegmentationAccumulator(num_classes)
  for image in range(8):
    per_image.add_confusion(confusion_matrix(preds[image], targets[image], num_classes))
  np.testing.assert_array_equal(per_image.confusion, accumulator.confusion)
  expected = mean_iou(preds, targets, num_classes)
  result = accumulator.result()
  np.testing.assert_allclose(result["miou"], expected["miou"], rtol=1e-6)
  np.testing.assert_allclose(result["per_class_iou"], expected["per_class_iou"], rtol=1e-6)
  np.testing.assert_allclose(result["pixel_accuracy"], expected["pixel_accuracy"], rtol=1e-6)
  assert isinstance(result["miou"], float)


def test_miou_from_confusion_host_device_square_and_uint8_agree():
  preds, targets = _random_label_maps(9, 21, shape=(2, 16, 16))
  confusion = np.asarray(confusion_matrix(preds.astype(np.uint8), targets.astype(np.uint8), 21))
  # uint8 maps: target * (K + 1) exceeds 255, computed in int32 all the same.
  np.testing.assert_array_equal(confusion, confusion_matrix(preds, targets, 21))
  host = miou_from_confusion(confusion.astype(np.int64))
  device = jax.jit(miou_from_confusion)(jnp.asarray(confusion))
  square = miou_from_confusion(confusion[:, :21])  # e.g. torchmetrics' matrix: no invalid predictions here
  for got in (device, square):
    np.testing.assert_allclose(got["miou"], host["miou"], rtol=1e-6)
    np.testing.assert_allclose(got["per_class_iou"], host["per_class_iou"], rtol=1e-6)
  assert host["per_class_iou"].dtype == np.float64 and device["miou"].dtype == jnp.float32
  np.testing.assert_allclose(host["miou"], _torch_jaccard(preds, targets, 21, average="macro"), rtol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# Panoptic quality

THINGS, STUFFS, VOID = (1, 3, 4), (0, 6), 255  # category 9 in ground truths: also void (not a known category)


def _reference_pq(preds, targets, things, stuffs):
  """Per-category ``(iou_sum, tp, fp, fn)`` from panopticapi's rules written out on pixel sets, image by image
  (predicted pixels outside the categories are unassigned)."""
  categories = sorted(things) + sorted(stuffs)
  stats = {c: [0.0, 0, 0, 0] for c in categories}
  height, width = targets.shape[-3:-1]
  for pred, target in zip(preds.reshape(-1, height * width, 2), targets.reshape(-1, height * width, 2)):
    def segments(panoptic):
      found = {}
      for pixel, (category, instance) in enumerate(panoptic.tolist()):
        if category in categories:
          found.setdefault((category, instance if category in things else 0), set()).add(pixel)
      return found

    pred_segments, target_segments = segments(pred), segments(target)
    void = {pixel for pixel, category in enumerate(target[:, 0].tolist()) if category not in categories}
    matched_pred, matched_target = set(), set()
    for target_key, target_pixels in target_segments.items():
      for pred_key, pred_pixels in pred_segments.items():
        if pred_key[0] != target_key[0]:
          continue
        iou = len(target_pixels & pred_pixels) / (len(target_pixels | pred_pixels) - len(pred_pixels & void))
        if iou > 0.5:
          stats[target_key[0]][0] += iou
          stats[target_key[0]][1] += 1
          matched_pred.add(pred_key)
          matched_target.add(target_key)
    for pred_key, pred_pixels in pred_segments.items():
      if pred_key not in matched_pred and len(pred_pixels & void) <= len(pred_pixels) / 2:
        stats[pred_key[0]][2] += 1
    for target_key in target_segments:
      if target_key not in matched_target:
        stats[target_key[0]][3] += 1
  return categories, stats


def _reference_averages(categories, stats, things):
  averages = {}
  for suffix, keep in (("", lambda c: True), ("_things", lambda c: c in things), ("_stuff", lambda c: c not in things)):
    rows = []
    for c in categories:
      iou, tp, fp, fn = stats[c]
      if keep(c) and tp + fp + fn > 0:
        rows.append((iou / (tp + fp / 2 + fn / 2), iou / tp if tp else 0.0, tp / (tp + fp / 2 + fn / 2)))
    for name, mean in zip(("pq", "sq", "rq"), np.mean(rows, 0) if rows else np.zeros(3)):
      averages[name + suffix] = float(mean)
  return averages


def _torch_pq(preds, targets, things=THINGS, stuffs=STUFFS, **kwargs):
  """torchmetrics' per-category ``[C, 3]`` (pq, sq, rq) and overall ``[3]``."""
  per_class = PanopticQuality(set(things), set(stuffs), return_sq_and_rq=True, return_per_class=True, **kwargs)
  overall = PanopticQuality(set(things), set(stuffs), return_sq_and_rq=True, **kwargs)
  preds, targets = torch.from_numpy(preds.reshape(-1, *preds.shape[-3:])), torch.from_numpy(
      targets.reshape(-1, *targets.shape[-3:]))
  return per_class(preds, targets).numpy(), overall(preds, targets).numpy()


def _random_panoptic(seed, batch=3, height=20, width=25, block=5):
  """Blocky ground truth (things with a few instances, stuff, void 255 and 9) and predictions that shift each
  image by up to a pixel per axis (segment IoUs on both sides of 0.5), relabel some blocks and cover the void with
  known categories."""
  rng = np.random.RandomState(seed)
  grid = (batch, height // block, width // block)
  categories = np.array(THINGS + STUFFS + (VOID, 9))
  coarse = np.stack([rng.choice(categories, grid, p=[0.2, 0.2, 0.15, 0.15, 0.15, 0.1, 0.05]),
                     rng.randint(1, 4, grid)], -1)
  targets = coarse.repeat(block, 1).repeat(block, 2)
  known = np.array(THINGS + STUFFS)
  preds = np.stack([np.roll(image, tuple(rng.randint(-1, 2, 2)), axis=(0, 1)) for image in targets])
  relabel = rng.rand(*grid) < 0.3
  coarse_pred = np.stack([np.where(relabel, rng.choice(known, grid), coarse[..., 0]),
                          np.where(relabel, rng.randint(1, 4, grid), coarse[..., 1])], -1)
  preds = np.where(relabel.repeat(block, 1).repeat(block, 2)[..., None],
                   coarse_pred.repeat(block, 1).repeat(block, 2), preds)
  void = ~np.isin(preds[..., 0], known)
  preds[..., 0] = np.where(void, rng.choice(known, void.shape), preds[..., 0])
  return preds, targets


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pq_matches_torchmetrics_and_panopticapi_rules_on_random_maps(seed):
  preds, targets = _random_panoptic(seed)
  got = panoptic_quality(preds, targets, THINGS, STUFFS)
  categories, stats = _reference_pq(preds, targets, THINGS, STUFFS)
  np.testing.assert_array_equal(got["categories"], categories)
  present = np.array([sum(stats[c][1:]) > 0 for c in categories])
  assert present.any() and 0 < got["pq"] < 1  # neither vacuous nor perfect
  for name, value in _reference_averages(categories, stats, THINGS).items():
    assert got[name] == pytest.approx(value, abs=1e-12), name
  per_class, overall = _torch_pq(preds, targets)
  np.testing.assert_allclose([got["pq"], got["sq"], got["rq"]], overall, atol=1e-12)
  ours = np.stack([got["per_category_pq"], got["per_category_sq"], got["per_category_rq"]], 1)
  np.testing.assert_allclose(ours[present], per_class[present], atol=1e-12)
  # Categories that never appeared: NaN here, 0 in torchmetrics.
  assert np.isnan(ours[~present]).all() and (per_class[~present] == 0).all()


def test_pq_perfect_prediction_and_stuff_instance_ids():
  _, targets = _random_panoptic(3)
  preds = np.where(np.isin(targets[..., :1], THINGS + STUFFS), targets, VOID)  # void 9 is no predicted category
  got = panoptic_quality(preds, targets, THINGS, STUFFS)
  for name in ("pq", "sq", "rq", "pq_things", "sq_things", "rq_things", "pq_stuff", "sq_stuff", "rq_stuff"):
    assert got[name] == 1.0, name
  # Stuff is one segment per category: its instance ids do not matter; a thing's do.
  stuff = np.isin(preds[..., 0], STUFFS)
  preds[..., 1] = np.where(stuff, np.random.RandomState(0).randint(0, 50, stuff.shape), preds[..., 1])
  assert panoptic_quality(preds, targets, THINGS, STUFFS)["pq"] == 1.0
  thing = np.isin(preds[..., 0], THINGS)
  preds[..., 1] = np.where(thing, preds[..., 1] + 10 * (np.arange(preds.shape[2]) % 2), preds[..., 1])
  assert panoptic_quality(preds, targets, THINGS, STUFFS)["pq_things"] < 1.0


def _two_segment_image():
  """10 x 10: a thing (1, 1) in rows 0-4, stuff 0 in rows 5-9 columns 0-5, void in rows 5-9 columns 6-9."""
  target = np.zeros((10, 10, 2), np.int32)
  target[:5] = (1, 1)
  target[5:, 6:] = (VOID, 0)
  return target


def test_pq_predictions_over_void_leave_the_union_and_are_not_false_positives():
  target = _two_segment_image()
  pred = target.copy()
  pred[5:, 6:] = (0, 0)  # stuff 0 also over the void
  pred[5:, 7:] = (3, 1)  # a thing on void only (15 pixels): not a false positive
  pred[5, 6] = (3, 2)    # 1 pixel on void and ...
  pred[5:7, 5] = (3, 2)  # ... 2 off it: mostly off void, a false positive of category 3
  got = panoptic_quality(pred[None], target[None], THINGS, STUFFS)
  index = {c: i for i, c in enumerate(got["categories"])}
  assert got["per_category_sq"][index[1]] == 1.0 and got["per_category_pq"][index[1]] == 1.0
  # Stuff 0: 28 pixels on its 30, 4 on void, left out of the union: 28 / (32 + 30 - 28 - 4), not 28 / 34.
  assert got["per_category_sq"][index[0]] == pytest.approx(28 / 30)
  assert got["per_category_rq"][index[3]] == 0.0  # one FP, no TP, no FN
  accumulator = PanopticQualityAccumulator(THINGS, STUFFS)
  accumulator.update(pred, target)
  assert accumulator.false_positives.tolist() == [0, 1, 0, 0, 0]
  assert accumulator.true_positives.tolist() == [1, 0, 0, 1, 0]
  per_class, overall = _torch_pq(pred, target)
  np.testing.assert_allclose([got["pq"], got["sq"], got["rq"]], overall, atol=1e-12)


def test_pq_unassigned_predictions_follow_panopticapi_where_torchmetrics_differs():
  target = _two_segment_image()
  pred = target.copy()
  pred[5:, 6:] = (0, 0)
  pred[3:5] = (VOID, 0)  # 20 of the thing's 50 pixels unassigned: IoU 30 / 50 (panopticapi), 30 / 30 (torchmetrics)
  got = panoptic_quality(pred, target, THINGS, STUFFS)
  index = {c: i for i, c in enumerate(got["categories"])}
  assert got["per_category_sq"][index[1]] == pytest.approx(0.6)
  categories, stats = _reference_pq(pred, target, THINGS, STUFFS)
  assert stats[1] == [pytest.approx(0.6), 1, 0, 0]
  unknown = pred.copy()
  unknown[3:5] = (8, 0)  # an unknown category: unassigned as well, when allowed
  with pytest.raises(ValueError, match=r"preds contain categories \[8\]"):
    panoptic_quality(unknown, target, THINGS, STUFFS)
  allowed = panoptic_quality(unknown, target, THINGS, STUFFS, allow_unknown_preds_category=True)
  np.testing.assert_array_equal(allowed["per_category_sq"], got["per_category_sq"])
  per_class, _ = _torch_pq(unknown, target, allow_unknown_preds_category=True)
  assert per_class[index[1], 1] == pytest.approx(1.0)

  # Nothing predicted: every GT segment is missed (pq 0); torchmetrics drops segments predicted void instead.
  empty = np.full_like(target, VOID)
  got = panoptic_quality(empty, target, THINGS, STUFFS)
  assert got["pq"] == 0.0 and got["rq"] == 0.0
  np.testing.assert_array_equal(got["per_category_pq"][[index[1], index[0]]], 0.0)
  assert np.isnan(got["per_category_pq"][[index[3], index[4], index[6]]]).all()
  _, overall = _torch_pq(np.full_like(target, 8), target, allow_unknown_preds_category=True)
  assert np.isnan(overall).all()


def test_pq_image_without_segments_is_zero_not_nan_and_adds_nothing():
  nothing = np.full((1, 20, 25, 2), VOID, np.int32)
  nothing[0, 0, :, 0] = 9  # another void category in the ground truth
  got = panoptic_quality(np.full_like(nothing, VOID), nothing, THINGS, STUFFS)
  scalars = [value for key, value in got.items() if not key.startswith("per_category") and key != "categories"]
  assert len(scalars) == 9 and all(value == 0.0 for value in scalars)
  assert np.isnan(got["per_category_pq"]).all()
  preds, targets = _random_panoptic(4, batch=1)
  accumulator = PanopticQualityAccumulator(THINGS, STUFFS)
  accumulator.update(preds, targets)
  accumulator.update(np.full_like(nothing, VOID), nothing)
  with_empty, alone = accumulator.result(), panoptic_quality(preds, targets, THINGS, STUFFS)
  assert alone["pq"] > 0
  for key, value in alone.items():
    np.testing.assert_array_equal(with_empty[key], value)


def test_pq_accumulated_over_batches_equals_one_call():
  preds, targets = _random_panoptic(5, batch=6)
  accumulator = PanopticQualityAccumulator(THINGS, STUFFS)
  for batch in np.split(np.arange(6), 3):
    accumulator.update(jnp.asarray(preds[batch]), targets[batch])
  got, whole = accumulator.result(), panoptic_quality(preds, targets, THINGS, STUFFS)
  for key, value in whole.items():
    np.testing.assert_allclose(got[key], value, atol=1e-12)
  # Leading axes are free: [2, 3, H, W, 2] is the same six images.
  nested = panoptic_quality(preds.reshape(2, 3, *preds.shape[1:]), targets.reshape(2, 3, *targets.shape[1:]),
                            THINGS, STUFFS)
  assert nested["pq"] == whole["pq"]
  _, overall = _torch_pq(preds, targets)
  np.testing.assert_allclose(got["pq"], overall[0], atol=1e-12)


def test_pq_invalid_arguments_are_clear_errors():
  target = _two_segment_image()
  with pytest.raises(ValueError, match="disjoint"):
    PanopticQualityAccumulator((1, 2), (2, 3))
  with pytest.raises(ValueError, match="void_label 0 must not be"):
    PanopticQualityAccumulator(THINGS, STUFFS, void_label=0)
  with pytest.raises(ValueError, match="integer category ids"):
    PanopticQualityAccumulator((1.5,), STUFFS)
  with pytest.raises(ValueError, match=r"\[\.\.\., H, W, 2\]"):
    panoptic_quality(target[..., :1], target[..., :1], THINGS, STUFFS)
  with pytest.raises(ValueError, match="same shape"):
    panoptic_quality(target[:5], target, THINGS, STUFFS)
