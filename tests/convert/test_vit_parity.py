"""from_transformers: a small random HF ViTForImageClassification (no download) against its conversion."""

import functools

import jax
import numpy as np
import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification

from cvjax.convert import from_transformers

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, num_labels=5)


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


def _images(height, width, seed=0):
  x = np.random.default_rng(seed).standard_normal((2, 3, height, width), dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


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
  x_nchw, x_nhwc = _images(height, width, seed=1)
  with torch.no_grad():
    expected = hf_model(x_nchw, interpolate_pos_encoding=True).logits.numpy()
  module, variables = from_transformers(hf_model)
  np.testing.assert_allclose(module.apply(variables, x_nhwc, train=False), expected, rtol=1e-4, atol=1e-4)


def test_layer_norm_eps_and_identity_head_are_carried_over():
  hf_model = small_hf_vit(seed=2, num_labels=0, layer_norm_eps=1e-3)
  x_nchw, x_nhwc = _images(32, 32, seed=2)
  with torch.no_grad():
    expected = hf_model(x_nchw).logits.numpy()
  module, variables = from_transformers(hf_model)
  assert module.num_classes == 0 and module.layer_norm_eps == 1e-3
  np.testing.assert_allclose(module.apply(variables, x_nhwc, train=False), expected, rtol=1e-4, atol=1e-4)


def test_unsupported_activation_and_mismatched_state_dict_are_clear_errors():
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    from_transformers(small_hf_vit(hidden_act="relu"))
  hf_model = small_hf_vit()
  hf_model.vit.embeddings.position_embeddings = torch.nn.Parameter(torch.zeros(1, 5, 32))
  with pytest.raises(ValueError, match="position_embeddings: shape"):
    from_transformers(hf_model)
