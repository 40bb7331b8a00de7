"""PyTorch DETR checkpoints -> ``cvjax.models.detection.detr.DETR``, from two layouts.

* HF ``DetrForObjectDetection`` with the HF ResNet backbone: ``from_transformers(hf_model)``, in the
  transformers >= 5 layout (``model.encoder.layers.N.mlp.fc1``, ``...self_attn.o_proj``) or the 4.x one
  (``model.backbone.conv_encoder.model...``, ``...fc1``, ``...out_proj``, renamed by ``LEGACY_KEYS``).
* The official facebookresearch/detr layout (``torch.hub.load('facebookresearch/detr', 'detr_resnet50')``,
  ``detr-r50-e632da11.pth``): ``from_torch_state_dict('detr_resnet50', state_dict)``, which lands in
  ``from_official_state_dict`` here.

Nothing is downloaded and torch is not imported here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Mapping, Tuple

import numpy as np

from cvjax.convert import common
from cvjax.convert.huggingface import (RESNET_CONFIG_FIELDS, _hf_resnet_module_name, register_hf_converter,
                                       resnet_config_problems, resnet_kwargs)
from cvjax.convert.torchvision import torchvision_module_name
from cvjax.models import MODELS, create_model
from cvjax.models.detection.detr import DETR

# Top-level DETR submodules that live under HF's ``model.`` (the heads sit at the root).
_UNDER_MODEL = ("backbone", "input_projection", "query_position_embeddings", "position_embedding", "encoder",
                "decoder")

# transformers 4.x key -> 5.x key (re.sub rules, in order; none matches a 5.x key).
LEGACY_KEYS = (
    (r"^model\.backbone\.conv_encoder\.model\.", "model.backbone.model."),
    (r"^model\.backbone\.position_embedding\.", "model.position_embedding."),
    (r"\.(self_attn|encoder_attn)\.out_proj\.", r".\1.o_proj."),
    (r"^model\.(encoder|decoder)\.layers\.(\d+)\.(fc1|fc2)\.", r"model.\1.layers.\2.mlp.\3."),
)

# DetrConfig field -> what detr_from_transformers does with it (see cvjax.convert.huggingface).
CONFIG_FIELDS = {
    "backbone_config": "the backbone: a ResNetConfig (HF ResNet backbone), each field as BACKBONE_CONFIG_FIELDS; "
                       "raises for any other backbone (timm)",
    "use_timm_backbone": "raises when the model was built with a timm backbone (4.x reads this flag; 5.x "
                         "decides by backbone_config, checked as above)",
    "backbone": "no effect: names a timm backbone, refused above",
    "use_pretrained_backbone": "no effect: whether HF downloads backbone weights at construction; the weights "
                               "come from the state_dict",
    "backbone_kwargs": "no effect: options of a timm backbone, refused above",
    "num_channels": "no effect: sizes only a timm backbone; the HF ResNet backbone's channels are "
                    "backbone_config.num_channels",
    "num_queries": "DETR.num_queries",
    "d_model": "DETR.d_model",
    "encoder_layers": "DETR.num_encoder_layers",
    "decoder_layers": "DETR.num_decoder_layers",
    "num_hidden_layers": "no effect: an alias of encoder_layers (4.x)",
    "encoder_attention_heads": "DETR.num_heads",
    "decoder_attention_heads": "DETR.decoder_num_heads",
    "encoder_ffn_dim": "DETR.ffn_dim",
    "decoder_ffn_dim": "DETR.decoder_ffn_dim",
    "activation_function": "DETR.activation; raises for a name not in common.HF_ACTIVATIONS",
    "dropout": "DETR.dropout_rate and DETR.encoder_input_dropout_rate (HF drops the encoder's input too)",
    "attention_dropout": "DETR.attention_dropout_rate",
    "activation_dropout": "DETR.activation_dropout_rate",
    "encoder_layerdrop": "raises when non-zero (cvjax DETR has no LayerDrop; train-time only, and "
                         "transformers 5 no longer reads it)",
    "decoder_layerdrop": "raises when non-zero (as encoder_layerdrop)",
    "auxiliary_loss": "DETR.decoder_feed_normed_outputs: with it HF feeds each decoder layer the previous "
                      "layer's LayerNormed output (cvjax always returns the auxiliary predictions)",
    "position_embedding_type": "DETR.position_embedding_type ('sine' or 'learned')",
    "dilation": "no effect: HF dilates only timm backbones (refused above); the HF ResNet backbone keeps its "
                "strides, and so does the converted model",
    "is_encoder_decoder": "no effect: not read by the model",
    "init_std": "no effect: initialisation only",
    "init_xavier_std": "no effect: initialisation only (of the segmentation head)",
    **{name: "no effect: matching cost / loss weight, read only by the HF loss (cvjax's is in tasks/detr.py)"
       for name in ("class_cost", "bbox_cost", "giou_cost", "mask_loss_coefficient", "dice_loss_coefficient",
                    "bbox_loss_coefficient", "giou_loss_coefficient", "eos_coefficient")},
}
# The ResNetConfig fields of backbone_config: as for an HF ResNet, except the backbone outputs.
BACKBONE_CONFIG_FIELDS = {
    **RESNET_CONFIG_FIELDS,
    "out_features": "raises unless its last entry is the last stage: DETR reads the last feature map, and the "
                    "cvjax DETR reads C5",
    "out_indices": "as out_features (the same choice by index)",
}


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


def config_problems(config: Any, backbone_class: str = "ResNetBackbone") -> List[str]:
  """Reasons, as ``'field=value (why)'``, why the cvjax DETR cannot reproduce an HF ``DetrConfig`` whose model
  built a ``backbone_class`` backbone."""
  problems = common.generic_config_problems(config)
  backbone = config.backbone_config
  backbone_type = getattr(backbone, "model_type", None)
  if backbone_type != "resnet" or backbone_class != "ResNetBackbone":
    problems.append(f"backbone_config={backbone_type or backbone!r} (built as {backbone_class}, use_timm_backbone="
                    f"{getattr(config, 'use_timm_backbone', None)!r}: only the HF ResNet backbone is supported, "
                    "use_timm_backbone=False with a ResNetConfig)")
  else:
    problems += [f"backbone_config.{problem}" for problem in resnet_config_problems(backbone)]
    if list(backbone.out_features or backbone.stage_names[-1:])[-1:] != backbone.stage_names[-1:]:
      problems.append(f"backbone_config.out_features={backbone.out_features!r} (DETR reads the last one, which "
                      f"must be the last stage, {backbone.stage_names[-1]!r})")
  common.hf_activation(config, "activation_function", problems)
  if config.position_embedding_type not in ("sine", "learned"):
    problems.append(f"position_embedding_type={config.position_embedding_type!r} ('sine' or 'learned')")
  for name in ("encoder_layerdrop", "decoder_layerdrop"):
    if getattr(config, name, 0):
      problems.append(f"{name}={getattr(config, name)!r} (cvjax DETR has no LayerDrop: set it to 0)")
  return problems


def convert(config: Any, state_dict: Mapping[str, Any], backbone_class: str = "ResNetBackbone",
            source: str = "HF DetrForObjectDetection state_dict") -> Tuple[DETR, Dict]:
  """``(DETR, {'params', 'batch_stats'})`` of an HF ``DetrConfig`` and a ``DetrForObjectDetection`` state_dict in
  either transformers layout (what ``detr_from_transformers`` does with a model)."""
  common.raise_if_unsupported("HF DetrConfig", config_problems(config, backbone_class))
  backbone = resnet_kwargs(config.backbone_config)
  module = DETR(
      num_classes=config.num_labels, num_queries=config.num_queries, d_model=config.d_model,
      num_heads=config.encoder_attention_heads, num_encoder_layers=config.encoder_layers,
      num_decoder_layers=config.decoder_layers, ffn_dim=config.encoder_ffn_dim,
      decoder_num_heads=config.decoder_attention_heads, decoder_ffn_dim=config.decoder_ffn_dim,
      dropout_rate=config.dropout, encoder_input_dropout_rate=config.dropout,
      attention_dropout_rate=config.attention_dropout, activation_dropout_rate=config.activation_dropout,
      activation=common.HF_ACTIVATIONS[config.activation_function],
      position_embedding_type=config.position_embedding_type,
      decoder_feed_normed_outputs=bool(config.auxiliary_loss),
      **{f"backbone_{key}": value for key, value in backbone.items()})
  variables = common.load_state_dict(module, common.rename_keys(state_dict, LEGACY_KEYS),
                                     input_shape=(1, 64, 64, config.backbone_config.num_channels),
                                     torch_key=hf_detr_key, source=source)
  return module, variables


@register_hf_converter("DetrForObjectDetection")
def detr_from_transformers(hf_model: Any) -> Tuple[DETR, Dict]:
  """HF DETR detector -> (``DETR`` module, ``{'params', 'batch_stats'}``), architecture from ``hf_model.config``.

  Supports the HF ResNet backbone (``use_timm_backbone=False``, ``backbone_config`` a ``ResNetConfig``) and
  every other config field (``CONFIG_FIELDS``): layer counts, heads and FFN widths per part, activation,
  dropouts, sine or learned position embedding, ``auxiliary_loss``. ``module.apply(variables, images_nhwc,
  pixel_mask=mask, train=False)`` reproduces HF's eval-mode ``logits`` / ``pred_boxes``; its ``aux_outputs``
  are the heads on each earlier decoder layer's output after the decoder LayerNorm (HF's auxiliary outputs,
  which HF computes only with ``auxiliary_loss=True``).

  Raises:
    ValueError: naming each config field whose value the cvjax DETR cannot reproduce (a timm backbone, an
      activation it does not have, a backbone output other than the last stage, LayerDrop), or listing the
      state_dict's unexpected keys, missing keys and shape mismatches.
  """
  backbone = hf_model.model.backbone
  backbone_class = type(getattr(backbone, "conv_encoder", backbone).model).__name__  # 4.x: under conv_encoder
  return convert(hf_model.config, hf_model.state_dict(), backbone_class)


# ---- The official facebookresearch/detr layout ----------------------------------------------------------

_OFFICIAL_BACKBONE = "backbone.0.body."  # Joiner[0] = Backbone, whose .body is torchvision's ResNet
# cvjax sub-layer names -> the official TransformerEncoderLayer / TransformerDecoderLayer attributes.
_OFFICIAL_SUBLAYERS = {
    "encoder": {"self_attn": "self_attn", "self_attn_layer_norm": "norm1", "final_layer_norm": "norm2"},
    "decoder": {"self_attn": "self_attn", "encoder_attn": "multihead_attn", "self_attn_layer_norm": "norm1",
                "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm3"},
}
_OFFICIAL_FEED_FORWARD = {"fc1": "linear1", "fc2": "linear2"}
_OFFICIAL_HEADS = {"input_projection": "input_proj", "query_position_embeddings": "query_embed",
                   "class_labels_classifier": "class_embed", "bbox_predictor": "bbox_embed"}
# The learned position embedding (Joiner[1] = PositionEmbeddingLearned).
_OFFICIAL_POSITION = {"row_embeddings": "backbone.1.row_embed", "column_embeddings": "backbone.1.col_embed"}
# nn.MultiheadAttention stacks the q, k and v projections row-wise in one in_proj_weight / in_proj_bias.
_FUSED_PARTS = ("q", "k", "v")
_FUSED_SUFFIXES = (".in_proj_weight", ".in_proj_bias")
_DC5_SUFFIX = "_dc5"


def official_detr_key(path: Tuple[str, ...]) -> str:
  """cvjax DETR variable path (without collection) -> official DETR state_dict key.

  ``('backbone', 'layer1_0', 'downsample_0', 'kernel')`` -> ``'backbone.0.body.layer1.0.downsample.0.weight'``;
  ``('decoder', 'layers_2', 'encoder_attn', 'o_proj', 'bias')`` -> ``'transformer.decoder.layers.2.
  multihead_attn.out_proj.bias'``. A q/k/v projection maps to its row block of the fused tensor, written
  ``'<...>.self_attn.in_proj_weight[q]'`` (see ``split_fused_attention``).
  """
  head, *modules, leaf = path
  torch_leaf = common.TORCH_LEAF_NAMES[leaf]
  if head == "backbone":
    return f"{_OFFICIAL_BACKBONE}{torchvision_module_name(tuple(modules))}.{torch_leaf}"
  if head == "position_embedding":
    return f"{_OFFICIAL_POSITION[modules[0]]}.{torch_leaf}"
  if head in _OFFICIAL_HEADS:  # bbox_predictor/layers_2 -> bbox_embed.layers.2
    return f"{torchvision_module_name((_OFFICIAL_HEADS[head], *modules))}.{torch_leaf}"
  if modules == ["layernorm"]:  # the decoder's final norm, shared by every decoder output
    return f"transformer.decoder.norm.{torch_leaf}"
  layer, sublayer, *projection = modules
  prefix = f"transformer.{head}.layers.{layer.removeprefix('layers_')}."
  if sublayer == "mlp":
    return f"{prefix}{_OFFICIAL_FEED_FORWARD[projection[0]]}.{torch_leaf}"
  name = prefix + _OFFICIAL_SUBLAYERS[head][sublayer]
  if not projection:
    return f"{name}.{torch_leaf}"
  if projection == ["o_proj"]:
    return f"{name}.out_proj.{torch_leaf}"
  return f"{name}.in_proj_{torch_leaf}[{projection[0][0]}]"


def split_fused_attention(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """Replaces each fused ``<attn>.in_proj_weight [3d, d]`` / ``in_proj_bias [3d]`` by its three row blocks.

  The blocks are keyed ``'<attn>.in_proj_weight[q]'``, ``[k]``, ``[v]`` (PyTorch's order), so that an
  error about one of them still names the checkpoint's key. Every other entry is passed through.
  """
  split = {}
  for key, value in state_dict.items():
    if not key.endswith(_FUSED_SUFFIXES):
      split[key] = value
      continue
    value = common.to_numpy(value)
    if value.shape[0] % len(_FUSED_PARTS):
      raise ValueError(f"{key}: shape {value.shape}, but a fused q/k/v projection has 3 * d_model rows")
    for part, block in zip(_FUSED_PARTS, np.split(value, len(_FUSED_PARTS))):
      split[f"{key}[{part}]"] = block
  return split


def read_official_architecture(state_dict: Mapping[str, Any]) -> Dict[str, Any]:
  """The ``DETR`` keyword arguments that an official-layout state_dict determines.

  ``num_classes`` = class_embed rows - 1 (the last row is "no object"), ``num_queries`` / ``d_model`` from
  query_embed, layer counts from the highest ``layers.<i>`` index (a gap is then reported as missing keys),
  ``ffn_dim`` from the first encoder ``linear1``, the position embedding (``backbone.1.row_embed`` present =
  learned), and the backbone's block type (``conv3`` present = bottleneck), blocks per stage and widths. What a
  state_dict cannot tell: the number of attention heads
  (not saved by ``nn.MultiheadAttention``), DC5 dilation and dropout rates.

  Raises:
    ValueError: naming the keys needed here that the state_dict lacks.
  """
  def last_index(pattern: str) -> int:
    indices = [int(match.group(1)) for key in state_dict if (match := re.match(pattern, key))]
    return max(indices, default=-1)

  block_type = "bottleneck" if f"{_OFFICIAL_BACKBONE}layer1.0.conv3.weight" in state_dict else "basic"
  last_conv = "conv3" if block_type == "bottleneck" else "conv2"
  stage_sizes = tuple(last_index(rf"{re.escape(_OFFICIAL_BACKBONE)}layer{stage}\.(\d+)\.") + 1
                      for stage in range(1, 5))
  shape_keys = {"classes": "class_embed.weight", "queries": "query_embed.weight",
                "ffn": "transformer.encoder.layers.0.linear1.weight", "stem": f"{_OFFICIAL_BACKBONE}conv1.weight"}
  shape_keys.update({f"stage{stage}": f"{_OFFICIAL_BACKBONE}layer{stage}.0.{last_conv}.weight"
                     for stage in range(1, 5)})
  missing = [key for key in shape_keys.values() if key not in state_dict]
  if missing:
    raise ValueError(f"official DETR state_dict lacks keys that give the architecture: {missing}")
  rows = {name: np.shape(state_dict[key])[0] for name, key in shape_keys.items()}  # no copy of the tensors
  num_queries, d_model = np.shape(state_dict["query_embed.weight"])
  return dict(
      num_classes=rows["classes"] - 1, num_queries=num_queries, d_model=d_model,
      num_encoder_layers=last_index(r"transformer\.encoder\.layers\.(\d+)\.") + 1,
      num_decoder_layers=last_index(r"transformer\.decoder\.layers\.(\d+)\.") + 1, ffn_dim=rows["ffn"],
      position_embedding_type="learned" if f"{_OFFICIAL_POSITION['row_embeddings']}.weight" in state_dict else "sine",
      backbone_block_type=block_type, backbone_stage_sizes=stage_sizes, backbone_stem_width=rows["stem"],
      backbone_stage_widths=tuple(rows[f"stage{stage}"] for stage in range(1, 5)))


def from_official_state_dict(model_name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Tuple[DETR, Dict]:
  """An official facebookresearch/detr checkpoint -> (``DETR`` module, ``{'params', 'batch_stats'}``).

  Args:
    model_name: a registered ``detr_resnet*`` name whose backbone (block type and blocks per stage) is the
      checkpoint's: ``detr_resnet50``, ``detr_resnet101``; a ``_dc5`` suffix (``detr_resnet50_dc5``, torch.hub's
      DC5 models) sets ``dilation=True``, which the weights cannot show.
    state_dict: the official keys (``backbone.0.body.layer1.0.conv1.weight``, ``input_proj.weight``,
      ``query_embed.weight``, ``transformer.encoder.layers.0.self_attn.in_proj_weight``, ...,
      ``transformer.decoder.norm.weight``, ``class_embed.weight``, ``bbox_embed.layers.2.bias``), as
      ``model.state_dict()`` of the hub model or the released ``.pth`` file, whose ``{'model': state_dict}``
      wrapper is also accepted.
    **model_kwargs: ``DETR`` options the weights do not determine. ``num_heads`` (default 8, as in every
      released DETR) must be the checkpoint's: ``nn.MultiheadAttention`` does not save it and a wrong count
      gives wrong outputs without an error. Others: dropout rates, ``aux_outputs``, ``dtype``,
      ``backbone_layer_impl``.

  Returns:
    ``(module, variables)``; the architecture (classes, queries, widths, layer counts, FFN width, backbone
    widths) is read from the state_dict (``read_official_architecture``). ``module.apply(variables,
    images_nhwc, pixel_mask=mask, train=False)`` reproduces the official ``pred_logits`` / ``pred_boxes`` on
    the same ImageNet-normalised images; note that the official ``NestedTensor.mask`` is ``True`` on padding,
    cvjax's ``pixel_mask`` on real pixels.

  Raises:
    ValueError: for a name whose backbone differs from the checkpoint's, for keyword arguments that
      contradict the checkpoint, and for keys the model does not expect, keys it needs that are missing, or
      shapes that differ (all listed).
  """
  if isinstance(state_dict.get("model"), Mapping):
    state_dict = state_dict["model"]
  base_name = model_name
  if model_name not in MODELS and model_name.endswith(_DC5_SUFFIX):
    # torch.hub's DC5 models: the same weights, the last stage dilated instead of strided.
    base_name = model_name.removesuffix(_DC5_SUFFIX)
    model_kwargs = {"dilation": True, **model_kwargs}
  architecture = read_official_architecture(state_dict)
  # The name fixes the backbone's depth; the checkpoint must agree (layer3: 6 blocks in R50, 23 in R101).
  backbone = {"backbone_block_type": architecture.pop("backbone_block_type"),
              "backbone_stage_sizes": architecture.pop("backbone_stage_sizes")}
  registered = create_model(base_name)
  if backbone != {key: getattr(registered, key) for key in backbone}:
    raise ValueError(f"the state_dict's backbone has {backbone['backbone_block_type']} blocks per stage "
                     f"{backbone['backbone_stage_sizes']}, but {model_name!r} has {registered.backbone_block_type} "
                     f"blocks {tuple(registered.backbone_stage_sizes)}")
  conflicts = {key: (value, architecture[key]) for key, value in model_kwargs.items()
               if key in architecture and value != architecture[key]}
  if conflicts:
    raise ValueError(f"keyword arguments contradict the state_dict, as {{name: (given, checkpoint)}}: {conflicts}")
  module = create_model(base_name, **{**architecture, **model_kwargs})
  variables = common.load_state_dict(module, split_fused_attention(state_dict), input_shape=(1, 64, 64, 3),
                                     torch_key=official_detr_key, source=f"official DETR {model_name} state_dict")
  return module, variables
