"""from_transformers: HF ResNets (random weights and BN statistics, no download) against their conversion."""

import functools

import jax
import numpy as np
import pytest
import torch
from torch_reference import randomise_batch_norms
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

from cvjax.convert import from_transformers


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
}


def _nchw_and_nhwc(shape=(2, 3, 64, 64), seed=0):
  x = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1)


@pytest.mark.parametrize("variant", sorted(CONFIGS))
def test_resnet_for_image_classification_logits_match(variant):
  torch.manual_seed(0)
  hf_model = ResNetForImageClassification(ResNetConfig(num_labels=7, **CONFIGS[variant]))
  randomise_batch_norms(hf_model)
  hf_model.eval()
  x_nchw, x_nhwc = _nchw_and_nhwc()
  with torch.no_grad():
    expected = hf_model(x_nchw).logits.numpy()

  module, variables = from_transformers(hf_model)
  logits = jax.jit(functools.partial(module.apply, train=False))(variables, x_nhwc)
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
  hf_model = ResNetForImageClassification(ResNetConfig(hidden_act="gelu", **CONFIGS["basic"]))
  with pytest.raises(ValueError, match="hidden_act 'gelu'"):
    from_transformers(hf_model)
