"""from_torch_state_dict against torchvision's own ResNet, VGG and AlexNet (``torchvision.models``).

Every reference is a torchvision class run by its own ``forward``: ResNet-18 and AlexNet as the factories build
them, the bottleneck ResNets as ``ResNet(Bottleneck, layers)`` with fewer blocks per stage (full width:
torchvision has no width knob), and VGG as ``VGG(make_layers(cfgs['A'] at 1/8 width, batch_norm))`` whose
hard-coded 25088 x 4096 head is replaced by a small head of the same layout. BatchNorms get random statistics
and affines; ResNets keep torchvision's He init, VGG's and AlexNet's weights (PyTorch's default init there) are
re-drawn at He scale: the logits are then O(1), so that a 1e-4 tolerance is not vacuous.
"""

import functools
import math

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch_reference import randomise_batch_norms

from cvjax.convert import from_torch_state_dict

NUM_CLASSES = 7


def he_normal_weights(model: nn.Module, seed: int = 0) -> nn.Module:
  """Re-draws every conv / Linear weight from N(0, 2 / fan_in) and bias from U(-0.1, 0.1).

  PyTorch's default init shrinks activations by ~sqrt(6) per layer: AlexNet's logits come out ~0.01, where an
  absolute 1e-4 tolerance is a 1% error. He scale keeps them O(1) through the ReLUs.
  """
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (nn.Conv2d, nn.Linear)):
        fan_in = module.weight[0].numel()
        module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2 / fan_in))
        if module.bias is not None:
          module.bias.copy_(torch.rand(module.bias.shape, generator=generator) * 0.2 - 0.1)
  return model


def small_vgg11(torchvision, batch_norm: bool, width: int, pool_size: int, hidden: int) -> nn.Module:
  """torchvision's VGG-11 at ``width / 64`` of its channels with a ``hidden``-wide head on a ``pool_size`` pool,
  He-scaled."""
  vgg = torchvision.models.vgg
  features = vgg.make_layers([v if v == "M" else v * width // 64 for v in vgg.cfgs["A"]], batch_norm=batch_norm)
  # The constructor's 120M-parameter head is replaced below: build it on the meta device (no memory, no init).
  with torch.device("meta"):
    model = vgg.VGG(features, num_classes=NUM_CLASSES)
  model.avgpool = nn.AdaptiveAvgPool2d(pool_size)
  channels = 512 * width // 64
  model.classifier = nn.Sequential(  # torchvision's head layout, narrower
      nn.Linear(channels * pool_size**2, hidden), nn.ReLU(True), nn.Dropout(),
      nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(), nn.Linear(hidden, NUM_CLASSES))
  return he_normal_weights(model)


def bottleneck_resnet(torchvision, layers, **kwargs) -> nn.Module:
  resnet = torchvision.models.resnet
  return resnet.ResNet(resnet.Bottleneck, layers, num_classes=NUM_CLASSES, **kwargs)


# case -> (cvjax model name, torch model from torchvision, cvjax kwargs, input side)
CASES = {
    # 64x64: C5 is 2x2, so the global pool averages distinct positions.
    "resnet18": ("resnet18", lambda tv: tv.models.resnet18(num_classes=NUM_CLASSES), {}, 64),
    "resnet50": ("resnet50", lambda tv: bottleneck_resnet(tv, [1, 1, 2, 1]), dict(stage_sizes=(1, 1, 2, 1)), 64),
    # Frozen BN reads the same keys and in eval mode computes what nn.BatchNorm2d computes.
    "resnet50_frozen_bn": ("resnet50", lambda tv: bottleneck_resnet(tv, [1, 1, 1, 1]),
                           dict(stage_sizes=(1, 1, 1, 1), frozen_bn=True), 64),
    # DC5: layer4's first block keeps dilation 1 with stride 1, its second is dilated by 2 (C5 is 4x4 here).
    "resnet50_dc5": ("resnet50", lambda tv: bottleneck_resnet(tv, [1, 1, 1, 2],
                                                              replace_stride_with_dilation=[False, False, True]),
                     dict(stage_sizes=(1, 1, 1, 2), dilate_last_stage=True), 64),
    # A 2x2 final map pooled to 3x3 (overlapping adaptive bins): 9 distinct positions in the flatten.
    "vgg11": ("vgg11", lambda tv: small_vgg11(tv, False, 8, 3, 16),
              dict(width=8, pool_size=3, classifier_width=16), 64),
    "vgg11_bn": ("vgg11_bn", lambda tv: small_vgg11(tv, True, 8, 3, 16),
                 dict(width=8, pool_size=3, classifier_width=16), 64),
    # Full size; 191x191 leaves a 5x5 map that the 6x6 adaptive pool spreads over overlapping bins.
    "alexnet": ("alexnet", lambda tv: he_normal_weights(tv.models.alexnet(num_classes=NUM_CLASSES)), {}, 191),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_match_torchvision(torchvision, case):
  name, build, kwargs, side = CASES[case]
  torch.manual_seed(0)  # torchvision's own init draws from the global generator
  torch_model = randomise_batch_norms(build(torchvision))
  x = np.random.default_rng(0).standard_normal((2, 3, side, side), dtype=np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()
  assert expected.shape == (2, NUM_CLASSES) and expected.std() > 0.1  # O(1) logits: 1e-4 is a real tolerance

  module, variables = from_torch_state_dict(name, torch_model.state_dict(), num_classes=NUM_CLASSES, **kwargs)
  logits = jax.jit(functools.partial(module.apply, train=False))(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_mismatched_state_dicts_list_every_problem(torchvision):
  resnet = torchvision.models.resnet
  state_dict = resnet.ResNet(resnet.BasicBlock, [1, 1, 1, 1], num_classes=5).state_dict()
  kwargs = dict(num_classes=5, stage_sizes=(1, 1, 1, 1))
  assert "bn1.num_batches_tracked" in state_dict  # ignored, as it must be
  from_torch_state_dict("resnet18", state_dict, **kwargs)  # the intact checkpoint converts

  broken = dict(state_dict)
  del broken["layer2.0.downsample.0.weight"]
  broken["layer9.0.conv1.weight"] = broken["layer1.0.conv1.weight"]
  with pytest.raises(ValueError) as error:
    from_torch_state_dict("resnet18", broken, **kwargs)
  assert "missing keys: ['layer2.0.downsample.0.weight']" in str(error.value)
  assert "unexpected keys: ['layer9.0.conv1.weight']" in str(error.value)

  with pytest.raises(ValueError) as error:
    from_torch_state_dict("resnet18", state_dict, **dict(kwargs, num_classes=6))
  assert "fc.weight: shape (5, 512) ((512, 5) in flax layout), but the model's params/fc/kernel is (512, 6)" in \
      str(error.value)
  assert "fc.bias: shape (5,)" in str(error.value)
