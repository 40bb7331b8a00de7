"""Segmentation metrics: mean IoU from a confusion matrix over all pixels, and panoptic quality (PQ).

Semantic segmentation (``confusion_matrix``, ``miou_from_confusion``, ``mean_iou``,
``SemanticSegmentationAccumulator``): integer label maps of any leading shape, pixels whose target is
``ignore_index`` excluded. Per-class IoU = TP / (TP + FP + FN) from the confusion matrix summed over every pixel of
the split (not a mean of per-image IoUs); the mean runs over the classes present in the ground truth or the
predictions. ``confusion_matrix`` is jax.numpy (jit-able, accumulable on device batch by batch); the metrics
from it are computed with NumPy in float64 for host matrices and with jnp for jax arrays.

Against torchmetrics' ``MulticlassJaccardIndex(num_classes=K, ignore_index=255)`` (1.9):
- ``average='macro'`` equals ``miou``: both leave out the classes absent from GT and prediction (mmseg and the
  FCN paper's "mean IU" do too). With ``zero_division=nan`` torchmetrics' macro average is NaN as soon as one
  class is absent (its weights multiply the NaN), so the default ``zero_division=0`` is the comparable one.
- ``average='none'`` gives absent classes ``zero_division`` (0 by default); ``per_class_iou`` gives them NaN,
  which tells "not evaluated" apart from "always wrong" (torchmetrics with ``zero_division=float('nan')``).
- With no valid pixel at all torchmetrics' macro average is NaN; ``miou`` and ``pixel_accuracy`` are 0.0, as
  cvjax's other evaluators report an empty split.
- Predictions outside ``[0, K)`` (a model's "no class", e.g. 255) are wrong: false negatives of the target's
  class, false positives of no class (mmseg's ``intersect_and_union``). torchmetrics does not support them.
- ``ignore_index`` inside ``[0, K)`` is an error here; torchmetrics drops that class from its macro average.

Panoptic segmentation (``panoptic_quality``, ``PanopticQualityAccumulator``): ``[..., H, W, 2]`` integer maps,
channel 0 the category id, channel 1 the instance id (torchmetrics' ``PanopticQuality`` layout). Stuff segments
are identified by their category alone (instance ids ignored), thing segments by (category, instance). Semantics
of panopticapi's ``pq_compute`` (Kirillov et al. 2019):
- ground-truth pixels whose category is not in ``things`` or ``stuffs`` (``void_label`` or any other id) are
  void; predicted pixels with ``void_label`` (or, with ``allow_unknown_preds_category``, any unknown category)
  are unassigned: they belong to no predicted segment;
- a predicted and a ground-truth segment of the same category match when IoU > 0.5 (unique by construction),
  with the prediction's pixels on GT void left out of the union: ``union = pred_area + gt_area - intersection -
  pred_area_on_void``;
- unmatched ground-truth segments are false negatives; unmatched predicted segments are false positives unless
  more than half of their area lies on GT void;
- per category PQ = sum IoU(TP) / (TP + FP/2 + FN/2) = SQ x RQ, averaged over the categories with TP + FP + FN > 0
  (all, things, stuff). Crowd regions are not supported (the layout has no crowd flag): mark them void.

Against torchmetrics' ``PanopticQuality(things, stuffs)`` (1.9): equal whenever every predicted pixel has a known
category. For unassigned predicted pixels (its ``allow_unknown_preds_category=True`` maps them to void)
torchmetrics also removes the ground-truth pixels predicted void from the union and drops unmatched ground-truth
segments that are mostly predicted void from the false negatives; panopticapi does neither (a GT segment that the
model left unlabelled is missed), and neither does cvjax. torchmetrics has no ``void_label`` for predictions,
returns 0 for the per-category values of absent categories (cvjax: NaN) and NaN averages when no category
appears (cvjax: 0.0).
"""

from __future__ import annotations

import os
from typing import Dict, Iterable, List, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

Array = Union[np.ndarray, jax.Array]


def confusion_matrix(preds: Array, targets: Array, num_classes: int, ignore_index: int = 255) -> jax.Array:
  """Pixel counts of (target class, predicted class) pairs, with one extra column for invalid predictions.

  Args:
    preds: integer ``[...]`` predicted class per pixel (e.g. ``argmax`` of ``logits [B, H, W, K]``); values
      outside ``[0, K)`` are counted in the last column.
    targets: integer ``[...]`` (same shape) ground-truth class per pixel, ``ignore_index`` where unlabelled.
    num_classes: ``K``, static.
    ignore_index: target value of excluded pixels, outside ``[0, K)`` (static).

  Returns:
    int32 ``[K, K + 1]``: ``confusion[t, p]`` counts the pixels of target class ``t`` predicted as ``p``; column
    ``K`` counts those predicted outside ``[0, K)`` (wrong for every class, so ``confusion[:, :K]`` is the usual
    ``[K, K]`` matrix and a row's sum is its class's number of labelled pixels). Sums over batches add up; int32
    holds 2^31 pixels per cell (accumulate in int64 on the host beyond that).

  Targets outside ``[0, K)`` other than ``ignore_index`` are a ``ValueError`` for concrete arrays; under
  ``jax.jit`` (where values cannot be checked) they are excluded like ``ignore_index``.
  """
  _check_label_maps(preds, targets, num_classes, ignore_index)
  return _confusion_matrix_jit(preds, targets, num_classes)


def _confusion_matrix(preds, targets, num_classes: int) -> jax.Array:
  """``confusion_matrix`` without the checks; ``ignore_index`` lies outside ``[0, K)`` and is excluded here with
  every other target outside the classes."""
  # int32 before the index arithmetic: uint8 label maps would wrap around at target * (K + 1).
  preds, targets = jnp.asarray(preds, jnp.int32).ravel(), jnp.asarray(targets, jnp.int32).ravel()
  valid = (targets >= 0) & (targets < num_classes)
  columns = jnp.where((preds >= 0) & (preds < num_classes), preds, num_classes)
  index = jnp.where(valid, targets, 0) * (num_classes + 1) + columns
  counts = jnp.bincount(index, weights=valid.astype(jnp.int32), length=num_classes * (num_classes + 1))
  return counts.reshape(num_classes, num_classes + 1)


# Eager calls too: one compiled program per input shape, not one dispatch per primitive (5x faster to first use).
_confusion_matrix_jit = jax.jit(_confusion_matrix, static_argnums=2)
_mean_iou_jit = jax.jit(lambda preds, targets, num_classes: miou_from_confusion(
    _confusion_matrix(preds, targets, num_classes)), static_argnums=2)


def miou_from_confusion(confusion: Array) -> Dict[str, Array]:
  """mIoU, per-class IoU and pixel accuracy from a confusion matrix summed over a split.

  Args:
    confusion: integer ``[K, K + 1]`` from ``confusion_matrix`` (rows target, columns prediction, last column
      predictions outside ``[0, K)``), or a plain ``[K, K]`` matrix (e.g. torchmetrics' or sklearn's).

  Returns:
    ``miou``: mean of ``per_class_iou`` over the classes present in the ground truth or the predictions (0.0
    when none is); ``per_class_iou [K]``: TP / (TP + FP + FN), NaN for classes absent from both;
    ``pixel_accuracy``: correct / labelled pixels (0.0 without labelled pixels). float64 NumPy values for a
    NumPy matrix, float32 jax arrays (jit-able) for a jax array.
  """
  xp = jnp if isinstance(confusion, jax.Array) else np
  confusion = xp.asarray(confusion)
  num_classes = confusion.shape[0] if confusion.ndim == 2 else -1
  if confusion.ndim != 2 or confusion.shape[1] not in (num_classes, num_classes + 1):
    raise ValueError(f"confusion must be a [K, K + 1] (or [K, K]) confusion matrix, got shape {confusion.shape}")
  counts = confusion.astype(xp.float64 if xp is np else jnp.float32)
  true_positives = xp.diagonal(counts)
  labelled = counts.sum(1)  # with the invalid-prediction column: those pixels are false negatives
  predicted = counts[:, :num_classes].sum(0)
  union = labelled + predicted - true_positives
  present = union > 0
  per_class_iou = xp.where(present, true_positives / xp.where(present, union, 1), xp.nan)
  num_present = present.sum()
  total = labelled.sum()
  return {
      "miou": xp.where(present, per_class_iou, 0).sum() / xp.maximum(num_present, 1),
      "per_class_iou": per_class_iou,
      "pixel_accuracy": true_positives.sum() / xp.maximum(total, 1),
  }


def mean_iou(preds: Array, targets: Array, num_classes: int, ignore_index: int = 255) -> Dict[str, jax.Array]:
  """``miou_from_confusion(confusion_matrix(preds, targets, num_classes, ignore_index))``: the metrics of one
  set of label maps (any leading shape, e.g. ``[B, H, W]`` or ``[H, W]``), over all their pixels together."""
  _check_label_maps(preds, targets, num_classes, ignore_index)
  return _mean_iou_jit(preds, targets, num_classes)


class SemanticSegmentationAccumulator:
  """Sums the confusion matrix over a split; ``result()`` gives ``miou_from_confusion`` of the total.

  ``update(preds, targets)`` takes integer label maps of one batch (any leading shape; padding images: set their
  targets to ``ignore_index``), counted by ``confusion_matrix`` (compiled once per batch shape).
  An evaluator that already reduced a batch on device adds its ``[K, K + 1]`` matrix with ``add_confusion``.
  The total is int64 on the host.
  """

  def __init__(self, num_classes: int, ignore_index: int = 255):
    _check_classes(num_classes, ignore_index)
    self.num_classes = num_classes
    self.ignore_index = ignore_index
    self.confusion = np.zeros((num_classes, num_classes + 1), np.int64)

  def update(self, preds: Array, targets: Array) -> None:
    """Adds one batch of label maps (``ValueError`` for targets outside ``[0, K)`` other than ``ignore_index``)."""
    self.add_confusion(confusion_matrix(preds, targets, self.num_classes, self.ignore_index))

  def add_confusion(self, confusion: Array) -> None:
    """Adds a ``[K, K + 1]`` matrix from ``confusion_matrix`` (e.g. summed over a batch inside a jitted step)."""
    confusion = np.asarray(confusion)
    if confusion.shape != self.confusion.shape:
      raise ValueError(f"confusion must have shape {self.confusion.shape} (from confusion_matrix), got "
                       f"{confusion.shape}")
    self.confusion += confusion.astype(np.int64)

  def result(self) -> Dict[str, Union[float, np.ndarray]]:
    """``miou`` and ``pixel_accuracy`` (floats) and ``per_class_iou [K]`` (NaN where absent) over the split."""
    metrics = miou_from_confusion(self.confusion)
    return {"miou": float(metrics["miou"]), "per_class_iou": metrics["per_class_iou"],
            "pixel_accuracy": float(metrics["pixel_accuracy"])}


class PanopticQualityAccumulator:
  """Sums panoptic quality's per-category IoU, TP, FP and FN over a split, image by image.

  Args:
    things: category ids of countable things (segments are (category, instance)).
    stuffs: category ids of amorphous stuff (one segment per category and image; instance ids ignored).
    void_label: category id of unassigned predicted pixels and of void ground truth (which is also any other
      category outside ``things`` and ``stuffs``); not one of them.
    allow_unknown_preds_category: predicted categories outside ``things``, ``stuffs`` and ``void_label`` are
      unassigned pixels instead of a ``ValueError``.

  Per-category results follow ``categories``: sorted things, then sorted stuff (torchmetrics' order). See the
  module docstring for the matching rules and where they differ from torchmetrics.
  """

  def __init__(self, things: Iterable[int], stuffs: Iterable[int], void_label: int = 255,
               allow_unknown_preds_category: bool = False):
    things, stuffs = _category_ids(things, "things"), _category_ids(stuffs, "stuffs")
    if set(things) & set(stuffs):
      raise ValueError(f"things and stuffs must be disjoint, both contain {sorted(set(things) & set(stuffs))}")
    if not things and not stuffs:
      raise ValueError("at least one of things and stuffs must be non-empty")
    if void_label in things or void_label in stuffs:
      raise ValueError(f"void_label {void_label} must not be a thing or stuff category")
    self.categories = np.array(things + stuffs, np.int64)
    self.is_thing = np.arange(len(self.categories)) < len(things)
    self.void_label = int(void_label)
    self.allow_unknown_preds_category = allow_unknown_preds_category
    self._sort = np.argsort(self.categories)
    num_categories = len(self.categories)
    self.iou_sum = np.zeros(num_categories, np.float64)
    self.true_positives = np.zeros(num_categories, np.int64)
    self.false_positives = np.zeros(num_categories, np.int64)
    self.false_negatives = np.zeros(num_categories, np.int64)

  def update(self, preds: Array, targets: Array) -> None:
    """Adds integer ``[..., H, W, 2]`` panoptic maps (category, instance), each ``[H, W]`` image matched alone."""
    preds, targets = np.asarray(preds), np.asarray(targets)
    if preds.shape != targets.shape:
      raise ValueError(f"preds and targets must have the same shape, got {preds.shape} and {targets.shape}")
    if preds.ndim < 3 or preds.shape[-1] != 2:
      raise ValueError(f"panoptic maps must be [..., H, W, 2] (category id, instance id), got shape {preds.shape}")
    for name, x in (("preds", preds), ("targets", targets)):
      if not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"{name} must be integer (category id, instance id) maps, got dtype {x.dtype}")
    pixels = preds.shape[-3] * preds.shape[-2]
    preds, targets = preds.reshape(-1, pixels, 2).astype(np.int64), targets.reshape(-1, pixels, 2).astype(np.int64)
    pred_category = self._category_index(preds[..., 0])
    unknown = (pred_category < 0) & (preds[..., 0] != self.void_label)
    if unknown.any() and not self.allow_unknown_preds_category:
      raise ValueError(f"preds contain categories {np.unique(preds[..., 0][unknown])[:10].tolist()} that are not "
                       f"in things, stuffs or void_label {self.void_label} (allow_unknown_preds_category=True "
                       "makes them unassigned pixels)")
    target_category = self._category_index(targets[..., 0])
    for image in range(len(preds)):
      self._add_image(self._segments(pred_category[image], preds[image, :, 1]),
                      self._segments(target_category[image], targets[image, :, 1]))

  def _category_index(self, category_ids: np.ndarray) -> np.ndarray:
    """Position of each id in ``categories``, -1 for ids outside them (void / unassigned)."""
    sorted_ids = self.categories[self._sort]
    position = np.minimum(np.searchsorted(sorted_ids, category_ids), len(sorted_ids) - 1)
    return np.where(sorted_ids[position] == category_ids, self._sort[position], -1)

  def _segments(self, category: np.ndarray, instance: np.ndarray):
    """``(segment [N], segment_category [S])``: each pixel's segment in ``[0, S)``, ``S`` for no segment."""
    assigned = category >= 0
    instance = np.where(assigned & self.is_thing[category], instance, 0)  # stuff: one segment per category
    # One key per (instance, category), instance ids offset to start at 0, categories in [0, C); 0 for no segment.
    key = np.where(assigned, (instance - instance.min()) * len(self.categories) + category + 1, 0)
    unique_keys, segment, _ = _unique(key)
    unassigned_key = int(not assigned.all())  # sorted first
    segment_category = (unique_keys[unassigned_key:] - 1) % len(self.categories)
    segment = np.where(assigned, segment - unassigned_key, len(segment_category))
    return segment, segment_category

  def _add_image(self, pred, target) -> None:
    (pred_segment, pred_category), (target_segment, target_category) = pred, target
    num_pred, num_target = len(pred_category), len(target_category)
    num_categories = len(self.categories)
    pred_area = np.bincount(pred_segment, minlength=num_pred + 1)[:num_pred]
    target_area = np.bincount(target_segment, minlength=num_target + 1)[:num_target]
    pred_on_void = np.bincount(pred_segment[target_segment == num_target], minlength=num_pred + 1)[:num_pred]
    # The overlapping (target, pred) pairs, sparse: at most one per pixel whatever the number of segments.
    pair, _, intersection = _unique(target_segment * (num_pred + 1) + pred_segment)
    t, p = np.divmod(pair, num_pred + 1)
    real = (t < num_target) & (p < num_pred)
    t, p, intersection = t[real], p[real], intersection[real]
    same = target_category[t] == pred_category[p]
    t, p, intersection = t[same], p[same], intersection[same]
    iou = intersection / (target_area[t] + pred_area[p] - intersection - pred_on_void[p])
    matched = iou > 0.5
    t, p, iou = t[matched], p[matched], iou[matched]
    self.iou_sum += np.bincount(target_category[t], weights=iou, minlength=num_categories)
    self.true_positives += np.bincount(target_category[t], minlength=num_categories)
    missed = np.ones(num_target, bool)
    missed[t] = False
    self.false_negatives += np.bincount(target_category[missed], minlength=num_categories)
    # Unmatched predictions mostly over void are not false positives (panopticapi: void / area > 0.5).
    false = np.ones(num_pred, bool)
    false[p] = False
    false &= 2 * pred_on_void <= pred_area
    self.false_positives += np.bincount(pred_category[false], minlength=num_categories)

  def result(self) -> Dict[str, Union[float, np.ndarray]]:
    """``pq``, ``sq``, ``rq`` and their ``_things`` and ``_stuff`` versions (floats: means over the categories
    with TP + FP + FN > 0, 0.0 when there is none); ``per_category_pq``, ``per_category_sq``,
    ``per_category_rq`` (float64 ``[C]``, NaN for categories that never appeared; SQ is 0 without TP) in the
    order of ``categories`` (also returned)."""
    tp = self.true_positives.astype(np.float64)
    denominator = tp + 0.5 * self.false_positives + 0.5 * self.false_negatives
    present = denominator > 0
    with np.errstate(divide="ignore", invalid="ignore"):
      per_category = {
          "pq": np.where(present, self.iou_sum / denominator, np.nan),
          "sq": np.where(present, np.where(tp > 0, self.iou_sum / tp, 0.0), np.nan),
          "rq": np.where(present, tp / denominator, np.nan),
      }
    results: Dict[str, Union[float, np.ndarray]] = {}
    for suffix, subset in (("", np.ones_like(present)), ("_things", self.is_thing), ("_stuff", ~self.is_thing)):
      chosen = present & subset
      for name, values in per_category.items():
        results[name + suffix] = float(values[chosen].mean()) if chosen.any() else 0.0
    results.update({f"per_category_{name}": values for name, values in per_category.items()})
    results["categories"] = self.categories.copy()
    return results


def panoptic_quality(preds: Array, targets: Array, things: Iterable[int], stuffs: Iterable[int],
                     void_label: int = 255, allow_unknown_preds_category: bool = False
                     ) -> Dict[str, Union[float, np.ndarray]]:
  """Panoptic quality of integer ``[..., H, W, 2]`` (category, instance) maps: ``PanopticQualityAccumulator``
  updated once (arguments and results as documented there)."""
  accumulator = PanopticQualityAccumulator(things, stuffs, void_label, allow_unknown_preds_category)
  accumulator.update(preds, targets)
  return accumulator.result()


def _unique(keys: np.ndarray):
  """``np.unique(keys, return_inverse=True, return_counts=True)`` of non-negative int64 keys ``[N]``: by counting
  when their range is within a few times ``N`` (a panoptic image's segments and segment pairs: small ids, 50x
  faster than sorting), by sorting otherwise."""
  if keys.size and keys.max() < 4 * keys.size + 1024:
    counts = np.bincount(keys)
    lookup = np.cumsum(counts > 0) - 1
    used = np.flatnonzero(counts)
    return used, lookup[keys], counts[used]
  return np.unique(keys, return_inverse=True, return_counts=True)


def _check_classes(num_classes: int, ignore_index: int) -> None:
  if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
    raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
  if 0 <= ignore_index < num_classes:
    raise ValueError(f"ignore_index {ignore_index} is one of the {num_classes} classes; it must lie outside "
                     f"[0, {num_classes}) (renumber the classes so that the ignored label is not one of them)")


def _check_label_maps(preds, targets, num_classes: int, ignore_index: int) -> None:
  _check_classes(num_classes, ignore_index)
  if np.shape(preds) != np.shape(targets):
    raise ValueError(f"preds and targets must be label maps of the same shape, got {np.shape(preds)} and "
                     f"{np.shape(targets)}")
  for name, x in (("preds", preds), ("targets", targets)):
    dtype = x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype
    if not np.issubdtype(dtype, np.integer):
      raise ValueError(f"{name} must be integer class labels (argmax the logits first), got dtype {dtype}")
  if isinstance(targets, jax.core.Tracer):
    return  # values unknown while tracing: out-of-range targets are excluded
  targets = np.asarray(targets)
  labelled = targets[targets != ignore_index]
  if labelled.size and (labelled.min() < 0 or labelled.max() >= num_classes):
    raise ValueError(f"targets must lie in [0, {num_classes}) or equal ignore_index {ignore_index}; got values "
                     f"{labelled.min()}..{labelled.max()}")


def _category_ids(ids: Iterable[int], name: str) -> list:
  ids = list(ids)
  if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in ids):
    raise ValueError(f"{name} must be integer category ids, got {ids}")
  return sorted({int(i) for i in ids})


class SegmentationEvaluator:
  """Host side of a segmentation evaluation: sums the per-image confusion matrices of a task's eval outputs
  over the split (``SemanticSegmentationAccumulator``), with ``things`` / ``stuffs`` also panoptic quality
  (``PanopticQualityAccumulator`` on ``outputs['panoptic']`` against the batch's ``panoptic`` maps), and keeps
  the first images for ``write_files``.

  ``update(outputs, inputs)`` reads ``outputs``: ``confusion [B, K, K + 1]`` (``confusion_matrix`` per image),
  ``prediction [B, H, W]`` (label maps), ``mask [B]``, and for panoptic ``panoptic [B, H, W, 2]`` (predicted
  (category, segment id), ``void_label`` where no segment); ``inputs``: the host batch (``image``,
  ``label_map``, ``panoptic``).
  """

  def __init__(self, num_classes: int, class_names: Sequence[str], ignore_index: int = 255,
               num_visualizations: int = 4, things: Sequence[int] = (), stuffs: Sequence[int] = ()):
    self.accumulator = SemanticSegmentationAccumulator(num_classes, ignore_index)
    self.panoptic = (PanopticQualityAccumulator(things, stuffs, void_label=ignore_index)
                     if (things or stuffs) else None)
    self.class_names = list(class_names) or [str(k) for k in range(num_classes)]
    self.num_visualizations = num_visualizations
    self.count = 0
    self._drawable: List[tuple] = []

  def update(self, outputs: Dict[str, np.ndarray], inputs=None) -> None:
    """Adds one evaluation batch; rows with ``mask=False`` are padding."""
    mask = np.asarray(outputs["mask"], bool)
    self.accumulator.add_confusion(np.asarray(outputs["confusion"])[mask].sum(0))
    self.count += int(mask.sum())
    if self.panoptic is not None:
      if inputs is None or "panoptic" not in inputs:
        raise ValueError("panoptic evaluation needs the batch's ground-truth 'panoptic' maps "
                         "(config.dataset.panoptic=True)")
      self.panoptic.update(np.asarray(outputs["panoptic"])[mask], np.asarray(inputs["panoptic"])[mask])
    if inputs is not None:
      for row in np.flatnonzero(mask[:len(inputs["image"])]):
        if len(self._drawable) >= self.num_visualizations:
          break
        self._drawable.append((inputs["image"][row], inputs["label_map"][row], outputs["prediction"][row]))

  def result(self):
    metrics = self.accumulator.result()
    scalars = {"miou": metrics["miou"], "pixel_accuracy": metrics["pixel_accuracy"], "num_examples": self.count}
    details = {"per_class_iou": {name: (None if np.isnan(iou) else float(iou))
                                 for name, iou in zip(self.class_names, metrics["per_class_iou"])}}
    if self.panoptic is not None:
      quality = self.panoptic.result()
      scalars.update({key: float(value) for key, value in quality.items() if np.ndim(value) == 0})
      names = [self.class_names[c] if 0 <= c < len(self.class_names) else str(c) for c in self.panoptic.categories]
      details["per_category_pq"] = {n: (None if np.isnan(v) else float(v))
                                    for n, v in zip(names, quality["per_category_pq"])}
    return scalars, details

  def write_files(self, directory: str, step: int) -> List[str]:
    """A PNG of the first images: image | ground truth | prediction."""
    if not self._drawable:
      return []
    from cvjax.viz.image import unnormalize_image  # pylint: disable=import-outside-toplevel
    from cvjax.viz.segmentation import draw_segmentations  # pylint: disable=import-outside-toplevel

    images, targets, predictions = zip(*self._drawable)
    path = os.path.join(directory, f"segmentation_step_{step}.png")
    return [draw_segmentations([unnormalize_image(i) for i in images], targets, predictions, path,
                               len(self.class_names), self.class_names, title=f"step {step}")]
