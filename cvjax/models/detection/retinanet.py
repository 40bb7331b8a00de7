"""RetinaNet (Lin et al. 2017, "Focal Loss for Dense Object Detection") as torchvision builds it.

  backbone (ResNet C3..C5) -> ``FPN`` (P3..P5 + ``p6p7``: P6 a 3x3/2 conv of P5, P7 of ReLU(P6)) -> on every
  level, with weights shared across levels, a classification subnet (four 3x3 convs + ReLU, then a 3x3 conv to
  ``A * K`` sigmoid logits whose bias is ``-log((1 - pi) / pi)``, pi = 0.01) and a box subnet (likewise, to
  ``A * 4`` deltas, box coder weights 1) -> in eval, torchvision's ``postprocess_detections``.

Anchors: 3 sizes per level (``x, int(x * 2**(1/3)), int(x * 2**(2/3))`` for x = 32..512 on P3..P7) x 3 aspect
ratios, laid out as the anchor generator of the region-based detectors (``cvjax.ops.multilevel_anchors``).

In training the model also matches anchors to the ground truth (IoU >= 0.5 foreground, < 0.4 background,
between ignored, low-quality matches allowed; ``cvjax.ops.match_boxes``) inside the jitted step and returns the
targets with the predictions; the losses (``cvjax.tasks.retinanet``: focal loss and L1 box loss, each divided
by the image's foreground count) are pure functions of them.

Conventions as ``cvjax.models.detection.rcnn``: NHWC images padded top-left with a ``pixel_mask``; boxes absolute
``xyxy`` in input pixels; labels 0-based object classes. Unlike a softmax head, the sigmoid classifier has no
background column: ``num_classes`` outputs per anchor (torchvision's checkpoints carry an unused column 0 for
their 1-based labels; ``cvjax.convert`` drops it). Parameter names follow torchvision's keys
(``head/classification_head/conv_0``, ``head/regression_head/bbox_reg``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.detection.one_stage import AnchorPyramid, octave_anchor_sizes
from cvjax.models.detection.rcnn import clip_boxes, image_sizes
from cvjax.models.registry import MODELS
from cvjax.ops.boxes import decode_boxes
from cvjax.ops.nms import batched_nms

# torchvision's head convs: N(0, 0.01) weights, zero biases (the classifier's last bias is the prior's).
_head_init = nn.initializers.normal(0.01)
HEAD_NORMS = ("none", "group")


def retinanet_anchor_sizes(base_sizes: Sequence[float] = (32, 64, 128, 256, 512)) -> Tuple[Tuple[int, ...], ...]:
  """torchvision's RetinaNet anchor sizes (``cvjax.models.detection.one_stage.octave_anchor_sizes``)."""
  return octave_anchor_sizes(base_sizes)


class Subnet(nn.Module):
  """One RetinaNet subnet, shared over the levels: ``num_convs`` 3x3 convs + ReLU, then a 3x3 conv to
  ``num_anchors * outputs_per_anchor`` channels, reshaped to ``[B, H_l * W_l * A, outputs_per_anchor]`` per
  level (torchvision's (y, x, anchor) order) and concatenated over the levels."""
  outputs_per_anchor: int
  num_anchors: int
  final_name: str
  final_bias: float = 0.0
  num_convs: int = 4
  norm: str = "none"
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, pyramid: Sequence[jnp.ndarray]) -> jnp.ndarray:
    if self.norm not in HEAD_NORMS:
      raise ValueError(f"head norm must be one of {HEAD_NORMS}, got {self.norm!r}")
    channels = pyramid[0].shape[-1]
    grouped = self.norm == "group"
    convs = [layers.Conv(channels, 3, padding=1, use_bias=not grouped, kernel_init=_head_init,
                         impl=self.layer_impl, name=f"conv_{i}") for i in range(self.num_convs)]
    # torchvision's v2 head: GroupNorm(32) after each conv (bias-free), shared over the levels like the convs.
    norms = [nn.GroupNorm(num_groups=min(32, channels), epsilon=1e-5, name=f"norm_{i}") if grouped
             else (lambda x: x) for i in range(self.num_convs)]
    final = layers.Conv(self.num_anchors * self.outputs_per_anchor, 3, padding=1, kernel_init=_head_init,
                        bias_init=nn.initializers.constant(self.final_bias), impl=self.layer_impl,
                        name=self.final_name)
    outputs = []
    for x in pyramid:
      for conv, norm in zip(convs, norms):
        x = nn.relu(norm(conv(x)))
      # Channel a * K + k is (anchor a, output k): torchvision's view(N, A, K, H, W).permute(0, 3, 4, 1, 2).
      outputs.append(final(x).reshape(x.shape[0], -1, self.outputs_per_anchor))
    return jnp.concatenate(outputs, 1)


class RetinaNetHead(nn.Module):
  """torchvision ``RetinaNetHead`` (no normalisation, the v1 head): ``pyramid`` -> class logits ``[B, N, K]``
  and box deltas ``[B, N, 4]``, N = sum_l H_l W_l A."""
  num_anchors: int
  num_classes: int
  num_convs: int = 4
  prior_probability: float = 0.01
  norm: str = "none"
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, pyramid: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, jnp.ndarray]:
    prior_bias = -math.log((1 - self.prior_probability) / self.prior_probability)
    logits = Subnet(self.num_classes, self.num_anchors, "cls_logits", prior_bias, self.num_convs,
                    self.norm, self.layer_impl, name="classification_head")(pyramid)
    deltas = Subnet(4, self.num_anchors, "bbox_reg", 0.0, self.num_convs, self.norm, self.layer_impl,
                    name="regression_head")(pyramid)
    return logits, deltas


class RetinaNet(AnchorPyramid):
  """RetinaNet with a ResNet-FPN (torchvision ``retinanet_resnet50_fpn``).

  Attributes (torchvision's argument names where it has them):
    num_classes: object classes (sigmoid outputs per anchor; no background column).
    backbone, backbone_*, swin_*, dtype: the backbone (``BackboneFeatures``).
    fpn_channels, min_level, max_level, p6p7_source, anchor_sizes, aspect_ratios, fg_iou_thresh,
      bg_iou_thresh: the pyramid, anchors and matcher (``AnchorPyramid``; 256, P3..P7, P6 from P5, 3 octave
      sizes 32..812 x ratios (0.5, 1, 2), 0.5 / 0.4).
    head_convs, prior_probability: subnet depth (4) and the classifier's prior pi (0.01).
    head_norm: ``'none'`` (torchvision v1, the paper) or ``'group'`` (GroupNorm(32) after each subnet conv, as
      torchvision's ``retinanet_resnet50_fpn_v2`` head; its weights are not converted).
    score_thresh, topk_candidates, nms_thresh, detections_per_img: inference (0.05, 1000 per level, 0.5, 300).
  """
  num_classes: int = 90
  head_convs: int = 4
  head_norm: str = "none"
  prior_probability: float = 0.01
  score_thresh: float = 0.05
  topk_candidates: int = 1000
  nms_thresh: float = 0.5
  detections_per_img: int = 300

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool, pixel_mask: Optional[jnp.ndarray] = None,
               gt_boxes: Optional[jnp.ndarray] = None, gt_labels: Optional[jnp.ndarray] = None,
               gt_valid: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Detects objects; in training also matches anchors to the ground truth.

    Args:
      images: ``[B, H, W, 3]`` normalised, padded top-left; ``pixel_mask [B, H, W]`` True on real pixels.
      train: training mode (batch norm, targets); needs ``gt_boxes [B, M, 4]`` absolute xyxy input pixels,
        ``gt_labels [B, M]`` 0-based and ``gt_valid [B, M]``.

    Returns:
      both modes: ``cls_logits [B, N, K]``, ``bbox_regression [B, N, 4]`` (per anchor, levels concatenated),
      ``anchors [N, 4]``; eval adds ``boxes [B, D, 4]`` xyxy input pixels, ``scores [B, D]``, ``labels
      [B, D]`` int32 0-based, ``valid [B, D]``; train adds ``anchor_labels [B, N]`` (the matched GT's class
      for foreground anchors, -1 background, -2 ignored) and ``box_targets [B, N, 4]`` (encoded w.r.t. the
      anchor on foreground anchors, zeros elsewhere).
    """
    if images.ndim != 4:
      raise ValueError(f"RetinaNet expects NHWC images [B, H, W, 3], got shape {images.shape}")
    _, maps = self._pyramid(images, train)
    logits, deltas = RetinaNetHead(self.num_anchors, self.num_classes, self.head_convs, self.prior_probability,
                                   self.head_norm, self.backbone_layer_impl, name="head")(maps)
    anchors, level_sizes = self._anchors(images.shape[1:3], maps)
    outputs = {"cls_logits": logits, "bbox_regression": deltas, "anchors": anchors}
    if train:
      if gt_boxes is None or gt_labels is None or gt_valid is None:
        raise ValueError("RetinaNet in training needs gt_boxes, gt_labels and gt_valid")
      labels, targets, _ = self._anchor_targets(anchors, gt_boxes, gt_labels, gt_valid)
      outputs.update(anchor_labels=labels, box_targets=targets)
      return outputs
    sizes = image_sizes(pixel_mask, images.shape[:3])
    outputs.update(jax.vmap(functools.partial(self._detect, anchors, level_sizes))(
        jax.lax.stop_gradient(logits), jax.lax.stop_gradient(deltas), sizes))
    return outputs

  def _detect(self, anchors, level_sizes, logits, deltas, size) -> Dict[str, jnp.ndarray]:
    """torchvision ``RetinaNet.postprocess_detections`` for one image, with static shapes: per level the
    top ``topk_candidates`` (anchor, class) scores above ``score_thresh``, decoded and clipped; then
    class-aware NMS over the levels' candidates, ``detections_per_img`` kept."""
    classes = self.num_classes
    boxes, scores, labels = [], [], []
    start = 0
    for count in level_sizes:
      level_scores = jax.nn.sigmoid(logits[start:start + count]).reshape(-1)  # index a * K + k
      top_scores, top = jax.lax.top_k(jnp.where(level_scores > self.score_thresh, level_scores, -jnp.inf),
                                      min(self.topk_candidates, count * classes))
      anchor = start + top // classes
      boxes.append(clip_boxes(decode_boxes(deltas[anchor], anchors[anchor]), size))
      scores.append(top_scores)
      labels.append((top % classes).astype(jnp.int32))
      start += count
    boxes, scores, labels = (jnp.concatenate(x, 0) for x in (boxes, scores, labels))
    kept, _ = batched_nms(boxes, scores, labels, self.nms_thresh, self.detections_per_img,
                          score_threshold=self.score_thresh)
    valid = kept >= 0
    kept = jnp.maximum(kept, 0)
    return {"boxes": jnp.where(valid[:, None], boxes[kept], 0.0), "scores": jnp.where(valid, scores[kept], 0.0),
            "labels": jnp.where(valid, labels[kept], 0), "valid": valid}


_RESNETS = {"resnet18": ("basic", (2, 2, 2, 2)), "resnet50": ("bottleneck", (3, 4, 6, 3))}
for _backbone, (_block, _stages) in _RESNETS.items():
  MODELS.register(f"retinanet_{_backbone}_fpn")(functools.partial(
      RetinaNet, backbone_block_type=_block, backbone_stage_sizes=_stages))
