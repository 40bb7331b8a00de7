"""torchvision ``retinanet_resnet50_fpn`` state_dicts -> cvjax ``RetinaNet`` variables.

One torchvision key per flax leaf (backbone and FPN as ``cvjax.convert.rcnn``):

  backbone.fpn.extra_blocks.p6 / p7              fpn/p6 / fpn/p7
  head.classification_head.conv.<i>.0.*          head/classification_head/conv_<i>   (regression_head likewise)
  head.classification_head.cls_logits.*          head/classification_head/cls_logits
  head.regression_head.bbox_reg.*                head/regression_head/bbox_reg

torchvision's classifier has ``num_classes`` sigmoid columns per anchor for 1-based labels, column 0 (the
background index of its COCO label map) never a target. cvjax's labels are 0-based object classes: column 0 is
dropped from ``cls_logits`` and cvjax label ``k`` is torchvision label ``k + 1``; ``num_classes`` counts
object classes (torchvision's minus one).
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from cvjax.convert import common, rcnn
from cvjax.models import create_model

CLS_WEIGHT, CLS_BIAS = "head.classification_head.cls_logits.weight", "head.classification_head.cls_logits.bias"


def torch_key(path: Tuple[str, ...]) -> str:
  """A flax leaf path (without the collection) -> the torchvision key."""
  module, leaf = path[:-1], path[-1]
  name = common.TORCH_LEAF_NAMES[leaf]
  if module[0] == "fpn" and module[1] in ("p6", "p7"):
    return f"backbone.fpn.extra_blocks.{module[1]}.{name}"
  if module[0] == "head":
    if module[2].startswith("conv_"):
      return f"head.{module[1]}.conv.{module[2][5:]}.0.{name}"
    return f"head.{module[1]}.{module[2]}.{name}"
  return rcnn.torch_key(path)


def from_torchvision_retinanet(model_name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Tuple[Any, Dict]:
  """``(module, variables)`` of ``create_model(model_name, **model_kwargs)`` from a torchvision RetinaNet.

  Args:
    model_name: ``'retinanet_resnet50_fpn'`` (or ``'retinanet_resnet18_fpn'``).
    state_dict: torchvision's keys (``backbone.body.conv1.weight``, ``head.regression_head.bbox_reg.bias``).
    **model_kwargs: ``num_classes`` (object classes: torchvision's ``num_classes - 1``; read from the
      checkpoint when not given) and other model options; frozen batch norm by default, as torchvision's
      pretrained detectors.
  """
  model_kwargs.setdefault("backbone_frozen_bn", True)
  weight, bias = common.to_numpy(state_dict[CLS_WEIGHT]), common.to_numpy(state_dict[CLS_BIAS])
  num_anchors = common.to_numpy(state_dict["head.regression_head.bbox_reg.bias"]).shape[0] // 4
  torch_classes = bias.shape[0] // num_anchors
  model_kwargs.setdefault("num_classes", torch_classes - 1)
  if model_kwargs["num_classes"] != torch_classes - 1:
    raise ValueError(f"num_classes={model_kwargs['num_classes']} object classes, but the checkpoint's classifier "
                     f"has {torch_classes} columns per anchor (expected num_classes + 1, column 0 unused)")
  # Drop column 0 of every anchor: [A * (K + 1), ...] -> [A * K, ...].
  state_dict = dict(state_dict)
  state_dict[CLS_WEIGHT] = weight.reshape(num_anchors, torch_classes, *weight.shape[1:])[:, 1:].reshape(
      -1, *weight.shape[1:])
  state_dict[CLS_BIAS] = bias.reshape(num_anchors, torch_classes)[:, 1:].reshape(-1)
  module = create_model(model_name, **model_kwargs)
  variables = common.load_state_dict(module, state_dict, input_shape=(1, 64, 64, 3), torch_key=torch_key,
                                     source=f"torchvision {model_name} state_dict")
  return module, variables
