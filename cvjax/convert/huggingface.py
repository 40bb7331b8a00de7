"""HF ``transformers`` PyTorch models -> cvjax modules and variables, dispatched on the HF class name.

Each converter reads the architecture from ``hf_model.config`` and the weights from ``hf_model.state_dict()``
(nothing is downloaded, torch is not imported here). New families (DETR, ViT, Swin) add a function with
``@register_hf_converter('DetrForObjectDetection', ...)``.

Each converter module also has a ``CONFIG_FIELDS`` table: every field of its HF config class beyond the generic
ones (``common.generic_config_fields``) and what the converter does with it -- reproduces it in the cvjax module,
refuses some values with a ``ValueError`` naming the field and value, or ignores it because it cannot change
the converted model. ``tests/convert`` checks that the installed transformers has no field outside the table.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, List, Tuple

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


# ResNetConfig field -> what resnet_from_transformers does with it (see the module doc).
RESNET_CONFIG_FIELDS = {
    "num_channels": "the input channels (the stem conv's kernel)",
    "embedding_size": "ResNet.stem_width",
    "hidden_sizes": "ResNet.stage_widths",
    "depths": "ResNet.stage_sizes",
    "layer_type": "ResNet.block_type",
    "hidden_act": "ResNet.activation (the stem and block outputs, as HF); raises for a name not in "
                  "common.HF_ACTIVATIONS",
    "downsample_in_first_stage": "ResNet.downsample_in_first_stage",
    "downsample_in_bottleneck": "ResNet.stride_in_1x1",
    "out_features": "no effect: read only by ResNetBackbone (DETR's converter checks it)",
    "out_indices": "no effect: read only by ResNetBackbone (DETR's converter checks it)",
    "stage_names": "no effect: derived from depths, read only by ResNetBackbone",
}


def resnet_config_problems(config: Any) -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax ResNet cannot reproduce an HF ``ResNetConfig``."""
  problems = common.generic_config_problems(config)
  common.hf_activation(config, "hidden_act", problems)
  if config.layer_type not in ("basic", "bottleneck"):
    problems.append(f"layer_type={config.layer_type!r} (basic or bottleneck)")
  if len(config.hidden_sizes) != len(config.depths):
    problems.append(f"hidden_sizes={list(config.hidden_sizes)!r} (one per stage of depths={list(config.depths)})")
  return problems


def resnet_kwargs(config: Any) -> Dict[str, Any]:
  """The ``ResNet`` keyword arguments of an HF ``ResNetConfig`` (checked by ``resnet_config_problems``)."""
  return dict(stage_sizes=tuple(config.depths), block_type=config.layer_type, stem_width=config.embedding_size,
              stage_widths=tuple(config.hidden_sizes), stride_in_1x1=config.downsample_in_bottleneck,
              downsample_in_first_stage=config.downsample_in_first_stage,
              activation=common.HF_ACTIVATIONS[config.hidden_act])


@register_hf_converter("ResNetForImageClassification", "ResNetModel")
def resnet_from_transformers(hf_model: Any) -> Tuple[ResNet, Dict]:
  """HF ResNet (microsoft/resnet-*) -> ``cvjax.models.backbones.resnet.ResNet``.

  HF's ResNet is torchvision's with configurable widths: ``embedding_size`` (stem), ``hidden_sizes`` (stage
  outputs; a bottleneck's inner width is a quarter), ``depths``, ``layer_type``,
  ``downsample_in_bottleneck`` (stride on the first 1x1 = v1, else on the 3x3 = v1.5),
  ``downsample_in_first_stage``, ``hidden_act`` (after the stem and each block). ``ResNetModel`` (no head) maps
  to ``num_classes=0``: the pooled features. Every config field: ``RESNET_CONFIG_FIELDS``.

  Raises:
    ValueError: naming each config field whose value the cvjax ResNet cannot reproduce, or listing the
      state_dict's unexpected keys, missing keys and shape mismatches.
  """
  config = hf_model.config
  common.raise_if_unsupported("HF ResNetConfig", resnet_config_problems(config))
  is_classifier = type(hf_model).__name__ == "ResNetForImageClassification"
  module = ResNet(num_classes=config.num_labels if is_classifier else 0, **resnet_kwargs(config))
  prefix = "resnet." if is_classifier else ""
  variables = common.load_state_dict(
      module, hf_model.state_dict(), input_shape=(1, 64, 64, config.num_channels),
      torch_module_name=lambda path: _hf_resnet_module_name(path, prefix),
      source=f"HF {type(hf_model).__name__} state_dict")
  return module, variables
