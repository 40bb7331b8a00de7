"""from_transformers: tiny HF DetrForObjectDetection models (random weights, no download) against their conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference import assert_same_variables, rename_keys
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

from cvjax.convert import common, detr, from_transformers
from cvjax.models import create_model
from detr_reference import padded_batch, randomised_hf_detr

TOLERANCE = dict(rtol=1e-4, atol=1e-4)
BASIC = dict(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1], layer_type="basic")

# transformers 5 key -> 4.x key, as 4.45's DetrForObjectDetection names them (written out here, independently of
# the converter's LEGACY_KEYS).
_TO_4X = [(r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
          (r"^model\.position_embedding\.", "model.backbone.position_embedding."),
          (r"\.o_proj\.", ".out_proj."),
          (r"\.mlp\.(fc1|fc2)\.", r".\1.")]


def _config(backbone=None, **overrides):
  backbone = backbone or ResNetConfig(**BASIC, out_features=["stage4"])
  kwargs = dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5)
  return DetrConfig(**{**kwargs, **overrides})


def _hf_predictions(model, images, mask):
  """HF logits and boxes of the final layer, and of each earlier decoder layer with the heads on its output
  after the decoder LayerNorm: HF's auxiliary outputs (which it computes only with labels and
  ``auxiliary_loss=True``). Each layer's output is read by a hook, the same way in every transformers version."""
  layer_outputs = []
  hooks = [layer.register_forward_hook(lambda _, __, out: layer_outputs.append(
      out[0] if isinstance(out, tuple) else out)) for layer in model.model.decoder.layers]
  try:
    with torch.no_grad():
      out = model(torch.from_numpy(images), pixel_mask=torch.from_numpy(mask))
      aux = [{"pred_logits": model.class_labels_classifier(h).numpy(),
              "pred_boxes": model.bbox_predictor(h).sigmoid().numpy()}
             for h in map(model.model.decoder.layernorm, layer_outputs[:-1])]
  finally:
    for hook in hooks:
      hook.remove()
  return {"pred_logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy(), "aux_outputs": aux}


def _cvjax_predictions(module, variables, images, mask):
  apply = jax.jit(functools.partial(module.apply, train=False))
  return apply(variables, images.transpose(0, 2, 3, 1), pixel_mask=mask.astype(bool))


def _check_parity(model, images=None, mask=None):
  """Converts ``model`` and compares the final and auxiliary predictions on a padded batch; returns the module."""
  if images is None:
    images, mask = padded_batch()
  expected = _hf_predictions(model, images, mask)
  module, variables = from_transformers(model)
  got = _cvjax_predictions(module, variables, images, mask)
  assert np.abs(expected["pred_logits"]).max() > 0.5  # not a comparison of near-zeros
  np.testing.assert_allclose(got["pred_logits"], expected["pred_logits"], **TOLERANCE)
  np.testing.assert_allclose(got["pred_boxes"], expected["pred_boxes"], **TOLERANCE)
  assert len(got["aux_outputs"]) == len(expected["aux_outputs"]) == model.config.decoder_layers - 1
  for got_aux, expected_aux in zip(got["aux_outputs"], expected["aux_outputs"]):
    for key in ("pred_logits", "pred_boxes"):
      np.testing.assert_allclose(got_aux[key], expected_aux[key], **TOLERANCE)
  return module


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_detr_matches_hf_on_a_padded_batch(attn_implementation):
  model = randomised_hf_detr(_config())
  attention = model.model.encoder.layers[0].self_attn
  if hasattr(attention, "config"):
    # Set after construction: at construction HF would also ask the ResNet backbone for it, which has none.
    model.config._attn_implementation = attn_implementation
    assert attention.config._attn_implementation == attn_implementation
  elif attn_implementation != "eager":
    pytest.skip("this transformers' DETR has eager attention only")
  _check_parity(model)


def test_the_padding_mask_matters_in_the_parity_padded_batch():
  # Guards the test above: were the mask ignored on either side, the padded image's outputs would change.
  model = randomised_hf_detr(_config())
  images, mask = padded_batch()
  masked = _hf_predictions(model, images, mask)["pred_logits"][1]
  unmasked = _hf_predictions(model, images, np.ones_like(mask))["pred_logits"][1]
  assert np.abs(masked - unmasked).max() > 1e-2


def test_bottleneck_backbone_and_variables_layout():
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1],
                          layer_type="bottleneck", out_features=["stage4"])
  model = randomised_hf_detr(_config(backbone, decoder_layers=1), seed=1)
  images, mask = padded_batch(seed=1)
  module, variables = from_transformers(model)
  # Frozen BN: statistics and affine only in batch_stats, so no optimizer can touch them.
  assert "bn1" not in variables["params"]["backbone"] and "bn1" in variables["batch_stats"]["backbone"]
  got = _cvjax_predictions(module, variables, images, mask)
  np.testing.assert_allclose(got["pred_logits"], _hf_predictions(model, images, mask)["pred_logits"], **TOLERANCE)
  assert got["aux_outputs"] == []


def test_per_part_heads_and_widths_activation_learned_positions_and_dropouts():
  model = randomised_hf_detr(_config(encoder_attention_heads=2, decoder_attention_heads=8, encoder_ffn_dim=48,
                                     decoder_ffn_dim=24, activation_function="gelu",
                                     position_embedding_type="learned", num_queries=7, d_model=16,
                                     dropout=0.05, attention_dropout=0.15, activation_dropout=0.25), seed=2)
  module = _check_parity(model)
  assert (module.num_heads, module.decoder_num_heads, module.ffn_dim, module.decoder_ffn_dim) == (2, 8, 48, 24)
  assert module.activation is common.HF_ACTIVATIONS["gelu"] and module.position_embedding_type == "learned"
  assert (module.dropout_rate, module.encoder_input_dropout_rate) == (0.05, 0.05)
  assert (module.attention_dropout_rate, module.activation_dropout_rate) == (0.15, 0.25)


def test_auxiliary_loss_decoding_matches_hf():
  # With auxiliary_loss=True HF feeds every decoder layer the LayerNormed output of the one before.
  model = randomised_hf_detr(_config(auxiliary_loss=True), seed=3)
  assert _check_parity(model).decoder_feed_normed_outputs
  plain = randomised_hf_detr(_config(), seed=3)  # the same weights without it: other outputs
  images, mask = padded_batch()
  assert np.abs(_hf_predictions(plain, images, mask)["pred_logits"]
                - _hf_predictions(model, images, mask)["pred_logits"]).max() > 1e-2


def test_backbone_fields_off_their_defaults_and_dilation_that_hf_ignores():
  # HF's ResNet backbone: hidden_act after its stem and blocks, one input channel, several outputs of which DETR
  # reads the last; dilation applies to timm backbones only, so this HF model and its conversion are undilated.
  backbone = ResNetConfig(**{**BASIC, "depths": [1, 2, 1, 1]}, hidden_act="silu", num_channels=1,
                          out_features=["stage2", "stage4"], downsample_in_first_stage=True)
  model = randomised_hf_detr(_config(backbone, dilation=True, decoder_layers=2), seed=4)
  images, mask = padded_batch(seed=4)
  module = _check_parity(model, images[:, :1], mask)
  assert module.backbone_activation is common.HF_ACTIVATIONS["silu"] and not module.dilation
  assert module.backbone_downsample_in_first_stage


def _state_dict_in_4x_layout(model):
  state_dict = model.state_dict()
  if any(key.startswith("model.backbone.conv_encoder.") for key in state_dict):  # running on transformers 4.x
    return state_dict
  return rename_keys(state_dict, _TO_4X)


def test_transformers_4_state_dict_layout_loads_to_the_same_variables():
  model = randomised_hf_detr(_config(position_embedding_type="learned", decoder_layers=1), seed=5)
  legacy = _state_dict_in_4x_layout(model)
  for key in ("model.backbone.conv_encoder.model.embedder.embedder.convolution.weight",
              "model.backbone.position_embedding.row_embeddings.weight", "model.encoder.layers.1.fc2.bias",
              "model.decoder.layers.0.encoder_attn.out_proj.weight"):
    assert key in legacy
  _, variables = detr.convert(model.config, legacy)
  _, expected = from_transformers(model)
  assert_same_variables(variables, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(activation_function="laplace"), r"activation_function='laplace'"),
    (dict(encoder_layerdrop=0.1), r"encoder_layerdrop=0\.1"),
    (dict(decoder_layerdrop=0.2), r"decoder_layerdrop=0\.2"),
    (dict(backbone=ResNetConfig(**BASIC, out_features=["stage3"])), r"backbone_config\.out_features=\['stage3'\]"),
    (dict(backbone=ResNetConfig(**BASIC, out_features=["stage4"], hidden_act="laplace")),
     r"backbone_config\.hidden_act='laplace'"),
])
def test_unsupported_configs_are_errors_that_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=r"HF DetrConfig not supported .*" + message):
    from_transformers(DetrForObjectDetection(_config(**overrides)))


def test_timm_backbone_and_unknown_position_embedding_are_errors():
  # Neither can be built here (no timm; HF refuses the embedding), so the config check is called directly.
  timm = DetrConfig()  # transformers' default: a timm ResNet-50
  assert any(problem.startswith("backbone_config=") for problem in detr.config_problems(timm, "TimmBackbone"))
  config = _config()
  config.position_embedding_type = "rotary"
  assert detr.config_problems(config) == ["position_embedding_type='rotary' ('sine' or 'learned')"]


def test_full_size_detr_resnet50_has_hf_parameter_and_buffer_counts():
  model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                            backbone_config=ResNetConfig(out_features=["stage4"])))
  hf_params = sum(p.numel() for p in model.parameters())
  hf_buffers = sum(b.numel() for b in model.buffers())  # the frozen batch norms' four arrays
  detr_r50 = create_model("detr_resnet50", num_classes=model.config.num_labels)
  variables = jax.eval_shape(functools.partial(detr_r50.init, train=False), jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  count = lambda tree: sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))  # noqa: E731
  assert (count(variables["params"]), count(variables["batch_stats"])) == (hf_params, hf_buffers)
