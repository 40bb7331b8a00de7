"""Faster R-CNN (Ren et al. 2015) and Mask R-CNN (He et al. 2017) with an FPN, as torchvision builds them.

Stages (detectron2's shape, each a separate piece with explicit tensors between them):
  backbone (ResNet C2..C5 or Swin stages) -> ``FPN`` (P2..P5 + ``max_pool`` P6) -> RPN head on every level ->
  proposals (``cvjax.ops.select_proposals``) -> RoI box head (MultiScaleRoIAlign 7x7 on P2..P5, TwoMLPHead,
  predictor) -> [Mask R-CNN] mask head (MultiScaleRoIAlign 14x14, four 3x3 convs, 2x2/2 transposed conv,
  per-class 1x1).

Everything runs inside the jitted step with static shapes: in training the model also assigns the targets
(anchor matching 0.7/0.3 with low-quality matches and a 256-anchor 1:1 sample per image; GT boxes appended to
the proposals, matching 0.5 and a 512-RoI 1:3 sample; mask targets RoIAligned from the GT masks at 28x28) with
the ``sample`` rng, and returns the tensors the losses (``cvjax.tasks.rcnn``) need. Module and parameter
names follow torchvision's keys (``rpn_head/cls_logits``, ``box_head/fc6``, ``mask_predictor/conv5_mask``) so
that ``cvjax.convert.rcnn`` maps one key to one leaf.

Conventions: NHWC images normalised by the input pipeline, padded top-left with a ``pixel_mask``; boxes absolute
``xyxy`` in input-image pixels; labels 0-based object classes (the heads' class 0 is background, as in
torchvision, so head column ``k + 1`` is object class ``k``).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.detection.backbone import BackboneFeatures
from cvjax.models.detection.fpn import FPN
from cvjax.models.registry import MODELS
from cvjax.ops import anchors as anchor_ops
from cvjax.ops.buckets import map_valid_rows
from cvjax.ops import proposals as proposal_ops
from cvjax.ops.boxes import box_iou, decode_boxes, encode_boxes
from cvjax.ops.masks import paste_masks_in_image
from cvjax.ops.nms import batched_nms
from cvjax.ops.roi_align import fpn_level_assignment, multiscale_roi_align, roi_align
from cvjax.ops.roi_pool import roi_pool

ROI_OPS = ("align", "pool")
# torchvision's heads: RPN convs N(0, 0.01); mask convs He-normal over fan_out; Linear layers PyTorch's default.
_rpn_init = nn.initializers.normal(0.01)
_mask_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def _torch_dense(features: int, fan_in: int, name: str) -> nn.Dense:
  return nn.Dense(features, kernel_init=layers.torch_default_kernel_init,
                  bias_init=layers.torch_default_bias_init(fan_in), name=name)


class RPNHead(nn.Module):
  """torchvision ``RPNHead``: a shared 3x3 conv + ReLU, then 1x1 objectness (A) and box deltas (4A) per level."""
  num_anchors: int
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, pyramid: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``[B, H_l, W_l, C]`` maps -> objectness ``[B, N]`` and deltas ``[B, N, 4]``, N = sum H_l W_l A in
    (level, y, x, anchor) order (torchvision's ``concat_box_prediction_layers``)."""
    channels = pyramid[0].shape[-1]
    conv = layers.Conv(channels, 3, padding=1, kernel_init=_rpn_init, impl=self.layer_impl, name="conv")
    cls = layers.Conv(self.num_anchors, 1, padding=0, kernel_init=_rpn_init, impl=self.layer_impl,
                      name="cls_logits")
    box = layers.Conv(4 * self.num_anchors, 1, padding=0, kernel_init=_rpn_init, impl=self.layer_impl,
                      name="bbox_pred")
    logits, deltas = [], []
    for x in pyramid:
      t = nn.relu(conv(x))
      logits.append(cls(t).reshape(x.shape[0], -1))
      deltas.append(box(t).reshape(x.shape[0], -1, 4))
    return jnp.concatenate(logits, 1), jnp.concatenate(deltas, 1)


class BoxHead(nn.Module):
  """torchvision ``TwoMLPHead`` + ``FastRCNNPredictor``: ``[K, 7, 7, C]`` RoI features -> class logits
  ``[K, num_classes + 1]`` and per-class deltas ``[K, num_classes + 1, 4]``."""
  num_classes: int
  representation_size: int = 1024

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)  # torch's flatten order (C, H, W)
    x = nn.relu(_torch_dense(self.representation_size, x.shape[-1], "fc6")(x))
    x = nn.relu(_torch_dense(self.representation_size, x.shape[-1], "fc7")(x))
    logits = _torch_dense(self.num_classes + 1, x.shape[-1], "cls_score")(x)
    deltas = _torch_dense(4 * (self.num_classes + 1), x.shape[-1], "bbox_pred")(x)
    return logits, deltas.reshape(x.shape[0], self.num_classes + 1, 4)


class MaskHead(nn.Module):
  """torchvision ``MaskRCNNHeads`` + ``MaskRCNNPredictor``: ``[K, 14, 14, C]`` -> logits ``[K, 28, 28, classes]``."""
  num_classes: int
  channels: int = 256
  num_convs: int = 4
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_convs):
      x = nn.relu(layers.Conv(self.channels, 3, padding=1, kernel_init=_mask_init, impl=self.layer_impl,
                              name=f"mask_head_{i}")(x))
    # ConvTranspose2d(k=2, s=2) (its variables keep torchvision's conv5_mask name).
    kernel = self.param("conv5_mask_kernel", _mask_init, (2, 2, x.shape[-1], self.channels))
    bias = self.param("conv5_mask_bias", nn.initializers.zeros, (self.channels,))
    x = layers.conv_transpose2d(x, kernel, 2) + bias
    x = nn.relu(x)
    return layers.Conv(self.num_classes, 1, padding=0, kernel_init=_mask_init, impl=self.layer_impl,
                       name="mask_fcn_logits")(x)


def image_sizes(pixel_mask: Optional[jnp.ndarray], shape: Tuple[int, int, int]) -> jnp.ndarray:
  """``[B, 2]`` float32 (height, width) of each image's real (top-left) region."""
  batch, height, width = shape
  if pixel_mask is None:
    return jnp.broadcast_to(jnp.array([height, width], jnp.float32), (batch, 2))
  return jnp.stack([pixel_mask.any(2).sum(1), pixel_mask.any(1).sum(1)], -1).astype(jnp.float32)


def clip_boxes(boxes: jnp.ndarray, size: jnp.ndarray) -> jnp.ndarray:
  """Clips xyxy ``[..., 4]`` to ``[0, w] x [0, h]`` of ``size`` (h, w) (torchvision ``clip_boxes_to_image``)."""
  limit = jnp.stack([size[1], size[0], size[1], size[0]])
  return jnp.clip(boxes, 0.0, limit)


class MaskRCNN(BackboneFeatures):
  """Faster / Mask R-CNN with FPN (torchvision ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn``).

  Attributes (torchvision's argument names where it has them):
    num_classes: object classes (no background; the heads have ``num_classes + 1`` outputs).
    with_masks: Mask R-CNN (True) or Faster R-CNN (False).
    backbone, backbone_*, swin_*, dtype: the backbone (``BackboneFeatures``).
    fpn_channels: FPN width (256).
    anchor_sizes, aspect_ratios: one size tuple per pyramid level (P2..P6) and the ratios.
    rpn_*: RPN matcher, sampler and proposal settings; ``*_train`` / ``*_test`` the per-image top-k.
    box_*: RoI head matcher, sampler and inference settings; ``bbox_reg_weights`` the box coder's.
    representation_size: TwoMLPHead width (1024).
    mask_head_channels, mask_head_convs: mask head width and depth (256, 4).
    roi_op: ``'align'`` (RoIAlign) or ``'pool'`` (RoIPool) for the box and mask features; ``aligned`` the
      RoIAlign half-pixel offset (False in torchvision's v1 models); ``sampling_ratio`` its grid (2).
    canonical_scale: FPN level rule's canonical box size (224).
    mask_target_sampling_ratio: RoIAlign grid for the 28x28 mask targets (-1 adaptive, torchvision).
    mask_target_max_sampling_grid: static clamp of that adaptive grid (``roi_align``'s ``max_sampling_grid``);
      exact for RoIs up to ``28 * clamp`` pixels, and far cheaper than the default bound of the map size.
    mask_roi_buckets: the mask branch (head and, in training, targets) runs on the positive RoIs / valid
      detections only, at the smallest of this many static sizes (the slot count and its halvings,
      ``cvjax.ops.buckets``) that holds them; torchvision runs it on exactly those RoIs. ``1`` runs it on every
      slot (one compiled size). Outputs are the same either way.
    return_pasted_masks: in eval, also paste the masks into ``[B, D, H, W]`` (input size).
  """
  num_classes: int = 91
  with_masks: bool = True
  fpn_channels: int = 256
  anchor_sizes: Sequence[Sequence[float]] = ((32,), (64,), (128,), (256,), (512,))
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  rpn_pre_nms_top_n_train: int = 2000
  rpn_pre_nms_top_n_test: int = 1000
  rpn_post_nms_top_n_train: int = 2000
  rpn_post_nms_top_n_test: int = 1000
  rpn_nms_thresh: float = 0.7
  rpn_fg_iou_thresh: float = 0.7
  rpn_bg_iou_thresh: float = 0.3
  rpn_batch_size_per_image: int = 256
  rpn_positive_fraction: float = 0.5
  rpn_score_thresh: float = 0.0
  box_score_thresh: float = 0.05
  box_nms_thresh: float = 0.5
  box_detections_per_img: int = 100
  box_fg_iou_thresh: float = 0.5
  box_bg_iou_thresh: float = 0.5
  box_batch_size_per_image: int = 512
  box_positive_fraction: float = 0.25
  bbox_reg_weights: Sequence[float] = (10.0, 10.0, 5.0, 5.0)
  representation_size: int = 1024
  mask_head_channels: int = 256
  mask_head_convs: int = 4
  roi_op: str = "align"
  aligned: bool = False
  sampling_ratio: int = 2
  canonical_scale: float = 224.0
  mask_target_sampling_ratio: int = -1
  mask_target_max_sampling_grid: Optional[int] = None
  mask_roi_buckets: int = 4
  return_pasted_masks: bool = True

  # ---------------------------------------------------------------- RoI features
  def _roi_features(self, pyramid: Dict[int, jnp.ndarray], rois: jnp.ndarray, size: int) -> jnp.ndarray:
    """``[K, 5]`` rois -> ``[K, size, size, C]`` from their FPN level (P2..P5 rule, not the extra level)."""
    levels = sorted(pyramid)[:4]
    maps = {l: pyramid[l] for l in levels}
    rois = jax.lax.stop_gradient(rois)
    if self.roi_op == "align":
      return multiscale_roi_align(maps, rois, size, self.sampling_ratio, canonical_scale=self.canonical_scale,
                                  aligned=self.aligned)
    if self.roi_op != "pool":
      raise ValueError(f"roi_op must be one of {ROI_OPS}, got {self.roi_op!r}")
    level = fpn_level_assignment(rois[:, 1:], self.canonical_scale, 4, levels[0], levels[-1])
    pooled = jnp.zeros((rois.shape[0], size, size, maps[levels[0]].shape[-1]), jnp.float32)
    for l in levels:  # static loop over the (4) levels; each RoI keeps its own level's result
      pooled = jnp.where((level == l)[:, None, None, None], roi_pool(maps[l], rois, size, 2.0 ** -l), pooled)
    return pooled

  def _box_head(self, heads, pyramid, rois: jnp.ndarray) -> Tuple[jnp.ndarray, jnp.ndarray]:
    """``[K, 5]`` rois -> class logits ``[K, K1]`` and per-class deltas ``[K, K1, 4]`` (K1 = classes + 1)."""
    return heads["box"](self._roi_features(pyramid, rois, 7))

  def _mask_logits(self, head, pyramid, rois: jnp.ndarray, labels: jnp.ndarray) -> jnp.ndarray:
    """``[K, 5]`` rois and ``[K]`` 0-based labels -> ``[K, 28, 28]`` logits of each RoI's class."""
    logits = head(self._roi_features(pyramid, rois, 14))
    return jnp.take_along_axis(logits, (labels + 1)[:, None, None, None], axis=-1)[..., 0]

  def _mask_rows(self, heads, fn, args, valid):
    """``fn(mask_head, *rows)`` on the ``valid`` rows of ``args`` only (``map_valid_rows``), zeros elsewhere.

    The bucketed sizes run under ``lax.switch``, where a bound Flax module cannot be called: there the head is
    its parameters applied to an unbound copy. At initialisation (the call that creates them) it runs once on
    every row.
    """
    if self.is_initializing():
      return map_valid_rows(functools.partial(fn, heads["mask"]), args, valid, 1)
    params = self.variables["params"]["mask_head"]
    unbound = heads["mask"].clone(parent=None)
    head = lambda x: unbound.apply({"params": params}, x)
    return map_valid_rows(functools.partial(fn, head), args, valid, self.mask_roi_buckets)

  # ---------------------------------------------------------------- main
  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool, pixel_mask: Optional[jnp.ndarray] = None,
               gt_boxes: Optional[jnp.ndarray] = None, gt_labels: Optional[jnp.ndarray] = None,
               gt_valid: Optional[jnp.ndarray] = None, gt_masks: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Detects objects; in training also assigns targets.

    Args:
      images: ``[B, H, W, 3]`` normalised, padded top-left; ``pixel_mask [B, H, W]`` True on real pixels.
      train: training mode (batch norm, sampling with the ``sample`` rng, targets); needs ``gt_boxes [B, M, 4]``
        absolute xyxy input pixels, ``gt_labels [B, M]`` 0-based, ``gt_valid [B, M]`` and for masks
        ``gt_masks [B, M, H, W]`` (0/1 in the image frame).

    Returns:
      eval: ``boxes [B, D, 4]`` xyxy input pixels, ``scores [B, D]``, ``labels [B, D]`` int32 0-based, ``valid
      [B, D]``, ``proposals [B, P, 4]`` / ``proposal_valid``; with masks ``mask_probs [B, D, 28, 28]`` and
      (``return_pasted_masks``) ``masks [B, D, H, W]`` probabilities pasted as torchvision does.
      train: ``rpn_logits [B, N]``, ``rpn_deltas [B, N, 4]``, ``rpn_targets [B, N, 4]``, ``rpn_labels [B, N]``
      (1 sampled positive, 0 sampled negative, -1 not sampled); ``roi_logits [B, S, K + 1]``,
      ``roi_deltas [B, S, 4]`` (of the target class), ``roi_targets [B, S, 4]``, ``roi_labels [B, S]`` (c + 1
      for class c, 0 background, -1 padding); with masks ``mask_logits [B, Pm, 28, 28]``, ``mask_targets``
      and ``mask_valid [B, Pm]`` (the positive RoIs).
    """
    if images.ndim != 4:
      raise ValueError(f"MaskRCNN expects NHWC images [B, H, W, 3], got shape {images.shape}")
    batch, height, width = images.shape[:3]
    sizes = image_sizes(pixel_mask, images.shape[:3])
    pyramid = FPN(self.fpn_channels, "max_pool", self.backbone_layer_impl, name="fpn")(
        self._features(images, train))
    # The heads are built here (the one compact method) and used by the helpers below.
    heads = {"box": BoxHead(self.num_classes, self.representation_size, name="box_head")}
    if self.with_masks:
      heads["mask"] = MaskHead(self.num_classes + 1, self.mask_head_channels, self.mask_head_convs,
                                     self.backbone_layer_impl, name="mask_head")
    levels = sorted(pyramid)
    if len(self.anchor_sizes) != len(levels):
      raise ValueError(f"anchor_sizes has {len(self.anchor_sizes)} entries for {len(levels)} pyramid levels "
                       f"{levels}: give one size tuple per level")
    num_anchors = len(self.anchor_sizes[0]) * len(self.aspect_ratios)
    rpn_logits, rpn_deltas = RPNHead(num_anchors, self.backbone_layer_impl, name="rpn_head")(
        [pyramid[l] for l in levels])
    anchors, level_sizes = anchor_ops.multilevel_anchors(
        (height, width), [pyramid[l].shape[1:3] for l in levels], self.anchor_sizes,
        [self.aspect_ratios] * len(levels))
    anchors = jnp.asarray(anchors, jnp.float32)
    proposal_boxes = decode_boxes(jax.lax.stop_gradient(rpn_deltas), anchors[None])
    top_n = (self.rpn_pre_nms_top_n_train, self.rpn_post_nms_top_n_train) if train else (
        self.rpn_pre_nms_top_n_test, self.rpn_post_nms_top_n_test)
    select = functools.partial(proposal_ops.select_proposals, level_sizes=tuple(level_sizes),
                               pre_nms_top_n=top_n[0], post_nms_top_n=top_n[1],
                               nms_threshold=self.rpn_nms_thresh, score_threshold=self.rpn_score_thresh)
    proposals, _, proposal_valid = jax.vmap(lambda b, o, s: select(b, o, image_size=s))(
        proposal_boxes, jax.lax.stop_gradient(rpn_logits), sizes)
    if train:
      return self._train_outputs(heads, pyramid, anchors, rpn_logits, rpn_deltas, proposals, proposal_valid,
                                 gt_boxes, gt_labels, gt_valid, gt_masks)
    return self._detect(heads, pyramid, proposals, proposal_valid, sizes, (height, width))

  def _train_outputs(self, heads, pyramid, anchors, rpn_logits, rpn_deltas, proposals, proposal_valid, gt_boxes,
                     gt_labels, gt_valid, gt_masks) -> Dict[str, jnp.ndarray]:
    if gt_boxes is None or gt_labels is None or gt_valid is None or (self.with_masks and gt_masks is None):
      raise ValueError("MaskRCNN in training needs gt_boxes, gt_labels, gt_valid"
                       + (" and gt_masks" if self.with_masks else ""))
    gt_boxes = gt_boxes.astype(jnp.float32)
    # Degenerate boxes cannot be regression targets (log of a zero size): they are not objects.
    gt_valid = gt_valid & (gt_boxes[..., 2] > gt_boxes[..., 0]) & (gt_boxes[..., 3] > gt_boxes[..., 1])
    batch = rpn_logits.shape[0]
    rpn_rng, roi_rng = jax.random.split(self.make_rng("sample"))
    rpn_labels, rpn_targets = jax.vmap(functools.partial(self._rpn_targets, anchors))(
        gt_boxes, gt_valid, jax.random.split(rpn_rng, batch))
    rois, roi_labels, roi_targets, roi_match, roi_positive = jax.vmap(self._roi_targets)(
        proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, jax.random.split(roi_rng, batch))
    samples = rois.shape[1]
    index = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None], (batch, samples, 1))
    flat_rois = jnp.concatenate([index, rois], -1).reshape(-1, 5)
    logits, deltas = self._box_head(heads, pyramid, flat_rois)
    deltas = deltas.reshape(batch, samples, self.num_classes + 1, 4)
    outputs = {"rpn_logits": rpn_logits, "rpn_deltas": rpn_deltas, "rpn_labels": rpn_labels,
               "rpn_targets": rpn_targets, "roi_logits": logits.reshape(batch, samples, -1),
               "roi_deltas": jnp.take_along_axis(deltas, jnp.maximum(roi_labels, 0)[..., None, None], 2)[:, :, 0],
               "roi_targets": roi_targets, "roi_labels": roi_labels}
    if self.with_masks:
      # Positives come first among the samples (``sampled_indices``): the first int(S * fraction) slots hold
      # all of them, so the mask head runs on a static number of RoIs.
      num_mask = int(self.box_batch_size_per_image * self.box_positive_fraction)
      mask_rois = flat_rois.reshape(batch, samples, 5)[:, :num_mask].reshape(-1, 5)
      mask_labels = jnp.maximum(roi_labels[:, :num_mask] - 1, 0).reshape(-1)
      mask_valid = roi_positive[:, :num_mask]

      def mask_branch(head, rois, labels, match):
        return self._mask_logits(head, pyramid, rois, labels), self._mask_targets(gt_masks, rois, match)

      logits, targets = self._mask_rows(heads, mask_branch, [mask_rois, mask_labels,
                                                             roi_match[:, :num_mask].reshape(-1)],
                                        mask_valid.reshape(-1))
      outputs["mask_logits"] = logits.reshape(batch, num_mask, 28, 28)
      outputs["mask_valid"] = mask_valid
      outputs["mask_targets"] = targets.reshape(batch, num_mask, 28, 28)
    return outputs

  def _rpn_targets(self, anchors, gt_boxes, gt_valid, rng):
    match = proposal_ops.match_boxes(box_iou(gt_boxes, anchors), gt_valid, self.rpn_fg_iou_thresh,
                                     self.rpn_bg_iou_thresh, True)
    labels = jnp.where(match >= 0, 1, jnp.where(match == proposal_ops.BELOW_LOW_THRESHOLD, 0, -1))
    positive, negative = proposal_ops.balanced_sample(labels, self.rpn_batch_size_per_image,
                                                      self.rpn_positive_fraction, rng)
    # Non-positive anchors regress onto themselves (zero targets) so that no log(0) reaches the loss.
    reference = jnp.where(positive[:, None], gt_boxes[jnp.maximum(match, 0)], anchors)
    targets = encode_boxes(reference, anchors)
    return jnp.where(positive, 1, jnp.where(negative, 0, -1)), targets

  def _roi_targets(self, proposals, proposal_valid, gt_boxes, gt_labels, gt_valid, rng):
    candidates = jnp.concatenate([proposals, gt_boxes], 0)
    valid = jnp.concatenate([proposal_valid, gt_valid], 0)
    match = proposal_ops.match_boxes(box_iou(gt_boxes, candidates), gt_valid, self.box_fg_iou_thresh,
                                     self.box_bg_iou_thresh, False)
    labels = jnp.where(match >= 0, 1, jnp.where(match == proposal_ops.BELOW_LOW_THRESHOLD, 0, -1))
    labels = jnp.where(valid, labels, -1)
    positive, negative = proposal_ops.balanced_sample(labels, self.box_batch_size_per_image,
                                                      self.box_positive_fraction, rng)
    index, is_positive, sampled = proposal_ops.sampled_indices(positive, negative, self.box_batch_size_per_image)
    rois = candidates[index]
    matched = jnp.maximum(match[index], 0)
    class_labels = jnp.where(is_positive, gt_labels[matched].astype(jnp.int32) + 1, 0)
    class_labels = jnp.where(sampled, class_labels, -1)
    reference = jnp.where(is_positive[:, None], gt_boxes[matched], rois)
    safe_rois = jnp.where(sampled[:, None], rois, jnp.array([0.0, 0.0, 1.0, 1.0]))
    targets = encode_boxes(jnp.where(sampled[:, None], reference, safe_rois), safe_rois,
                           self.bbox_reg_weights)
    return rois, class_labels, targets, matched, is_positive & sampled

  def _mask_targets(self, gt_masks, rois, match):
    """torchvision ``project_masks_on_boxes``: RoIAlign of each RoI's matched GT mask, 28x28.

    ``gt_masks [B, M, H, W]``; ``rois [K, 5]`` (batch index, xyxy); ``match [K]`` the GT index in its image.
    Returns ``[K, 28, 28]``.
    """
    batch, num_gt, height, width = gt_masks.shape
    flat = gt_masks.reshape(batch * num_gt, height, width, 1).astype(jnp.float32)
    index = jnp.trunc(rois[:, 0]) * num_gt + match
    targets = roi_align(flat, jnp.concatenate([index[:, None], rois[:, 1:]], -1), 28, 1.0,
                        self.mask_target_sampling_ratio, False,
                        max_sampling_grid=self.mask_target_max_sampling_grid)
    return targets[..., 0]

  def _detect(self, heads, pyramid, proposals, proposal_valid, sizes, image_hw) -> Dict[str, jnp.ndarray]:
    """torchvision ``RoIHeads.postprocess_detections`` (+ the mask branch) with static shapes."""
    batch, count = proposals.shape[:2]
    index = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None], (batch, count, 1))
    logits, deltas = self._box_head(heads, pyramid, jnp.concatenate([index, proposals], -1).reshape(-1, 5))
    classes = self.num_classes
    scores = jax.nn.softmax(logits, -1).reshape(batch, count, classes + 1)[..., 1:]
    safe = jnp.where(proposal_valid[..., None], proposals, jnp.array([0.0, 0.0, 1.0, 1.0]))
    boxes = decode_boxes(deltas.reshape(batch, count, classes + 1, 4), safe[:, :, None], self.bbox_reg_weights)
    boxes = jax.vmap(clip_boxes)(boxes[:, :, 1:], sizes)
    labels = jnp.broadcast_to(jnp.arange(classes, dtype=jnp.int32), (batch, count, classes))
    boxes, scores, labels = boxes.reshape(batch, -1, 4), scores.reshape(batch, -1), labels.reshape(batch, -1)
    keep = (jnp.repeat(proposal_valid, classes, axis=1) & (boxes[..., 2] - boxes[..., 0] >= 1e-2)
            & (boxes[..., 3] - boxes[..., 1] >= 1e-2))
    scores = jnp.where(keep, scores, -jnp.inf)
    detections = self.box_detections_per_img
    kept, _ = jax.vmap(lambda b, s, c: batched_nms(b, s, c, self.box_nms_thresh, detections,
                                                   score_threshold=self.box_score_thresh))(boxes, scores, labels)
    valid = kept >= 0
    kept = jnp.maximum(kept, 0)
    take = lambda x: jnp.take_along_axis(x, kept.reshape(batch, -1, *([1] * (x.ndim - 2))), 1)
    out_boxes = jnp.where(valid[..., None], take(boxes), 0.0)
    outputs = {"boxes": out_boxes, "scores": jnp.where(valid, take(scores), 0.0),
               "labels": jnp.where(valid, take(labels), 0), "valid": valid, "proposals": proposals,
               "proposal_valid": proposal_valid}
    if self.with_masks:
      index = jnp.broadcast_to(jnp.arange(batch, dtype=jnp.float32)[:, None, None], (batch, detections, 1))
      rois = jnp.concatenate([index, out_boxes], -1).reshape(-1, 5)
      probs = self._mask_rows(
          heads, lambda head, r, l: jax.nn.sigmoid(self._mask_logits(head, pyramid, r, l)),
          [rois, outputs["labels"].reshape(-1)], valid.reshape(-1))
      probs = probs.reshape(batch, detections, 28, 28)
      outputs["mask_probs"] = probs
      if self.return_pasted_masks:
        outputs["masks"] = jax.vmap(lambda m, b: paste_masks_in_image(m, b, image_hw))(probs, out_boxes)
    return outputs


_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
for _backbone, (_block, _stages) in _RESNETS.items():
  for _prefix, _masks in (("fasterrcnn", False), ("maskrcnn", True)):
    MODELS.register(f"{_prefix}_{_backbone}_fpn")(functools.partial(
        MaskRCNN, with_masks=_masks, backbone_block_type=_block, backbone_stage_sizes=_stages))
MODELS.register("maskrcnn_swin_t_fpn")(functools.partial(MaskRCNN, backbone="swin"))
