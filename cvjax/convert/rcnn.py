"""torchvision ``fasterrcnn_resnet50_fpn`` / ``maskrcnn_resnet50_fpn`` state_dicts -> cvjax ``MaskRCNN`` variables.

torchvision's class 0 is background, as the heads' column 0 in cvjax, so the predictor weights load as they are;
``num_classes`` counts object classes only (torchvision's ``num_classes`` minus one). One torchvision key per
flax leaf:

  backbone.body.<resnet key>                  backbone/<resnet path> (FrozenBatchNorm stats in batch_stats)
  backbone.fpn.inner_blocks.<i>.0.*           fpn/inner_blocks_<i>       (layer_blocks likewise)
  rpn.head.conv.0.0.* / cls_logits / bbox_pred  rpn_head/conv | cls_logits | bbox_pred
  roi_heads.box_head.fc6 / fc7                box_head/fc6 / box_head/fc7
  roi_heads.box_predictor.cls_score / bbox_pred   box_head/cls_score / box_head/bbox_pred
  roi_heads.mask_head.<i>.0.*                 mask_head/mask_head_<i>
  roi_heads.mask_predictor.conv5_mask / mask_fcn_logits   mask_head/conv5_mask_{kernel,bias} / mask_fcn_logits
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Tuple

import numpy as np

from cvjax.convert import common
from cvjax.convert.torchvision import torchvision_module_name
from cvjax.models import create_model

_FIXED = {
    ("rpn_head", "conv"): "rpn.head.conv.0.0",
    ("rpn_head", "cls_logits"): "rpn.head.cls_logits",
    ("rpn_head", "bbox_pred"): "rpn.head.bbox_pred",
    ("box_head", "fc6"): "roi_heads.box_head.fc6",
    ("box_head", "fc7"): "roi_heads.box_head.fc7",
    ("box_head", "cls_score"): "roi_heads.box_predictor.cls_score",
    ("box_head", "bbox_pred"): "roi_heads.box_predictor.bbox_pred",
    ("mask_head", "mask_fcn_logits"): "roi_heads.mask_predictor.mask_fcn_logits",
}


def torch_key(path: Tuple[str, ...]) -> str:
  """A flax leaf path (without the collection) -> the torchvision key."""
  module, leaf = path[:-1], path[-1]
  if module == ("mask_head",) and leaf.startswith("conv5_mask_"):
    return "roi_heads.mask_predictor.conv5_mask." + {"kernel": "weight", "bias": "bias"}[leaf[11:]]
  name = common.TORCH_LEAF_NAMES[leaf]
  if module in _FIXED:
    return f"{_FIXED[module]}.{name}"
  if module[0] == "backbone":
    return f"backbone.body.{torchvision_module_name(module[1:])}.{name}"
  if module[0] == "fpn":
    block, index = module[1].rsplit("_", 1)
    return f"backbone.fpn.{block}.{index}.0.{name}"
  if module[0] == "mask_head":
    return f"roi_heads.mask_head.{module[1].rsplit('_', 1)[1]}.0.{name}"
  raise KeyError(f"no torchvision key for {'/'.join(path)}")


def from_torchvision_rcnn(model_name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Tuple[Any, Dict]:
  """``(module, variables)`` of ``create_model(model_name, **model_kwargs)`` from a torchvision R-CNN checkpoint.

  Args:
    model_name: ``'fasterrcnn_resnet50_fpn'`` or ``'maskrcnn_resnet50_fpn'`` (or a resnet18 variant).
    state_dict: torchvision's keys (``backbone.body.conv1.weight``, ``roi_heads.box_predictor.cls_score.bias``).
    **model_kwargs: ``num_classes`` (object classes; torchvision's ``num_classes - 1``) and other model
      options; frozen batch norm by default, as torchvision's pretrained detectors.
  """
  model_kwargs.setdefault("backbone_frozen_bn", True)
  if "num_classes" not in model_kwargs:
    model_kwargs["num_classes"] = int(common.to_numpy(state_dict["roi_heads.box_predictor.cls_score.bias"]).shape[0]) - 1
  module = create_model(model_name, **model_kwargs)

  def conv_transpose(path, value, target_shape):
    del target_shape
    if path[-1] == "conv5_mask_kernel":  # ConvTranspose2d [I, O, KH, KW]: the generic rule gave [KH, KW, O, I]
      return np.swapaxes(value, 2, 3)
    return value

  variables = common.load_state_dict(module, state_dict, input_shape=(1, 64, 64, 3), torch_key=torch_key,
                                     leaf_transform=conv_transpose, source=f"torchvision {model_name} state_dict")
  return module, variables
