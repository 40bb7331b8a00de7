"""HF ``ViTMAEForPreTraining`` (facebook/vit-mae-*) -> ``cvjax.models.ssl.mae.MAE``.

Reads the transformers >= 5 state_dict layout (``vit.layers.N.attention.q_proj``,
``decoder.decoder_layers.N.mlp.fc1``) and the 4.x one (``vit.encoder.layer.N.attention.attention.query``,
``decoder.decoder_layers.N.intermediate.dense``; renamed by the ViT converter's ``LEGACY_KEYS``, whose rules are
not anchored to the ``vit.`` prefix below the layer index). Nothing is downloaded and torch is not imported here.

HF stores both sin-cos position tables in the state_dict (frozen parameters); cvjax computes them. The
converter checks that the stored tables are the sin-cos ones (as in every released checkpoint) and raises
otherwise: transformers 5's random init leaves them at zero, which the cvjax MAE does not reproduce.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from cvjax.convert import common, vit
from cvjax.convert.huggingface import register_hf_converter
from cvjax.models.ssl.mae import MAE, sincos_position_embedding

# State_dict keys of the fixed tables (checked, not loaded).
POSITION_KEYS = ("vit.embeddings.position_embeddings", "decoder.decoder_pos_embed")
# Agreement asked of a stored table with the computed one (both are float64 sin/cos rounded to float32).
POSITION_ATOL = 1e-5
# Leaves that are bare ``nn.Parameter`` tensors in HF.
# ViTMAEConfig field -> what mae_from_transformers does with it (see cvjax.convert.huggingface).
CONFIG_FIELDS = {
    "hidden_size": "MAE.hidden_size",
    "num_hidden_layers": "MAE.depth",
    "num_attention_heads": "MAE.num_heads",
    "intermediate_size": "MAE.mlp_dim",
    "decoder_hidden_size": "MAE.decoder_hidden_size",
    "decoder_num_hidden_layers": "MAE.decoder_depth",
    "decoder_num_attention_heads": "MAE.decoder_num_heads",
    "decoder_intermediate_size": "MAE.decoder_mlp_dim",
    "hidden_act": "MAE.activation (encoder and decoder, as HF); raises for a name not in common.HF_ACTIVATIONS",
    "hidden_dropout_prob": "MAE.dropout_rate",
    "attention_probs_dropout_prob": "MAE.attention_dropout_rate",
    "layer_norm_eps": "MAE.layer_norm_eps (every LayerNorm, decoder_norm included, as HF)",
    "image_size": "MAE.image_size; raises for a non-square size (HF's patchify and sin-cos tables are square)",
    "patch_size": "MAE.patch_size; raises for a non-square patch (HF's decoder_pred width is patch_size**2)",
    "num_channels": "MAE.num_channels",
    "qkv_bias": "MAE.qkv_bias (encoder and decoder)",
    "mask_ratio": "MAE.mask_ratio; raises outside [0, 1)",
    "norm_pix_loss": "MAE.norm_pix_loss (the task passes it to mae_loss)",
    "head_dim": "raises unless head_dim splits both hidden sizes as hidden_size // heads (not a ViTMAEConfig "
                "field, but HF's attention reads it when a config sets it)",
    "initializer_range": "no effect: initialisation only",
}


def hf_mae_key(path: Tuple[str, ...]) -> str:
  """cvjax MAE parameter path -> HF state_dict key (``('decoder_layers_1', 'mlp', 'fc1', 'kernel')`` ->
  ``'decoder.decoder_layers.1.mlp.fc1.weight'``); the encoder's paths are the ViT's (``vit.hf_vit_key``)."""
  *modules, leaf = path
  if path == ("mask_token",):
    return "decoder.mask_token"
  if not modules or not modules[0].startswith("decoder_"):
    return vit.hf_vit_key(path)
  head, *rest = modules
  prefix = "decoder." + re.sub(r"^decoder_layers_(\d+)$", r"decoder_layers.\1", head)
  return ".".join([prefix, *rest, common.TORCH_LEAF_NAMES[leaf]])


def config_problems(config: Any) -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax MAE cannot reproduce an HF ``ViTMAEConfig``."""
  problems = common.generic_config_problems(config)
  common.hf_activation(config, "hidden_act", problems)
  for field in ("image_size", "patch_size"):
    value = getattr(config, field)
    if not isinstance(value, int) and len(set(value)) != 1:
      problems.append(f"{field}={value!r} (the cvjax MAE, as HF's patchify, is square)")
  if not 0.0 <= config.mask_ratio < 1.0:
    problems.append(f"mask_ratio={config.mask_ratio} (must be in [0, 1))")
  head_dim = getattr(config, "head_dim", None)
  for width, heads in (("hidden_size", "num_attention_heads"), ("decoder_hidden_size", "decoder_num_attention_heads")):
    split = head_dim or getattr(config, width) // getattr(config, heads)
    if split * getattr(config, heads) != getattr(config, width):
      problems.append(f"head_dim={split} x {heads}={getattr(config, heads)} != {width}={getattr(config, width)} "
                      f"(cvjax's heads split the width)")
  for width in ("hidden_size", "decoder_hidden_size"):
    if getattr(config, width) % 4:
      problems.append(f"{width}={getattr(config, width)} (the sin-cos position tables need a multiple of 4)")
  return problems


def _side(value: Any) -> int:
  return value if isinstance(value, int) else int(value[0])


def _check_position_tables(module: MAE, state_dict: Mapping[str, Any], source: str) -> None:
  """Raises unless the state_dict's frozen position tables are the sin-cos tables the cvjax MAE computes."""
  problems = []
  for key, width in zip(POSITION_KEYS, (module.hidden_size, module.decoder_hidden_size)):
    if key not in state_dict:
      problems.append(f"missing key {key}")
      continue
    stored = common.to_numpy(state_dict[key])
    expected = sincos_position_embedding(module.grid_size, module.grid_size, width)[None]
    if stored.shape != expected.shape:
      problems.append(f"{key}: shape {stored.shape}, expected {expected.shape}")
    elif not np.allclose(stored, expected, rtol=0.0, atol=POSITION_ATOL):
      problems.append(f"{key} is not MAE's fixed sin-cos table (max deviation "
                      f"{np.abs(stored - expected).max():.3g}; transformers' random init leaves it at zero -- "
                      f"copy a checkpoint's table or build_2d_sinusoidal_position_embedding's into it)")
  if problems:
    raise ValueError(f"{source} does not match MAE:\n  " + "\n  ".join(problems))


def convert(config: Any, state_dict: Mapping[str, Any], source: str = "HF ViTMAE state_dict") -> Tuple[MAE, Dict]:
  """``(MAE, {'params': ...})`` of an HF ``ViTMAEConfig`` and a ``ViTMAEForPreTraining`` state_dict in either
  transformers layout (what ``mae_from_transformers`` does with a model)."""
  common.raise_if_unsupported("HF ViTMAEConfig", config_problems(config))
  module = MAE(
      image_size=_side(config.image_size), patch_size=_side(config.patch_size), hidden_size=config.hidden_size,
      depth=config.num_hidden_layers, num_heads=config.num_attention_heads, mlp_dim=config.intermediate_size,
      decoder_hidden_size=config.decoder_hidden_size, decoder_depth=config.decoder_num_hidden_layers,
      decoder_num_heads=config.decoder_num_attention_heads, decoder_mlp_dim=config.decoder_intermediate_size,
      mask_ratio=config.mask_ratio, norm_pix_loss=config.norm_pix_loss, num_channels=config.num_channels,
      dropout_rate=config.hidden_dropout_prob, attention_dropout_rate=config.attention_probs_dropout_prob,
      layer_norm_eps=config.layer_norm_eps, qkv_bias=config.qkv_bias,
      activation=common.HF_ACTIVATIONS[config.hidden_act])
  state_dict = common.rename_keys(state_dict, vit.LEGACY_KEYS)
  _check_position_tables(module, state_dict, source)
  weights = {key: value for key, value in state_dict.items() if key not in POSITION_KEYS}
  variables = common.load_state_dict(
      module, weights, input_shape=(1, module.image_size, module.image_size, module.num_channels),
      torch_key=hf_mae_key, source=source)
  return module, variables


@register_hf_converter("ViTMAEForPreTraining")
def mae_from_transformers(hf_model: Any) -> Tuple[MAE, Dict]:
  """HF MAE pre-training model -> (``MAE`` module, ``{'params': ...}``), architecture from ``hf_model.config``.

  ``module.apply(variables, images_nhwc, noise=noise, train=False)`` gives HF's ``logits``, ``mask`` and
  ``ids_restore`` for the same ``noise``, and ``mae_loss(images, logits, mask, patch_size,
  module.norm_pix_loss)`` its ``loss``. Every config field is reproduced or refused (``CONFIG_FIELDS``).

  Raises:
    ValueError: naming each config field whose value the cvjax MAE cannot reproduce (non-square image or
      patch, an unknown activation, a mask ratio outside [0, 1), a ``head_dim`` that does not split the widths),
      position tables that are not the sin-cos ones, or listing unexpected keys, missing keys and shape
      mismatches.
  """
  return convert(hf_model.config, hf_model.state_dict(), source=f"HF {type(hf_model).__name__} state_dict")
