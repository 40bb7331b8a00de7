"""HF ``ViTForImageClassification`` (google/vit-*, facebook/deit-*) -> ``cvjax.models.backbones.vit.ViT``.

The layout is the installed transformers' (``vit.layers.N.attention.q_proj``); nothing is downloaded and
torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple


from cvjax.convert import common
from cvjax.convert.huggingface import register_hf_converter
from cvjax.models.backbones.vit import ViT

# Leaves that are bare ``nn.Parameter`` tensors in HF (no module, no layout change).
_EMBEDDING_LEAVES = {"cls_token": "vit.embeddings.cls_token",
                     "position_embeddings": "vit.embeddings.position_embeddings"}


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


@register_hf_converter("ViTForImageClassification")
def vit_from_transformers(hf_model: Any) -> Tuple[ViT, Dict]:
  """HF ViT classifier -> (``ViT`` module, ``{'params': ...}``), architecture read from ``hf_model.config``.

  ``num_labels == 0`` (HF's identity head) maps to ``num_classes=0``. Dropout rates and ``layer_norm_eps``
  are carried over. Raises ``ValueError`` for configs the cvjax ViT cannot express (non-GELU activation, a
  ``head_dim`` other than ``hidden_size / num_attention_heads``) and for state_dicts that do not match
  (listing unexpected keys, missing keys and shape mismatches).
  """
  config = hf_model.config
  if config.hidden_act != "gelu":
    raise ValueError(f"HF ViT hidden_act {config.hidden_act!r} is not supported (cvjax ViT uses exact gelu)")
  head_dim = getattr(config, "head_dim", None)
  if head_dim is not None and head_dim * config.num_attention_heads != config.hidden_size:
    raise ValueError(f"HF ViT head_dim {head_dim} x {config.num_attention_heads} heads != hidden_size "
                     f"{config.hidden_size}: not supported")
  module = ViT(
      image_size=config.image_size, patch_size=config.patch_size, hidden_size=config.hidden_size,
      depth=config.num_hidden_layers, num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      num_classes=config.num_labels, dropout_rate=config.hidden_dropout_prob,
      attention_dropout_rate=config.attention_probs_dropout_prob, layer_norm_eps=config.layer_norm_eps,
      pool="cls", qkv_bias=config.qkv_bias)
  height, width = (config.image_size,) * 2 if isinstance(config.image_size, int) else config.image_size
  variables = common.load_state_dict(module, hf_model.state_dict(),
                                     input_shape=(1, height, width, config.num_channels), torch_key=hf_vit_key,
                                     source=f"HF {type(hf_model).__name__} state_dict")
  return module, variables
