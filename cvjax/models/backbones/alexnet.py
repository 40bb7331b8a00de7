"""AlexNet in torchvision's layout (the one-GPU variant of Krizhevsky 2014, "One weird trick").

Submodules are named after their index in torchvision's ``features`` / ``classifier`` ``nn.Sequential``
(``features_0``, ``features_3``, ..., ``classifier_1``, ``classifier_4``, ``classifier_6``). The 11x11/4 stem
and three 3x3/2 max-pools need inputs of at least 63x63 pixels; use ``width`` to shrink the convs for CPU tests.

Input: NHWC float32 images already normalised by the input pipeline.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.registry import MODELS

# (torchvision index, channels at width 64, kernel, stride, padding, max-pool after) of each conv.
ALEXNET_CONVS = ((0, 64, 11, 4, 2, True), (3, 192, 5, 1, 2, True), (6, 384, 3, 1, 1, False),
                 (8, 256, 3, 1, 1, False), (10, 256, 3, 1, 1, True))
MIN_INPUT_SIZE = 63


@MODELS.register("alexnet")
class AlexNet(nn.Module):
  """AlexNet classifier.

  Attributes:
    num_classes: size of the last Linear.
    width: channel scale; every conv has ``c * width // 64`` channels (64 is torchvision's AlexNet).
    pool_size: output side of the adaptive average pool (6 in torchvision).
    classifier_width: width of the two hidden Linear layers (4096 in torchvision).
    dropout_rate: classifier dropout (rng ``dropout``).
    dtype: compute dtype; parameters stay float32; logits are returned in float32.
    layer_impl: how convolutions and max-pools run (``layers.conv2d`` / ``layers.max_pool``): ``'xla'`` as
      ``nn.Conv`` / ``nn.max_pool`` do, ``'patches'`` over shifted window views, ``'auto'`` the faster on CPU.
  """
  num_classes: int = 1000
  width: int = 64
  pool_size: int = 6
  classifier_width: int = 4096
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @property
  def head_pool_size(self) -> int:
    """The adaptive pool's output side that the classifier reads."""
    return self.pool_size

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """``[B, H, W, 3]`` (H, W >= 63) -> logits ``[B, num_classes]``."""
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_INPUT_SIZE:
      raise ValueError(f"AlexNet expects NHWC images [B, H, W, C] with H, W >= {MIN_INPUT_SIZE}, got shape "
                       f"{x.shape}")
    for index, channels, kernel, stride, padding, pool in ALEXNET_CONVS:
      x = layers.Conv(channels * self.width // 64, kernel, strides=stride, padding=padding, dtype=self.dtype,
                      impl=self.layer_impl, name=f"features_{index}")(x)
      x = nn.relu(x)
      if pool:
        x = layers.max_pool(x, 3, 2, impl=self.layer_impl)
    x = layers.torchvision_classifier(x, pool_size=self.pool_size, hidden=self.classifier_width,
                                      num_classes=self.num_classes, dropout_rate=self.dropout_rate, train=train,
                                      dropout_first=True, dtype=self.dtype)
    return x.astype(jnp.float32)
