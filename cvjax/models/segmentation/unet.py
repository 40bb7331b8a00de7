"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

A contracting path of `depth` levels (two 3x3 convolutions + ReLU, then a 2x2 max-pool; channels double per
level from `width`), a bottom level, and an expanding path that upsamples by 2 (halving the channels),
concatenates the contracting path's feature map of the same level (the skip connection) and applies two 3x3
convolutions; a 1x1 convolution gives the class scores. The paper: width 64, depth 4 (64 .. 1024 channels),
unpadded convolutions, no normalisation, dropout at the end of the contracting path.

Options:
  upsample: 'transpose' -- the paper's "up-convolution", a learned 2x2 stride-2 transposed convolution;
    'bilinear' -- bilinear x2 resizing (half-pixel centres, as PyTorch's align_corners=False) followed by a 1x1
    convolution that halves the channels: the fixed-interpolation alternative the ablation compares.
  skips: False drops the concatenations (an encoder-decoder without skip connections, the ablation's baseline).
  padding: 'same' -- zero-padded 3x3 convolutions, every level's maps keep their size (inputs must be divisible
    by 2**depth); 'valid' -- the paper's unpadded convolutions: each lowers a side by 2, and the skip maps are
    cropped centrally to the decoder's size before the concatenation. The valid network's output is smaller
    than its input (572 -> 388 for the paper's net), so, as in the paper's overlap-tile strategy, the input is
    first extended by mirroring (reflect padding, `valid_input_padding`) to the size whose output covers the
    whole image, and the output is cut back to the input size: `logits` are always at the input resolution.
  batch_norm: BatchNorm after every 3x3 convolution (not in the paper; it lets the small CPU presets train
    quickly at a high learning rate).

Returns ``{'logits': [B, H, W, num_classes]}`` (float32, NHWC, input resolution).
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.registry import MODELS

UPSAMPLE_MODES = ("transpose", "bilinear")
PADDING_MODES = ("same", "valid")


def valid_output_side(side: int, depth: int) -> int | None:
  """Output side of the valid-padding U-Net of `depth` levels for an input side, or None when a pooled map
  would have an odd side (the 2x2 pools need even sides, as the paper's input tile sizes ensure)."""
  for _ in range(depth):
    side -= 4
    if side < 2 or side % 2:
      return None
    side //= 2
  side -= 4
  for _ in range(depth):
    side = 2 * side - 4
  return side if side > 0 else None


def valid_input_padding(side: int, depth: int) -> Tuple[int, int]:
  """(before, after) mirror padding of an input side for the valid-padding U-Net: the smallest padded side
  whose output covers `side` pixels, with `before` = half the network's shrinkage so that output pixel j is
  input pixel j (the valid convolutions are centred)."""
  shrink = 12 * 2**depth - 8  # 4 pixels per conv pair per level, at the input scale: 184 for depth 4
  padded = side + shrink
  while valid_output_side(padded, depth) is None or valid_output_side(padded, depth) < side:
    padded += 1
  before = shrink // 2
  return before, padded - side - before


def _center_crop(x: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
  top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
  return x[:, top:top + height, left:left + width]


class UNet(nn.Module):
  """U-Net; see the module docstring for the options.

  Attributes:
    num_classes: output classes K.
    width: channels of the first level (64 in the paper); level i has `width * 2**i`.
    depth: number of 2x2 poolings (4 in the paper).
    upsample, skips, padding, batch_norm: see the module docstring.
    dropout_rate: dropout on the bottom level's output (the paper's "drop-out layers at the end of the
      contracting path"; rate not given there, 0.5 in its Caffe model).
    dtype: compute dtype; logits are returned in float32.
    layer_impl: how convolutions run (`layers.conv2d`).
  """
  num_classes: int
  width: int = 64
  depth: int = 4
  upsample: str = "transpose"
  skips: bool = True
  padding: str = "valid"
  batch_norm: bool = False
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  def _double_conv(self, x: jnp.ndarray, features: int, name: str, train: bool) -> jnp.ndarray:
    pad = 1 if self.padding == "same" else 0
    for i in (1, 2):
      x = layers.Conv(features, 3, padding=pad, use_bias=not self.batch_norm, dtype=self.dtype,
                      kernel_init=layers.conv_kernel_init, impl=self.layer_impl, name=f"{name}_conv{i}")(x)
      if self.batch_norm:
        x = layers.batch_norm(train=train, dtype=self.dtype, name=f"{name}_bn{i}")(x)
      x = nn.relu(x)
    return x

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> Dict[str, jnp.ndarray]:
    """``images [B, H, W, C]`` -> ``{'logits': [B, H, W, num_classes]}``."""
    if self.upsample not in UPSAMPLE_MODES:
      raise ValueError(f"UNet upsample must be one of {UPSAMPLE_MODES}, got {self.upsample!r}")
    if self.padding not in PADDING_MODES:
      raise ValueError(f"UNet padding must be one of {PADDING_MODES}, got {self.padding!r}")
    if images.ndim != 4:
      raise ValueError(f"UNet expects NHWC images [B, H, W, C], got shape {images.shape}")
    _, height, width, _ = images.shape
    x = images
    if self.padding == "same":
      if height % 2**self.depth or width % 2**self.depth:
        raise ValueError(f"UNet with padding='same' and depth {self.depth} needs sides divisible by "
                         f"{2**self.depth}, got {height} x {width}")
    else:
      pads = [valid_input_padding(side, self.depth) for side in (height, width)]
      x = jnp.pad(x, ((0, 0), *pads, (0, 0)), mode="reflect")

    skips = []
    for level in range(self.depth):
      x = self._double_conv(x, self.width * 2**level, f"down{level}", train)
      skips.append(x)
      x = layers.max_pool(x, 2, 2, impl=self.layer_impl)
    x = self._double_conv(x, self.width * 2**self.depth, "bottom", train)
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)

    for level in reversed(range(self.depth)):
      features = self.width * 2**level
      if self.upsample == "transpose":
        x = layers.ConvTranspose(features, 2, 2, dtype=self.dtype, name=f"up{level}_upconv")(x)
      else:
        b, h, w, c = x.shape
        x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "bilinear")
        x = layers.Conv(features, 1, padding=0, dtype=self.dtype, kernel_init=layers.conv_kernel_init,
                        impl=self.layer_impl, name=f"up{level}_conv1x1")(x)
      if self.skips:
        x = jnp.concatenate([_center_crop(skips[level], x.shape[1], x.shape[2]), x], axis=-1)
      x = self._double_conv(x, features, f"up{level}", train)

    logits = layers.Conv(self.num_classes, 1, padding=0, dtype=self.dtype, impl=self.layer_impl,
                         name="classifier")(x)
    return {"logits": logits[:, :height, :width].astype(jnp.float32)}


MODELS.register("unet")(UNet)
MODELS.register("unet_small")(functools.partial(UNet, width=16, depth=3, padding="same", batch_norm=True))
