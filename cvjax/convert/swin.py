"""HF ``SwinForImageClassification`` / ``SwinModel`` (microsoft/swin-*) -> ``cvjax.models.backbones.swin.Swin``.

The layout is the installed transformers' (``swin.encoder.layers.N.blocks.M.attention.q_proj``,
``...attention.relative_position_bias.relative_position_bias_table``); nothing is downloaded and torch is not
imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

import numpy as np
from absl import logging

from cvjax.convert import common
from cvjax.convert.huggingface import register_hf_converter
from cvjax.models.backbones.swin import Swin

_TABLE = "relative_position_bias_table"
# cvjax top-level module -> HF module under the ``swin.`` prefix (the classifier sits outside it).
_TOP_LEVEL = {"patch_embedding": "embeddings.patch_embeddings.projection", "embedding_norm": "embeddings.norm",
              "layernorm": "layernorm"}


def hf_swin_key(path: Tuple[str, ...], prefix: str) -> str:
  """cvjax Swin parameter path -> HF state_dict key (``('layers_1', 'blocks_0', 'mlp', 'fc1', 'kernel')`` ->
  ``'swin.encoder.layers.1.blocks.0.mlp.fc1.weight'`` with ``prefix='swin.'``)."""
  *modules, leaf = path
  head, *rest = modules
  if head == "classifier":
    return f"classifier.{common.TORCH_LEAF_NAMES[leaf]}"
  if head in _TOP_LEVEL:
    return f"{prefix}{_TOP_LEVEL[head]}.{common.TORCH_LEAF_NAMES[leaf]}"
  names = [re.sub(r"^(layers|blocks)_(\d+)$", r"\1.\2", m) for m in modules]
  if leaf == _TABLE:
    return f"{prefix}encoder.{'.'.join(names)}.relative_position_bias.{_TABLE}"
  return f"{prefix}encoder.{'.'.join(names)}.{common.TORCH_LEAF_NAMES[leaf]}"


def _keep_table_layout(path: Tuple[str, ...], value: np.ndarray, target_shape: Tuple[int, ...]) -> np.ndarray:
  """The bias table is ``[(2M-1)^2, heads]`` in both frameworks; undo the Linear transpose applied to 2-D
  tensors by ``common.torch_to_flax_layout``."""
  del target_shape
  return value.T if path[-1] == _TABLE else value


@register_hf_converter("SwinForImageClassification", "SwinModel")
def swin_from_transformers(hf_model: Any) -> Tuple[Swin, Dict]:
  """HF Swin -> (``Swin`` module, ``{'params': ...}``), architecture read from ``hf_model.config``.

  ``SwinModel`` (pooled output) and ``num_labels == 0`` (HF's identity head) map to ``num_classes=0``.
  ``drop_path_rate``, ``hidden_dropout_prob`` and ``layer_norm_eps`` are carried over;
  ``attention_probs_dropout_prob`` (train-only) has no cvjax counterpart and is dropped with a warning.
  Raises ``ValueError`` for configs the cvjax Swin cannot express (absolute position embeddings, a non-GELU
  activation, non-square patches or windows) and for state_dicts that do not match (listing unexpected keys,
  missing keys and shape mismatches).
  """
  config = hf_model.config
  if config.use_absolute_embeddings:
    raise ValueError("HF Swin use_absolute_embeddings=True is not supported (the cvjax Swin, as the paper's "
                     "models, has only relative position biases)")
  if config.hidden_act != "gelu":
    raise ValueError(f"HF Swin hidden_act {config.hidden_act!r} is not supported (cvjax Swin uses exact gelu)")
  for name in ("patch_size", "window_size"):
    if not isinstance(getattr(config, name), int):
      raise ValueError(f"HF Swin {name} {getattr(config, name)!r} is not supported: it must be one int")
  if config.attention_probs_dropout_prob:
    logging.warning("HF Swin attention_probs_dropout_prob=%s is dropped: cvjax Swin has no attention dropout",
                    config.attention_probs_dropout_prob)
  is_classifier = type(hf_model).__name__ == "SwinForImageClassification"
  module = Swin(
      patch_size=config.patch_size, embed_dim=config.embed_dim, depths=tuple(config.depths),
      num_heads=tuple(config.num_heads), window_size=config.window_size, mlp_ratio=config.mlp_ratio,
      num_classes=config.num_labels if is_classifier else 0, drop_path_rate=config.drop_path_rate,
      dropout_rate=config.hidden_dropout_prob, qkv_bias=config.qkv_bias, layer_norm_eps=config.layer_norm_eps)
  prefix = "swin." if is_classifier else ""
  variables = common.load_state_dict(
      module, hf_model.state_dict(), input_shape=(1, 224, 224, config.num_channels),
      torch_key=lambda path: hf_swin_key(path, prefix), leaf_transform=_keep_table_layout,
      source=f"HF {type(hf_model).__name__} state_dict")
  return module, variables
