"""HF ``DetrForObjectDetection`` with the HF ResNet backbone -> ``cvjax.models.detr.DETR``.

Nothing is downloaded and torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import jax

from cvjax.convert import common
from cvjax.convert.huggingface import _hf_resnet_module_name, register_hf_converter
from cvjax.models.detr import DETR

# Top-level DETR submodules that live under HF's ``model.`` (the heads sit at the root).
_UNDER_MODEL = ("backbone", "input_projection", "query_position_embeddings", "encoder", "decoder")


def hf_detr_key(path: Tuple[str, ...]) -> str:
  """cvjax DETR variable path (without collection) -> HF state_dict key.

  ``('encoder', 'layers_0', 'self_attn', 'q_proj', 'kernel')`` -> ``'model.encoder.layers.0.self_attn.q_proj.
  weight'``; backbone paths go through the HF ResNet naming (``model.backbone.model.encoder.stages...``).
  """
  head, *modules, leaf = path
  if head == "backbone":
    module = "model.backbone.model." + _hf_resnet_module_name(tuple(modules), "")
  else:
    module = ".".join([head, *(re.sub(r"^layers_(\d+)$", r"layers.\1", m) for m in modules)])
    if head in _UNDER_MODEL:
      module = "model." + module
  return f"{module}.{common.TORCH_LEAF_NAMES[leaf]}"


@register_hf_converter("DetrForObjectDetection")
def detr_from_transformers(hf_model: Any) -> Tuple[DETR, Dict]:
  """HF DETR detector -> (``DETR`` module, ``{'params', 'batch_stats'}``), architecture from ``hf_model.config``.

  Supports the HF ResNet backbone (``use_timm_backbone=False``, ``backbone_config`` a ``ResNetConfig`` with
  relu) and the sine position embedding. ``module.apply(variables, images_nhwc, pixel_mask=mask,
  train=False)`` reproduces HF's eval-mode ``logits`` / ``pred_boxes``; its ``aux_outputs`` are the heads
  on each earlier decoder layer's output after the decoder LayerNorm (original DETR; HF computes these only
  with ``auxiliary_loss=True``, which also feeds the normalised states to the next layer).

  Raises:
    ValueError: for configs the cvjax DETR cannot express (timm backbone, learned position embedding,
      non-relu activations, different encoder/decoder head counts or FFN widths) and for state_dicts that do
      not match (listing unexpected keys, missing keys and shape mismatches).
  """
  config = hf_model.config
  backbone = config.backbone_config
  unsupported = []
  if getattr(backbone, "model_type", None) != "resnet":
    unsupported.append(f"backbone {getattr(backbone, 'model_type', backbone)!r} (only the HF ResNet "
                       "backbone, use_timm_backbone=False, is supported)")
  elif backbone.hidden_act != "relu":
    unsupported.append(f"backbone hidden_act {backbone.hidden_act!r}")
  if config.position_embedding_type != "sine":
    unsupported.append(f"position_embedding_type {config.position_embedding_type!r}")
  if config.activation_function != "relu":
    unsupported.append(f"activation_function {config.activation_function!r}")
  if config.encoder_attention_heads != config.decoder_attention_heads:
    unsupported.append(f"encoder/decoder heads {config.encoder_attention_heads}/{config.decoder_attention_heads}")
  if config.encoder_ffn_dim != config.decoder_ffn_dim:
    unsupported.append(f"encoder/decoder ffn dims {config.encoder_ffn_dim}/{config.decoder_ffn_dim}")
  if unsupported:
    raise ValueError("HF DETR config not supported by cvjax DETR: " + "; ".join(unsupported))
  if list(getattr(backbone, "out_features", None) or [backbone.stage_names[-1]]) != [backbone.stage_names[-1]]:
    raise ValueError(f"HF DETR backbone out_features {backbone.out_features} must be the last stage only")

  module = DETR(
      num_classes=config.num_labels, num_queries=config.num_queries, d_model=config.d_model,
      num_heads=config.encoder_attention_heads, num_encoder_layers=config.encoder_layers,
      num_decoder_layers=config.decoder_layers, ffn_dim=config.encoder_ffn_dim, dropout_rate=config.dropout,
      attention_dropout_rate=config.attention_dropout, activation_dropout_rate=config.activation_dropout,
      backbone_stage_sizes=tuple(backbone.depths), backbone_block_type=backbone.layer_type,
      backbone_stem_width=backbone.embedding_size, backbone_stage_widths=tuple(backbone.hidden_sizes),
      backbone_stride_in_1x1=backbone.downsample_in_bottleneck,
      backbone_downsample_in_first_stage=backbone.downsample_in_first_stage)
  variables = common.load_state_dict(module, hf_model.state_dict(), input_shape=(1, 64, 64, backbone.num_channels),
                                     torch_key=hf_detr_key, source="HF DetrForObjectDetection state_dict")
  return module, variables
