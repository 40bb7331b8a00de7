"""YOLACT (Bolya et al. 2019, "YOLACT: Real-time Instance Segmentation"): one-stage instance masks as linear
combinations of shared prototypes.

  backbone (ResNet C3..C5) -> ``FPN`` P3..P7 (``p6p7`` extra levels, the RetinaNet pyramid)
    -> protonet on P3: three 3x3 convs + ReLU, bilinear x2 upsampling, a 3x3 conv + ReLU, a 1x1 conv to
       ``k = 32`` prototypes + ReLU: ``P [B, Hp, Wp, k]`` at stride 4;
    -> on every level, weights shared across levels: one 3x3 conv + ReLU, then three 3x3 convs to
       ``A * (C + 1)`` softmax class logits (background at index 0), ``A * 4`` box deltas (SSD's variances
       0.1 / 0.2, i.e. ``encode_boxes`` weights (10, 10, 5, 5)) and ``A * k`` tanh mask coefficients;
    -> in training only, a 1x1 conv on P3 to ``C`` semantic-segmentation logits (the auxiliary loss);
    -> in eval: softmax scores, ``cvjax.ops.multiclass_fast_nms`` (IoU 0.5, top 200 per class, score > 0.05),
       the detections' masks ``sigmoid(P c)`` cropped to their boxes.

Anchors: ``A = sizes x ratios`` per location with the anchor generator of the other detectors
(``cvjax.ops.multilevel_anchors``; YOLACT's own prior boxes are centred on cell centres, torchvision's grid on
cell corners); the paper's 550-pixel model has one size per level (24, 48, ..., 384) and ratios (1, 1/2, 2).
The matcher (0.5 / 0.4, every object's best anchors kept) and target encoding run inside the jitted step, as
does the mask-target assembly: for up to ``masks_to_train`` positive anchors per image (a random subset when
there are more, the ``sample`` rng), the predicted mask logits ``P c`` at prototype resolution, the matched
object's mask average-pooled to that resolution (> 0.5), and the object's box as the crop region. The losses
(``cvjax.tasks.yolact``) are pure functions of the returned tensors.

Differences from the official code, on purpose: the FPN is cvjax's one (torchvision's: nearest top-down
upsampling, a ReLU between P6 and P7, none on the outputs; YOLACT's upsamples bilinearly, applies ReLU to its
output convs and none between P6 and P7), and the anchors are torchvision's grid (above). Conventions as
``cvjax.models.detection.rcnn``: NHWC images padded top-left with a ``pixel_mask``, boxes absolute ``xyxy``
input pixels, labels 0-based object classes (the model's class column 0 is background).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.detection.one_stage import AnchorPyramid
from cvjax.models.detection.rcnn import clip_boxes, image_sizes
from cvjax.models.registry import MODELS
from cvjax.ops.boxes import decode_boxes
from cvjax.ops.nms import multiclass_fast_nms
from cvjax.ops.roi_align import roi_align

BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)  # SSD / YOLACT variances (0.1, 0.2) as box-coder weights
# YOLACT initialises every conv it adds xavier-uniform with zero bias.
_init = nn.initializers.xavier_uniform()


def crop_masks(masks: jnp.ndarray, boxes: jnp.ndarray, padding: float = 1.0) -> jnp.ndarray:
  """YOLACT's ``crop``: zero every pixel of ``masks [..., h, w]`` outside its box.

  ``boxes [..., 4]`` xyxy in mask pixels (pixel ``i`` spans ``[i, i + 1)``). Pixel column ``i`` is kept iff
  ``x1 - padding <= i < x2 + padding`` (likewise rows), the bounds clipped to the mask: the official code's
  ``sanitize_coordinates`` with its default padding of 1 pixel.

  Returns ``masks * inside`` in ``masks.dtype``.
  """
  h, w = masks.shape[-2:]
  x1, y1, x2, y2 = (boxes[..., i, None] for i in range(4))
  cols = jnp.arange(w, dtype=boxes.dtype)
  rows = jnp.arange(h, dtype=boxes.dtype)
  inside_x = (cols >= jnp.minimum(x1, x2) - padding) & (cols < jnp.maximum(x1, x2) + padding)
  inside_y = (rows >= jnp.minimum(y1, y2) - padding) & (rows < jnp.maximum(y1, y2) + padding)
  return masks * (inside_y[..., :, None] & inside_x[..., None, :]).astype(masks.dtype)


def downsample_masks(masks: jnp.ndarray, factor: int) -> jnp.ndarray:
  """``[..., H, W]`` 0/1 masks -> ``[..., ceil(H / factor), ceil(W / factor)]`` float32 fractions of each
  ``factor x factor`` cell covered (zero padding at the bottom / right), the area-average resize of the
  masks to a ``factor``-strided map."""
  h, w = masks.shape[-2:]
  ph, pw = -h % factor, -w % factor
  masks = jnp.pad(masks.astype(jnp.float32), [(0, 0)] * (masks.ndim - 2) + [(0, ph), (0, pw)])
  shape = masks.shape[:-2] + ((h + ph) // factor, factor, (w + pw) // factor, factor)
  return masks.reshape(shape).mean((-3, -1))


def _fit(maps: jnp.ndarray, hw: Sequence[int]) -> jnp.ndarray:
  """Crops or zero-pads the last two axes of ``maps`` to ``hw`` (a strided map's size can differ by one from
  ``ceil(H / stride)`` when ``H`` is not a multiple of the stride)."""
  h, w = hw
  pad = [(0, 0)] * (maps.ndim - 2) + [(0, max(h - maps.shape[-2], 0)), (0, max(w - maps.shape[-1], 0))]
  return jnp.pad(maps, pad)[..., :h, :w]


class ProtoNet(nn.Module):
  """YOLACT's protonet: ``num_convs`` 3x3 convs + ReLU, bilinear x2 (half-pixel centres, PyTorch's
  ``align_corners=False``), a 3x3 conv + ReLU, a 1x1 conv to ``num_prototypes`` + ReLU.
  ``[B, h, w, C]`` -> ``[B, 2h, 2w, num_prototypes]``."""
  channels: int = 256
  num_prototypes: int = 32
  num_convs: int = 3
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    conv = functools.partial(layers.Conv, kernel_init=_init, impl=self.layer_impl)
    for i in range(self.num_convs):
      x = nn.relu(conv(self.channels, 3, padding=1, name=f"conv_{i}")(x))
    b, h, w, c = x.shape
    x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
    x = nn.relu(conv(self.channels, 3, padding=1, name=f"conv_{self.num_convs}")(x))
    return nn.relu(conv(self.num_prototypes, 1, padding=0, name="prototypes")(x))


class YolactHead(nn.Module):
  """The prediction head shared over the levels: a 3x3 conv + ReLU (``upfeature``), then 3x3 convs to class
  logits ``[B, N, num_classes + 1]``, box deltas ``[B, N, 4]`` and tanh coefficients ``[B, N, k]``, N summed
  over the levels in (y, x, anchor) order."""
  num_anchors: int
  num_classes: int
  num_prototypes: int
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, pyramid: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    conv = functools.partial(layers.Conv, kernel_size=3, padding=1, kernel_init=_init, impl=self.layer_impl)
    channels = pyramid[0].shape[-1]
    upfeature = conv(channels, name="upfeature")
    outs = {"conf": self.num_classes + 1, "bbox": 4, "mask": self.num_prototypes}
    heads = {name: conv(self.num_anchors * n, name=f"{name}_layer") for name, n in outs.items()}
    results = {name: [] for name in outs}
    for x in pyramid:
      x = nn.relu(upfeature(x))
      for name, n in outs.items():
        results[name].append(heads[name](x).reshape(x.shape[0], -1, n))
    logits, deltas, coeffs = (jnp.concatenate(results[name], 1) for name in outs)
    return logits, deltas, jnp.tanh(coeffs)


class Yolact(AnchorPyramid):
  """YOLACT with a ResNet-FPN (the paper's ``yolact_base``: ResNet-101, 550x550).

  Attributes:
    num_classes: object classes (the class head has ``num_classes + 1`` outputs, background first).
    backbone, backbone_*, swin_*, dtype: the backbone (``BackboneFeatures``).
    fpn_channels, min_level, max_level, p6p7_source, anchor_sizes, aspect_ratios, fg_iou_thresh,
      bg_iou_thresh: the pyramid, anchors and matcher (``AnchorPyramid``); the paper's P3..P7 with sizes
      24..384 and ratios (1, 1/2, 2), matching 0.5 / 0.4.
    proto_level: the pyramid level the protonet (and the semantic-segmentation conv) reads (3); the
      prototypes are at stride ``2**proto_level / 2``.
    num_prototypes, proto_channels, proto_convs: ``k`` (32), the protonet width (256) and its 3x3 convs
      before the upsampling (3).
    masks_to_train: positive anchors per image whose masks are trained (100; a random subset if more).
    score_thresh, nms_thresh, top_k, detections_per_img: inference (0.05, 0.5, 200 per class, 100).
    mask_size: the side of the box-relative ``mask_probs`` of the detections (28), for the evaluator.
  """
  num_classes: int = 80
  anchor_sizes: Sequence[Sequence[float]] = ((24,), (48,), (96,), (192,), (384,))
  aspect_ratios: Sequence[float] = (1.0, 0.5, 2.0)
  proto_level: int = 3
  num_prototypes: int = 32
  proto_channels: int = 256
  proto_convs: int = 3
  masks_to_train: int = 100
  score_thresh: float = 0.05
  nms_thresh: float = 0.5
  top_k: int = 200
  detections_per_img: int = 100
  mask_size: int = 28

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool, pixel_mask: Optional[jnp.ndarray] = None,
               gt_boxes: Optional[jnp.ndarray] = None, gt_labels: Optional[jnp.ndarray] = None,
               gt_valid: Optional[jnp.ndarray] = None, gt_masks: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Detects and segments objects; in training also builds every target.

    Args:
      images: ``[B, H, W, 3]`` normalised, padded top-left; ``pixel_mask [B, H, W]`` True on real pixels.
      train: training mode (batch norm, targets, the ``sample`` rng); needs ``gt_boxes [B, M, 4]`` absolute
        xyxy input pixels, ``gt_labels [B, M]`` 0-based, ``gt_valid [B, M]`` and ``gt_masks [B, M, H, W]``
        (0/1 in the image frame).

    Returns:
      both modes: ``cls_logits [B, N, C + 1]`` (background first), ``bbox_regression [B, N, 4]``,
      ``mask_coefficients [B, N, k]``, ``prototypes [B, Hp, Wp, k]``, ``anchors [N, 4]``. Eval adds
      ``boxes [B, D, 4]`` xyxy input pixels, ``scores [B, D]``, ``labels [B, D]`` int32 0-based, ``valid
      [B, D]``, ``instance_masks [B, D, Hp, Wp]`` (mask probabilities at prototype resolution over the input
      frame, cropped to the box) and ``mask_probs [B, D, m, m]`` (the same, box-relative, ``m = mask_size``).
      Train adds ``anchor_labels [B, N]`` (class, -1 background, -2 ignored), ``box_targets [B, N, 4]``,
      ``mask_logits`` / ``mask_targets`` / ``mask_crop [B, P, Hp, Wp]`` (P = ``masks_to_train``; the crop
      is the matched object's box), ``mask_box_area [B, P]`` (that box's area in prototype pixels),
      ``mask_valid [B, P]``, ``num_positive [B]``, ``segm_logits`` / ``segm_targets [B, Hs, Ws, C]``.
    """
    if images.ndim != 4:
      raise ValueError(f"Yolact expects NHWC images [B, H, W, 3], got shape {images.shape}")
    if train:
      if gt_boxes is None or gt_labels is None or gt_valid is None or gt_masks is None:
        raise ValueError("Yolact in training needs gt_boxes, gt_labels, gt_valid and gt_masks")
      if gt_masks.shape[:2] != gt_boxes.shape[:2] or gt_masks.shape[2:] != images.shape[1:3]:
        raise ValueError(f"gt_masks must be [B, M, H, W] = {gt_boxes.shape[:2] + images.shape[1:3]} (the boxes' "
                         f"objects, the image frame), got {gt_masks.shape}")
    levels, maps = self._pyramid(images, train)
    if self.proto_level not in levels:
      raise ValueError(f"proto_level {self.proto_level} is not one of the pyramid levels {levels}")
    proto_map = maps[levels.index(self.proto_level)]
    prototypes = ProtoNet(self.proto_channels, self.num_prototypes, self.proto_convs, self.backbone_layer_impl,
                          name="proto_net")(proto_map)
    logits, deltas, coeffs = YolactHead(self.num_anchors, self.num_classes, self.num_prototypes,
                                        self.backbone_layer_impl, name="head")(maps)
    anchors, _ = self._anchors(images.shape[1:3], maps)
    outputs = {"cls_logits": logits, "bbox_regression": deltas, "mask_coefficients": coeffs,
               "prototypes": prototypes, "anchors": anchors}
    # Powers of two by construction (the FPN level, x2 upsampled), also when H is not a multiple of the stride.
    stride = 2 ** (self.proto_level - 1)
    if train or self.is_initializing():  # the auxiliary head exists in every mode; it runs in training only
      segm_logits = layers.Conv(self.num_classes, 1, padding=0, kernel_init=_init, impl=self.backbone_layer_impl,
                                name="semantic_seg_conv")(proto_map)
    if train:
      labels, targets, matched = self._anchor_targets(anchors, gt_boxes, gt_labels, gt_valid, BOX_WEIGHTS)
      outputs.update(anchor_labels=labels, box_targets=targets, segm_logits=segm_logits)
      outputs.update(self._mask_targets(prototypes, coeffs, labels, matched, gt_boxes.astype(jnp.float32),
                                        gt_masks, stride))
      outputs["segm_targets"] = self._semantic_targets(gt_masks, gt_labels, gt_valid, 2 ** self.proto_level,
                                                       proto_map.shape[1:3])
      return outputs
    sizes = image_sizes(pixel_mask, images.shape[:3])
    outputs.update(jax.vmap(functools.partial(self._detect, anchors, stride))(
        *(jax.lax.stop_gradient(x) for x in (logits, deltas, coeffs, prototypes)), sizes))
    return outputs

  def _mask_targets(self, prototypes, coeffs, labels, matched, gt_boxes, gt_masks, stride):
    """Up to ``masks_to_train`` positives per image (random when more): their mask logits, targets, crops."""
    batch, n = labels.shape
    count = min(self.masks_to_train, n)
    positive = labels >= 0
    # A random order of the positives first (uniform keys in [0, 1), the others 2), then the first `count`.
    keys = jnp.where(positive, jax.random.uniform(self.make_rng("sample"), labels.shape), 2.0)
    _, chosen = jax.lax.top_k(-keys, count)
    take = lambda x: jnp.take_along_axis(x, chosen.reshape(batch, count, *([1] * (x.ndim - 2))), 1)
    valid = take(positive)
    objects = take(matched)
    mask_logits = jnp.einsum("bhwk,bpk->bphw", prototypes, take(coeffs))
    small = _fit(downsample_masks(gt_masks, stride), prototypes.shape[1:3])  # [B, M, Hp, Wp]
    mask_targets = (jnp.take_along_axis(small, objects[:, :, None, None], 1) > 0.5).astype(jnp.float32)
    boxes = jnp.take_along_axis(gt_boxes, objects[:, :, None], 1) / stride
    crop = crop_masks(jnp.ones_like(mask_logits), boxes)
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
    return {"mask_logits": mask_logits, "mask_targets": mask_targets, "mask_crop": crop,
            "mask_box_area": jnp.where(valid, area, 1.0), "mask_valid": valid,
            "num_positive": positive.sum(-1)}

  def _semantic_targets(self, gt_masks, gt_labels, gt_valid, stride, map_hw):
    """``[B, Hs, Ws, C]``: per class, the union of its objects' masks downsampled (> 0.5) to the map."""
    small = _fit(downsample_masks(gt_masks, stride), map_hw) > 0.5  # [B, M, Hs, Ws]
    onehot = jax.nn.one_hot(gt_labels, self.num_classes, dtype=bool) & gt_valid[..., None]  # [B, M, C]
    return (small[:, :, :, :, None] & onehot[:, :, None, None, :]).any(1).astype(jnp.float32)

  def _detect(self, anchors, stride, logits, deltas, coeffs, prototypes, size) -> Dict[str, jnp.ndarray]:
    """One image: softmax scores, decoded clipped boxes, multiclass Fast NMS, masks of the kept detections."""
    scores = jax.nn.softmax(logits, -1)[:, 1:]
    boxes = clip_boxes(decode_boxes(deltas, anchors, BOX_WEIGHTS), size)
    kept = multiclass_fast_nms(boxes, scores, self.nms_thresh, self.top_k, self.detections_per_img,
                               self.score_thresh)
    valid = kept["valid"]
    index = jnp.maximum(kept["indices"], 0)
    det_boxes = jnp.where(valid[:, None], boxes[index], 0.0)
    masks = jax.nn.sigmoid(jnp.einsum("hwk,dk->dhw", prototypes, coeffs[index]))
    masks = crop_masks(masks, det_boxes / stride) * valid[:, None, None]
    rois = jnp.concatenate([jnp.arange(masks.shape[0], dtype=jnp.float32)[:, None], det_boxes], 1)
    # Box-relative masks for the shared evaluator (which pastes them back into the boxes at the original size):
    # bilinear samples of the prototype-resolution masks, as YOLACT's upsampling of its masks to the image.
    mask_probs = roi_align(masks[..., None], rois, self.mask_size, 1.0 / stride, sampling_ratio=2,
                           aligned=True)[..., 0]
    return {"boxes": det_boxes, "scores": kept["scores"], "labels": kept["labels"], "valid": valid,
            "instance_masks": masks, "mask_probs": mask_probs}


_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3)),
            "resnet101": ("bottleneck", (3, 4, 23, 3))}
for _backbone, (_block, _stages) in _RESNETS.items():
  MODELS.register(f"yolact_{_backbone}_fpn")(functools.partial(
      Yolact, backbone_block_type=_block, backbone_stage_sizes=_stages))
