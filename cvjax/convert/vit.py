"""HF ``ViTForImageClassification`` (google/vit-*, facebook/deit-*) -> ``cvjax.models.backbones.vit.ViT``.

Reads the transformers >= 5 state_dict layout (``vit.layers.N.attention.q_proj``) and the 4.x one
(``vit.encoder.layer.N.attention.attention.query``, renamed by ``LEGACY_KEYS``); nothing is downloaded and
torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

from cvjax.convert import common
from cvjax.convert.huggingface import register_hf_converter
from cvjax.models.backbones.vit import ViT

# Leaves that are bare ``nn.Parameter`` tensors in HF (no module, no layout change).
_EMBEDDING_LEAVES = {"cls_token": "vit.embeddings.cls_token",
                     "position_embeddings": "vit.embeddings.position_embeddings"}

# transformers 4.x key -> 5.x key (re.sub rules, in order; none matches a 5.x key).
LEGACY_KEYS = (
    (r"^vit\.encoder\.layer\.(\d+)\.", r"vit.layers.\1."),
    (r"\.attention\.attention\.query\.", ".attention.q_proj."),
    (r"\.attention\.attention\.key\.", ".attention.k_proj."),
    (r"\.attention\.attention\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

# ViTConfig field -> what vit_from_transformers does with it (see cvjax.convert.huggingface).
CONFIG_FIELDS = {
    "hidden_size": "ViT.hidden_size",
    "num_hidden_layers": "ViT.depth",
    "num_attention_heads": "ViT.num_heads",
    "intermediate_size": "ViT.mlp_dim",
    "hidden_act": "ViT.activation; raises for a name not in common.HF_ACTIVATIONS",
    "hidden_dropout_prob": "ViT.dropout_rate",
    "attention_probs_dropout_prob": "ViT.attention_dropout_rate",
    "layer_norm_eps": "ViT.layer_norm_eps",
    "image_size": "ViT.image_size (int or pair)",
    "patch_size": "ViT.patch_size (int or pair)",
    "num_channels": "the input channels (the patch embedding's kernel)",
    "qkv_bias": "ViT.qkv_bias",
    "head_dim": "raises unless head_dim * num_attention_heads == hidden_size (not a ViTConfig field, but HF's "
                "attention reads it when a config sets it; else hidden_size // num_attention_heads)",
    "initializer_range": "no effect: initialisation only",
    "encoder_stride": "no effect: read only by ViTForMaskedImageModeling's decoder",
    "pooler_output_size": "no effect: ViTForImageClassification has no pooler",
    "pooler_act": "no effect: ViTForImageClassification has no pooler",
}


def hf_vit_key(path: Tuple[str, ...]) -> str:
  """cvjax ViT parameter path -> HF state_dict key (``('layers_0', 'mlp', 'fc1', 'kernel')`` ->
  ``'vit.layers.0.mlp.fc1.weight'``)."""
  *modules, leaf = path
  if not modules:
    return _EMBEDDING_LEAVES[leaf]
  head, *rest = modules
  if head == "classifier":
    prefix = "classifier"
  elif head == "patch_embedding":
    prefix = "vit.embeddings.patch_embeddings.projection"
  else:
    prefix = "vit." + re.sub(r"^layers_(\d+)$", r"layers.\1", head)
  return ".".join([prefix, *rest, common.TORCH_LEAF_NAMES[leaf]])


def config_problems(config: Any) -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax ViT cannot reproduce an HF ``ViTConfig``."""
  problems = common.generic_config_problems(config)
  common.hf_activation(config, "hidden_act", problems)
  head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
  if head_dim * config.num_attention_heads != config.hidden_size:
    problems.append(f"head_dim={head_dim} x num_attention_heads={config.num_attention_heads} != hidden_size="
                    f"{config.hidden_size} (cvjax ViT's heads split hidden_size)")
  return problems


def convert(config: Any, state_dict: Mapping[str, Any], source: str = "HF ViT state_dict") -> Tuple[ViT, Dict]:
  """``(ViT, {'params': ...})`` of an HF ``ViTConfig`` and a ``ViTForImageClassification`` state_dict in either
  transformers layout (what ``vit_from_transformers`` does with a model)."""
  common.raise_if_unsupported("HF ViTConfig", config_problems(config))
  module = ViT(
      image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
      depth=config.num_hidden_layers, num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      num_classes=config.num_labels, dropout_rate=config.hidden_dropout_prob,
      attention_dropout_rate=config.attention_probs_dropout_prob, layer_norm_eps=config.layer_norm_eps,
      pool="cls", qkv_bias=config.qkv_bias, activation=common.HF_ACTIVATIONS[config.hidden_act])
  height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
  variables = common.load_state_dict(module, common.rename_keys(state_dict, LEGACY_KEYS),
                                     input_shape=(1, height, width, config.num_channels), torch_key=hf_vit_key,
                                     source=source)
  return module, variables


@register_hf_converter("ViTForImageClassification")
def vit_from_transformers(hf_model: Any) -> Tuple[ViT, Dict]:
  """HF ViT classifier -> (``ViT`` module, ``{'params': ...}``), architecture read from ``hf_model.config``.

  ``num_labels == 0`` (HF's identity head) maps to ``num_classes=0``. Every config field is reproduced or
  refused (``CONFIG_FIELDS``): widths, depth, heads, activation, dropout rates, ``layer_norm_eps``,
  ``qkv_bias``, image and patch size (ints or pairs), input channels.

  Raises:
    ValueError: naming each config field whose value the cvjax ViT cannot reproduce (an activation it does
      not have, a ``head_dim`` other than ``hidden_size / num_attention_heads``), or listing the state_dict's
      unexpected keys, missing keys and shape mismatches.
  """
  return convert(hf_model.config, hf_model.state_dict(), source=f"HF {type(hf_model).__name__} state_dict")
