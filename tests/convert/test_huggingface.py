"""from_transformers: HF ResNets (random weights and BN statistics, no download) against their conversion, and
what every converter shares: the activation table, the config-field tables, the legacy key renaming."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch_reference import randomise_batch_norms
from transformers import DetrConfig, ResNetConfig, ResNetForImageClassification, ResNetModel, SwinConfig, ViTConfig
from transformers.activations import ACT2FN

from cvjax.convert import common, detr, from_transformers, huggingface, swin, vit


CONFIGS = {
    "basic": dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[2, 1, 1, 1]),
    # Stem width differs from the first stage: HF then puts a projection shortcut on stage 1, block 0.
    "basic_projected_stage1": dict(layer_type="basic", embedding_size=6, hidden_sizes=[8, 16, 16, 24],
                                   depths=[1, 1, 1, 1]),
    "bottleneck_v1.5": dict(layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32, 48, 64],
                            depths=[1, 2, 1, 1]),
    "bottleneck_v1_downsample_first_stage": dict(
        layer_type="bottleneck", embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 2, 1],
        downsample_in_bottleneck=True, downsample_in_first_stage=True),
    # Every other field off its default: activation (HF applies it after the stem and each block only), one
    # input channel, three stages.
    "silu_one_channel_three_stages": dict(layer_type="basic", embedding_size=8, hidden_sizes=[8, 16, 24],
                                          depths=[1, 2, 1], hidden_act="silu", num_channels=1),
}


def _nchw_and_nhwc(shape=(2, 3, 64, 64), seed=0):
  x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_resnet_for_image_classification_logits_match(variant):
  torch.manual_seed(0)
  config = ResNetConfig(num_labels=7, **CONFIGS[variant])
  hf_model = ResNetForImageClassification(config)
  randomise_batch_norms(hf_model)
  hf_model.eval()
  x_nchw, x_nhwc = _nchw_and_nhwc((2, config.num_channels, 64, 64))
  with torch.no_grad():
    expected = hf_model(x_nchw).logits.numpy()

  module, variables = from_transformers(hf_model)
  assert module.activation is common.HF_ACTIVATIONS[config.hidden_act]
  logits = jax.jit(functools.partial(module.apply, train=False))(variables, x_nhwc)
  assert np.abs(expected).max() > 0.1  # not a comparison of near-zeros
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_resnet_model_without_head_gives_the_pooled_features():
  torch.manual_seed(1)
  hf_model = ResNetModel(ResNetConfig(**CONFIGS["bottleneck_v1.5"]))
  randomise_batch_norms(hf_model, seed=1)
  hf_model.eval()
  x_nchw, x_nhwc = _nchw_and_nhwc(seed=1)
  with torch.no_grad():
    expected = hf_model(x_nchw).pooler_output.flatten(1).numpy()
  module, variables = from_transformers(hf_model)
  assert "fc" not in variables["params"]
  np.testing.assert_allclose(jax.jit(functools.partial(module.apply, train=False))(variables, x_nhwc),
                             expected, rtol=1e-4, atol=1e-4)


def test_unsupported_class_and_activation_are_clear_errors():
  with pytest.raises(ValueError, match="ResNetForImageClassification"):
    from_transformers(torch.nn.Linear(2, 2))
  hf_model = ResNetForImageClassification(ResNetConfig(hidden_act="laplace", **CONFIGS["basic"]))
  with pytest.raises(ValueError, match=r"HF ResNetConfig not supported .*hidden_act='laplace'"):
    from_transformers(hf_model)


@pytest.mark.parametrize("name", sorted(common.HF_ACTIVATIONS))
def test_activation_table_matches_transformers(name):
  if name not in ACT2FN:
    pytest.skip(f"this transformers has no {name!r} activation")
  x = np.linspace(-12.0, 12.0, 481, dtype=np.float32)  # beyond gelu_10's clip and relu6's cap
  with torch.no_grad():
    expected = ACT2FN[name](torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(common.HF_ACTIVATIONS[name](jnp.asarray(x)), expected, rtol=1e-5, atol=1e-5)


def _detr_config():
  return DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                    backbone_config=ResNetConfig(out_features=["stage4"]))


@pytest.mark.parametrize("make_config, table", [
    pytest.param(ResNetConfig, huggingface.RESNET_CONFIG_FIELDS, id="ResNetConfig"),
    pytest.param(ViTConfig, vit.CONFIG_FIELDS, id="ViTConfig"),
    pytest.param(SwinConfig, swin.CONFIG_FIELDS, id="SwinConfig"),
    pytest.param(_detr_config, detr.CONFIG_FIELDS, id="DetrConfig"),
    pytest.param(lambda: _detr_config().backbone_config, detr.BACKBONE_CONFIG_FIELDS, id="DetrConfig.backbone"),
])
def test_every_config_field_of_the_installed_transformers_is_accounted_for(make_config, table):
  # A field that a newer transformers adds fails here until the converter decides what to do with it.
  unaccounted = set(make_config().to_dict()) - common.generic_config_fields() - set(table)
  assert not unaccounted, f"transformers {transformers.__version__} config fields the converter ignores"
  assert all(isinstance(use, str) and use for use in table.values())


def test_generic_fields_include_the_base_config_and_refuse_pruned_heads():
  assert {"id2label", "return_dict", "architectures"} <= common.generic_config_fields()
  config = ViTConfig()
  assert common.generic_config_problems(config) == []
  config.pruned_heads = {0: [1]}  # transformers 4.x: prunes heads at construction
  assert common.generic_config_problems(config) == ["pruned_heads={0: [1]} (pruned attention heads are not "
                                                    "supported)"]


def test_rename_keys_rewrites_in_order_drops_and_refuses_collisions():
  rules = ((r"\.old\.", ".new."), (r"^a\.new\.", "b.new."), (r"\.index$", None))
  assert common.rename_keys({"a.old.w": 1, "a.index": 2, "c.w": 3}, rules) == {"b.new.w": 1, "c.w": 3}
  with pytest.raises(ValueError, match=r"keys 'a\.old\.w' and 'b\.new\.w' both map to 'b\.new\.w'"):
    common.rename_keys({"a.old.w": 1, "b.new.w": 2}, rules)
