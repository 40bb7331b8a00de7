"""Building blocks shared by the models: a fast ``Conv``, batch norm variants, pooling and stochastic depth.

Everything here is NHWC. Padding follows PyTorch where the models need it (explicit symmetric pads), so that
torchvision / HF weights load without a shift of the sampling grid.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cvjax.ops._args import positive_int_pair

Dtype = Any
IntPair = Union[int, Tuple[int, int]]
Padding = Union[str, int, Sequence[Tuple[int, int]]]

IMPLS = ("auto", "xla", "patches", "xla_gemm_grad")

# XLA:CPU is slow (down to ~2 GFLOP/s) on 3x3 convolutions whose output map is tiny and on the gradients of
# strided and 1x1 convolutions; the same work as one matmul over patches runs at GEMM speed. Measured on the
# project's 2-core AMD EPYC, batch 32, forward + both gradients (ms, lax vs patches):
#   3x3, out 2x2, 512->512: 400 vs 7;   3x3, out 2x2, 64->64: 1.3 vs 0.6;   3x3, out 4x4, 256->256: 9 vs 6
#   3x3/2, 4x4->2x2, 256->512: 85 vs 3; 3x3, out 8x8, 128->128: 5 vs 8;     3x3, out 32x32, 64->64: 52 vs 75
#   1x1, 32x32, 64->256: 98 vs 20;      1x1/2, 16x16, 256->512: 18 vs 6
# Over whole ResNet-18/50 train steps (64x64 inputs, benchmarks/train_step.py) 16 output pixels was the best
# threshold of 4, 16, 64, 256; above it XLA's kernels win and the KH*KW-times larger patches cost memory.
PATCHES_MAX_OUTPUT_PIXELS = 16

# torchvision's ResNet / VGG initialisation of convolutions: He-normal over fan_out (biases zero).
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")
# PyTorch's default nn.Linear / nn.Conv2d weight init, kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), +).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_default_bias_init(fan_in: int) -> Callable:
  """PyTorch's default nn.Linear / nn.Conv2d bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); ``fan_in`` is the
  layer's input size (times the kernel area for a conv), which a flax bias initializer is not given."""
  bound = 1.0 / np.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _explicit_padding(padding: Padding, in_hw, window_hw, strides) -> Tuple[Tuple[int, int], ...]:
  """Canonicalises ``padding`` to ``((top, bottom), (left, right))``; an int pads all sides equally."""
  if isinstance(padding, str):
    return tuple(lax.padtype_to_pads(in_hw, window_hw, strides, padding.upper()))
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(tuple(p) for p in padding)
  if len(pads) != 2 or any(len(p) != 2 for p in pads):
    raise ValueError(f"padding must be 'SAME', 'VALID', an int or ((top, bottom), (left, right)); got {padding!r}")
  return pads


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")


def _window_views(x: jnp.ndarray, window_hw, strides, dilation, out_hw) -> list:
  """The ``KH*KW`` strided views of an already padded ``[B, H, W, C]`` map, each ``[B, Ho, Wo, C]``, in
  row-major window order: view ``(i, j)`` holds the window element ``(i, j)`` of every output pixel."""
  batch, _, _, channels = x.shape
  views = []
  for i in range(window_hw[0]):
    for j in range(window_hw[1]):
      start = (0, i * dilation[0], j * dilation[1], 0)
      limit = (batch, start[1] + (out_hw[0] - 1) * strides[0] + 1, start[2] + (out_hw[1] - 1) * strides[1] + 1,
               channels)
      views.append(lax.slice(x, start, limit, (1, *strides, 1)))
  return views


def conv_uses_patches(out_hw: Tuple[int, int], kernel_hw: Tuple[int, int]) -> bool:
  """The static rule of ``conv2d(impl='auto')``: on CPU, a matmul for 1x1 kernels (no patch blow-up: a 1x1
  conv is a GEMM) and for spatial kernels with at most ``PATCHES_MAX_OUTPUT_PIXELS`` output pixels.

  GPUs and TPUs keep ``lax.conv_general_dilated`` (their convolution kernels are the vendor's; the rule was
  measured on CPU only).
  """
  return jax.default_backend() == "cpu" and (kernel_hw == (1, 1)
                                             or out_hw[0] * out_hw[1] <= PATCHES_MAX_OUTPUT_PIXELS)


# Where XLA:CPU's own kernel gradient loses to KH*KW GEMMs (measured on a 16-core x86 host, fwd + dx + dk):
# Mask R-CNN's mask head 3x3 256->256 over 256 RoIs of 14x14 6.7 s -> 2.6 s, the ResNet stem at 512^2
# 855 -> 464 ms; below about 2^27 multiply-adds or with fewer than 32 output channels GEMMs of a tiny
# [Cin, Cout] output are no faster (3x3 16->16 over 32 maps of 64x64: 97 -> 120 ms).
GEMM_KERNEL_GRAD_MIN_MACS = 2 ** 27
GEMM_KERNEL_GRAD_MIN_COUT = 32


def conv_uses_gemm_kernel_grad(out_pixels: int, kernel_shape: Tuple[int, int, int, int]) -> bool:
  """The static rule of ``conv2d(impl='auto')`` for convolutions it leaves to XLA: on CPU, take the kernel
  gradient as GEMMs (``_conv_gemm_kernel_grad``) when it has at least ``GEMM_KERNEL_GRAD_MIN_MACS``
  multiply-adds (``out_pixels = B * Ho * Wo`` times the kernel size) and ``GEMM_KERNEL_GRAD_MIN_COUT`` outputs."""
  kh, kw, cin, cout = kernel_shape
  return (jax.default_backend() == "cpu" and cout >= GEMM_KERNEL_GRAD_MIN_COUT
          and out_pixels * kh * kw * cin * cout >= GEMM_KERNEL_GRAD_MIN_MACS)


def _lax_conv(x, kernel, strides, pads, dilation):
  return lax.conv_general_dilated(x, kernel, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_gemm_kernel_grad(x, kernel, strides, pads, dilation):
  """``lax.conv_general_dilated`` whose kernel gradient is ``KH * KW`` GEMMs instead of XLA's.

  XLA:CPU computes a convolution's kernel gradient as another convolution (the output gradient as its
  kernel) at a fraction of its forward speed: 3x3 256->256 over 256 maps of 14x14 (a Mask R-CNN mask head
  layer) takes 2.0 s there against 0.38 s forward. ``dK[i, j] = view(i, j)^T dY``, where ``view(i, j)`` is the
  input window element ``(i, j)`` of every output pixel (``_window_views``), is the same sum as
  ``[Cin, B*Ho*Wo] @ [B*Ho*Wo, Cout]`` matmuls at GEMM speed; the forward and the input gradient stay XLA's.
  """
  return _lax_conv(x, kernel, strides, pads, dilation)


def _conv_gemm_kernel_grad_fwd(x, kernel, strides, pads, dilation):
  return _lax_conv(x, kernel, strides, pads, dilation), (x, kernel)


def _conv_gemm_kernel_grad_bwd(strides, pads, dilation, residuals, grad):
  x, kernel = residuals
  _, input_vjp = jax.vjp(lambda v: _lax_conv(v, kernel, strides, pads, dilation), x)
  (dx,) = input_vjp(grad)
  kh, kw, cin, cout = kernel.shape
  views = _window_views(jnp.pad(x, ((0, 0), *pads, (0, 0))), (kh, kw), strides, dilation, grad.shape[1:3])
  flat_grad = grad.reshape(-1, cout)
  contract = (((0,), (0,)), ((), ()))
  dk = jnp.stack([lax.dot_general(v.reshape(-1, cin), flat_grad, contract) for v in views])
  return dx, dk.reshape(kernel.shape).astype(kernel.dtype)


_conv_gemm_kernel_grad.defvjp(_conv_gemm_kernel_grad_fwd, _conv_gemm_kernel_grad_bwd)


def conv2d(x: jnp.ndarray, kernel: jnp.ndarray, *, strides: IntPair = 1, padding: Padding = 0,
           dilation: IntPair = 1, impl: str = "auto") -> jnp.ndarray:
  """2-D cross-correlation, the same function as ``lax.conv_general_dilated`` in NHWC / HWIO.

  Args:
    x: ``[B, H, W, Cin]`` input.
    kernel: ``[KH, KW, Cin, Cout]`` weights (``nn.Conv``'s layout), of ``x``'s dtype.
    strides: window stride, int or ``(sh, sw)``.
    padding: ``'SAME'``, ``'VALID'``, an int (PyTorch's symmetric padding) or ``((top, bottom), (left, right))``.
    dilation: kernel dilation (atrous rate), int or pair.
    impl: ``'xla'`` calls ``lax.conv_general_dilated``; ``'patches'`` (im2col) concatenates the ``KH*KW``
      shifted, strided views of the zero-padded input on the channel axis and does one matmul with the
      kernel reshaped to ``[KH*KW*Cin, Cout]`` (its gradients are matmuls, pads and adds as well);
      ``'xla_gemm_grad'`` is ``'xla'`` with the kernel gradient as ``KH*KW`` matmuls (``_conv_gemm_kernel_grad``);
      ``'auto'`` picks ``'patches'`` where ``conv_uses_patches`` says it is faster, otherwise
      ``'xla_gemm_grad'`` where ``conv_uses_gemm_kernel_grad`` does, otherwise ``'xla'``.

  Returns:
    ``[B, Ho, Wo, Cout]`` in ``x``'s dtype.
  """
  _check_impl(impl)
  if x.ndim != 4 or kernel.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"conv2d expects x [B, H, W, C] and kernel [KH, KW, C, Cout]; got {x.shape} and "
                     f"{kernel.shape}")
  strides = positive_int_pair(strides, "strides")
  dilation = positive_int_pair(dilation, "dilation")
  kh, kw, cin, cout = kernel.shape
  window = ((kh - 1) * dilation[0] + 1, (kw - 1) * dilation[1] + 1)
  pads = _explicit_padding(padding, x.shape[1:3], window, strides)
  out_hw = tuple((x.shape[1 + i] + sum(pads[i]) - window[i]) // strides[i] + 1 for i in range(2))
  if min(out_hw) < 1:
    raise ValueError(f"conv2d: input {x.shape[1:3]} with padding {pads} is smaller than the "
                     f"(dilated) kernel window {window}")
  if impl == "auto" and not conv_uses_patches(out_hw, (kh, kw)):
    impl = "xla_gemm_grad" if conv_uses_gemm_kernel_grad(x.shape[0] * out_hw[0] * out_hw[1], kernel.shape) else "xla"
  if impl == "xla_gemm_grad":
    return _conv_gemm_kernel_grad(x, kernel, strides, pads, dilation)
  if impl == "xla":
    return _lax_conv(x, kernel, strides, pads, dilation)
  views = _window_views(jnp.pad(x, ((0, 0), *pads, (0, 0))), (kh, kw), strides, dilation, out_hw)
  # Channel order (i, j, c) of the patches is the row-major order of kernel.reshape(-1, cout).
  patches = jnp.concatenate(views, axis=-1) if len(views) > 1 else views[0]
  return jnp.dot(patches, kernel.reshape(kh * kw * cin, cout))


class Conv(nn.Module):
  """Drop-in for ``nn.Conv`` (2-D, ungrouped) that runs tiny-map convolutions fast on CPU.

  Same variables as ``nn.Conv``: ``kernel [KH, KW, Cin, Cout]`` and ``bias [Cout]``, so checkpoints and
  converters do not care which is used. ``impl`` (one of ``IMPLS``) is forwarded to ``conv2d``.
  """
  features: int
  kernel_size: IntPair
  strides: IntPair = 1
  padding: Padding = "SAME"
  kernel_dilation: IntPair = 1
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Callable = nn.linear.default_kernel_init
  bias_init: Callable = nn.initializers.zeros
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, Cin]`` -> ``[B, Ho, Wo, features]``."""
    kernel_shape = (*positive_int_pair(self.kernel_size, "kernel_size"), x.shape[-1], self.features)
    kernel = self.param("kernel", self.kernel_init, kernel_shape, self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides=self.strides, padding=self.padding, dilation=self.kernel_dilation,
               impl=self.impl)
    return y + bias if bias is not None else y


def conv_transpose2d(x: jnp.ndarray, kernel: jnp.ndarray, stride: int) -> jnp.ndarray:
  """Unpadded 2-D transposed convolution with PyTorch's / Caffe's semantics (the gradient of a strided conv).

  ``out[y, x', o] = sum_{i, j, c} in[i, j, c] * kernel[y - stride * i, x' - stride * j, c, o]``.

  Args:
    x: ``[B, H, W, Cin]``.
    kernel: ``[KH, KW, Cin, Cout]`` (PyTorch's ``ConvTranspose2d.weight`` ``[Cin, Cout, KH, KW]`` transposed
      ``(2, 3, 0, 1)``).
    stride: the upsampling factor.

  Returns:
    ``[B, (H - 1) * stride + KH, (W - 1) * stride + KW, Cout]``.
  """
  kh, kw = kernel.shape[:2]
  if kh == kw == stride:
    # Non-overlapping taps (U-Net's and Mask R-CNN's 2x2 / 2): output pixel (s i + a, s j + b) is x[i, j] @
    # kernel[a, b] -- one matmul and a depth-to-space, ~10x faster on CPU than the dilated convolution below.
    b, h, w, _ = x.shape
    return jnp.einsum("bijc,adco->biajdo", x, kernel).reshape(b, stride * h, stride * w, kernel.shape[-1])
  # The scatter above is a correlation of the stride-dilated input with the flipped kernel, fully padded.
  return lax.conv_general_dilated(x, kernel[::-1, ::-1], (1, 1), ((kh - 1, kh - 1), (kw - 1, kw - 1)),
                                  lhs_dilation=(stride, stride), dimension_numbers=("NHWC", "HWIO", "NHWC"))


class ConvTranspose(nn.Module):
  """PyTorch's ``ConvTranspose2d(Cin, features, kernel_size, stride)`` (no padding) as ``conv_transpose2d``.

  Variables ``kernel [k, k, Cin, features]`` (PyTorch's weight transposed ``(2, 3, 0, 1)``, *not* flipped: the
  taps of flax's ``nn.ConvTranspose`` are the mirror image) and ``bias [features]`` when ``use_bias``.
  """
  features: int
  kernel_size: int
  stride: int
  use_bias: bool = True
  kernel_init: Callable = nn.linear.default_kernel_init  # flax's nn.ConvTranspose default (LeCun normal)
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, h, w, Cin]`` -> ``[B, (h - 1) * stride + k, (w - 1) * stride + k, features]``."""
    kernel = self.param("kernel", self.kernel_init, (self.kernel_size, self.kernel_size, x.shape[-1],
                                                     self.features), jnp.float32)
    bias = self.param("bias", self.bias_init, (self.features,), jnp.float32) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv_transpose2d(x, kernel, self.stride)
    return y + bias if bias is not None else y


def torch_dense(features: int, fan_in: int, name: str | None = None) -> nn.Dense:
  """``nn.Dense`` initialised as PyTorch's default ``nn.Linear(fan_in, features)``."""
  return nn.Dense(features, kernel_init=torch_default_kernel_init, bias_init=torch_default_bias_init(fan_in),
                  name=name)


class PredictionMLP(nn.Module):
  """The query heads of DETR-style models (DETR's box MLP, MaskFormer's mask embedder): ``num_layers``
  PyTorch-initialised Dense layers ``layers_<i>``, ReLU between, ``[..., d]`` -> ``[..., output_dim]``."""
  hidden_dim: int
  output_dim: int
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    for i in range(self.num_layers):
      last = i == self.num_layers - 1
      x = torch_dense(self.output_dim if last else self.hidden_dim, x.shape[-1], f"layers_{i}")(x)
      if not last:
        x = nn.relu(x)
    return x


class FrozenBatchNorm(nn.Module):
  """Batch norm that always normalises with its stored statistics and is never trained.

  Its four arrays (``scale``, ``bias``, ``mean``, ``var``, each ``[C]``) live in the ``batch_stats``
  collection, not in ``params``: the optimizer never sees them (so weight decay cannot move them either) and,
  since nothing writes them, a train step returns them unchanged. This is torchvision's FrozenBatchNorm2d,
  whose four tensors are buffers, as DETR uses it. Computed in float32, returned in ``dtype``.
  """
  epsilon: float = 1e-5
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[..., C]`` -> ``[..., C]``."""
    shape = (x.shape[-1],)
    scale = self.variable("batch_stats", "scale", jnp.ones, shape, jnp.float32).value
    bias = self.variable("batch_stats", "bias", jnp.zeros, shape, jnp.float32).value
    mean = self.variable("batch_stats", "mean", jnp.zeros, shape, jnp.float32).value
    var = self.variable("batch_stats", "var", jnp.ones, shape, jnp.float32).value
    multiplier = scale * lax.rsqrt(var + self.epsilon)
    y = x.astype(jnp.float32) * multiplier + (bias - mean * multiplier)
    return y.astype(self.dtype or x.dtype)


def batch_norm(*, train: bool, frozen: bool = False, dtype: Dtype | None = None,
               scale_init: Callable = nn.initializers.ones, name: str | None = None) -> nn.Module:
  """The batch norm of the torchvision-layout models: PyTorch's momentum (0.1, i.e. flax 0.9) and eps 1e-5.

  ``frozen=True`` gives a ``FrozenBatchNorm`` (``scale_init`` then does not apply). Note that PyTorch updates
  ``running_var`` with the unbiased batch variance where flax uses the biased one; inference is identical.
  """
  if frozen:
    return FrozenBatchNorm(dtype=dtype, name=name)
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=dtype,
                      scale_init=scale_init, name=name)


def max_pool(x: jnp.ndarray, window: int, stride: int, padding: int = 0, impl: str = "auto") -> jnp.ndarray:
  """PyTorch's ``MaxPool2d(window, stride, padding)`` (floor mode) on ``[B, H, W, C]``.

  Padded cells never win; a NaN in a window gives NaN. The gradient goes to the first maximum of each window
  in row-major order, as in PyTorch and in XLA's ``select_and_scatter``.

  ``impl``: ``'xla'`` (and ``'xla_gemm_grad'``, which concerns convolutions) is ``nn.max_pool``
  (``reduce_window``); ``'patches'`` takes the elementwise max over
  the ``window**2`` strided views and routes the gradient with a first-hit mask; ``'auto'`` uses
  ``'patches'`` on CPU, where XLA's ``select_and_scatter`` gradient is 3-14x slower than that (ResNet stem,
  VGG and AlexNet pools, measured forward + gradient).
  """
  _check_impl(impl)
  pads = ((padding, padding), (padding, padding))
  if impl in ("xla", "xla_gemm_grad") or (impl == "auto" and jax.default_backend() != "cpu"):
    return nn.max_pool(x, (window, window), (stride, stride), pads)
  out_hw = tuple((x.shape[1 + i] + 2 * padding - window) // stride + 1 for i in range(2))
  if min(out_hw) < 1:
    raise ValueError(f"max_pool: input {x.shape[1:3]} with padding {padding} is smaller than the window {window}")
  padded = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)
  views = _window_views(padded, (window, window), (stride, stride), (1, 1), out_hw)
  maximum = lax.stop_gradient(functools.reduce(jnp.maximum, views))
  out, taken = jnp.zeros_like(maximum), jnp.zeros(maximum.shape, bool)
  for view in views:
    hit = (view == maximum) & ~taken
    out, taken = jnp.where(hit, view, out), taken | hit
  # Only a NaN window has no hit: keep its NaN.
  return jnp.where(taken, out, maximum)


def _adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """``[size_out, size_in]`` averaging weights of PyTorch's adaptive pooling bins.

  Bin ``i`` covers ``[floor(i * in / out), ceil((i + 1) * in / out))``; bins overlap or repeat when
  ``in`` is not a multiple of ``out``, and replicate pixels when ``in < out``.
  """
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(x: jnp.ndarray, output_size: int) -> jnp.ndarray:
  """PyTorch's ``AdaptiveAvgPool2d(output_size)``: ``[B, H, W, C]`` -> ``[B, S, S, C]``.

  Two small averaging matrices and one einsum: exact bin semantics, static shapes, a dense gradient.
  """
  h, w = x.shape[1:3]
  if (h, w) == (output_size, output_size):
    return x
  rows = jnp.asarray(_adaptive_pool_matrix(h, output_size), x.dtype)
  cols = jnp.asarray(_adaptive_pool_matrix(w, output_size), x.dtype)
  return jnp.einsum("ph,bhwc,qw->bpqc", rows, x, cols)


def torchvision_classifier(x: jnp.ndarray, *, pool_size: int, hidden: int, num_classes: int, dropout_rate: float,
                           train: bool, dropout_first: bool, dtype: Dtype | None = None) -> jnp.ndarray:
  """torchvision's AlexNet / VGG head on a feature map ``[B, H, W, C]``: ``AdaptiveAvgPool2d(pool_size)``,
  flatten (NHWC order: converters permute the first Linear's rows from PyTorch's NCHW flatten), three Linears.

  VGG orders each hidden stage Linear, ReLU, Dropout; AlexNet Dropout, Linear, ReLU (``dropout_first``). The
  Dense layers are named ``classifier_<i>`` after their index in torchvision's ``nn.Sequential``. Dropout
  draws from the ``dropout`` rng in training.

  Returns:
    ``[B, num_classes]`` logits.
  """
  x = adaptive_avg_pool(x, pool_size)
  x = x.reshape(x.shape[0], -1)
  linear_offset = 1 if dropout_first else 0
  dense_init = nn.initializers.normal(0.01)  # torchvision's VGG init for Linear layers
  for stage in range(2):
    if dropout_first:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
    x = nn.Dense(hidden, dtype=dtype, kernel_init=dense_init, name=f"classifier_{3 * stage + linear_offset}")(x)
    x = nn.relu(x)
    if not dropout_first:
      x = nn.Dropout(dropout_rate, deterministic=not train)(x)
  return nn.Dense(num_classes, dtype=dtype, kernel_init=dense_init, name="classifier_6")(x)


class DropPath(nn.Module):
  """Stochastic depth: zeroes a whole sample's residual branch with probability ``rate`` (rng ``'dropout'``)
  and scales the kept ones by ``1 / (1 - rate)``."""
  rate: float

  @nn.compact
  def __call__(self, x: jnp.ndarray, *, deterministic: bool) -> jnp.ndarray:
    if deterministic or self.rate == 0.0:
      return x
    keep_prob = 1.0 - self.rate
    keep = jax.random.bernoulli(self.make_rng("dropout"), keep_prob, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(keep, x / keep_prob, 0.0).astype(x.dtype)
