"""from_transformers: small random HF ViTForImageClassification models (no download) against their conversion."""

import functools

import jax
import numpy as np
import pytest
import torch
from torch_reference import assert_same_variables, rename_keys
from transformers import ViTConfig, ViTForImageClassification

from cvjax.convert import common, from_transformers, vit

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, num_labels=5)

# transformers 5 key -> 4.x key, as 4.45's ViTForImageClassification names them (written out here, independently
# of the converter's LEGACY_KEYS).
_TO_4X = [(r"^vit\.layers\.(\d+)\.attention\.([qkv])_proj\.",
           lambda m: f"vit.encoder.layer.{m[1]}.attention.attention.{dict(q='query', k='key', v='value')[m[2]]}."),
          (r"^vit\.layers\.(\d+)\.attention\.o_proj\.", r"vit.encoder.layer.\1.attention.output.dense."),
          (r"^vit\.layers\.(\d+)\.mlp\.fc1\.", r"vit.encoder.layer.\1.intermediate.dense."),
          (r"^vit\.layers\.(\d+)\.mlp\.fc2\.", r"vit.encoder.layer.\1.output.dense."),
          (r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1.")]


def small_hf_vit(seed=0, **overrides):
  """The small ViT in eval mode, every parameter redrawn at unit-ish scale: HF's std-0.02 init leaves near-zero
  logits and uniform attention, which would hide a misplaced layer."""
  torch.manual_seed(seed)
  model = ViTForImageClassification(ViTConfig(attn_implementation="eager", **{**SMALL, **overrides}))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "layernorm" in name and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      else:
        param.normal_(0.0, 0.5 if param.ndim < 2 else param.shape[-1] ** -0.5 * 2)
  return model.eval()


def _images(height, width, seed=0, channels=3):
  x = np.random.default_rng(seed).standard_normal((2, channels, height, width), dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def _check_logits(hf_model, module, variables, height, width, seed=0, **hf_kwargs):
  x_nchw, x_nhwc = _images(height, width, seed, hf_model.config.num_channels)
  with torch.no_grad():
    expected = hf_model(x_nchw, **hf_kwargs).logits.numpy()
  assert np.abs(expected).max() > 0.5  # the comparison is not between near-zeros
  np.testing.assert_allclose(module.apply(variables, x_nhwc, train=False), expected, rtol=1e-4, atol=1e-4)


def test_logits_and_attention_match_hf():
  hf_model = small_hf_vit()
  x_nchw, x_nhwc = _images(32, 32)
  with torch.no_grad():
    expected = hf_model(x_nchw, output_attentions=True)
  module, variables = from_transformers(hf_model)
  logits, attentions = jax.jit(functools.partial(module.apply, train=False, return_attention=True))(
      variables, x_nhwc)
  assert np.abs(expected.logits.numpy()).max() > 0.5  # the comparison below is not between near-zeros
  np.testing.assert_allclose(logits, expected.logits.numpy(), rtol=1e-4, atol=1e-4)
  assert len(attentions) == len(expected.attentions) == SMALL["num_hidden_layers"]
  for ours, theirs in zip(attentions, expected.attentions):
    assert ours.shape == (2, 4, 17, 17)
    assert theirs.numpy().max() > 2 / 17  # not uniform
    np.testing.assert_allclose(ours, theirs.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("height, width", [(48, 48), (24, 40)])
def test_other_resolutions_match_hf_interpolate_pos_encoding(height, width):
  hf_model = small_hf_vit(seed=1)
  module, variables = from_transformers(hf_model)
  _check_logits(hf_model, module, variables, height, width, seed=1, interpolate_pos_encoding=True)


def test_layer_norm_eps_and_identity_head_are_carried_over():
  hf_model = small_hf_vit(seed=2, num_labels=0, layer_norm_eps=1e-3)
  module, variables = from_transformers(hf_model)
  assert module.num_classes == 0 and module.layer_norm_eps == 1e-3
  _check_logits(hf_model, module, variables, 32, 32, seed=2)


def test_every_other_config_field_off_its_default_is_carried_over():
  # Non-square image and patches (HF runs them at the native size), no q/k/v bias, the tanh GELU, a 3-head
  # attention with 8-wide heads, one input channel, 3 layers, dropout rates (train only: checked as fields).
  hf_model = small_hf_vit(seed=3, image_size=(32, 48), patch_size=(8, 16), qkv_bias=False, hidden_act="gelu_new",
                          hidden_size=24, num_attention_heads=3, intermediate_size=40, num_hidden_layers=3,
                          num_channels=1, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
  module, variables = from_transformers(hf_model)
  assert (module.image_size, module.patch_size, module.qkv_bias) == ((32, 48), (8, 16), False)
  assert (module.dropout_rate, module.attention_dropout_rate) == (0.1, 0.2)
  assert module.activation is common.HF_ACTIVATIONS["gelu_new"]
  assert "bias" not in variables["params"]["layers_0"]["attention"]["q_proj"]
  _check_logits(hf_model, module, variables, 32, 48, seed=3)


def _state_dict_in_4x_layout(hf_model):
  state_dict = hf_model.state_dict()
  if any(".encoder.layer." in key for key in state_dict):  # running on transformers 4.x already
    return state_dict
  return rename_keys(state_dict, _TO_4X, first_match_only=True)


def test_transformers_4_state_dict_layout_loads_to_the_same_variables():
  hf_model = small_hf_vit(seed=4)
  legacy = _state_dict_in_4x_layout(hf_model)
  assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
  assert "vit.encoder.layer.1.intermediate.dense.bias" in legacy
  module, variables = vit.convert(hf_model.config, legacy)
  _, expected = from_transformers(hf_model)
  assert_same_variables(variables, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(hidden_act="laplace"), r"hidden_act='laplace'"),
    (dict(head_dim=4), r"head_dim=4 x num_attention_heads=4 != hidden_size=32"),
])
def test_unsupported_configs_are_errors_that_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=r"HF ViTConfig not supported .*" + message):
    from_transformers(small_hf_vit(**overrides))


def test_pruned_heads_and_mismatched_state_dict_are_clear_errors():
  hf_model = small_hf_vit()
  hf_model.config.pruned_heads = {0: [1]}
  with pytest.raises(ValueError, match=r"pruned_heads=\{0: \[1\]\}"):
    from_transformers(hf_model)
  hf_model = small_hf_vit()
  hf_model.vit.embeddings.position_embeddings = torch.nn.Parameter(torch.zeros(1, 5, 32))
  with pytest.raises(ValueError, match="position_embeddings: shape"):
    from_transformers(hf_model)
