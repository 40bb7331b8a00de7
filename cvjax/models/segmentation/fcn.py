"""FCN: the fully convolutional networks of Long, Shelhamer & Darrell (2015) and torchvision's ``fcn_resnet*``.

``FCN`` (registered ``fcn32s``, ``fcn16s``, ``fcn8s``) is the paper's VGG-16 net: the VGG module's conv1_1 ..
conv5_3 and five max-pools (``backbone/features_<i>``, torchvision's numbering), ``fc6`` = 7x7 conv and ``fc7`` =
1x1 conv (ReLU + dropout each), ``score_fr`` a 1x1 conv to K classes, then upsampling by transposed convolutions
initialised to bilinear interpolation. FCN-16s adds a 1x1 ``score_pool4`` on pool4 to the 2x upsampled scores
(``upscore2``), FCN-8s also a ``score_pool3`` on pool3 (after ``upscore_pool4``); the skip scores and ``score_fr``
start at zero (paper, Sec. 4.2-4.3), so a 16s / 8s net starts from its coarser net's scores (interpolated a
little more smoothly: bilinear 2x then 16x is an 80-tap kernel, not the 64-tap bilinear 32x; equal on linear
maps). The 2x upsamplings are learned (K -> K transposed convs, bilinear per class at init); the final 32x / 16x /
8x one is a fixed per-class bilinear interpolation, not a parameter.

``FCNResNet`` (``fcn_resnet50``, ``fcn_resnet101``, and ``fcn_resnet18`` on basic blocks for CPU runs) is
torchvision's model of that name: a ResNet with ``replace_stride_with_dilation=(False, True, True)`` (output stride
8), an FCNHead (3x3 conv to in/4 channels, BN, ReLU, dropout 0.1, 1x1 conv to K) on layer4, bilinear resizing to
the input size (``F.interpolate(mode='bilinear', align_corners=False)``) and, with ``aux_loss``, the same head on
layer3. Submodules carry torchvision's names with ``.N`` written ``_N`` (``backbone/layer1_0/conv1``,
``classifier_0``, ``aux_classifier_4``), so ``cvjax.convert.fcn`` maps a ``state_dict`` by one rule.

Both return ``{'logits': [B, H, W, K]}`` (float32, the input's H and W; FCNResNet adds ``aux_logits``). Inputs are
NHWC float32 images already normalised by the input pipeline.

Geometry of the VGG nets. Every layer maps an output pixel o to the input coordinate of its window centre,
``stride * o + (kernel - 1) / 2 - padding``; a transposed conv (kernel k, stride s) maps its output y back by the
inverse, ``(y - (k - 1) / 2) / s``. Composing them (Caffe's ``crop`` layer does the same):

* ``input_padding=100`` (the Caffe model: conv1_1 padded by 100, fc6 unpadded, pools rounding up): pool_n's pixel
  o sits at ``2^n o + (2^n - 1) / 2 - 99``, so pool5 at ``32 o - 83.5``, ``score_fr`` at ``32 o + 12.5`` and the
  64 / 32 stride-32 upsampling at ``y - 19``: crop 19. ``upscore2`` (kernel 4, stride 2) is at ``16 y - 11.5`` and
  pool4 at ``16 o - 91.5``: pool4's scores are cropped at 5; the fused map, ``upscore_pool4`` at ``8 y - 23.5``
  against pool3 at ``8 o - 95.5``: crop 9; the final upsamplings (32 / 16 and 16 / 8) land at ``y - 27`` and
  ``y - 31``. With the pools rounding up, pool5 has at least ``(H + 198) / 32`` pixels, so every crop fits its
  map for any input size H (the x32 upsampling gives at least ``H + 38 = H + 2 * 19`` pixels, 16s and 8s likewise).
* ``input_padding=0`` ('same' convolutions, fc6 padded by 3; for inputs divisible by 32, which the pools then
  halve exactly): pool_n's pixel o sits at ``2^n o + (2^n - 1) / 2`` and ``score_fr`` at ``32 o + 15.5``, so the
  2x upsamplings are one pixel early (``upscore2`` at ``16 y - 8.5``, pool4 at ``16 o + 7.5``): the skips are not
  cropped and the upsampled maps are cropped by 1 (a kernel-4 stride-2 transposed conv with padding 1, an exact
  2x); the final crops are 16 / 8 / 4 (padding k/4: an exact 32x / 16x / 8x). Without the 100 pixels of padding
  a 32x32 input costs ~50x less ((32 + 198)^2 / 32^2 conv1 pixels), for the CPU presets.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Dict, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvjax.models import layers
from cvjax.models.backbones.resnet import ResNet
from cvjax.models.backbones.vgg import VGG, VGG_CHANNELS
from cvjax.models.registry import MODELS


# ---- bilinear transposed convolutions ------------------------------------------------------------------------

def bilinear_filter(size: int) -> np.ndarray:
  """The 1-D factor ``[size]`` of the bilinear-interpolation kernel of a stride-``ceil(size / 2)`` transposed
  conv (Caffe's ``bilinear`` filler, the FCN code's ``upsample_filt``): ``1 - |i - centre| / factor``.

  For ``size = 2 * factor`` the taps two strides apart sum to 1, so the transposed conv reproduces constant and
  linear maps away from its borders (its output pixel y interpolates the input at ``(y - (size - 1) / 2) /
  factor``).
  """
  factor = (size + 1) // 2
  centre = factor - 1 if size % 2 == 1 else factor - 0.5
  return (1 - np.abs(np.arange(size) - centre) / factor).astype(np.float32)


def per_class_bilinear_init(key, shape, dtype=jnp.float32) -> jnp.ndarray:
  """Initialiser of a ``[k, k, C, C]`` transposed-conv kernel: bilinear from class c to class c, zero across
  classes (what the FCN code's ``interp`` surgery writes into its deconvolutions)."""
  del key
  size, size_w, channels, channels_out = shape
  if size != size_w or channels != channels_out:
    raise ValueError(f"a per-class bilinear kernel is [k, k, C, C], got {shape}")
  f = bilinear_filter(size)
  kernel = np.einsum("i,j,cd->ijcd", f, f, np.eye(channels, dtype=np.float32))
  return jnp.asarray(kernel, dtype)


def _upsampling_matrix(size_in: int, factor: int, offset: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]``: row y of the per-channel bilinear transposed conv (kernel ``2 * factor``, stride
  ``factor``) whose output is cropped at ``offset``: ``M[y, i] = f[y + offset - factor * i]``."""
  f = bilinear_filter(2 * factor)
  taps = np.arange(size_out)[:, None] + offset - factor * np.arange(size_in)[None, :]
  return np.where((taps >= 0) & (taps < f.size), f[np.clip(taps, 0, f.size - 1)], 0.0).astype(np.float32)


def fixed_bilinear_upsample(x: jnp.ndarray, factor: int, offset: int, size: Tuple[int, int]) -> jnp.ndarray:
  """The FCN's final, fixed upsampling: ``conv_transpose2d`` of every channel with the bilinear kernel of side
  ``2 * factor`` (no mixing of classes), cropped to ``size`` at ``(offset, offset)``.

  The kernel is separable, so this is two small constant matrices and one einsum (exact, a dense gradient, and
  ~K times cheaper than a grouped transposed conv).

  Args:
    x: ``[B, h, w, C]`` scores.
    factor: the stride (32, 16 or 8).
    offset: the crop offset, the same on both axes.
    size: ``(H, W)`` of the output.

  Returns:
    ``[B, H, W, C]`` in ``x``'s dtype.
  """
  h, w = x.shape[1:3]
  for axis, (side, out) in enumerate(zip((h, w), size)):
    full = (side - 1) * factor + 2 * factor
    if offset + out > full:
      raise ValueError(f"fixed_bilinear_upsample: a crop of {out} at {offset} on axis {axis + 1} does not fit the "
                       f"{full} pixels that x{factor} upsampling of {side} gives")
  rows = jnp.asarray(_upsampling_matrix(h, factor, offset, size[0]), x.dtype)
  cols = jnp.asarray(_upsampling_matrix(w, factor, offset, size[1]), x.dtype)
  return jnp.einsum("yh,bhwc,xw->byxc", rows, x, cols)


# ---- the paper's VGG-16 FCNs -------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Geometry:
  """Paddings and crop offsets of one ``input_padding`` mode (derived in the module docstring).

  Attributes:
    fc6_padding: padding of the 7x7 fc6.
    skip_offsets: ``{pool index: crop offset}`` of the pool4 / pool3 score maps.
    upsampled_offset: crop offset of the 2x upsampled scores before a fusion.
    final_offsets: ``{stride: crop offset}`` of the final upsampling.
  """
  fc6_padding: int
  skip_offsets: Dict[int, int]
  upsampled_offset: int
  final_offsets: Dict[int, int]


GEOMETRIES = {
    100: Geometry(fc6_padding=0, skip_offsets={4: 5, 3: 9}, upsampled_offset=0, final_offsets={32: 19, 16: 27, 8: 31}),
    0: Geometry(fc6_padding=3, skip_offsets={4: 0, 3: 0}, upsampled_offset=1, final_offsets={32: 16, 16: 8, 8: 4}),
}
# Per stride, the pools whose scores are fused, coarse to fine.
SKIP_POOLS = {32: (), 16: (4,), 8: (4, 3)}


def _crop(x: jnp.ndarray, offset: int, size: Tuple[int, int]) -> jnp.ndarray:
  """``x[:, offset:offset + H, offset:offset + W]`` for ``size = (H, W)``."""
  return x[:, offset:offset + size[0], offset:offset + size[1]]


class FCN(nn.Module):
  """FCN-32s / 16s / 8s on VGG-16 (Long et al. 2015).

  Attributes:
    num_classes: K, the classes scored per pixel (21 for PASCAL VOC, background included).
    stride: 32 (FCN-32s), 16 (FCN-16s: + pool4) or 8 (FCN-8s: + pool3 as well).
    input_padding: 100 (the Caffe model, any input size) or 0 ('same' convs, H and W divisible by 32); see the
      module docstring for the crops each implies.
    width: VGG base width (64 in the paper; the conv widths are 64, 128, 256, 512, 512 times ``width / 64``).
    fc_width: channels of fc6 and fc7 (4096 in the paper).
    dropout_rate: after fc6 and after fc7 (rng ``dropout``, in training only).
    batch_norm: VGG-16 with batch norm after every convolution (torchvision's ``vgg16_bn`` layout; not in the
      paper, whose VGG-16 had none): lets the CPU presets train from scratch.
    dtype: compute dtype; parameters stay float32 and the logits are returned in float32.
    layer_impl: how convolutions and max-pools run (``layers.conv2d``).
  """
  num_classes: int = 21
  stride: int = 32
  input_padding: int = 100
  width: int = 64
  fc_width: int = 4096
  dropout_rate: float = 0.5
  batch_norm: bool = False
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> Dict[str, jnp.ndarray]:
    """``[B, H, W, 3]`` -> ``{'logits': [B, H, W, num_classes]}``."""
    if self.stride not in SKIP_POOLS:
      raise ValueError(f"FCN stride must be one of {sorted(SKIP_POOLS)} (FCN-32s/16s/8s), got {self.stride}")
    if self.input_padding not in GEOMETRIES:
      raise ValueError(f"FCN input_padding must be one of {sorted(GEOMETRIES)}, got {self.input_padding}")
    if x.ndim != 4:
      raise ValueError(f"FCN expects NHWC images [B, H, W, C], got shape {x.shape}")
    size = x.shape[1:3]
    if self.input_padding == 0 and (size[0] % 32 or size[1] % 32):
      raise ValueError(f"FCN with input_padding=0 needs H and W divisible by 32, got images of shape {x.shape} "
                       f"(input_padding=100 takes any size)")
    geometry = GEOMETRIES[self.input_padding]
    if self.input_padding:
      # conv1_1's own padding is 1: 99 more zeros make the Caffe model's 100.
      pad = self.input_padding - 1
      x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    pools = VGG(VGG_CHANNELS["vgg16"], batch_norm=self.batch_norm, width=self.width, ceil_mode=True,
                dtype=self.dtype, layer_impl=self.layer_impl, name="backbone")(x, train=train, return_features=True)

    conv = functools.partial(layers.Conv, dtype=self.dtype, impl=self.layer_impl)
    y = pools["pool5"]
    for name, kernel, padding in (("fc6", 7, geometry.fc6_padding), ("fc7", 1, 0)):
      y = conv(self.fc_width, kernel, padding=padding, kernel_init=layers.conv_kernel_init, name=name)(y)
      y = nn.Dropout(self.dropout_rate, deterministic=not train)(nn.relu(y))
    # Zero-initialised scoring layers (paper, Sec. 4.3: random init was neither better nor faster).
    score = functools.partial(conv, self.num_classes, 1, padding=0, kernel_init=nn.initializers.zeros)
    y = score(name="score_fr")(y)

    for stage, pool in enumerate(SKIP_POOLS[self.stride]):
      # Learnable, bias-free (Caffe's Deconvolution with bias_term: false), bilinear per class at init.
      name = "upscore2" if stage == 0 else f"upscore_pool{pool + 1}"
      upsampled = layers.ConvTranspose(self.num_classes, 4, 2, use_bias=False, kernel_init=per_class_bilinear_init,
                                       dtype=self.dtype, name=name)(y)
      skip = score(name=f"score_pool{pool}")(pools[f"pool{pool}"])
      skip_offset, up_offset = geometry.skip_offsets[pool], geometry.upsampled_offset
      # The common extent: the upsampled map's with input_padding=100 (Caffe crops the skip to it), the skip's
      # with 0.
      fused_size = tuple(min(u - up_offset, s - skip_offset) for u, s in zip(upsampled.shape[1:3], skip.shape[1:3]))
      y = _crop(upsampled, up_offset, fused_size) + _crop(skip, skip_offset, fused_size)

    y = fixed_bilinear_upsample(y, self.stride, geometry.final_offsets[self.stride], size)
    return {"logits": y.astype(jnp.float32)}


# ---- torchvision's dilated-ResNet FCN ----------------------------------------------------------------------

def fcn_head(x: jnp.ndarray, *, num_classes: int, name: str, train: bool, dropout_rate: float, dtype: Any,
             layer_impl: str) -> jnp.ndarray:
  """torchvision's ``FCNHead`` inside the calling compact module: 3x3 conv (no bias) to ``C // 4`` channels,
  BN, ReLU, dropout, 1x1 conv to ``num_classes``; layers ``<name>_0``, ``<name>_1`` and ``<name>_4`` after their
  index in its ``nn.Sequential``. PyTorch's default conv init, as torchvision leaves it. ``[B, h, w, C]`` ->
  ``[B, h, w, num_classes]``."""
  inner = x.shape[-1] // 4
  conv = functools.partial(layers.Conv, dtype=dtype, impl=layer_impl, kernel_init=layers.torch_default_kernel_init)
  x = conv(inner, 3, padding=1, use_bias=False, name=f"{name}_0")(x)
  x = nn.relu(layers.batch_norm(train=train, dtype=dtype, name=f"{name}_1")(x))
  x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  return conv(num_classes, 1, padding=0, bias_init=layers.torch_default_bias_init(inner), name=f"{name}_4")(x)


def resize_bilinear(x: jnp.ndarray, size: Tuple[int, int]) -> jnp.ndarray:
  """``[B, h, w, C]`` -> ``[B, H, W, C]`` as ``F.interpolate(mode='bilinear', align_corners=False)`` upsamples
  (half-pixel centres, edge samples clamped; ``antialias`` only matters when shrinking, and is off)."""
  return jax.image.resize(x, (x.shape[0], *size, x.shape[-1]), method="bilinear", antialias=False)


class FCNResNet(nn.Module):
  """torchvision's ``fcn_resnet50`` / ``fcn_resnet101`` layout on any ResNet.

  Attributes:
    stage_sizes, block_type, width: the backbone ResNet's (``cvjax.models.backbones.resnet.ResNet``).
    num_classes: K (21 for torchvision's VOC-label checkpoints, background included).
    aux_loss: also return ``aux_logits`` from an FCNHead on layer3 (torchvision's ``aux_classifier``).
    replace_stride_with_dilation: of layer2..layer4; ``(False, True, True)`` gives output stride 8.
    dropout_rate: of the heads (0.1 in torchvision; rng ``dropout``, in training only).
    dtype: compute dtype; parameters stay float32 and the logits are returned in float32.
    layer_impl: how convolutions and max-pools run (``layers.conv2d``).
  """
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  block_type: str = "bottleneck"
  num_classes: int = 21
  width: int = 64
  aux_loss: bool = False
  replace_stride_with_dilation: Sequence[bool] = (False, True, True)
  dropout_rate: float = 0.1
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, train: bool) -> Dict[str, jnp.ndarray]:
    """``[B, H, W, 3]`` -> ``{'logits': [B, H, W, K]}`` (and ``'aux_logits'`` of the same shape with
    ``aux_loss``)."""
    if x.ndim != 4:
      raise ValueError(f"FCNResNet expects NHWC images [B, H, W, C], got shape {x.shape}")
    if len(self.stage_sizes) != 4:
      raise ValueError(f"FCNResNet reads layer3 and layer4 of a four-stage ResNet, got stage_sizes "
                       f"{tuple(self.stage_sizes)}")
    features = ResNet(self.stage_sizes, block_type=self.block_type, num_classes=0, width=self.width,
                      replace_stride_with_dilation=self.replace_stride_with_dilation, dtype=self.dtype,
                      layer_impl=self.layer_impl, name="backbone")(x, train=train, return_features=True)
    head = functools.partial(fcn_head, num_classes=self.num_classes, train=train, dropout_rate=self.dropout_rate,
                             dtype=self.dtype, layer_impl=self.layer_impl)
    size = x.shape[1:3]
    outputs = {"logits": resize_bilinear(head(features["c5"], name="classifier").astype(jnp.float32), size)}
    if self.aux_loss:
      outputs["aux_logits"] = resize_bilinear(head(features["c4"], name="aux_classifier").astype(jnp.float32), size)
    return outputs


for _stride in SKIP_POOLS:
  MODELS.register(f"fcn{_stride}s")(functools.partial(FCN, stride=_stride))

_RESNETS = {"fcn_resnet18": ("basic", (2, 2, 2, 2)), "fcn_resnet50": ("bottleneck", (3, 4, 6, 3)),
            "fcn_resnet101": ("bottleneck", (3, 4, 23, 3))}
for _name, (_block, _sizes) in _RESNETS.items():
  MODELS.register(_name)(functools.partial(FCNResNet, stage_sizes=_sizes, block_type=_block))
