"""YOLOv1 (Redmon et al. 2016, "You Only Look Once: Unified, Real-Time Object Detection").

The image is an ``S x S`` grid (S = 7). A backbone and two fully connected layers (the paper's 4096 hidden
units, dropout 0.5, leaky ReLU 0.1 everywhere but the linear output) predict per cell ``B`` boxes (B = 2), each
``(x, y, sqrt(w), sqrt(h), confidence)``, and ``C`` class probabilities Pr(class | object) shared by the
cell's boxes. ``x, y`` are the box centre's offset inside its cell (0..1), ``w, h`` the box size as a fraction
of the image; the network predicts the square roots of the sizes, as the paper says, so a decoded size is the
prediction squared (never negative). Per cell the output channels are ``[x, y, sqrt w, sqrt h, conf] * B``
then the ``C`` class scores.

Backbones (``network``):
  ``'darknet24'``  the paper's 24 convolutional layers (Fig. 3): 7x7/2 64, maxpool, 3x3 192, maxpool, 1x1 128,
                   3x3 256, 1x1 256, 3x3 512, maxpool, (1x1 256, 3x3 512) x 4, 1x1 512, 3x3 1024, maxpool,
                   (1x1 512, 3x3 1024) x 2, 3x3 1024, 3x3/2 1024, 3x3 1024, 3x3 1024: stride 64, 448 -> 7.
  ``'fast'``       Fast YOLO's 9 convolutional layers (3x3 convs of 16, 32, ..., 512 channels, each followed by a maxpool,
                   then 1024, 1024 and 256).
  ``'resnet'``     the detectors' shared ResNet (``BackboneFeatures``), its C5 map (stride 32; 8 with
                   ``backbone_stem='cifar'``): small CPU presets.
``darknet_width`` multiplies the Darknet channels (CPU variants); ``batch_norm`` adds batch norm after each
Darknet conv (the 2016 paper has none, darknet's later ``yolov1.cfg`` has it; it lets a network train from
scratch). The fully connected head reads the flattened final map whatever its size, so the grid is ``S``
for any input size; the optional convolutional head (``head='conv'``, a CPU-scale variant) predicts each cell
from its own location of a map that must be ``S x S``.

Training targets (``yolo_v1_targets``): an object belongs to the cell holding its centre; a cell holds at most
one object (the largest when several centres fall in it, a YOLOv1 limitation); of that cell's B predictors the
one whose current box has the highest IoU with the object is "responsible" for it, and its confidence target
is that IoU (darknet's ``rescore``) or 1. The loss (``cvjax.tasks.yolo``) is the paper's sum-squared error.

Conventions as the other detectors: NHWC images padded top-left with a ``pixel_mask``; boxes absolute ``xyxy``
in input pixels; labels 0-based object classes; eval outputs ``boxes / scores / labels / valid`` per image.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.detection.backbone import BackboneFeatures
from cvjax.models.detection.rcnn import clip_boxes, image_sizes
from cvjax.models.registry import MODELS
from cvjax.ops.boxes import box_convert, elementwise_box_iou
from cvjax.ops.nms import batched_nms

NETWORKS = ("darknet24", "fast", "resnet")
HEADS = ("fc", "conv")
# (kernel, channels, stride) per conv; "M" a 2x2/2 max pool.
DARKNET24 = ((7, 64, 2), "M", (3, 192, 1), "M", (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
             *((1, 256, 1), (3, 512, 1)) * 4, (1, 512, 1), (3, 1024, 1), "M",
             *((1, 512, 1), (3, 1024, 1)) * 2, (3, 1024, 1), (3, 1024, 2), (3, 1024, 1), (3, 1024, 1))
FAST = ((3, 16, 1), "M", (3, 32, 1), "M", (3, 64, 1), "M", (3, 128, 1), "M", (3, 256, 1), "M", (3, 512, 1), "M",
        (3, 1024, 1), (3, 1024, 1), (3, 256, 1))
DARKNET_SPECS = {"darknet24": DARKNET24, "fast": FAST}


class Darknet(nn.Module):
  """A plain conv stack from ``spec`` with leaky ReLU 0.1: ``[B, H, W, 3]`` -> ``[B, h, w, C]``. Pools that
  would take a map below 1 pixel are skipped, so small inputs still reach the head."""
  spec: Sequence[Any]
  width: float = 1.0
  batch_norm: bool = True
  layer_impl: str = "auto"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool) -> jnp.ndarray:
    index = 0
    for item in self.spec:
      if item == "M":
        if min(x.shape[1:3]) >= 2:
          x = layers.max_pool(x, 2, 2)
        continue
      kernel, channels, stride = item
      x = layers.Conv(max(1, int(round(channels * self.width))), kernel, strides=stride, padding=kernel // 2,
                      use_bias=not self.batch_norm, kernel_init=nn.initializers.variance_scaling(
                          2.0, "fan_in", "normal"), impl=self.layer_impl, dtype=self.dtype,
                      name=f"conv{index}")(x)
      if self.batch_norm:
        x = layers.batch_norm(train=train, dtype=self.dtype, name=f"bn{index}")(x)
      x = nn.leaky_relu(x, 0.1)
      index += 1
    return x


def decode_cells(predictions: jnp.ndarray, boxes_per_cell: int, image_hw: Tuple[int, int]) -> jnp.ndarray:
  """``[B, S, S, >= 5 * boxes_per_cell]`` raw outputs -> ``[B, S, S, boxes_per_cell, 4]`` absolute ``xyxy``
  in pixels of an ``image_hw`` image (cell offsets added to ``x, y``; sizes squared)."""
  grid = predictions.shape[1]
  raw = predictions[..., :5 * boxes_per_cell].reshape(*predictions.shape[:3], boxes_per_cell, 5)
  cells = jnp.arange(grid, dtype=jnp.float32)
  cx = (raw[..., 0] + cells[None, None, :, None]) / grid
  cy = (raw[..., 1] + cells[None, :, None, None]) / grid
  height, width = image_hw
  scale = jnp.array([width, height, width, height], jnp.float32)
  cxcywh = jnp.stack([cx, cy, raw[..., 2] ** 2, raw[..., 3] ** 2], -1)
  return box_convert(cxcywh, "cxcywh", "xyxy") * scale


def yolo_v1_targets(pred_boxes: jnp.ndarray, gt_boxes: jnp.ndarray, gt_labels: jnp.ndarray,
                    gt_valid: jnp.ndarray, image_hw: Tuple[int, int], rescore: bool = True) -> Dict[str, Any]:
  """One image's YOLOv1 targets (module docstring).

  Args:
    pred_boxes: ``[S, S, B, 4]`` the current predicted boxes, absolute xyxy (only their IoUs are used).
    gt_boxes: ``[M, 4]`` absolute xyxy in pixels of the ``image_hw`` input; ``gt_labels [M]``; ``gt_valid [M]``.
    rescore: confidence target = the responsible box's IoU (True) or 1.

  Returns:
    ``object_mask [S, S]`` bool (the cell holds an object), ``responsible [S, S, B]`` bool, ``box_targets
    [S, S, 4]`` (x, y offsets in the cell, sqrt w, sqrt h as fractions of the image), ``class_targets [S, S]``
    int32 and ``confidence_targets [S, S, B]`` (zero off the responsible predictors).
  """
  grid = pred_boxes.shape[0]
  height, width = image_hw
  gt_boxes = gt_boxes.astype(jnp.float32)
  cx = (gt_boxes[:, 0] + gt_boxes[:, 2]) / (2 * width)
  cy = (gt_boxes[:, 1] + gt_boxes[:, 3]) / (2 * height)
  w = jnp.clip((gt_boxes[:, 2] - gt_boxes[:, 0]) / width, 0.0, 1.0)
  h = jnp.clip((gt_boxes[:, 3] - gt_boxes[:, 1]) / height, 0.0, 1.0)
  # An object whose centre is outside the image, or whose box is empty, is nobody's target.
  valid = gt_valid & (w > 0) & (h > 0) & (cx >= 0) & (cx < 1) & (cy >= 0) & (cy < 1)
  col = jnp.clip(jnp.floor(cx * grid), 0, grid - 1).astype(jnp.int32)
  row = jnp.clip(jnp.floor(cy * grid), 0, grid - 1).astype(jnp.int32)
  cell_of = jnp.where(valid, row * grid + col, -1)                                  # [M]
  in_cell = cell_of[None, :] == jnp.arange(grid * grid)[:, None]                     # [S*S, M]
  chosen = jnp.argmax(jnp.where(in_cell, (w * h)[None, :], -1.0), axis=1)            # largest object per cell
  object_mask = in_cell.any(1).reshape(grid, grid)
  chosen = chosen.reshape(grid, grid)
  box = gt_boxes[chosen]                                                             # [S, S, 4]
  ious = jax.lax.stop_gradient(elementwise_box_iou(
      pred_boxes, jnp.broadcast_to(box[:, :, None, :], pred_boxes.shape)))  # [S, S, B]
  responsible = jax.nn.one_hot(jnp.argmax(ious, -1), pred_boxes.shape[2], dtype=bool) & object_mask[..., None]
  cells = jnp.arange(grid, dtype=jnp.float32)
  box_targets = jnp.stack([cx[chosen] * grid - cells[None, :], cy[chosen] * grid - cells[:, None],
                           jnp.sqrt(w[chosen]), jnp.sqrt(h[chosen])], -1)
  confidence = ious if rescore else jnp.ones_like(ious)
  return {"object_mask": object_mask, "responsible": responsible,
          "box_targets": jnp.where(object_mask[..., None], box_targets, 0.0),
          "class_targets": jnp.where(object_mask, gt_labels[chosen].astype(jnp.int32), 0),
          "confidence_targets": jnp.where(responsible, confidence, 0.0)}


class YOLOv1(BackboneFeatures):
  """YOLOv1 (module docstring).

  Attributes:
    num_classes: C. ``grid_size``: S (7). ``boxes_per_cell``: B (2).
    network: ``'darknet24'`` | ``'fast'`` | ``'resnet'`` (module docstring); ``darknet_width``, ``batch_norm``.
    backbone_*: the ResNet when ``network='resnet'`` (``BackboneFeatures``); ``feature_level`` the ResNet map
      the head reads (2..5 for C2..C5; None: C5).
    head: ``'fc'``, the paper's two fully connected layers (``hidden_size`` 4096 units, then dropout, then
      ``S * S * (5 B + C)`` outputs), or ``'conv'``: ``head_convs`` 3x3 convs of ``hidden_size`` channels
      (leaky ReLU), dropout, and a 1x1 conv to ``5 B + C`` per cell, on a backbone map that is the ``S x S``
      grid itself (a CPU-scale variant: each cell is predicted from its own receptive field, not from one
      flattened vector; the outputs, targets and loss are the paper's).
    dropout_rate: the dropout before the output layer (0.5).
    rescore: confidence target = IoU (True, the paper) or 1.
    score_thresh, nms_thresh, detections_per_img: inference on the class-specific confidences
      ``Pr(class | object) * confidence``: threshold, class-aware NMS, top detections.
  """
  num_classes: int = 20
  grid_size: int = 7
  boxes_per_cell: int = 2
  network: str = "darknet24"
  darknet_width: float = 1.0
  batch_norm: bool = True
  head: str = "fc"
  hidden_size: int = 4096
  head_convs: int = 2
  dropout_rate: float = 0.5
  rescore: bool = True
  feature_level: Optional[int] = None
  score_thresh: float = 0.005
  nms_thresh: float = 0.5
  detections_per_img: int = 100

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool, pixel_mask: Optional[jnp.ndarray] = None,
               gt_boxes: Optional[jnp.ndarray] = None, gt_labels: Optional[jnp.ndarray] = None,
               gt_valid: Optional[jnp.ndarray] = None) -> Dict[str, Any]:
    """Detects objects; in training also assigns the ground truth to cells and predictors.

    Args:
      images: ``[B, H, W, 3]`` normalised, padded top-left; ``pixel_mask [B, H, W]`` True on real pixels.
      train: training mode (dropout needs the ``'dropout'`` rng; batch norm); needs ``gt_boxes [B, M, 4]``
        absolute xyxy input pixels, ``gt_labels [B, M]`` 0-based and ``gt_valid [B, M]``.

    Returns:
      both modes: ``predictions [B, S, S, 5 B + C]`` (raw, module docstring), ``pred_boxes [B, S, S, B, 4]``
      xyxy input pixels, ``confidence [B, S, S, B]``, ``class_scores [B, S, S, C]``; train adds the targets of
      ``yolo_v1_targets`` batched; eval adds ``boxes [B, D, 4]``, ``scores [B, D]``, ``labels [B, D]`` int32,
      ``valid [B, D]``.
    """
    if images.ndim != 4:
      raise ValueError(f"YOLOv1 expects NHWC images [B, H, W, 3], got shape {images.shape}")
    if self.network not in NETWORKS:
      raise ValueError(f"network must be one of {NETWORKS}, got {self.network!r}")
    height, width = images.shape[1:3]
    if self.network == "resnet":
      features = self._features(images, train)
      level = self.feature_level or max(features)  # default C5 (stride 32, or 8 with the CIFAR stem)
      if level not in features:
        raise ValueError(f"feature_level must be one of the backbone's levels {sorted(features)}, got {level}")
      x = features[level]
    else:
      x = Darknet(DARKNET_SPECS[self.network], self.darknet_width, self.batch_norm, self.backbone_layer_impl,
                  self.dtype, name="backbone")(images, train)
    grid, per_cell = self.grid_size, 5 * self.boxes_per_cell + self.num_classes
    # A small output init keeps the first steps' sum-squared errors (and their gradients) moderate.
    out_init = nn.initializers.normal(0.01)
    x = x.astype(jnp.float32)
    if self.head == "fc":
      x = x.reshape(x.shape[0], -1)
      x = nn.leaky_relu(nn.Dense(self.hidden_size, name="fc1")(x), 0.1)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      predictions = nn.Dense(grid * grid * per_cell, kernel_init=out_init, name="fc2")(x).reshape(
          -1, grid, grid, per_cell)
    elif self.head == "conv":
      if x.shape[1:3] != (grid, grid):
        raise ValueError(f"the conv head needs the backbone map to be the {grid}x{grid} grid, got "
                         f"{x.shape[1:3]}: choose grid_size, feature_level or the input size to match")
      for i in range(self.head_convs):
        x = nn.leaky_relu(layers.Conv(self.hidden_size, 3, padding=1, impl=self.backbone_layer_impl,
                                      name=f"head_conv{i}")(x), 0.1)
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      predictions = layers.Conv(per_cell, 1, padding=0, kernel_init=out_init, impl=self.backbone_layer_impl,
                                name="head_out")(x)
    else:
      raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
    pred_boxes = decode_cells(predictions, self.boxes_per_cell, (height, width))
    confidence = predictions[..., 4:5 * self.boxes_per_cell:5]
    class_scores = predictions[..., 5 * self.boxes_per_cell:]
    outputs = {"predictions": predictions, "pred_boxes": pred_boxes, "confidence": confidence,
               "class_scores": class_scores}
    if train:
      if gt_boxes is None or gt_labels is None or gt_valid is None:
        raise ValueError("YOLOv1 in training needs gt_boxes, gt_labels and gt_valid")
      outputs.update(jax.vmap(functools.partial(yolo_v1_targets, image_hw=(height, width),
                                                rescore=self.rescore))(pred_boxes, gt_boxes, gt_labels, gt_valid))
      return outputs
    sizes = image_sizes(pixel_mask, images.shape[:3])
    outputs.update(jax.vmap(self._detect)(*(jax.lax.stop_gradient(v) for v in (pred_boxes, confidence,
                                                                                class_scores)), sizes))
    return outputs

  def _detect(self, pred_boxes, confidence, class_scores, size) -> Dict[str, jnp.ndarray]:
    """One image: class-specific confidences ``[S*S*B, C]``, thresholded, class-aware NMS, top detections."""
    classes = self.num_classes
    scores = (class_scores[:, :, None, :] * confidence[..., None]).reshape(-1)  # (cell, box, class)
    boxes = clip_boxes(pred_boxes.reshape(-1, 4), size)
    candidate = jnp.arange(scores.shape[0]) // classes
    kept, _ = batched_nms(boxes[candidate], scores, (jnp.arange(scores.shape[0]) % classes).astype(jnp.int32),
                          self.nms_thresh, self.detections_per_img, score_threshold=self.score_thresh)
    valid = kept >= 0
    kept = jnp.maximum(kept, 0)
    return {"boxes": jnp.where(valid[:, None], boxes[candidate[kept]], 0.0),
            "scores": jnp.where(valid, scores[kept], 0.0),
            "labels": jnp.where(valid, kept % classes, 0).astype(jnp.int32), "valid": valid}


MODELS.register("yolov1_darknet24")(functools.partial(YOLOv1, network="darknet24"))
MODELS.register("yolov1_fast")(functools.partial(YOLOv1, network="fast"))
MODELS.register("yolov1_resnet18")(functools.partial(YOLOv1, network="resnet", backbone_block_type="basic",
                                                     backbone_stage_sizes=(2, 2, 2, 2)))
