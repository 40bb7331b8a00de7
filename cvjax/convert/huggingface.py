"""HF ``transformers`` PyTorch models -> cvjax modules and variables, dispatched on the HF class name.

Each converter reads the architecture from ``hf_model.config`` and the weights from ``hf_model.state_dict()``
(nothing is downloaded, torch is not imported here). New families (DETR, ViT, Swin) add a function with
``@register_hf_converter('DetrForObjectDetection', ...)``.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Tuple

from cvjax.convert import common
from cvjax.models.backbones.resnet import ResNet

HF_CONVERTERS: Dict[str, Callable[[Any], Tuple[Any, Dict]]] = {}


def register_hf_converter(*class_names: str):
  """Decorator: registers ``fn(hf_model) -> (module, variables)`` for the given HF class names."""

  def decorator(fn):
    for name in class_names:
      if name in HF_CONVERTERS:
        raise ValueError(f"HF class {name!r} already has a converter")
      HF_CONVERTERS[name] = fn
    return fn

  return decorator


def from_transformers(hf_model: Any) -> Tuple[Any, Dict]:
  """Converts an HF PyTorch model (any train/eval mode) to ``(flax module, variables)``.

  ``module.apply(variables, pixel_values_nhwc, train=False)`` reproduces the HF model's eval-mode main output
  (logits for ``*ForImageClassification``) on the same images in NCHW.
  """
  class_name = type(hf_model).__name__
  if class_name not in HF_CONVERTERS:
    raise ValueError(f"no converter for HF class {class_name!r}; supported: {sorted(HF_CONVERTERS)}")
  return HF_CONVERTERS[class_name](hf_model)


def _hf_resnet_module_name(flax_path: Tuple[str, ...], prefix: str) -> str:
  """Maps cvjax ResNet paths to HF ResNet module names (``layer2_1/bn3`` -> ``encoder.stages.1.layers.1.
  layer.2.normalization``)."""
  head, *rest = flax_path
  if head == "fc":
    return "classifier.1"
  if head in ("conv1", "bn1"):
    return prefix + "embedder.embedder." + ("convolution" if head == "conv1" else "normalization")
  stage, block = re.fullmatch(r"layer(\d+)_(\d+)", head).groups()
  name = f"{prefix}encoder.stages.{int(stage) - 1}.layers.{block}."
  (layer,) = rest
  if layer.startswith("downsample_"):
    return name + ("shortcut.convolution" if layer == "downsample_0" else "shortcut.normalization")
  kind, index = re.fullmatch(r"(conv|bn)(\d+)", layer).groups()
  return name + f"layer.{int(index) - 1}." + ("convolution" if kind == "conv" else "normalization")


@register_hf_converter("ResNetForImageClassification", "ResNetModel")
def resnet_from_transformers(hf_model: Any) -> Tuple[ResNet, Dict]:
  """HF ResNet (microsoft/resnet-*) -> ``cvjax.models.backbones.resnet.ResNet``.

  HF's ResNet is torchvision's with configurable widths: ``embedding_size`` (stem), ``hidden_sizes`` (stage
  outputs; a bottleneck's inner width is a quarter), ``depths``, ``layer_type``,
  ``downsample_in_bottleneck`` (stride on the first 1x1 = v1, else on the 3x3 = v1.5),
  ``downsample_in_first_stage``. ``ResNetModel`` (no head) maps to ``num_classes=0``: the pooled features.
  """
  config = hf_model.config
  if config.hidden_act != "relu":
    raise ValueError(f"HF ResNet hidden_act {config.hidden_act!r} is not supported (cvjax ResNet uses relu)")
  is_classifier = type(hf_model).__name__ == "ResNetForImageClassification"
  module = ResNet(
      stage_sizes=tuple(config.depths), block_type=config.layer_type,
      num_classes=config.num_labels if is_classifier else 0, stem_width=config.embedding_size,
      stage_widths=tuple(config.hidden_sizes), stride_in_1x1=config.downsample_in_bottleneck,
      downsample_in_first_stage=config.downsample_in_first_stage)
  prefix = "resnet." if is_classifier else ""
  variables = common.load_state_dict(
      module, hf_model.state_dict(), input_shape=(1, 64, 64, config.num_channels),
      torch_module_name=lambda path: _hf_resnet_module_name(path, prefix),
      source=f"HF {type(hf_model).__name__} state_dict")
  return module, variables
