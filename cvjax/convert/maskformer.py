"""HF ``MaskFormerForInstanceSegmentation`` (facebook/maskformer-*) -> ``cvjax.models.segmentation.maskformer``.

Both HF backbones: ``ResNetBackbone`` (``backbone_config`` a ``ResNetConfig``, through ``AutoBackbone``) and
``MaskFormerSwinBackbone`` (a ``SwinConfig`` or ``MaskFormerSwinConfig``; HF turns the former into the latter
with all four stages as outputs). Reads the transformers >= 5 state_dict layout and the 4.x one, whose decoder
names ``...self_attn.out_proj`` and ``...layers.N.fc1`` are renamed by ``LEGACY_KEYS`` (the MaskFormer Swin
keeps the 4.x Swin names in both, renamed by ``cvjax.convert.swin.LEGACY_KEYS``). Nothing is downloaded and
torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from cvjax.convert import common, swin
from cvjax.convert.huggingface import (RESNET_CONFIG_FIELDS, _hf_resnet_module_name, register_hf_converter,
                                       resnet_config_problems, resnet_kwargs)
from cvjax.models.segmentation.maskformer import MaskFormer

_PIXEL_LEVEL = "model.pixel_level_module."
_TRANSFORMER = "model.transformer_module."
# HF backbone classes by backbone_config.model_type (MaskFormerPixelLevelModule builds a MaskFormerSwinBackbone
# for 'swin' too).
_BACKBONE_CLASSES = {"resnet": "ResNetBackbone", "swin": "MaskFormerSwinBackbone",
                     "maskformer-swin": "MaskFormerSwinBackbone"}
# cvjax ConvNormReLU children -> the index of the layer in HF's conv / norm / ReLU sequence.
_CONV_NORM = {"conv": "0", "norm": "1"}

# transformers 4.x key -> 5.x key (re.sub rules, in order; none matches a 5.x key).
LEGACY_KEYS = (
    (r"\.(self_attn|encoder_attn)\.out_proj\.", r".\1.o_proj."),
    (r"^(model\.transformer_module\.decoder\.layers\.\d+)\.(fc1|fc2)\.", r"\1.mlp.\2."),
)
# Saved by HF but read by no output: the loss's class weights, and MaskFormerSwinModel's final LayerNorm (the
# backbone hands on its stages through its own per-stage norms).
UNUSED_KEYS = ((r"^criterion\.empty_weight$", None),
               (r"^model\.pixel_level_module\.encoder\.model\.layernorm\.(weight|bias)$", None))

_LOSS_ONLY = "no effect: loss / matching weight, read only by the HF loss (cvjax's is in tasks/)"
_INIT_ONLY = "no effect: initialisation only"

# MaskFormerConfig field -> what maskformer_from_transformers does with it (see cvjax.convert.huggingface).
CONFIG_FIELDS = {
    "backbone_config": "the backbone: a ResNetConfig (BACKBONE_CONFIG_FIELDS['resnet']) or a SwinConfig / "
                       "MaskFormerSwinConfig (BACKBONE_CONFIG_FIELDS['swin']); raises for any other",
    "decoder_config": "the transformer decoder: a DetrConfig, each field as DECODER_CONFIG_FIELDS",
    "fpn_feature_size": "MaskFormer.fpn_feature_size",
    "mask_feature_size": "MaskFormer.mask_feature_size",
    "use_auxiliary_loss": "no effect on the main outputs; with it HF computes auxiliary_logits, which "
                          "MaskFormer(aux_semantics='hf') reproduces (the converted module keeps the paper's)",
    "output_auxiliary_logits": "no effect: whether HF returns auxiliary_logits (cvjax returns aux_outputs unless "
                               "aux_outputs=False)",
    "num_attention_heads": "no effect: HF's copy of decoder_config.encoder_attention_heads",
    "num_hidden_layers": "no effect: HF's copy of decoder_config.num_hidden_layers",
    "init_std": _INIT_ONLY,
    "init_xavier_std": _INIT_ONLY,
    **{name: _LOSS_ONLY for name in ("no_object_weight", "dice_weight", "cross_entropy_weight", "mask_weight")},
}
# DetrConfig field (decoder_config) -> what the converter does with it.
DECODER_CONFIG_FIELDS = {
    "num_queries": "MaskFormer.num_queries",
    "d_model": "MaskFormer.d_model",
    "decoder_layers": "MaskFormer.num_decoder_layers",
    "decoder_attention_heads": "MaskFormer.num_heads",
    "decoder_ffn_dim": "MaskFormer.ffn_dim",
    "activation_function": "MaskFormer.activation; raises for a name not in common.HF_ACTIVATIONS",
    "dropout": "MaskFormer.dropout_rate",
    "attention_dropout": "MaskFormer.attention_dropout_rate",
    "activation_dropout": "MaskFormer.activation_dropout_rate",
    "auxiliary_loss": "MaskFormer.decoder_feed_normed_outputs (HF then feeds each decoder layer the previous "
                      "layer's LayerNormed output)",
    "decoder_layerdrop": "raises when non-zero (cvjax has no LayerDrop; train-time only)",
    "position_embedding_type": "no effect: HF MaskFormer always uses the sine embedding, as cvjax",
    **{name: "no effect: MaskFormer has no transformer encoder" for name in (
        "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim", "encoder_layerdrop")},
    **{name: "no effect: DETR's own backbone, which MaskFormer's decoder does not build" for name in (
        "backbone_config", "num_channels", "dilation")},
    "init_std": _INIT_ONLY,
    "init_xavier_std": _INIT_ONLY,
    **{name: _LOSS_ONLY for name in ("class_cost", "bbox_cost", "giou_cost", "mask_loss_coefficient",
                                     "dice_loss_coefficient", "bbox_loss_coefficient", "giou_loss_coefficient",
                                     "eos_coefficient")},
}
_ALL_STAGES = "raises unless every stage, in order (HF MaskFormer feeds each one to its pixel decoder)"
BACKBONE_CONFIG_FIELDS = {
    "resnet": {**RESNET_CONFIG_FIELDS, "out_features": _ALL_STAGES, "out_indices": _ALL_STAGES + " (by index)",
               "stage_names": "no effect: derived from depths"},
    "swin": {**swin.CONFIG_FIELDS, "out_features": "for a SwinConfig none (HF sets stage1..stage4); for a "
                                                   "MaskFormerSwinConfig " + _ALL_STAGES,
             "out_indices": "as out_features", "stage_names": "no effect: derived from depths",
             "encoder_stride": "no effect: not read by MaskFormerSwin",
             "window_size": "MaskFormer.swin_window_size, on every map however small (HF MaskFormerSwin pads "
                            "small maps to a whole window); raises unless one int"},
}


def hf_maskformer_key(path: Tuple[str, ...], backbone: str) -> str:
  """cvjax MaskFormer variable path (without collection) -> HF ``MaskFormerForInstanceSegmentation`` key.

  ``('pixel_decoder', 'layers_1', 'block', 'norm', 'scale')`` -> ``'model.pixel_level_module.decoder.fpn.layers.1.
  block.1.weight'``; ``('mask_embedder', 'layers_2', 'bias')`` -> ``'mask_embedder.2.0.bias'``; backbone paths go
  through the HF ResNet or Swin naming (``model.pixel_level_module.encoder[.model].``).
  """
  head, *modules, leaf = path
  torch_leaf = common.TORCH_LEAF_NAMES.get(leaf)
  encoder = _PIXEL_LEVEL + "encoder."
  if head == "backbone":
    if backbone == "swin":
      return swin.hf_swin_key((*modules, leaf), encoder + "model.")
    return f"{_hf_resnet_module_name(tuple(modules), encoder)}.{torch_leaf}"
  if match := re.fullmatch(r"backbone_norm(\d+)", head):
    return f"{encoder}hidden_states_norms.{match[1]}.{torch_leaf}"
  if head == "pixel_decoder":
    if modules == ["mask_projection"]:
      return f"{_PIXEL_LEVEL}decoder.mask_projection.{torch_leaf}"
    names = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules[:-1]] + [_CONV_NORM[modules[-1]]]
    return f"{_PIXEL_LEVEL}decoder.fpn.{'.'.join(names)}.{torch_leaf}"
  if head == "mask_embedder":  # PredictionBlock i = (Linear, activation)
    return f"mask_embedder.{modules[0].removeprefix('layers_')}.0.{torch_leaf}"
  if head == "class_predictor":
    return f"class_predictor.{torch_leaf}"
  names = [re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in (head, *modules)]
  return f"{_TRANSFORMER}{'.'.join(names)}.{torch_leaf}"


def _backbone_kind(config: Any) -> str:
  return "swin" if _BACKBONE_CLASSES.get(getattr(config.backbone_config, "model_type", None)) == \
      "MaskFormerSwinBackbone" else "resnet"


def _stage_problems(backbone: Any) -> List[str]:
  """A MaskFormer backbone must output every stage (no stem), in order."""
  if backbone.model_type == "swin":  # HF replaces the outputs by stage1..stage4
    return [] if len(backbone.depths) == 4 else [
        f"backbone_config.depths={list(backbone.depths)!r} (HF MaskFormer uses stage1..stage4 of a Swin: 4 stages)"]
  stages = list(backbone.stage_names[1:])
  if list(backbone.out_features or []) != stages:
    return [f"backbone_config.out_features={backbone.out_features!r} (MaskFormer's pixel decoder reads every "
            f"stage: {stages!r})"]
  return []


def config_problems(config: Any, backbone_class: str) -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax MaskFormer cannot reproduce an HF ``MaskFormerConfig``
  whose model built a ``backbone_class`` backbone."""
  problems = common.generic_config_problems(config)
  backbone = config.backbone_config
  model_type = getattr(backbone, "model_type", None)
  if _BACKBONE_CLASSES.get(model_type) != backbone_class:
    problems.append(f"backbone_config={model_type or backbone!r} (built as {backbone_class}: only the HF ResNet "
                    "backbone (ResNetConfig) and MaskFormerSwin (SwinConfig / MaskFormerSwinConfig) are supported)")
  else:
    backbone_problems = resnet_config_problems(backbone) if model_type == "resnet" else swin.config_problems(backbone)
    problems += [f"backbone_config.{problem}" for problem in backbone_problems] + _stage_problems(backbone)
  decoder = config.decoder_config
  problems += common.generic_config_problems(decoder)
  common.hf_activation(decoder, "activation_function", problems)
  if getattr(decoder, "decoder_layerdrop", 0):
    problems.append(f"decoder_config.decoder_layerdrop={decoder.decoder_layerdrop!r} (cvjax MaskFormer has no "
                    "LayerDrop: set it to 0)")
  return problems


def convert(config: Any, state_dict: Mapping[str, Any], backbone_class: str,
            source: str = "HF MaskFormerForInstanceSegmentation state_dict") -> Tuple[MaskFormer, Dict]:
  """``(MaskFormer, variables)`` of an HF ``MaskFormerConfig`` and a ``MaskFormerForInstanceSegmentation``
  state_dict in either transformers layout (what ``maskformer_from_transformers`` does with a model)."""
  common.raise_if_unsupported("HF MaskFormerConfig", config_problems(config, backbone_class))
  decoder = config.decoder_config
  kind = _backbone_kind(config)
  if kind == "resnet":
    # HF's ResNetBackbone has trainable BatchNorm2d (eval: the running statistics), so has the conversion.
    backbone = {f"backbone_{key}": value for key, value in resnet_kwargs(config.backbone_config).items()}
    backbone["backbone_frozen_bn"] = False
  else:
    backbone = {f"swin_{key}": value for key, value in swin.swin_kwargs(config.backbone_config).items()}
  module = MaskFormer(
      num_classes=config.num_labels, num_queries=decoder.num_queries, d_model=decoder.d_model,
      num_heads=decoder.decoder_attention_heads, num_decoder_layers=decoder.decoder_layers,
      ffn_dim=decoder.decoder_ffn_dim, dropout_rate=decoder.dropout, attention_dropout_rate=decoder.attention_dropout,
      activation_dropout_rate=decoder.activation_dropout,
      activation=common.HF_ACTIVATIONS[decoder.activation_function],
      decoder_feed_normed_outputs=bool(decoder.auxiliary_loss), fpn_feature_size=config.fpn_feature_size,
      mask_feature_size=config.mask_feature_size, backbone=kind, **backbone)
  renamed = common.rename_keys(state_dict, UNUSED_KEYS + LEGACY_KEYS + swin.LEGACY_KEYS)
  variables = common.load_state_dict(
      module, renamed, input_shape=(1, 64, 64, config.backbone_config.num_channels),
      torch_key=lambda path: hf_maskformer_key(path, kind), leaf_transform=swin.keep_bias_table_layout,
      source=source)
  return module, variables


@register_hf_converter("MaskFormerForInstanceSegmentation")
def maskformer_from_transformers(hf_model: Any) -> Tuple[MaskFormer, Dict]:
  """HF MaskFormer -> (``MaskFormer`` module, ``{'params', 'batch_stats'}``), architecture from
  ``hf_model.config``.

  ``module.apply(variables, images_nhwc, train=False)`` reproduces HF's eval-mode ``class_queries_logits``
  (``pred_logits``) and ``masks_queries_logits`` (``pred_masks``, ``[B, Q, h, w]``). Its ``aux_outputs`` are the
  paper's (the heads on each earlier decoder layer's LayerNormed output); ``module.clone(aux_semantics='hf')``
  gives HF's ``auxiliary_logits`` instead (which HF computes with ``use_auxiliary_loss=True``). Every config
  field is reproduced, refused or shown to have no effect: ``CONFIG_FIELDS``, ``DECODER_CONFIG_FIELDS``,
  ``BACKBONE_CONFIG_FIELDS``.

  Raises:
    ValueError: naming each config field whose value the cvjax MaskFormer cannot reproduce (another backbone,
      backbone outputs other than every stage, an activation it does not have, absolute position embeddings
      in the Swin, LayerDrop), or listing the state_dict's unexpected keys, missing keys and shape mismatches.
  """
  backbone_class = type(hf_model.model.pixel_level_module.encoder).__name__
  return convert(hf_model.config, hf_model.state_dict(), backbone_class)
