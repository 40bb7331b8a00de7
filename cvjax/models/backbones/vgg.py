"""VGG-11/13/16/19 with and without batch norm (Simonyan & Zisserman 2015; torchvision layout).

Submodules are named after their index in torchvision's ``features`` / ``classifier`` ``nn.Sequential``
(``features_0`` is the first conv, ``features_1`` its BN in the ``_bn`` variants, ``classifier_0`` the first
Linear), so ``cvjax.convert`` maps torchvision checkpoints key for key.

Small inputs: after five 2x2 max-pools a 32x32 image is a 1x1 map, which torchvision's 7x7 adaptive pool
would replicate 49 times into a 25088-wide first Linear (100M parameters). For CIFAR-sized training pass
``small_input=True``: the CIFAR-style head, global average pool -> dropout -> one Linear (``classifier``). A
narrow three-Linear head (hidden width = last conv width, no normalisation) was tried and its ReLUs died within
the first 100 steps on `shapes`, leaving the net at chance; the single Linear cannot die. ``pool_size`` /
``classifier_width`` set explicitly give torchvision's three-Linear head at that size instead.
``width`` scales every conv.

As a backbone (FCN), ``return_features=True`` returns the output of every max-pool instead of the logits, and
``ceil_mode=True`` rounds the pooled sizes up as Caffe's pooling layers do (PyTorch's ``ceil_mode``).

Input: NHWC float32 images already normalised by the input pipeline.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.registry import MODELS


# Conv output channels at width 64; "M" is a 2x2 / 2 max-pool. Configurations A, B, D and E of the paper.
VGG_CHANNELS = {
    "vgg11": (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg13": (64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"),
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512,
              "M"),
}


class VGG(nn.Module):
  """VGG classifier.

  Attributes:
    channels: conv output channels at ``width=64``, ``'M'`` for a max-pool (``VGG_CHANNELS``).
    batch_norm: a BN after every conv (the ``vgg*_bn`` models).
    num_classes: size of the last Linear.
    width: channel scale; every conv has ``c * width // 64`` channels.
    small_input: for 32x32 inputs: global average pool, dropout and one Linear ``classifier`` (unless
      ``pool_size`` or ``classifier_width`` is given).
    pool_size: output side of the adaptive average pool before the classifier (default 7 as in torchvision).
    classifier_width: width of the two hidden Linear layers (default 4096 as in torchvision).
    dropout_rate: dropout of the classifier (rng ``dropout``).
    dtype: compute dtype; parameters stay float32; logits are returned in float32.
    layer_impl: how convolutions and max-pools run (``layers.conv2d`` / ``layers.max_pool``): ``'xla'`` as
      ``nn.Conv`` / ``nn.max_pool`` do, ``'patches'`` over shifted window views, ``'auto'`` the faster on CPU.
    ceil_mode: pooled sides ``ceil(H / 2)`` instead of ``floor(H / 2)`` (Caffe's rounding, PyTorch's
      ``MaxPool2d(ceil_mode=True)``): an odd side's last row / column is pooled on its own.
  """
  channels: Sequence[Union[int, str]]
  batch_norm: bool = False
  num_classes: int = 1000
  width: int = 64
  small_input: bool = False
  pool_size: Optional[int] = None
  classifier_width: Optional[int] = None
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  layer_impl: str = "auto"
  ceil_mode: bool = False

  @property
  def head_pool_size(self) -> int:
    """The adaptive pool's output side that the classifier reads (``pool_size`` resolved)."""
    if self.pool_size is not None:
      return self.pool_size
    return 7

  @property
  def head_width(self) -> int:
    """Width of the hidden Linears (``classifier_width`` resolved)."""
    if self.classifier_width is not None:
      return self.classifier_width
    return 4096

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False) -> Union[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """``[B, H, W, 3]`` (H, W >= 32) -> logits ``[B, num_classes]``, or with ``return_features=True`` the
    max-pool outputs ``{'pool1': [B, H/2, W/2, C1], ..., 'pool5': [B, H/32, W/32, C5]}`` in the compute dtype
    (sides rounded down, or up with ``ceil_mode``; the classifier is then not applied)."""
    if x.ndim != 4 or min(x.shape[1:3]) < 32:
      raise ValueError(f"VGG expects NHWC images [B, H, W, C] with H, W >= 32, got shape {x.shape}")
    index = 0  # position in torchvision's `features` Sequential
    pools = {}
    for channels in self.channels:
      if channels == "M":
        if self.ceil_mode:
          # Pad odd sides at the bottom / right with -inf, which never wins: floor then rounds up.
          x = jnp.pad(x, ((0, 0), (0, x.shape[1] % 2), (0, x.shape[2] % 2), (0, 0)), constant_values=-jnp.inf)
        x = layers.max_pool(x, 2, 2, impl=self.layer_impl)
        pools[f"pool{len(pools) + 1}"] = x
        index += 1
        continue
      x = layers.Conv(channels * self.width // 64, 3, padding=1, dtype=self.dtype, kernel_init=layers.conv_kernel_init,
                      impl=self.layer_impl, name=f"features_{index}")(x)
      index += 1
      if self.batch_norm:
        x = layers.batch_norm(train=train, dtype=self.dtype, name=f"features_{index}")(x)
        index += 1
      x = nn.relu(x)
      index += 1
    if return_features:
      return pools
    if self.small_input and self.pool_size is None and self.classifier_width is None:
      x = x.mean(axis=(1, 2))
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
      return nn.Dense(self.num_classes, dtype=self.dtype, name="classifier")(x).astype(jnp.float32)
    x = layers.torchvision_classifier(x, pool_size=self.head_pool_size, hidden=self.head_width,
                                      num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                                      dropout_first=False, dtype=self.dtype)
    return x.astype(jnp.float32)


for _name, _channels in VGG_CHANNELS.items():
  MODELS.register(_name)(functools.partial(VGG, channels=_channels))
  MODELS.register(f"{_name}_bn")(functools.partial(VGG, channels=_channels, batch_norm=True))
