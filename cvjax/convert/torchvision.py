"""torchvision ``state_dict``s -> cvjax ResNet / VGG / AlexNet variables.

cvjax names these models' submodules after torchvision's attribute paths with ``.<index>`` written
``_<index>`` (``layer1_0/downsample_0``, ``features_3``, ``classifier_6``), so the key mapping is one rule.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import numpy as np

from cvjax.convert import common
from cvjax.models import create_model
from cvjax.models.backbones.alexnet import AlexNet
from cvjax.models.backbones.resnet import ResNet
from cvjax.models.backbones.vgg import VGG

# The Linear that reads the flattened pooled map, per architecture.
_FLATTENED_LINEAR = {VGG: "classifier_0", AlexNet: "classifier_1"}
_SUPPORTED = (ResNet, VGG, AlexNet)
# Large enough for every supported model's strides (AlexNet needs 63); only shapes are traced.
_INPUT_SIDE = 224


def torchvision_module_name(flax_path: Tuple[str, ...]) -> str:
  """``('layer1_0', 'downsample_0')`` -> ``'layer1.0.downsample.0'``."""
  return ".".join(re.sub(r"_(\d+)$", r".\1", part) for part in flax_path)


def nchw_flatten_to_nhwc(kernel: np.ndarray, pool_size: int) -> np.ndarray:
  """Reorders the input rows of a Linear kernel ``[C*P*P, O]`` from PyTorch's NCHW flatten to NHWC.

  PyTorch flattens the pooled ``[C, P, P]`` map channel-major (row ``c*P*P + h*P + w``); cvjax flattens
  ``[P, P, C]`` (row ``(h*P + w)*C + c``).
  """
  rows, out = kernel.shape
  channels = rows // (pool_size * pool_size)
  return kernel.reshape(channels, pool_size, pool_size, out).transpose(1, 2, 0, 3).reshape(rows, out)


def from_torch_state_dict(model_name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Tuple[Any, Dict]:
  """Builds ``create_model(model_name, **model_kwargs)`` and its variables from a torchvision checkpoint.

  ``detr_*`` names (``detr_resnet50``, ``detr_resnet101``, ``detr_resnet50_dc5``) take the official
  facebookresearch/detr checkpoint layout instead, whose backbone is a torchvision ResNet; see
  ``cvjax.convert.detr.from_official_state_dict``.

  Args:
    model_name: a registered ResNet (``resnet*``, ``plain*``), VGG (``vgg*``) or ``alexnet`` name; the
      detectors ``fasterrcnn_*`` / ``maskrcnn_*`` (``cvjax.convert.rcnn``) and ``retinanet_*``
      (``cvjax.convert.retinanet``); the segmentation models ``fcn_resnet*`` (``cvjax.convert.fcn``), and
      ``fcn32s`` / ``fcn16s`` / ``fcn8s`` from a torchvision VGG-16 classifier (the paper's ImageNet start).
    state_dict: torchvision names -> tensors (``conv1.weight``, ``layer1.0.downsample.0.weight``,
      ``features.0.weight``, ``classifier.6.bias``, ...); ``num_batches_tracked`` is ignored.
    **model_kwargs: model options that the checkpoint was trained with (``num_classes``, ``width``,
      ``frozen_bn``, ``pool_size``, ...).

  Returns:
    ``(module, variables)`` with ``module.apply(variables, images_nhwc, train=False)`` equal to the
    PyTorch model on ``images_nchw``.
  """
  if model_name.startswith(("fasterrcnn_", "maskrcnn_")):
    from cvjax.convert import rcnn  # pylint: disable=import-outside-toplevel
    return rcnn.from_torchvision_rcnn(model_name, state_dict, **model_kwargs)
  if model_name.startswith("retinanet_"):
    from cvjax.convert import retinanet  # pylint: disable=import-outside-toplevel
    return retinanet.from_torchvision_retinanet(model_name, state_dict, **model_kwargs)
  if model_name.startswith("fcn_"):
    from cvjax.convert import fcn  # pylint: disable=import-outside-toplevel
    return fcn.from_torchvision_fcn(model_name, state_dict, **model_kwargs)
  if model_name in ("fcn32s", "fcn16s", "fcn8s"):
    # The paper's VGG-16 nets start from a torchvision VGG-16 classifier (ImageNet), fc6/fc7 convolutionalised.
    from cvjax.convert import fcn  # pylint: disable=import-outside-toplevel
    return fcn.fcn_from_torchvision_vgg16(model_name, state_dict, **model_kwargs)
  if model_name.startswith("detr_"):
    # Imported here: cvjax.convert.detr builds on this module's torchvision naming.
    from cvjax.convert import detr  # pylint: disable=import-outside-toplevel
    return detr.from_official_state_dict(model_name, state_dict, **model_kwargs)
  module = create_model(model_name, **model_kwargs)
  if not isinstance(module, _SUPPORTED):
    raise ValueError(f"no torchvision converter for {model_name!r} ({type(module).__name__}); supported "
                     f"families: {[cls.__name__ for cls in _SUPPORTED]}")
  flattened_linear = _FLATTENED_LINEAR.get(type(module))

  def permute_flattened_linear(path, value, target_shape):
    del target_shape
    if path == ("params", flattened_linear, "kernel"):
      return nchw_flatten_to_nhwc(value, module.head_pool_size)
    return value

  variables = common.load_state_dict(
      module, state_dict, input_shape=(1, _INPUT_SIDE, _INPUT_SIDE, 3),
      torch_module_name=torchvision_module_name,
      leaf_transform=permute_flattened_linear if flattened_linear else None,
      source=f"torchvision {model_name} state_dict")
  return module, variables
