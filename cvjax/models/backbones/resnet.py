"""ResNet v1.5 (He et al. 2016; torchvision layout) and its plain, shortcut-free twin for the degradation study.

Submodule names mirror torchvision's attribute paths with ``.`` written ``_`` (``layer1_0/conv1``,
``layer2_0/downsample_0`` is the 1x1 projection conv and ``downsample_1`` its BN, ``fc``), so
``cvjax.convert`` maps a torchvision ``state_dict`` one key to one leaf.

Input: NHWC float32 images already normalised by the input pipeline (ImageNet mean/std).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.registry import MODELS


BLOCK_EXPANSION = {"basic": 1, "bottleneck": 4}
# Stem conv (kernel, stride); the ImageNet stem is followed by a 3x3/2 max-pool.
STEM_CONVS = {"imagenet": (7, 2), "cifar": (3, 1)}


class ResidualBlock(nn.Module):
  """A basic (two 3x3) or bottleneck (1x1, 3x3, 1x1) block; ``residual=False`` drops the shortcut.

  Attributes:
    features: output channels. A bottleneck's inner width is ``features // 4``.
    block_type: ``'basic'`` or ``'bottleneck'``.
    strides: stride of the block; in a bottleneck it sits on the 3x3 (v1.5) unless ``stride_in_1x1`` (v1).
    dilation: dilation of the 3x3 convolution(s) (padding equals the dilation, as in torchvision).
    residual: with a shortcut (identity, or 1x1 conv + BN when the shape changes) or plain.
    zero_init_last_bn: start the last BN's scale at 0, so that the block starts as the identity.
    frozen_bn: use ``FrozenBatchNorm`` (statistics and affine in ``batch_stats``, never trained).
    activation: applied to the block's output, after the residual sum (HF ``hidden_act``); between its
      convolutions it is always relu, as in HF.
  """
  features: int
  block_type: str = "basic"
  strides: int = 1
  dilation: int = 1
  residual: bool = True
  stride_in_1x1: bool = False
  zero_init_last_bn: bool = False
  frozen_bn: bool = False
  dtype: Any = jnp.float32
  layer_impl: str = "auto"
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
    """``[B, H, W, Cin]`` -> ``[B, H / strides, W / strides, features]``."""
    conv = functools.partial(layers.Conv, use_bias=False, dtype=self.dtype, kernel_init=layers.conv_kernel_init,
                             impl=self.layer_impl)
    norm = functools.partial(layers.batch_norm, train=train, frozen=self.frozen_bn, dtype=self.dtype)
    d = self.dilation
    if self.block_type == "basic":
      specs = [(self.features, 3, self.strides, d), (self.features, 3, 1, d)]
    elif self.block_type == "bottleneck":
      inner = self.features // 4
      stride_1x1, stride_3x3 = (self.strides, 1) if self.stride_in_1x1 else (1, self.strides)
      specs = [(inner, 1, stride_1x1, 1), (inner, 3, stride_3x3, d), (self.features, 1, 1, 1)]
    else:
      raise ValueError(f"block_type must be 'basic' or 'bottleneck', got {self.block_type!r}")

    y = x
    for i, (features, kernel, stride, dilation) in enumerate(specs, start=1):
      y = conv(features, kernel, strides=stride, padding=dilation * (kernel // 2), kernel_dilation=dilation,
               name=f"conv{i}")(y)
      last = i == len(specs)
      scale_init = nn.initializers.zeros if last and self.zero_init_last_bn else nn.initializers.ones
      y = norm(scale_init=scale_init, name=f"bn{i}")(y)
      if not last:
        y = nn.relu(y)
    if self.residual:
      shortcut = x
      if self.strides != 1 or x.shape[-1] != self.features:
        shortcut = conv(self.features, 1, strides=self.strides, padding=0, name="downsample_0")(x)
        shortcut = norm(name="downsample_1")(shortcut)
      y = y + shortcut
    return self.activation(y)


class ResNet(nn.Module):
  """ResNet classifier / backbone.

  Attributes:
    stage_sizes: blocks per stage, e.g. ``(2, 2, 2, 2)`` for ResNet-18.
    block_type: ``'basic'`` or ``'bottleneck'``.
    num_classes: classes of the ``fc`` head; ``0`` returns the pooled ``[B, C]`` features instead.
    width: base width (64 in the paper); stage ``i`` outputs ``width * 2**i * expansion`` channels and the
      stem ``width`` (4..16 keeps CPU tests fast).
    stem_width, stage_widths: explicit channel counts overriding ``width`` (HF configs' ``embedding_size``
      and ``hidden_sizes``).
    stem: ``'imagenet'`` (7x7/2 conv + 3x3/2 max-pool, output stride 4) or ``'cifar'`` (3x3/1 conv, no
      pool: for 32x32 inputs, all strides below are then 4x smaller).
    residual: False gives the plain network (same layers, no shortcuts, no projection convs).
    stride_in_1x1: stride on the first 1x1 of a bottleneck (ResNet v1, HF ``downsample_in_bottleneck``)
      instead of on the 3x3 (v1.5, torchvision).
    downsample_in_first_stage: stride 2 in the first stage too (HF option).
    dilate_last_stage: replace the last stage's stride by dilation 2 (DETR's DC5: C5 at stride 16).
    replace_stride_with_dilation: one flag per stage after the first (torchvision's argument of that name):
      a flagged stage keeps its input resolution and multiplies the dilation by its stride instead, e.g.
      ``(False, True, True)`` for the FCN / DeepLab backbones (C4 and C5 at stride 8). ``dilate_last_stage``
      flags the last stage as well.
    zero_init_last_bn: zero-init the last BN scale of every block (Goyal et al. 2017).
    frozen_bn: ``FrozenBatchNorm`` everywhere (affine and statistics in ``batch_stats``, not in
      ``params``, so no optimizer updates them; train and eval behave the same). For DETR.
    frozen_stages: with trainable batch norm, the stem and the first ``frozen_stages`` stages normalise with
      their running statistics in training too and never update them (mmdetection's ``frozen_stages``): a
      part whose parameters the optimizer freezes (``config.optimizer.freeze``) is then frozen whole, as
      DETR's frozen batch norm does for its stem and ``layer1``. 0 = none.
    dtype: compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32, logits are returned in float32.
    layer_impl: how convolutions and max-pools run (``layers.conv2d`` / ``layers.max_pool``): ``'xla'`` as
      ``nn.Conv`` / ``nn.max_pool`` do, ``'patches'`` over shifted window views, ``'auto'`` the faster on CPU.
    activation: the stem's and every block's output activation (HF ``hidden_act``; relu in torchvision and
      the paper); inside the blocks it is always relu, as in HF.
  """
  stage_sizes: Sequence[int]
  block_type: str = "basic"
  num_classes: int = 1000
  width: int = 64
  stem_width: Optional[int] = None
  stage_widths: Optional[Sequence[int]] = None
  stem: str = "imagenet"
  residual: bool = True
  stride_in_1x1: bool = False
  downsample_in_first_stage: bool = False
  dilate_last_stage: bool = False
  replace_stride_with_dilation: Optional[Sequence[bool]] = None
  zero_init_last_bn: bool = False
  frozen_bn: bool = False
  frozen_stages: int = 0
  dtype: Any = jnp.float32
  layer_impl: str = "auto"
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  def _dilated_stages(self) -> Sequence[bool]:
    """Per stage: whether its stride is replaced by dilation (``replace_stride_with_dilation`` and
    ``dilate_last_stage`` resolved; the first stage never is, as in torchvision)."""
    flags = [False] * len(self.stage_sizes)
    if self.replace_stride_with_dilation is not None:
      if len(self.replace_stride_with_dilation) != len(self.stage_sizes) - 1:
        raise ValueError(f"replace_stride_with_dilation needs one flag per stage after the first "
                         f"({len(self.stage_sizes) - 1}), got {tuple(self.replace_stride_with_dilation)}")
      flags[1:] = [bool(flag) for flag in self.replace_stride_with_dilation]
    if self.dilate_last_stage:
      flags[-1] = True
    return flags

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool,
               return_features: bool = False) -> Union[jnp.ndarray, Dict[str, jnp.ndarray]]:
    """Classifies ``[B, H, W, 3]`` images.

    Returns:
      logits ``[B, num_classes]`` (float32), pooled features ``[B, C]`` if ``num_classes == 0``, or with
      ``return_features=True`` the stage outputs ``{'c2': [B, H/4, W/4, C2], ..., 'c5': [B, H/32, W/32, C5]}``
      (the head is then not applied; strides are /1../8 with ``stem='cifar'``; a dilated stage keeps the
      stride of the one before it, so C5 is /16 with ``dilate_last_stage``).
    """
    if x.ndim != 4:
      raise ValueError(f"ResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
    expansion = BLOCK_EXPANSION.get(self.block_type)
    if expansion is None:
      raise ValueError(f"block_type must be one of {sorted(BLOCK_EXPANSION)}, got {self.block_type!r}")
    stage_widths = self.stage_widths or [self.width * 2**i * expansion for i in range(len(self.stage_sizes))]
    if len(stage_widths) != len(self.stage_sizes):
      raise ValueError(f"stage_widths {stage_widths} and stage_sizes {self.stage_sizes} differ in length")

    if self.stem not in STEM_CONVS:
      raise ValueError(f"stem must be one of {sorted(STEM_CONVS)}, got {self.stem!r}")
    kernel, stride = STEM_CONVS[self.stem]
    x = layers.Conv(self.stem_width or self.width, kernel, strides=stride, padding=kernel // 2, use_bias=False,
                    dtype=self.dtype, kernel_init=layers.conv_kernel_init, impl=self.layer_impl, name="conv1")(x)
    if not 0 <= self.frozen_stages <= len(self.stage_sizes):
      raise ValueError(f"frozen_stages must be in [0, {len(self.stage_sizes)}], got {self.frozen_stages}")
    x = self.activation(layers.batch_norm(train=train and self.frozen_stages == 0, frozen=self.frozen_bn,
                                          dtype=self.dtype, name="bn1")(x))
    if self.stem == "imagenet":
      x = layers.max_pool(x, 3, 2, padding=1, impl=self.layer_impl)

    dilated_stages = self._dilated_stages()
    features = {}
    dilation = 1
    for stage, (num_blocks, features_out) in enumerate(zip(self.stage_sizes, stage_widths)):
      stride = 2 if stage > 0 or self.downsample_in_first_stage else 1
      # As torchvision's replace_stride_with_dilation: the stage's first block keeps the previous dilation.
      first_dilation = dilation
      if dilated_stages[stage]:
        dilation, stride = dilation * stride, 1
      for block in range(num_blocks):
        x = ResidualBlock(
            features_out, block_type=self.block_type, strides=stride if block == 0 else 1,
            dilation=first_dilation if block == 0 else dilation, residual=self.residual,
            stride_in_1x1=self.stride_in_1x1, zero_init_last_bn=self.zero_init_last_bn,
            frozen_bn=self.frozen_bn, dtype=self.dtype, layer_impl=self.layer_impl, activation=self.activation,
            name=f"layer{stage + 1}_{block}")(x, train=train and stage >= self.frozen_stages)
      features[f"c{stage + 2}"] = x
    if return_features:
      return features

    x = jnp.mean(x, axis=(1, 2))
    if self.num_classes == 0:
      return x.astype(jnp.float32)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name="fc")(x)
    return x.astype(jnp.float32)


_ARCHITECTURES = {
    "resnet18": ("basic", (2, 2, 2, 2), True),
    "resnet34": ("basic", (3, 4, 6, 3), True),
    "resnet50": ("bottleneck", (3, 4, 6, 3), True),
    "resnet101": ("bottleneck", (3, 4, 23, 3), True),
    "resnet152": ("bottleneck", (3, 8, 36, 3), True),
    "plain18": ("basic", (2, 2, 2, 2), False),
    "plain34": ("basic", (3, 4, 6, 3), False),
}

for _name, (_block, _sizes, _residual) in _ARCHITECTURES.items():
  MODELS.register(_name)(functools.partial(ResNet, stage_sizes=_sizes, block_type=_block, residual=_residual))
