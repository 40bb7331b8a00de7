"""Swin Transformer (shifted) window attention primitives, in pure jnp.

Reference: microsoft/Swin-Transformer ``swin_transformer.py`` and HF ``transformers`` ``SwinLayer`` (same
semantics and buffers). A Swin block on a ``[B, H, W, C]`` map (``H``, ``W`` multiples of the window, see
``pad_to_window_multiple``) is::

  ws, shift = effective_window_and_shift(H, W, window_size, shift)   # shift = window_size // 2 every 2nd block
  x = jnp.roll(x, (-shift, -shift), axis=(1, 2))                       # only when shift > 0
  windows = window_partition(x, ws).reshape(-1, ws * ws, C)            # [B*nW, N, C]
  q, k, v = ...                                                        # each [B*nW, heads, N, head_dim]
  bias = table[relative_position_index(ws)].transpose(2, 0, 1)         # [heads, N, N], table [(2ws-1)^2, heads]
  out = window_attention(q, k, v, bias, shifted_window_mask(H, W, ws, shift) if shift else None)
  x = window_reverse(out_projected.reshape(-1, ws, ws, C), ws, H, W)
  x = jnp.roll(x, (shift, shift), axis=(1, 2))

Windows are ordered batch-major, then row-major over the window grid (``nW = (H / ws) * (W / ws)``); tokens
inside a window are row-major (``N = ws * ws``).
"""

from __future__ import annotations

from typing import Optional, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops._args import positive_int_pair

Array = jax.Array
WindowSize = Union[int, Tuple[int, int]]

# Swin's additive mask value between tokens of different regions: exp(-100) is not exactly 0, and -100 (rather
# than -inf) is what the reference adds, so outputs match it bit for bit.
MASK_VALUE = -100.0


def _check_divisible(height: int, width: int, window_size: int) -> None:
  if window_size < 1 or height % window_size or width % window_size:
    raise ValueError(f"height and width ({height}, {width}) must be multiples of window_size {window_size}; "
                     "pad with pad_to_window_multiple first")


def window_partition(x: Array, window_size: int) -> Array:
  """Splits ``[B, H, W, C]`` into non-overlapping windows ``[B * nW, ws, ws, C]`` (batch-major, row-major)."""
  if x.ndim != 4:
    raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
  b, h, w, c = x.shape
  _check_divisible(h, w, window_size)
  x = x.reshape(b, h // window_size, window_size, w // window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, c)


def window_reverse(windows: Array, window_size: int, height: int, width: int) -> Array:
  """Inverse of ``window_partition``: ``[B * nW, ws, ws, C]`` -> ``[B, H, W, C]``."""
  _check_divisible(height, width, window_size)
  per_image = (height // window_size) * (width // window_size)
  if windows.ndim != 4 or windows.shape[1:3] != (window_size, window_size) or windows.shape[0] % per_image:
    raise ValueError(f"windows must be [B * {per_image}, {window_size}, {window_size}, C] for a {height}x{width} "
                     f"map, got shape {windows.shape}")
  c = windows.shape[-1]
  x = windows.reshape(-1, height // window_size, width // window_size, window_size, window_size, c)
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(-1, height, width, c)


def relative_position_index(window_size: WindowSize) -> Array:
  """``[N, N]`` int32 index into the ``[(2Wh - 1) * (2Ww - 1), heads]`` relative position bias table.

  For query token ``i`` and key token ``j`` (row-major in the window), ``(dh, dw) = coord_i - coord_j`` and
  ``index = (dh + Wh - 1) * (2 Ww - 1) + (dw + Ww - 1)``.
  """
  wh, ww = positive_int_pair(window_size, "window_size")
  coords = np.stack(np.meshgrid(np.arange(wh), np.arange(ww), indexing="ij")).reshape(2, -1)  # [2, N]
  rel = coords[:, :, None] - coords[:, None, :]  # [2, N, N], query minus key
  return jnp.asarray((rel[0] + wh - 1) * (2 * ww - 1) + (rel[1] + ww - 1), jnp.int32)


def shifted_window_mask(height: int, width: int, window_size: int, shift: int) -> Array:
  """``[nW, N, N]`` float32 additive mask of shifted-window attention: 0 within a region, -100 across.

  After rolling the map by ``-shift``, a window at the bottom/right edge holds tokens from up to 4 regions
  that were not adjacent in the image. Each axis has 3 regions, ``[0, L - ws)``, ``[L - ws, L - shift)`` and
  ``[L - shift, L)`` (the reference's slices ``(0, -ws), (-ws, -shift), (-shift, None)``); tokens of different
  (row region, column region) labels must not attend to each other. The ``L - ws`` boundary falls between
  windows, so ``shift == 0`` gives all zeros.
  """
  _check_divisible(height, width, window_size)
  if not 0 <= shift < window_size:
    raise ValueError(f"shift must be in [0, window_size={window_size}), got {shift}")
  rows, cols = np.arange(height), np.arange(width)
  row_region = (rows >= height - window_size).astype(np.int32) + (rows >= height - shift)
  col_region = (cols >= width - window_size).astype(np.int32) + (cols >= width - shift)
  labels = (row_region[:, None] * 3 + col_region[None, :]).reshape(
      height // window_size, window_size, width // window_size, window_size)
  labels = labels.transpose(0, 2, 1, 3).reshape(-1, window_size * window_size)  # [nW, N]
  mask = np.where(labels[:, :, None] != labels[:, None, :], MASK_VALUE, 0.0)
  return jnp.asarray(mask, jnp.float32)


def window_attention(q: Array, k: Array, v: Array, bias: Optional[Array] = None, mask: Optional[Array] = None,
                     scale: Optional[float] = None, return_weights: bool = False):
  """Multi-head attention inside each window: ``softmax(q * scale @ k^T + bias + mask) @ v``.

  Args:
    q, k, v: ``[B * nW, heads, N, head_dim]`` (windows batch-major as from ``window_partition``).
    bias: optional ``[heads, N, N]`` relative position bias, shared by all windows.
    mask: optional ``[nW, N, N]`` additive mask (``shifted_window_mask``); window ``i`` of every image uses
      ``mask[i % nW]`` (the leading axis is reshaped to ``[B, nW]``).
    scale: logit scale applied to ``q``; default ``head_dim ** -0.5``.
    return_weights: also return the ``[B * nW, heads, N, N]`` attention probabilities.

  Returns:
    ``[B * nW, heads, N, head_dim]`` in ``q.dtype`` (softmax computed in at least float32), or
    ``(out, weights)`` with ``return_weights``.
  """
  if q.ndim != 4 or k.shape != q.shape or v.shape[:3] != q.shape[:3]:
    raise ValueError(f"q, k, v must be [B*nW, heads, N, head_dim] with matching shapes, got {q.shape}, "
                     f"{k.shape}, {v.shape}")
  windows, heads, n, head_dim = q.shape
  if scale is None:
    scale = head_dim ** -0.5
  logits = jnp.einsum("whnd,whmd->whnm", q * scale, k)
  logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))
  if bias is not None:
    if bias.shape != (heads, n, n):
      raise ValueError(f"bias must be [heads, N, N] = {(heads, n, n)}, got {bias.shape}")
    logits = logits + bias
  if mask is not None:
    if mask.ndim != 3 or mask.shape[1:] != (n, n) or windows % mask.shape[0]:
      raise ValueError(f"mask must be [nW, {n}, {n}] with nW dividing the {windows} windows, got {mask.shape}")
    per_image = mask.shape[0]
    logits = (logits.reshape(-1, per_image, heads, n, n) + mask[None, :, None]).reshape(logits.shape)
  weights = jax.nn.softmax(logits, axis=-1).astype(q.dtype)
  out = jnp.einsum("whnm,whmd->whnd", weights, v)
  return (out, weights) if return_weights else out


def effective_window_and_shift(height: int, width: int, window_size: int, shift: int) -> Tuple[int, int]:
  """Swin's rule for small maps: if ``min(H, W) <= window_size`` use one window of ``min(H, W)``, no shift."""
  if min(height, width) <= window_size:
    return min(height, width), 0
  return window_size, shift


def pad_to_window_multiple(x: Array, window_size: int) -> Tuple[Array, Tuple[int, int]]:
  """Zero-pads ``[B, H, W, C]`` at the bottom/right to multiples of ``window_size``.

  Returns:
    ``(x_padded [B, H + pad_h, W + pad_w, C], (pad_h, pad_w))``; undo with ``crop_window_padding``.
  """
  if x.ndim != 4:
    raise ValueError(f"x must be [B, H, W, C], got shape {x.shape}")
  pad_h = -x.shape[1] % window_size
  pad_w = -x.shape[2] % window_size
  if pad_h or pad_w:
    x = jnp.pad(x, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
  return x, (pad_h, pad_w)


def crop_window_padding(x: Array, pad: Tuple[int, int]) -> Array:
  """Removes the bottom/right ``(pad_h, pad_w)`` added by ``pad_to_window_multiple`` from ``[B, H, W, C]``."""
  pad_h, pad_w = pad
  return x[:, :x.shape[1] - pad_h, :x.shape[2] - pad_w]
