"""from_transformers: small random HF Swin models (no download) against their conversion, logits and stages."""

import types

import jax
import numpy as np
import pytest
import torch
from torch_reference import assert_same_variables, rename_keys
from transformers import SwinConfig, SwinForImageClassification, SwinModel

from cvjax.convert import common, from_transformers, swin
from cvjax.models.backbones.swin import WindowAttention

# Three stages so that every one of them can need padding on CPU-test sizes; two blocks each, so every stage
# has a shifted block.
SMALL = dict(image_size=64, patch_size=4, embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 4], window_size=5,
             num_labels=5)

# transformers 5 key -> 4.x key, as 4.45's Swin names them (written out here, independently of the converter's
# LEGACY_KEYS); 4.x also saves each block's relative_position_index buffer.
_TO_4X = [(r"\.attention\.([qkv])_proj\.", lambda m: f".attention.self.{dict(q='query', k='key', v='value')[m[1]]}."),
          (r"\.attention\.relative_position_bias\.relative_position_bias_table$",
           ".attention.self.relative_position_bias_table"),
          (r"\.attention\.o_proj\.", ".attention.output.dense."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."),
          (r"\.mlp\.fc2\.", ".output.dense.")]


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


def _images(height, width, seed=0, channels=3):
  x = np.random.default_rng(seed).standard_normal((2, channels, height, width), dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


def _hf_outputs(hf_model, x_nchw, stage_hw):
  """HF's main output and, as NHWC arrays, the patch embedding and every stage's output before its
  PatchMerging (what HF's ``output_hidden_states_before_downsampling`` gives in transformers 5), read by hooks
  on the embeddings and each stage's last block, the same way in every transformers version."""
  base = getattr(hf_model, "swin", hf_model)
  maps = []
  hook = lambda _, __, out: maps.append(out[0])  # noqa: E731  (every one returns a tuple)
  hooks = [base.embeddings.register_forward_hook(hook)]
  hooks += [stage.blocks[-1].register_forward_hook(hook) for stage in base.encoder.layers]
  try:
    with torch.no_grad():
      out = hf_model(x_nchw)
  finally:
    for handle in hooks:
      handle.remove()
  main_output = (out.logits if hasattr(out, "logits") else out.pooler_output).numpy()
  sizes = [stage_hw[0]] + list(stage_hw)  # the embedding has stage 1's size
  return main_output, [m.numpy().reshape(m.shape[0], *hw, m.shape[-1]) for m, hw in zip(maps, sizes)]


def _check_against_hf(hf_model, height, width, expected_stage_hw):
  x_nchw, x_nhwc = _images(height, width, channels=hf_model.config.num_channels)
  main_output, expected_maps = _hf_outputs(hf_model, x_nchw, expected_stage_hw)
  module, variables = from_transformers(hf_model)

  @jax.jit
  def outputs_and_features(x):  # one compilation for both calls
    return (module.apply(variables, x, train=False),
            module.apply(variables, x, train=False, return_features=True))

  ours, features = outputs_and_features(x_nhwc)
  names = ["stem"] + [f"stage{i + 1}" for i in range(len(hf_model.config.depths))]
  assert sorted(features) == sorted(names)
  assert [features[n].shape[1:3] for n in names[1:]] == expected_stage_hw
  for name, theirs in zip(names, expected_maps):
    assert np.abs(theirs).max() > 1.0, name  # the comparison is not between near-zeros
    np.testing.assert_allclose(features[name], theirs, rtol=1e-4, atol=2e-4, err_msg=name)
  assert np.abs(main_output).max() > 0.5
  np.testing.assert_allclose(ours, main_output, rtol=1e-4, atol=1e-4)
  return module, variables


def test_padding_at_every_stage_matches_hf():
  # 106x150 is not a multiple of the patch (HF pads the pixels to 108x152): 27x38 tokens. With window 5 every
  # stage pads (27x38 -> 30x40; 14x19 -> 15x20; 7x10 -> 10x10) and both merges see an odd side.
  module, _ = _check_against_hf(small_hf_swin(), 106, 150, expected_stage_hw=[(27, 38), (14, 19), (7, 10)])
  assert (module.window_size, module.depths, module.num_classes) == (5, (2, 2, 2), 5)


def test_last_stage_no_larger_than_the_window_matches_hf():
  # Window 4 on 32x48: the last stage is 4x6, min(H, W) == window, so one window row, padded to 4x8, no shift.
  # (HF cannot run min(H, W) < window: its bias is built for the configured window only.)
  hf_model = small_hf_swin(seed=1, window_size=4, depths=[2, 2], num_heads=[2, 4])
  _check_against_hf(hf_model, 32, 48, expected_stage_hw=[(8, 12), (4, 6)])


def test_swin_model_pooled_output_and_every_other_field_off_its_default():
  # Non-square patches (4 x 2 on 40 x 52: 10 x 26 tokens), one input channel, no q/k/v bias, the SiLU, MLP ratio
  # 2, eps 1e-3; the dropout rates and stochastic depth only act in training, checked below.
  hf_model = small_hf_swin(seed=2, model_class=SwinModel, layer_norm_eps=1e-3, qkv_bias=False,
                           drop_path_rate=0.3, mlp_ratio=2.0, depths=[2, 1], num_heads=[2, 2], patch_size=[4, 2],
                           num_channels=1, hidden_act="silu", hidden_dropout_prob=0.1,
                           attention_probs_dropout_prob=0.2)
  module, variables = _check_against_hf(hf_model, 40, 52, expected_stage_hw=[(10, 26), (5, 13)])
  assert module.num_classes == 0 and module.layer_norm_eps == 1e-3 and not module.qkv_bias
  assert module.drop_path_rate == 0.3 and module.mlp_ratio == 2.0 and module.patch_size == (4, 2)
  assert (module.dropout_rate, module.attention_dropout_rate) == (0.1, 0.2)
  assert module.activation is common.HF_ACTIVATIONS["silu"]


def test_attention_dropout_acts_on_the_attention_probabilities_in_training_only():
  # The converter's attention_probs_dropout_prob lands here (WindowAttention.dropout_rate).
  windows = jax.random.normal(jax.random.PRNGKey(0), (6, 16, 8))
  attention = WindowAttention(num_heads=2, window_size=4, dropout_rate=0.5)
  variables = attention.init(jax.random.PRNGKey(1), windows, 4, None)
  leaves, tree = jax.tree_util.tree_flatten(variables)  # redrawn at unit scale: the init's outputs are tiny
  variables = tree.unflatten([jax.random.normal(jax.random.PRNGKey(i), leaf.shape) for i, leaf in enumerate(leaves)])
  rng = {"dropout": jax.random.PRNGKey(2)}

  @jax.jit
  def outputs(variables):  # one compilation (eager dropout is slow to dispatch)
    run = lambda module, **kw: module.apply(variables, windows, 4, None, **kw)  # noqa: E731
    return (run(attention), run(attention.clone(dropout_rate=0.0), train=True), run(attention, train=True, rngs=rng),
            run(attention.clone(dropout_rate=1.0), train=True, rngs=rng))

  evaluation, undropped, dropped, all_dropped = outputs(variables)
  np.testing.assert_array_equal(evaluation, undropped)
  assert np.abs(dropped - evaluation).max() > 1e-2
  # With every probability dropped only the output projection's bias is left.
  np.testing.assert_allclose(all_dropped, np.broadcast_to(variables["params"]["o_proj"]["bias"], all_dropped.shape),
                             atol=1e-6)


def _state_dict_in_4x_layout(hf_model):
  state_dict = hf_model.state_dict()
  if any(".attention.self." in key for key in state_dict):  # running on transformers 4.x already
    return state_dict
  renamed = rename_keys(state_dict, _TO_4X)
  for key in [k for k in renamed if k.endswith(".relative_position_bias_table")]:  # 4.x saved the index too
    renamed[key.replace("_bias_table", "_index")] = torch.zeros(4, 4, dtype=torch.long)
  return renamed


def test_transformers_4_state_dict_layout_loads_to_the_same_variables():
  hf_model = small_hf_swin(seed=3, depths=[2, 1], num_heads=[2, 2])
  legacy = _state_dict_in_4x_layout(hf_model)
  assert "swin.encoder.layers.0.blocks.1.attention.self.relative_position_bias_table" in legacy
  assert "swin.encoder.layers.0.blocks.1.attention.self.relative_position_index" in legacy
  assert "swin.encoder.layers.1.blocks.0.output.dense.weight" in legacy
  _, variables = swin.convert(hf_model.config, legacy, classifier=True)
  _, expected = from_transformers(hf_model)
  assert_same_variables(variables, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(use_absolute_embeddings=True), r"use_absolute_embeddings=True"),
    (dict(hidden_act="laplace"), r"hidden_act='laplace'"),
])
def test_unsupported_configs_are_errors_that_name_the_field(overrides, message):
  with pytest.raises(ValueError, match=r"HF SwinConfig not supported .*" + message):
    from_transformers(small_hf_swin(**overrides))


def test_non_square_windows_and_unpooled_swin_model_are_errors():
  # transformers 5 types window_size as an int; 4.x configs could hold a pair.
  config = types.SimpleNamespace(**{**small_hf_swin().config.to_dict(), "window_size": (5, 7)})
  assert swin.config_problems(config) == ["window_size=(5, 7) (one int: the windows are square)"]
  torch.manual_seed(0)
  with pytest.raises(ValueError, match=r"add_pooling_layer=False"):
    from_transformers(SwinModel(SwinConfig(**SMALL), add_pooling_layer=False))


def test_mismatched_state_dict_is_a_clear_error():
  hf_model = small_hf_swin()
  bias = hf_model.swin.encoder.layers[1].blocks[0].attention
  bias = getattr(bias, "relative_position_bias", None) or bias.self  # 4.x: the table sits in attention.self
  bias.relative_position_bias_table = torch.nn.Parameter(torch.zeros(49, 2))
  with pytest.raises(ValueError, match=r"layers\.1\.blocks\.0\..*relative_position_bias_table: shape"):
    from_transformers(hf_model)
