"""MaskFormer's objective (Cheng et al. 2021): Hungarian matching of masks and the set criterion.

Reference: facebookresearch/MaskFormer ``mask_former/modeling/{matcher,criterion}.py``, equal to HF's
``MaskFormerHungarianMatcher`` / ``MaskFormerLoss`` (the values the tests compare against). Conventions: the
class head has ``K + 1`` logits, the last "no object"; targets are the image's segments padded to a static
``M`` with a boolean ``valid`` mask, binary masks at the target resolution ``[H, W]``; predicted masks are
logits at their own resolution ``[h, w]`` (1/4 of the input in MaskFormer).

Two resolutions, as the reference: the matcher compares masks at the *prediction* resolution, the targets
downsampled by PyTorch's ``interpolate(mode='nearest')`` (source pixel ``floor(i * in / out)``, not the
half-pixel rule of ``jax.image.resize``); the losses compare them at the *target* resolution, the matched
predictions upsampled bilinearly with ``align_corners=False``.

Everything runs inside the jitted train step on the global batch, so ``num_masks`` (the count that normalises
the mask losses) is the global count: the reference's per-process mean of the all-reduced count, with its
gradients averaged over processes, amounts to the same. Padded segments cost memory like real ones (the loss
upsamples ``M`` masks per image to ``[H, W]``); keep ``M`` near the data's real maximum.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.evaluation.segmentation import SegmentationEvaluator, confusion_matrix
from cvjax.models.segmentation.maskformer_inference import panoptic_inference, semantic_inference
from cvjax.ops.losses import dice_loss, sigmoid_focal_loss
from cvjax.ops.matching import match_sets
from cvjax.tasks.base import TASKS, Metrics, Task
from cvjax.tasks.detr import match_class_cost, set_classification_loss

_HIGHEST = jax.lax.Precision.HIGHEST  # f32 matmuls default to bf16 passes on TPU: too coarse for costs


@dataclasses.dataclass(frozen=True)
class MaskFormerWeights:
  """MaskFormer's matcher and loss weights (the paper's and HF ``MaskFormerConfig``'s defaults).

  The matcher uses the loss weights as its costs (the reference hard-codes its class cost at 1, the same as
  the default ``class_weight``).

  Attributes:
    class_weight: matcher cost of ``-p(target class)`` and weight of the cross-entropy loss.
    mask_weight: sigmoid focal loss on mask logits (matcher cost and loss).
    dice_weight: dice loss (smoothing 1) on mask probabilities (matcher cost and loss).
    eos_coef: cross-entropy class weight of "no object" (the other classes weigh 1).
    focal_alpha: focal loss positive-pixel weight.
    focal_gamma: focal loss focusing exponent.
  """
  class_weight: float = 1.0
  mask_weight: float = 20.0
  dice_weight: float = 1.0
  eos_coef: float = 0.1
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0


def _torch_nearest_indices(in_size: int, out_size: int) -> np.ndarray:
  """Source indices of PyTorch's ``interpolate(mode='nearest')`` along one axis: ``floor(i * in / out)``
  in float32, clipped to ``in - 1`` (the scale is computed as PyTorch does, so rounding agrees)."""
  scale = np.float32(in_size) / np.float32(out_size)
  index = np.floor(np.arange(out_size, dtype=np.float32) * scale).astype(np.int64)
  return np.minimum(index, in_size - 1)


def resize_nearest(masks: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """``[..., H, W]`` -> ``[..., h, w]`` by PyTorch's ``interpolate(mode='nearest')`` rule (a static gather)."""
  rows = _torch_nearest_indices(masks.shape[-2], size[0])
  cols = _torch_nearest_indices(masks.shape[-1], size[1])
  return masks[..., rows[:, None], cols[None, :]]


def resize_bilinear(logits: jax.Array, size: Tuple[int, int]) -> jax.Array:
  """``[..., h, w]`` -> ``[..., H, W]``, PyTorch's ``interpolate(mode='bilinear', align_corners=False)``.

  ``jax.image.resize`` without antialiasing samples the same half-pixel-centred positions with the same two
  taps; at the borders it renormalises the one in-range tap to 1, which is PyTorch's clamp of the source index.
  """
  return jax.image.resize(logits, logits.shape[:-2] + tuple(size), method="bilinear", antialias=False)


def pairwise_mask_costs(pred_masks: jax.Array, target_masks: jax.Array, alpha: float = 0.25,
                        gamma: float = 2.0) -> Tuple[jax.Array, jax.Array]:
  """Focal and dice cost of every (prediction, target) mask pair, the matcher's mask costs.

  Args:
    pred_masks: ``[B, Q, P]`` mask logits over ``P`` pixels.
    target_masks: ``[B, M, P]`` binary masks (float).
    alpha, gamma: focal loss parameters.

  Returns:
    ``(focal [B, Q, M], dice [B, Q, M])``: the focal loss of the pair averaged over pixels, and its dice loss
    ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)`` -- the values the losses would give for that pair.
  """
  num_pixels = pred_masks.shape[-1]
  # The focal loss of a pixel is its positive-label loss where t = 1 and its negative-label loss where t = 0,
  # so the pair sums are two matmuls over pixels.
  focal_pos = sigmoid_focal_loss(pred_masks, jnp.ones_like(pred_masks), alpha, gamma)
  focal_neg = sigmoid_focal_loss(pred_masks, jnp.zeros_like(pred_masks), alpha, gamma)
  focal = (jnp.einsum("bqp,bmp->bqm", focal_pos, target_masks, precision=_HIGHEST)
           + jnp.einsum("bqp,bmp->bqm", focal_neg, 1 - target_masks, precision=_HIGHEST)) / num_pixels
  probs = jax.nn.sigmoid(pred_masks)
  numerator = 2 * jnp.einsum("bqp,bmp->bqm", probs, target_masks, precision=_HIGHEST)
  denominator = probs.sum(-1)[:, :, None] + target_masks.sum(-1)[:, None, :]
  return focal, 1 - (numerator + 1) / (denominator + 1)


def maskformer_match(pred_logits: jax.Array, pred_masks: jax.Array, target_masks: jax.Array,
                     labels: jax.Array, valid: jax.Array, weights: MaskFormerWeights = MaskFormerWeights(),
                     backend: str = "auto") -> jax.Array:
  """MaskFormer's matcher: per query, the index of its target segment or -1.

  Cost ``[B, Q, M] = class_weight * -softmax(logits)[label] + mask_weight * focal + dice_weight * dice``, the
  mask costs at the prediction resolution ``[h, w]`` with the targets nearest-downsampled (module docstring),
  solved exactly per image over the valid targets (``cvjax.ops.match_sets``).

  Args:
    pred_logits: ``[B, Q, K + 1]``.
    pred_masks: ``[B, Q, h, w]`` mask logits.
    target_masks: ``[B, M, H, W]`` binary (bool / uint8 / float).
    labels: ``[B, M]`` int target classes in ``[0, K)``.
    valid: ``[B, M]`` bool, real targets.
    weights: matcher weights (and focal parameters).
    backend: ``match_sets`` backend ('auto' | 'jax' | 'scipy').

  Returns:
    ``[B, Q]`` int32 target index in ``[0, M)`` or -1 (unmatched), without gradient.
  """
  pred_logits, pred_masks = jax.lax.stop_gradient((pred_logits, pred_masks))
  batch_size, num_queries, height, width = pred_masks.shape
  targets = resize_nearest(jnp.asarray(target_masks), (height, width)).astype(jnp.float32)
  focal, dice = pairwise_mask_costs(pred_masks.astype(jnp.float32).reshape(batch_size, num_queries, -1),
                                    targets.reshape(batch_size, targets.shape[1], -1),
                                    weights.focal_alpha, weights.focal_gamma)
  cost = (weights.class_weight * match_class_cost(pred_logits, labels) + weights.mask_weight * focal
          + weights.dice_weight * dice)
  # The train loop's batch axis: on a mesh, each device's images go to its own host's scipy.
  return match_sets(cost, valid, backend=backend, batch_axis="data")


def _layer_losses(logits: jax.Array, pred_masks: jax.Array, target_masks: jax.Array, labels: jax.Array,
                  valid: jax.Array, example_mask: jax.Array, num_masks: jax.Array, weights: MaskFormerWeights,
                  backend: str) -> Dict[str, jax.Array]:
  """The three MaskFormer losses of one decoder layer's predictions (see `maskformer_loss`)."""
  match = maskformer_match(logits, pred_masks, target_masks, labels, valid, weights, backend)  # [B, Q]
  loss_ce, class_error = set_classification_loss(logits, match, labels, example_mask, weights.eos_coef)
  # Gathered per target rather than per query: M masks are upsampled instead of Q.
  assigned = match[:, :, None] == jnp.arange(labels.shape[1])  # [B, Q, M]
  target_matched = assigned.any(axis=1)  # [B, M]
  query = jnp.argmax(assigned, axis=1)  # [B, M], 0 where unmatched (masked out below)
  masks = jnp.take_along_axis(pred_masks.astype(jnp.float32), query[:, :, None, None], axis=1)
  masks = resize_bilinear(masks, target_masks.shape[-2:])  # [B, M, H, W]
  targets = target_masks.astype(jnp.float32)
  focal = sigmoid_focal_loss(masks, targets, weights.focal_alpha, weights.focal_gamma).mean(axis=(-2, -1))
  dice = dice_loss(masks.reshape((-1,) + masks.shape[2:]), targets.reshape((-1,) + targets.shape[2:]))
  return {"loss_cross_entropy": loss_ce,
          "loss_mask": jnp.where(target_matched, focal, 0).sum() / num_masks,
          "loss_dice": jnp.where(target_matched, dice.reshape(target_matched.shape), 0).sum() / num_masks,
          "class_error": class_error}


def maskformer_loss(outputs: Mapping[str, Any], targets: Mapping[str, Any],
                    weights: MaskFormerWeights = MaskFormerWeights(), matcher_backend: str = "auto"
                    ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """MaskFormer's set criterion on the final and every auxiliary decoder output (HF ``MaskFormerLoss``).

  Per layer, after its own matching (`maskformer_match`): weighted cross-entropy over all queries (matched
  queries -> their segment's class, the rest -> "no object" with weight ``eos_coef``; PyTorch's weighted
  mean), plus over matched pairs at the target resolution the sigmoid focal loss averaged over pixels and the
  dice loss, each summed over pairs and divided by ``num_masks``, the number of valid target segments in the
  global batch (at least 1). Total = sum over layers of ``class_weight * ce + mask_weight * focal +
  dice_weight * dice``. An image without segments contributes only its queries' "no object" terms.

  Args:
    outputs: the model's ``{'pred_logits': [B, Q, K + 1], 'pred_masks': [B, Q, h, w]`` mask logits,
      ``'aux_outputs'``: a sequence of dicts with the same keys (optional, may be empty)``}``.
    targets: ``masks [B, M, H, W]`` bool / uint8 (padded entries: anything), ``labels [B, M]`` int in
      ``[0, K)``, ``valid [B, M]`` bool, optional ``example_mask [B]`` bool (False = a padding example, ignored
      entirely).
    weights: matcher and loss weights.
    matcher_backend: ``cvjax.ops.match_sets`` backend.

  Returns:
    ``(loss, terms)``: the scalar total and the final layer's unweighted ``loss_cross_entropy``,
    ``loss_mask`` (focal), ``loss_dice``, ``class_error`` (percent of matched queries with the wrong class)
    and ``num_masks``.
  """
  target_masks = jnp.asarray(targets["masks"])
  labels = jnp.asarray(targets["labels"], jnp.int32)
  valid = jnp.asarray(targets["valid"], bool)
  if target_masks.ndim != 4 or labels.shape != target_masks.shape[:2] or valid.shape != labels.shape:
    raise ValueError(f"targets masks must be [B, M, H, W] with labels and valid [B, M]; got masks "
                     f"{target_masks.shape}, labels {labels.shape}, valid {valid.shape}")
  batch_size = labels.shape[0]
  example_mask = targets.get("example_mask")
  example_mask = (jnp.ones((batch_size,), bool) if example_mask is None else jnp.asarray(example_mask, bool))
  valid = valid & example_mask[:, None]
  num_masks = jnp.maximum(valid.sum().astype(jnp.float32), 1.0)
  layers = [outputs] + list(outputs.get("aux_outputs") or [])
  total = jnp.zeros((), jnp.float32)
  final = None
  for layer in layers:
    logits, pred_masks = layer["pred_logits"], layer["pred_masks"]
    if pred_masks.ndim != 4 or pred_masks.shape[:2] != logits.shape[:2] or logits.shape[0] != batch_size:
      raise ValueError(f"outputs pred_logits must be [B, Q, K + 1] and pred_masks [B, Q, h, w] with B = "
                       f"{batch_size}; got pred_logits {logits.shape}, pred_masks {pred_masks.shape}")
    terms = _layer_losses(logits, pred_masks, target_masks, labels, valid, example_mask, num_masks, weights,
                          matcher_backend)
    total = total + (weights.class_weight * terms["loss_cross_entropy"] + weights.mask_weight
                     * terms["loss_mask"] + weights.dice_weight * terms["loss_dice"])
    final = terms if final is None else final
  return total, dict(final, num_masks=num_masks)


@TASKS.register("mask_classification")
class MaskClassificationTask(Task):
  """Mask classification (MaskFormer): a set of (class, binary mask) predictions per image.

  Config keys ``task.{class_weight, mask_weight, dice_weight, eos_coef, matcher_backend}``. Batch keys:
  ``image``, ``segment_masks [B, M, H, W]`` bool / uint8, ``segment_labels [B, M]`` int in ``[0, K)``,
  ``segment_valid [B, M]`` bool, optional ``mask [B]`` (False = a padding example).
  """

  def __init__(self, config, *args, **kwargs):
    super().__init__(config, *args, **kwargs)
    task = config.task
    self.weights = MaskFormerWeights(
        class_weight=float(task.get("class_weight", 1.0)), mask_weight=float(task.get("mask_weight", 20.0)),
        dice_weight=float(task.get("dice_weight", 1.0)), eos_coef=float(task.get("eos_coef", 0.1)))
    self.matcher_backend = task.get("matcher_backend", "auto")

  def loss(self, outputs, batch) -> Tuple[jax.Array, Metrics]:
    targets = {"masks": batch["segment_masks"], "labels": batch["segment_labels"],
               "valid": batch["segment_valid"], "example_mask": batch.get("mask")}
    loss, terms = maskformer_loss(outputs, targets, self.weights, self.matcher_backend)
    one = jnp.ones((), jnp.float32)
    metrics = {"loss": (loss, one)}
    metrics.update({name: (value, one) for name, value in terms.items()})
    return loss, metrics

  @property
  def stuffs(self) -> Tuple[int, ...]:
    return tuple(k for k in range(self.num_classes) if k not in self.things)

  @property
  def panoptic(self) -> bool:
    """Panoptic evaluation (PQ) besides mIoU, unless ``task.semantic_only`` (ADE20K-150: semantic only)."""
    return not self.config.task.get("semantic_only", False)

  def eval_outputs(self, outputs, batch) -> Dict[str, jax.Array]:
    """Semantic inference (``einsum(softmax(class)[..., :K], sigmoid(masks))``, argmax) as per-image confusion
    matrices and label maps, and panoptic inference as ``panoptic [B, H, W, 2]`` (255, 0 where no segment),
    both at the input resolution (HF's post-processing, ``maskformer_inference``)."""
    ignore = int(self.config.task.get("ignore_index", 255))
    size = tuple(batch["label_map"].shape[1:3])
    semantic = semantic_inference(outputs["pred_logits"], outputs["pred_masks"], size)
    prediction = semantic["labels"].astype(jnp.int32)
    labels = jnp.where(batch["mask"][:, None, None], batch["label_map"], ignore)
    confusion = jax.vmap(lambda p, t: confusion_matrix(p, t, self.num_classes, ignore))(prediction, labels)
    result = {"confusion": confusion, "prediction": prediction, "mask": batch["mask"]}
    if self.panoptic:
      task = self.config.task
      panoptic = panoptic_inference(
          outputs["pred_logits"], outputs["pred_masks"], size, threshold=float(task.get("threshold", 0.5)),
          mask_threshold=float(task.get("mask_threshold", 0.5)),
          overlap_mask_area_threshold=float(task.get("overlap_mask_area_threshold", 0.8)),
          label_ids_to_fuse=self.stuffs)["panoptic"]
      result["panoptic"] = jnp.where(panoptic[..., :1] < 0, jnp.array([ignore, 0]), panoptic).astype(jnp.int32)
    return result

  def evaluator(self):
    things, stuffs = (self.things, self.stuffs) if self.panoptic else ((), ())
    return SegmentationEvaluator(self.num_classes, self.class_names,
                                 ignore_index=int(self.config.task.get("ignore_index", 255)),
                                 num_visualizations=int(self.config.task.get("num_visualizations", 4)),
                                 things=things, stuffs=stuffs)

