"""from_torch_state_dict against PyTorch models with torchvision's module layout, written here.

torchvision is not installable, so the reference models below are written from torchvision's architecture
(same attribute names and Sequential indices); their ``state_dict()`` is what a torchvision checkpoint holds.
"""

import functools

import jax
import numpy as np
import pytest
import torch
from torch import nn
from torch_reference import randomise_batch_norms

from cvjax.convert import from_torch_state_dict


class TorchBlock(nn.Module):
  """torchvision's BasicBlock (expansion 1) or Bottleneck (expansion 4, stride on the 3x3)."""

  def __init__(self, in_channels, planes, stride, bottleneck):
    super().__init__()
    out_channels = planes * (4 if bottleneck else 1)
    kernels = [1, 3, 1] if bottleneck else [3, 3]
    widths = [planes, planes, out_channels] if bottleneck else [planes, out_channels]
    strides = [1, stride, 1] if bottleneck else [stride, 1]
    channels = in_channels
    for i, (kernel, width, s) in enumerate(zip(kernels, widths, strides), start=1):
      setattr(self, f"conv{i}", nn.Conv2d(channels, width, kernel, s, kernel // 2, bias=False))
      setattr(self, f"bn{i}", nn.BatchNorm2d(width))
      channels = width
    self.num_convs = len(kernels)
    self.downsample = None
    if stride != 1 or in_channels != out_channels:
      self.downsample = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                                      nn.BatchNorm2d(out_channels))

  def forward(self, x):
    y = x
    for i in range(1, self.num_convs + 1):
      y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
      if i < self.num_convs:
        y = torch.relu(y)
    return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class TorchResNet(nn.Module):
  """torchvision's ResNet with a base ``width`` (64 there)."""

  def __init__(self, depths, bottleneck, width, num_classes):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(width)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    channels = width
    for stage, depth in enumerate(depths):
      blocks = []
      for block in range(depth):
        stride = 2 if stage > 0 and block == 0 else 1
        blocks.append(TorchBlock(channels, width * 2**stage, stride, bottleneck))
        channels = width * 2**stage * (4 if bottleneck else 1)
      setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
    self.fc = nn.Linear(channels, num_classes)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.fc(x.mean((2, 3)))


class TorchVGGOrAlexNet(nn.Module):
  """torchvision's VGG / AlexNet: ``features``, ``avgpool``, ``classifier``."""

  def __init__(self, features, pool_size, classifier):
    super().__init__()
    self.features, self.avgpool, self.classifier = features, nn.AdaptiveAvgPool2d(pool_size), classifier

  def forward(self, x):
    return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def torch_vgg11(width, batch_norm, pool_size, hidden, num_classes):
  layers, channels = [], 3
  for v in [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]:  # torchvision's cfg "A"
    if v == "M":
      layers.append(nn.MaxPool2d(2, 2))
      continue
    layers.append(nn.Conv2d(channels, v * width // 64, 3, padding=1))
    channels = v * width // 64
    layers += [nn.BatchNorm2d(channels), nn.ReLU()] if batch_norm else [nn.ReLU()]
  classifier = nn.Sequential(nn.Linear(channels * pool_size**2, hidden), nn.ReLU(), nn.Dropout(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(), nn.Linear(hidden, num_classes))
  return TorchVGGOrAlexNet(nn.Sequential(*layers), pool_size, classifier)


def torch_alexnet(width, hidden, num_classes):
  c = [v * width // 64 for v in (64, 192, 384, 256, 256)]
  features = nn.Sequential(
      nn.Conv2d(3, c[0], 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
      nn.Conv2d(c[0], c[1], 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
      nn.Conv2d(c[1], c[2], 3, padding=1), nn.ReLU(), nn.Conv2d(c[2], c[3], 3, padding=1), nn.ReLU(),
      nn.Conv2d(c[3], c[4], 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2))
  classifier = nn.Sequential(nn.Dropout(), nn.Linear(c[4] * 36, hidden), nn.ReLU(), nn.Dropout(),
                             nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
  return TorchVGGOrAlexNet(features, 6, classifier)


CASES = {
    "resnet18": lambda: (TorchResNet([1, 2, 1, 1], False, 8, 7),
                         dict(width=8, num_classes=7, stage_sizes=(1, 2, 1, 1)), 64),
    "resnet50": lambda: (TorchResNet([1, 1, 2, 1], True, 4, 7),
                         dict(width=4, num_classes=7, stage_sizes=(1, 1, 2, 1)), 64),
    # Frozen BN reads the same keys and in eval mode computes what nn.BatchNorm2d computes.
    "resnet50_frozen_bn": lambda: (TorchResNet([1, 1, 1, 1], True, 4, 7),
                                   dict(width=4, num_classes=7, stage_sizes=(1, 1, 1, 1), frozen_bn=True), 64),
    # A 2x2 final map pooled to 3x3 (overlapping adaptive bins): 9 distinct positions in the flatten.
    "vgg11": lambda: (torch_vgg11(8, False, 3, 16, 7),
                      dict(width=8, pool_size=3, classifier_width=16, num_classes=7), 64),
    "vgg11_bn": lambda: (torch_vgg11(8, True, 3, 16, 7),
                         dict(width=8, pool_size=3, classifier_width=16, num_classes=7), 64),
    # 127x127 leaves a 3x3 map that the 6x6 adaptive pool replicates: the default AlexNet head.
    "alexnet": lambda: (torch_alexnet(8, 16, 7), dict(width=8, classifier_width=16, num_classes=7), 127),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_converted_logits_match_torch(case):
  torch.manual_seed(0)
  torch_model, kwargs, side = CASES[case]()
  torch_model = randomise_batch_norms(torch_model)
  x = np.random.default_rng(0).standard_normal((2, 3, side, side), dtype=np.float32)
  with torch.no_grad():
    expected = torch_model(torch.from_numpy(x)).numpy()

  module, variables = from_torch_state_dict(case.removesuffix("_frozen_bn"), torch_model.state_dict(), **kwargs)
  logits = jax.jit(functools.partial(module.apply, train=False))(variables, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_mismatched_state_dicts_list_every_problem():
  state_dict = TorchResNet([1, 1, 1, 1], False, 4, 5).state_dict()
  kwargs = dict(width=4, num_classes=5, stage_sizes=(1, 1, 1, 1))
  assert "bn1.num_batches_tracked" in state_dict  # ignored, as it must be

  broken = dict(state_dict)
  del broken["layer2.0.downsample.0.weight"]
  broken["layer9.0.conv1.weight"] = broken["layer1.0.conv1.weight"]
  with pytest.raises(ValueError) as error:
    from_torch_state_dict("resnet18", broken, **kwargs)
  assert "missing keys: ['layer2.0.downsample.0.weight']" in str(error.value)
  assert "unexpected keys: ['layer9.0.conv1.weight']" in str(error.value)

  with pytest.raises(ValueError) as error:
    from_torch_state_dict("resnet18", state_dict, **dict(kwargs, num_classes=6))
  assert "fc.weight: shape (5, 32) ((32, 5) in flax layout), but the model's params/fc/kernel is (32, 6)" in \
      str(error.value)
  assert "fc.bias: shape (5,)" in str(error.value)
