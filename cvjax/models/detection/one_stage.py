"""What the anchor-based one-stage detectors (RetinaNet, YOLACT) share: the FPN pyramid over chosen levels,
its anchors, and the matching of anchors to the ground truth inside the jitted step.

``AnchorPyramid`` is a base class like ``BackboneFeatures`` (a Flax dataclass with attributes and methods
that the subclass's compact ``__call__`` calls), so that every one-stage detector names its pyramid, anchor
and matcher attributes alike and builds the FPN under the same parameter path (``fpn/...``).
"""

from __future__ import annotations

import functools
from typing import List, Sequence, Tuple

import jax
import jax.numpy as jnp

from cvjax.models.detection.backbone import BackboneFeatures
from cvjax.models.detection.fpn import FPN
from cvjax.ops import anchors as anchor_ops
from cvjax.ops import proposals as proposal_ops
from cvjax.ops.boxes import box_iou, encode_boxes


def octave_anchor_sizes(base_sizes: Sequence[float] = (32, 64, 128, 256, 512)) -> Tuple[Tuple[int, ...], ...]:
  """Per level ``(x, int(x * 2**(1/3)), int(x * 2**(2/3)))``: torchvision's three octave scales (truncated)."""
  return tuple((int(x), int(x * 2 ** (1.0 / 3)), int(x * 2 ** (2.0 / 3))) for x in base_sizes)


class AnchorPyramid(BackboneFeatures):
  """Backbone -> FPN (``p6p7`` extra levels) on levels ``min_level..max_level``, anchors and matching.

  Attributes:
    fpn_channels: FPN width (256). ``min_level`` / ``max_level``: the pyramid levels the heads run on (3 / 7:
      C3..C5 -> P3..P7; 2 / 4 feeds C2 to the FPN and drops P5..P7, for small objects at CPU scale).
      ``p6p7_source``: ``'p5'`` (torchvision's RetinaNet v1) or ``'c5'`` (the RetinaNet paper, v2).
    anchor_sizes, aspect_ratios: one size tuple per pyramid level, and the ratios (height / width); the
      anchors are ``cvjax.ops.multilevel_anchors``'s (torchvision's rounding and (y, x, anchor) order).
    fg_iou_thresh, bg_iou_thresh: the matcher (``cvjax.ops.match_boxes``, low-quality matches allowed).
  """
  fpn_channels: int = 256
  min_level: int = 3
  max_level: int = 7
  p6p7_source: str = "p5"
  anchor_sizes: Sequence[Sequence[float]] = octave_anchor_sizes()
  aspect_ratios: Sequence[float] = (0.5, 1.0, 2.0)
  fg_iou_thresh: float = 0.5
  bg_iou_thresh: float = 0.4

  def _pyramid(self, images: jnp.ndarray, train: bool) -> Tuple[List[int], List[jnp.ndarray]]:
    """``[B, H, W, 3]`` -> (levels, their FPN maps ``[B, H / 2**l, W / 2**l, fpn_channels]``), levels
    ascending. Call it from the subclass's compact ``__call__``."""
    if not self.min_level <= self.max_level <= 7 or self.min_level < 2:
      raise ValueError(f"pyramid levels need 2 <= min_level <= max_level <= 7, got {self.min_level} and "
                       f"{self.max_level}")
    features = {l: m for l, m in self._features(images, train).items() if l >= self.min_level}
    pyramid = FPN(self.fpn_channels, "p6p7", self.backbone_layer_impl, self.p6p7_source, name="fpn")(features)
    levels = sorted(l for l in pyramid if l <= self.max_level)
    if len(self.anchor_sizes) != len(levels):
      raise ValueError(f"anchor_sizes has {len(self.anchor_sizes)} entries for {len(levels)} pyramid levels "
                       f"{levels}: give one size tuple per level")
    return levels, [pyramid[l] for l in levels]

  @property
  def num_anchors(self) -> int:
    """Anchors per location: sizes per level x aspect ratios."""
    return len(self.anchor_sizes[0]) * len(self.aspect_ratios)

  def _anchors(self, image_hw: Sequence[int], maps: Sequence[jnp.ndarray]) -> Tuple[jnp.ndarray, List[int]]:
    """``([N, 4] float32 xyxy anchors of all levels, anchors per level)``."""
    anchors, level_sizes = anchor_ops.multilevel_anchors(
        tuple(image_hw), [m.shape[1:3] for m in maps], self.anchor_sizes, [self.aspect_ratios] * len(maps))
    return jnp.asarray(anchors, jnp.float32), level_sizes

  def _anchor_targets(self, anchors: jnp.ndarray, gt_boxes: jnp.ndarray, gt_labels: jnp.ndarray,
                      gt_valid: jnp.ndarray, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """Matches a batch: ``gt_boxes [B, M, 4]`` absolute xyxy, ``gt_labels [B, M]``, ``gt_valid [B, M]`` ->
    ``labels [B, N]`` (the matched object's class, -1 background, -2 between the thresholds), ``box_targets
    [B, N, 4]`` (``encode_boxes`` with ``weights`` on foreground anchors, zeros elsewhere) and ``matched
    [B, N]`` (the object index of foreground anchors, 0 elsewhere). Degenerate boxes (zero width or height)
    are not objects: they could not be regression targets (log of a zero size)."""
    gt_boxes = gt_boxes.astype(jnp.float32)
    gt_valid = gt_valid & (gt_boxes[..., 2] > gt_boxes[..., 0]) & (gt_boxes[..., 3] > gt_boxes[..., 1])
    return jax.vmap(functools.partial(self._match_image, anchors, weights=tuple(weights)))(
        gt_boxes, gt_labels, gt_valid)

  def _match_image(self, anchors, gt_boxes, gt_labels, gt_valid, weights):
    match = proposal_ops.match_boxes(box_iou(gt_boxes, anchors), gt_valid, self.fg_iou_thresh,
                                     self.bg_iou_thresh, True)
    foreground = match >= 0
    matched = jnp.maximum(match, 0)
    labels = jnp.where(foreground, gt_labels[matched].astype(jnp.int32), match)
    # Other anchors regress onto themselves (zero targets) so that no log(0) of a padding box is computed.
    reference = jnp.where(foreground[:, None], gt_boxes[matched], anchors)
    return labels, encode_boxes(reference, anchors, weights), matched
