"""from_transformers: small random HF Swin models (no download) against their conversion, logits and stages."""

import jax
import numpy as np
import pytest
import torch
from transformers import SwinConfig, SwinForImageClassification, SwinModel

from cvjax.convert import from_transformers

# Three stages so that every one of them can need padding on CPU-test sizes; two blocks each, so every stage
# has a shifted block.
SMALL = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=5,
             num_labels=5)


def small_hf_swin(seed=0, model_class=SwinForImageClassification, **overrides):
  """The small Swin in eval mode, every parameter redrawn at unit-ish scale: HF's init (std 0.02, zero bias
  tables) leaves near-zero logits, uniform attention and no position bias, which would hide a misplaced
  layer, a transposed bias table or a wrong relative position index."""
  torch.manual_seed(seed)
  model = model_class(SwinConfig(attn_implementation="eager", **{**SMALL, **overrides}))
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      elif "relative_position_bias_table" in name:
        param.normal_(0.0, 1.0)
      else:
        param.normal_(0.0, 0.5 if param.ndim < 2 else param.shape[-1] ** -0.5 * 2)
  return model.eval()


def _images(height, width, seed=0):
  x = np.random.default_rng(seed).standard_normal((2, 3, height, width), dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def _check_against_hf(hf_model, height, width, expected_stage_hw):
  x_nchw, x_nhwc = _images(height, width)
  with torch.no_grad():
    expected = hf_model(x_nchw, output_hidden_states=True, output_hidden_states_before_downsampling=True)
  module, variables = from_transformers(hf_model)

  @jax.jit
  def outputs_and_features(x):  # one compilation for both calls
    return (module.apply(variables, x, train=False),
            module.apply(variables, x, train=False, return_features=True))

  ours, features = outputs_and_features(x_nhwc)
  names = ["stem"] + [f"stage{i + 1}" for i in range(len(hf_model.config.depths))]
  assert sorted(features) == sorted(names)
  assert [features[n].shape[1:3] for n in names[1:]] == expected_stage_hw
  for name, theirs in zip(names, expected.reshaped_hidden_states):
    theirs = theirs.numpy().transpose(0, 2, 3, 1)
    assert np.abs(theirs).max() > 1.0, name  # the comparison is not between near-zeros
    np.testing.assert_allclose(features[name], theirs, rtol=1e-4, atol=2e-4, err_msg=name)
  main_output = (expected.logits if hasattr(expected, "logits") else expected.pooler_output).numpy()
  assert np.abs(main_output).max() > 0.5
  np.testing.assert_allclose(ours, main_output, rtol=1e-4, atol=1e-4)
  return module


def test_padding_at_every_stage_matches_hf():
  # 106x150 is not a multiple of the patch (HF pads the pixels to 108x152): 27x38 tokens. With window 5 every
  # stage pads (27x38 -> 30x40; 14x19 -> 15x20; 7x10 -> 10x10) and both merges see an odd side.
  module = _check_against_hf(small_hf_swin(), 106, 150, expected_stage_hw=[(27, 38), (14, 19), (7, 10)])
  assert (module.window_size, module.depths, module.num_classes) == (5, (2, 2, 2), 5)


def test_last_stage_no_larger_than_the_window_matches_hf():
  # Window 4 on 32x48: the last stage is 4x6, min(H, W) == window, so one window row, padded to 4x8, no shift.
  # (HF cannot run min(H, W) < window: its bias is built for the configured window only.)
  hf_model = small_hf_swin(seed=1, window_size=4, depths=[2, 2], num_heads=[2, 4])
  _check_against_hf(hf_model, 32, 48, expected_stage_hw=[(8, 12), (4, 6)])


def test_swin_model_pooled_output_and_settings_are_carried_over():
  hf_model = small_hf_swin(seed=2, model_class=SwinModel, layer_norm_eps=1e-3, qkv_bias=False,
                           drop_path_rate=0.3, mlp_ratio=2.0, depths=[2, 1], num_heads=[2, 2])
  module = _check_against_hf(hf_model, 40, 52, expected_stage_hw=[(10, 13), (5, 7)])
  assert module.num_classes == 0 and module.layer_norm_eps == 1e-3 and not module.qkv_bias
  assert module.drop_path_rate == 0.3 and module.mlp_ratio == 2.0


def test_unsupported_configs_and_mismatched_state_dict_are_clear_errors():
  with pytest.raises(ValueError, match="use_absolute_embeddings"):
    from_transformers(small_hf_swin(use_absolute_embeddings=True))
  with pytest.raises(ValueError, match="hidden_act 'relu'"):
    from_transformers(small_hf_swin(hidden_act="relu"))
  hf_model = small_hf_swin()
  bias = hf_model.swin.encoder.layers[1].blocks[0].attention.relative_position_bias
  bias.relative_position_bias_table = torch.nn.Parameter(torch.zeros(49, 2))
  with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\..*relative_position_bias_table: shape"):
    from_transformers(hf_model)
