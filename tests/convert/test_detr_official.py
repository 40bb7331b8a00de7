"""from_torch_state_dict('detr_*'): the official facebookresearch/detr checkpoint layout, checked against HF.

No official checkpoint can be exercised here (nothing is downloaded, and torchvision, which the official
model is built from, is not installed): the official-layout state_dict is made from a random HF
``DetrForObjectDetection`` (HF ResNet backbone) by a rename written in this file, independently of the
converter's own mapping, the inverse of HF's published conversion from the official checkpoints (q/k/v
concatenated into ``in_proj_weight``; the HF ResNet's ``encoder.stages.S.layers.B.layer.I`` is torchvision's
``layerS+1.B.convI+1`` / ``bnI+1``). HF converted the released checkpoints with this table and matched them
within 1e-4, so agreement with HF here stands for agreement with the official model.
"""

import functools
import re

import jax
import numpy as np
import pytest
import torch
from torch_reference import assert_same_variables
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

from cvjax.convert import common, detr, from_torch_state_dict
from detr_reference import padded_batch, randomised_hf_detr

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
HEADS = 4  # not in any state_dict: passed to the converter
R18_LIKE = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[2, 2, 2, 2], layer_type="basic",
                        out_features=["stage4"])


def _hf_model(backbone=R18_LIKE, seed=0, **overrides):
  """A small randomised HF DETR (detr_reference.randomised_hf_detr)."""
  kwargs = dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5)
  return randomised_hf_detr(DetrConfig(**{**kwargs, **overrides}), seed)


def _backbone_key(match):
  stage, block, layer, kind, leaf = match.groups()
  module = "conv" if kind == "convolution" else "bn"
  return f"backbone.0.body.layer{int(stage) + 1}.{block}.{module}{int(layer) + 1}.{leaf}"


def _sublayer_key(match):
  stack, index, sublayer, rest = match.groups()
  official = {"self_attn": "self_attn", "encoder_attn": "multihead_attn", "self_attn_layer_norm": "norm1",
              "encoder_attn_layer_norm": "norm2", "final_layer_norm": "norm2" if stack == "encoder" else "norm3",
              "mlp.fc1": "linear1", "mlp.fc2": "linear2"}[sublayer]
  return f"transformer.{stack}.layers.{index}.{official}.{rest.replace('o_proj', 'out_proj')}"


# HF DetrForObjectDetection key -> official key; q/k/v projections keep their names here and are fused below.
_RENAMES = [
    (r"model\.backbone\.model\.embedder\.embedder\.convolution\.(\w+)", r"backbone.0.body.conv1.\1"),
    (r"model\.backbone\.model\.embedder\.embedder\.normalization\.(\w+)", r"backbone.0.body.bn1.\1"),
    (r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.layer\.(\d+)\.(convolution|normalization)"
     r"\.(\w+)", _backbone_key),
    (r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.convolution\.(\w+)",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.downsample.0.{m[3]}"),
    (r"model\.backbone\.model\.encoder\.stages\.(\d+)\.layers\.(\d+)\.shortcut\.normalization\.(\w+)",
     lambda m: f"backbone.0.body.layer{int(m[1]) + 1}.{m[2]}.downsample.1.{m[3]}"),
    (r"model\.input_projection\.(\w+)", r"input_proj.\1"),
    (r"model\.position_embedding\.(row|col)\w*_embeddings\.weight", r"backbone.1.\1_embed.weight"),
    (r"model\.query_position_embeddings\.weight", "query_embed.weight"),
    (r"model\.(encoder|decoder)\.layers\.(\d+)\.(self_attn|encoder_attn|self_attn_layer_norm|encoder_attn_layer_norm"
     r"|final_layer_norm|mlp\.fc1|mlp\.fc2)\.(.+)", _sublayer_key),
    (r"model\.decoder\.layernorm\.(\w+)", r"transformer.decoder.norm.\1"),
    (r"class_labels_classifier\.(\w+)", r"class_embed.\1"),
    (r"bbox_predictor\.layers\.(\d)\.(\w+)", r"bbox_embed.layers.\1.\2"),
]


def official_state_dict(hf_model):
  """The official facebookresearch/detr state_dict of an HF DETR (every HF tensor used exactly once)."""
  renamed = {}
  # The rules above are written for transformers 5's names; 4.x's are brought to them first.
  for key, value in common.rename_keys(hf_model.state_dict(), detr.LEGACY_KEYS).items():
    targets = [re.sub(pattern, replacement, key) for pattern, replacement in _RENAMES if re.fullmatch(pattern, key)]
    assert len(targets) == 1, f"the test's rename has {len(targets)} rules for HF key {key}"
    renamed[targets[0]] = value
  official = {}
  for key, value in renamed.items():
    fused = re.fullmatch(r"(.+)\.([qkv])_proj\.(weight|bias)", key)
    if fused is None:
      official[key] = value
    elif fused[2] == "q":  # nn.MultiheadAttention's in_proj: q, k, v rows stacked in this order
      prefix, leaf = fused[1], fused[3]
      official[f"{prefix}.in_proj_{leaf}"] = torch.cat([renamed[f"{prefix}.{p}_proj.{leaf}"] for p in "qkv"])
  return official


def _check_parity(hf_model, module, variables):
  images, mask = padded_batch()
  with torch.no_grad():
    expected = hf_model(torch.from_numpy(images), pixel_mask=torch.from_numpy(mask))
  got = jax.jit(functools.partial(module.apply, train=False))(variables, images.transpose(0, 2, 3, 1),
                                                                  pixel_mask=mask.astype(bool))
  np.testing.assert_allclose(got["pred_logits"], expected.logits.numpy(), **TOLERANCE)
  np.testing.assert_allclose(got["pred_boxes"], expected.pred_boxes.numpy(), **TOLERANCE)


def test_official_layout_matches_hf_on_a_padded_batch():
  # ResNet-50's depth (the name must match it) at tiny widths: bottlenecks with projection shortcuts.
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[3, 4, 6, 3],
                          layer_type="bottleneck", out_features=["stage4"])
  hf_model = _hf_model(backbone)
  state_dict = official_state_dict(hf_model)
  assert "transformer.decoder.layers.2.multihead_attn.in_proj_weight" in state_dict
  # The released .pth files wrap the state_dict as {'model': ...}.
  module, variables = from_torch_state_dict("detr_resnet50", {"model": state_dict}, num_heads=HEADS)
  assert (module.num_classes, module.num_queries, module.d_model, module.ffn_dim) == (5, 10, 32, 64)
  assert (module.num_encoder_layers, module.num_decoder_layers, module.dilation) == (2, 3, False)
  assert (module.backbone_stem_width, module.backbone_stage_widths) == (8, (16, 32, 48, 64))
  _check_parity(hf_model, module, variables)


def test_basic_blocks_and_the_dc5_name_that_sets_dilation_with_the_same_weights():
  state_dict = official_state_dict(_hf_model())  # ResNet-18's depth: basic blocks load too
  plain_module, plain = from_torch_state_dict("detr_resnet18", state_dict, num_heads=HEADS)
  module, variables = from_torch_state_dict("detr_resnet18_dc5", state_dict, num_heads=HEADS)
  assert module.dilation and not plain_module.dilation
  assert_same_variables(variables, plain)


def test_learned_position_embedding_is_read_from_the_state_dict():
  hf_model = _hf_model(decoder_layers=2, position_embedding_type="learned")
  state_dict = official_state_dict(hf_model)
  assert state_dict["backbone.1.col_embed.weight"].shape == (50, 16)
  module, variables = from_torch_state_dict("detr_resnet18", state_dict, num_heads=HEADS)
  assert module.position_embedding_type == "learned"
  _check_parity(hf_model, module, variables)


def test_full_size_detr_r50_layout_is_read_from_the_state_dict():
  hf_model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                               backbone_config=ResNetConfig(out_features=["stage4"]), num_labels=91))
  state_dict = official_state_dict(hf_model)
  assert len(state_dict) == 458  # as in detr-r50-e632da11.pth: 265 backbone + 193 transformer and heads
  module, variables = from_torch_state_dict("detr_resnet50", state_dict)
  assert (module.num_classes, module.num_queries, module.d_model, module.num_heads, module.ffn_dim) == (
      91, 100, 256, 8, 2048)
  assert (module.num_encoder_layers, module.num_decoder_layers) == (6, 6)
  assert variables["params"]["class_labels_classifier"]["kernel"].shape == (256, 92)


def _small_state_dict():
  return official_state_dict(_hf_model(decoder_layers=1, encoder_layers=1))


@pytest.mark.parametrize("edit, message", [
    pytest.param(lambda sd: sd.pop("transformer.decoder.norm.weight"),
                 r"missing keys: \['transformer\.decoder\.norm\.weight'\]", id="missing"),
    pytest.param(lambda sd: sd.pop("transformer.encoder.layers.0.self_attn.in_proj_bias"),
                 r"missing keys: .*transformer\.encoder\.layers\.0\.self_attn\.in_proj_bias\[q\]", id="missing_fused"),
    pytest.param(lambda sd: sd.update({"backbone.0.body.fc.weight": torch.zeros(3, 24)}),
                 r"unexpected keys: \['backbone\.0\.body\.fc\.weight'\]", id="unexpected"),
    pytest.param(lambda sd: sd.pop("class_embed.weight"),
                 r"lacks keys that give the architecture: \['class_embed\.weight'\]", id="missing_head"),
    pytest.param(lambda sd: sd.update({"transformer.decoder.layers.0.linear1.weight": torch.zeros(65, 32)}),
                 r"transformer\.decoder\.layers\.0\.linear1\.weight: shape \(65, 32\)", id="shape"),
])
def test_key_problems_are_errors_that_name_the_key(edit, message):
  state_dict = _small_state_dict()
  edit(state_dict)
  with pytest.raises(ValueError, match=message):
    from_torch_state_dict("detr_resnet18", state_dict, num_heads=HEADS)


def test_a_name_or_argument_that_contradicts_the_checkpoint_is_an_error():
  state_dict = _small_state_dict()
  with pytest.raises(ValueError, match=r"basic blocks per stage \(2, 2, 2, 2\), but 'detr_resnet50'"):
    from_torch_state_dict("detr_resnet50", state_dict)
  with pytest.raises(ValueError, match=r"'num_classes': \(7, 5\)"):
    from_torch_state_dict("detr_resnet18", state_dict, num_classes=7, num_heads=HEADS)
