"""HF ``SwinForImageClassification`` / ``SwinModel`` (microsoft/swin-*) -> ``cvjax.models.backbones.swin.Swin``.

Reads the transformers >= 5 state_dict layout (``swin.encoder.layers.N.blocks.M.attention.q_proj``,
``...attention.relative_position_bias.relative_position_bias_table``) and the 4.x one
(``...attention.self.query``, ``...attention.self.relative_position_bias_table``, renamed by ``LEGACY_KEYS``);
nothing is downloaded and torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from cvjax.convert import common
from cvjax.convert.huggingface import register_hf_converter
from cvjax.models.backbones.swin import Swin

_TABLE = "relative_position_bias_table"
# cvjax top-level module -> HF module under the ``swin.`` prefix (the classifier sits outside it).
_TOP_LEVEL = {"patch_embedding": "embeddings.patch_embeddings.projection", "embedding_norm": "embeddings.norm",
              "layernorm": "layernorm"}

# transformers 4.x key -> 5.x key (re.sub rules, in order; none matches a 5.x key). 4.x also saved each block's
# relative_position_index buffer, which the window size fixes: dropped.
LEGACY_KEYS = (
    (r"\.attention\.self\.relative_position_index$", None),
    (r"\.attention\.self\.relative_position_bias_table$", ".attention.relative_position_bias." + _TABLE),
    (r"\.attention\.self\.query\.", ".attention.q_proj."),
    (r"\.attention\.self\.key\.", ".attention.k_proj."),
    (r"\.attention\.self\.value\.", ".attention.v_proj."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.intermediate\.dense\.", ".mlp.fc1."),
    (r"\.output\.dense\.", ".mlp.fc2."),
)

# SwinConfig field -> what swin_from_transformers does with it (see cvjax.convert.huggingface).
CONFIG_FIELDS = {
    "patch_size": "Swin.patch_size (int or pair)",
    "num_channels": "the input channels (the patch embedding's kernel)",
    "embed_dim": "Swin.embed_dim",
    "depths": "Swin.depths",
    "num_heads": "Swin.num_heads",
    "window_size": "Swin.window_size; raises unless one int",
    "mlp_ratio": "Swin.mlp_ratio",
    "qkv_bias": "Swin.qkv_bias",
    "hidden_dropout_prob": "Swin.dropout_rate",
    "attention_probs_dropout_prob": "Swin.attention_dropout_rate",
    "drop_path_rate": "Swin.drop_path_rate (the same linear rule; HF drops only the attention branch, cvjax "
                      "both, as the paper's code: a training-only difference)",
    "hidden_act": "Swin.activation; raises for a name not in common.HF_ACTIVATIONS",
    "layer_norm_eps": "Swin.layer_norm_eps",
    "use_absolute_embeddings": "raises when True (cvjax Swin has only the relative position bias)",
    "image_size": "no effect: sizes only the absolute position embeddings, which are refused (the windows "
                  "follow the input's size, in HF as in cvjax)",
    "initializer_range": "no effect: initialisation only",
    "encoder_stride": "no effect: read only by SwinForMaskedImageModeling's decoder",
    "out_features": "no effect: read only by SwinBackbone",
    "out_indices": "no effect: read only by SwinBackbone",
    "stage_names": "no effect: derived from depths, read only by SwinBackbone",
    "num_layers": "no effect: derived, len(depths)",
    "hidden_size": "no effect: derived, embed_dim * 2 ** (len(depths) - 1)",
}


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


def keep_bias_table_layout(path: Tuple[str, ...], value: np.ndarray, target_shape: Tuple[int, ...]) -> np.ndarray:
  """The bias table is ``[(2M-1)^2, heads]`` in both frameworks; undo the Linear transpose applied to 2-D
  tensors by ``common.torch_to_flax_layout``."""
  del target_shape
  return value.T if path[-1] == _TABLE else value


def config_problems(config: Any) -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax Swin cannot reproduce an HF ``SwinConfig``."""
  problems = common.generic_config_problems(config)
  common.hf_activation(config, "hidden_act", problems)
  if config.use_absolute_embeddings:
    problems.append("use_absolute_embeddings=True (the cvjax Swin, as the paper's models, has only relative "
                    "position biases)")
  if not isinstance(config.window_size, int):
    problems.append(f"window_size={config.window_size!r} (one int: the windows are square)")
  return problems


def swin_kwargs(config: Any) -> Dict[str, Any]:
  """The ``Swin`` keyword arguments (all but ``num_classes``) of an HF ``SwinConfig`` or
  ``MaskFormerSwinConfig`` (checked by ``config_problems``)."""
  patch_size = config.patch_size if isinstance(config.patch_size, int) else tuple(config.patch_size)
  return dict(
      patch_size=patch_size, embed_dim=config.embed_dim, depths=tuple(config.depths),
      num_heads=tuple(config.num_heads), window_size=config.window_size, mlp_ratio=config.mlp_ratio,
      drop_path_rate=config.drop_path_rate, dropout_rate=config.hidden_dropout_prob, qkv_bias=config.qkv_bias,
      layer_norm_eps=config.layer_norm_eps, activation=common.HF_ACTIVATIONS[config.hidden_act],
      attention_dropout_rate=config.attention_probs_dropout_prob)


def convert(config: Any, state_dict: Mapping[str, Any], classifier: bool,
            source: str = "HF Swin state_dict") -> Tuple[Swin, Dict]:
  """``(Swin, {'params': ...})`` of an HF ``SwinConfig`` and a ``SwinForImageClassification`` (``classifier``)
  or ``SwinModel`` state_dict in either transformers layout (what ``swin_from_transformers`` does)."""
  common.raise_if_unsupported("HF SwinConfig", config_problems(config))
  module = Swin(num_classes=config.num_labels if classifier else 0, **swin_kwargs(config))
  variables = common.load_state_dict(
      module, common.rename_keys(state_dict, LEGACY_KEYS), input_shape=(1, 224, 224, config.num_channels),
      torch_key=lambda path: hf_swin_key(path, "swin." if classifier else ""),
      leaf_transform=keep_bias_table_layout, source=source)
  return module, variables


@register_hf_converter("SwinForImageClassification", "SwinModel")
def swin_from_transformers(hf_model: Any) -> Tuple[Swin, Dict]:
  """HF Swin -> (``Swin`` module, ``{'params': ...}``), architecture read from ``hf_model.config``.

  ``SwinModel`` (pooled output) and ``num_labels == 0`` (HF's identity head) map to ``num_classes=0``. Every
  config field is reproduced or refused (``CONFIG_FIELDS``): widths, depths, heads, window, MLP ratio,
  activation, dropout and stochastic depth rates, ``layer_norm_eps``, ``qkv_bias``, patch size (int or pair),
  input channels.

  Raises:
    ValueError: naming each config field whose value the cvjax Swin cannot reproduce (absolute position
      embeddings, an activation it does not have, non-square windows), for a ``SwinModel`` built without its
      pooling layer (its main output, the unpooled tokens, has no cvjax counterpart), or listing the
      state_dict's unexpected keys, missing keys and shape mismatches.
  """
  class_name = type(hf_model).__name__
  if class_name == "SwinModel" and getattr(hf_model, "pooler", None) is None:
    raise ValueError("HF SwinModel(add_pooling_layer=False) is not supported: the cvjax Swin returns pooled "
                     "features (num_classes=0); convert a SwinModel with its pooler, the weights are the same")
  return convert(hf_model.config, hf_model.state_dict(), classifier=class_name == "SwinForImageClassification",
                 source=f"HF {class_name} state_dict")
