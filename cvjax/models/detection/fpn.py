"""Feature Pyramid Network (Lin et al. 2017) as torchvision builds it (``torchvision.ops.FeaturePyramidNetwork``).

Per input level a 1x1 lateral conv (``inner_blocks_i``) to ``out_channels``; top-down from the coarsest level,
the running map is resized to the next finer lateral's size with PyTorch's ``nearest`` interpolation and added
to it; a 3x3 conv (``layer_blocks_i``) on every sum gives ``P_i``. Extra levels:

  ``'max_pool'``  P6 = ``max_pool(P5, kernel 1, stride 2)``, i.e. every other pixel (Faster / Mask R-CNN's
                  ``pool`` level, used by the RPN only);
  ``'p6p7'``      P6 = 3x3/2 conv of P5 or of C5 (``p6p7_source``), P7 = 3x3/2 conv of ReLU(P6) (RetinaNet;
                  torchvision's ``retinanet_resnet50_fpn`` takes P5, its ``_v2`` and the paper C5);
  ``'none'``      no extra level.

Initialisation as torchvision: every conv ``kaiming_uniform(a=1)`` (i.e. ``U(+-sqrt(3 / fan_in))``), biases zero.
Maps are NHWC; the output is a dict ``{level: [B, H_l, W_l, out_channels]}`` keyed by the pyramid level
``l`` (stride ``2 ** l`` for ResNet's C2..C5 with the ImageNet stem).
"""

from __future__ import annotations

from typing import Dict, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cvjax.models import layers

# torchvision's FPN convs: kaiming_uniform_(a=1) -> gain sqrt(2 / (1 + 1)) = 1, bound sqrt(3 / fan_in).
fpn_kernel_init = nn.initializers.variance_scaling(1.0, "fan_in", "uniform")
EXTRA_BLOCKS = ("max_pool", "p6p7", "none")


def nearest_resize(x: jnp.ndarray, size: Sequence[int]) -> jnp.ndarray:
  """PyTorch ``interpolate(mode='nearest', size=size)`` of ``[B, H, W, C]``: source index
  ``min(floor(dst * (in / out)), in - 1)`` per axis, the scale computed in float32 as PyTorch does."""
  out = x
  for axis, new in zip((1, 2), size):
    old = x.shape[axis]
    if old == new:
      continue
    scale = np.float32(old) / np.float32(new)
    index = np.minimum(np.floor(np.arange(new, dtype=np.float32) * scale).astype(np.int64), old - 1)
    out = jnp.take(out, index, axis=axis)
  return out


class FPN(nn.Module):
  """FPN over a backbone's feature maps.

  Attributes:
    out_channels: channels of every output level (256 in the paper).
    extra_blocks: ``'max_pool'`` | ``'p6p7'`` | ``'none'`` (module docstring).
    layer_impl: ``layers.conv2d`` implementation.
    p6p7_source: ``'p5'``, ``'c5'``, or ``'auto'``: C5 when its channels differ from ``out_channels``
      (torchvision's ``LastLevelP6P7(C5 channels, out_channels)``), else P5.
  """
  out_channels: int = 256
  extra_blocks: str = "max_pool"
  layer_impl: str = "auto"
  p6p7_source: str = "auto"

  def _conv(self, kernel: int, stride: int, name: str) -> layers.Conv:
    return layers.Conv(self.out_channels, kernel, strides=stride, padding=kernel // 2,
                       kernel_init=fpn_kernel_init, impl=self.layer_impl, name=name)

  @nn.compact
  def __call__(self, features: Dict[int, jnp.ndarray]) -> Dict[int, jnp.ndarray]:
    """``{level: [B, H_l, W_l, C_l]}`` for consecutive levels (e.g. 2..5) -> ``{level: [B, H_l, W_l,
    out_channels]}`` for the same levels plus the extra ones (6, or 6 and 7)."""
    if self.extra_blocks not in EXTRA_BLOCKS:
      raise ValueError(f"extra_blocks must be one of {EXTRA_BLOCKS}, got {self.extra_blocks!r}")
    levels = sorted(features)
    if not levels or levels != list(range(levels[0], levels[0] + len(levels))):
      raise ValueError(f"FPN needs consecutive feature levels, got {levels}")
    inner = [self._conv(1, 1, f"inner_blocks_{i}")(features[l]) for i, l in enumerate(levels)]
    running = inner[-1]
    outputs = {levels[-1]: self._conv(3, 1, f"layer_blocks_{len(levels) - 1}")(running)}
    for i in range(len(levels) - 2, -1, -1):
      running = inner[i] + nearest_resize(running, inner[i].shape[1:3])
      outputs[levels[i]] = self._conv(3, 1, f"layer_blocks_{i}")(running)
    top = levels[-1]
    if self.extra_blocks == "max_pool":
      outputs[top + 1] = outputs[top][:, ::2, ::2]
    elif self.extra_blocks == "p6p7":
      if self.p6p7_source not in ("auto", "p5", "c5"):
        raise ValueError(f"p6p7_source must be 'auto', 'p5' or 'c5', got {self.p6p7_source!r}")
      use_p5 = self.p6p7_source == "p5" or (self.p6p7_source == "auto"
                                             and features[top].shape[-1] == self.out_channels)
      source = outputs[top] if use_p5 else features[top]
      p6 = self._conv(3, 2, "p6")(source)
      outputs[top + 1] = p6
      outputs[top + 2] = self._conv(3, 2, "p7")(nn.relu(p6))
    return dict(sorted(outputs.items()))
