"""RoIPool (Fast R-CNN max pooling over quantised bins), in pure jnp.

Reference: ``torchvision.ops.roi_pool`` (CPU kernel ``roi_pool_kernel.cpp``). Box corners are scaled and
rounded half away from zero (C++ ``std::round``, not NumPy's half-to-even); ``roi = max(end - start + 1, 1)``;
bin ``p`` covers ``[floor(p * roi / P), ceil((p + 1) * roi / P))`` shifted by ``start`` and clipped to the map;
the output is the bin's maximum, 0 for an empty bin. The kernel's running maximum starts at ``-FLT_MAX`` with a
strict ``>``, so NaN and values ``<= -FLT_MAX`` are never picked (a bin holding only those returns
``-FLT_MAX``), ties go to the first element in row-major order, and the backward pass sends the whole output
gradient to that one element (none when nothing was picked).

Bins of any size are exact with static shapes: the maximum over a rectangle is taken separably, first over the
bin's rows for every column with a sparse table (per map row ``h`` and level ``j``, the max and first argmax row
of rows ``[h, h + 2**j)``; any row range is two overlapping blocks, so two lookups), then over the bin's
columns with a mask over the map width. The table costs ``floor(log2 H) + 1`` copies of the map (values and
int32 rows). The picked element is finally gathered from ``features``, so ``jax.grad`` routes the gradient
exactly like the kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops._args import callable_module
from cvjax.ops.roi_align import (OutputSize, check_features_and_rois, ieee_divide, map_chunks, parse_output_size,
                                 split_rois)

Array = jax.Array

# RoIs per lax.map step: bounds the [chunk, PH, PW, W, C] column reduction (tuned on the benchmarks/roi_ops.py problem).
_CHUNK = 2
_FLT_MAX = float(np.finfo(np.float32).max)


def _round_half_away(x: Array) -> Array:
  """C++ ``std::round``: halves go away from zero (exact: ``x - trunc(x)`` has no rounding error)."""
  whole = jnp.trunc(x)
  return whole + jnp.where(jnp.abs(x - whole) >= 0.5, jnp.sign(x), 0.0)


def _bin_edges(lo, hi, scale, n_bins, size):
  """``[K, n_bins]`` start and end (exclusive) map indices of each bin along one axis, clipped to the map."""
  start = _round_half_away(lo * scale)
  length = jnp.maximum(_round_half_away(hi * scale) - start + 1.0, 1.0)
  bin_size = ieee_divide(length, n_bins)
  p = jnp.arange(n_bins, dtype=bin_size.dtype)
  first = jnp.clip(jnp.floor(p * bin_size[:, None]) + start[:, None], 0, size)
  last = jnp.clip(jnp.ceil((p + 1.0) * bin_size[:, None]) + start[:, None], 0, size)
  return first, last


def _num_levels(height: int) -> int:
  """Levels of a sparse table over ``height`` rows: blocks of 1, 2, 4, ... <= height rows."""
  return height.bit_length()


def _first_max(max_a, arg_a, max_b, arg_b):
  """Elementwise (max, first argmax) of two candidates; equal maxima keep the smaller index."""
  arg = jnp.where(max_a > max_b, arg_a, jnp.where(max_b > max_a, arg_b, jnp.minimum(arg_a, arg_b)))
  return jnp.maximum(max_a, max_b), arg


def _row_sparse_table(values: Array):
  """Sparse table over rows: ``[J, B, H, W, C]`` max and first argmax row of rows ``[h, h + 2**j)``.

  Entries whose block runs past the last row are never read. Any row range ``[a, b)`` is then the union of
  the two (overlapping) blocks of level ``floor(log2(b - a))`` starting at ``a`` and ending at ``b``.
  """
  height = values.shape[1]
  level_max = [values]
  level_arg = [jnp.broadcast_to(jnp.arange(height, dtype=jnp.int32)[:, None, None], values.shape)]
  for j in range(1, _num_levels(height)):
    span = 2 ** (j - 1)
    prev_max, prev_arg = level_max[-1], level_arg[-1]
    pad = [(0, 0), (0, span), (0, 0), (0, 0)]
    next_max = jnp.pad(prev_max[:, span:], pad, constant_values=-jnp.inf)
    next_arg = jnp.pad(prev_arg[:, span:], pad, constant_values=height)
    new_max, new_arg = _first_max(prev_max, prev_arg, next_max, next_arg)
    level_max.append(new_max)
    level_arg.append(new_arg)
  return jnp.stack(level_max), jnp.stack(level_arg)


def roi_pool(features: Array, rois: Array, output_size: OutputSize, spatial_scale: float = 1.0) -> Array:
  """RoIPool with torchvision's semantics (``torchvision.ops.roi_pool``), channels last.

  Args:
    features: ``[B, H, W, C]`` float map (NHWC).
    rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, absolute xyxy in image pixels; no gradient.
    output_size: ``PH`` or ``(PH, PW)``.
    spatial_scale: map pixels per image pixel.

  Returns:
    ``[K, PH, PW, C]`` in ``features.dtype``. A RoI with a non-finite value or a batch index outside ``[0, B)``
    gives zeros. Jit-able, vmap-able, differentiable w.r.t. ``features`` (gradient to the argmax element).
    Cost: ``K * PH * PW * W * C`` comparisons plus the sparse table (see the module docstring).
  """
  features, rois = jnp.asarray(features), jnp.asarray(rois)
  check_features_and_rois(features, rois)
  pooled = parse_output_size(output_size)
  batch_size, height, width, channels = features.shape
  if rois.shape[0] == 0:
    return jnp.zeros((0, *pooled, channels), features.dtype)
  compute = jnp.promote_types(features.dtype, jnp.float32)
  batch, boxes, ok = split_rois(rois, batch_size, compute)
  row_first, row_last = _bin_edges(boxes[:, 1], boxes[:, 3], spatial_scale, pooled[0], height)
  col_first, col_last = _bin_edges(boxes[:, 0], boxes[:, 2], spatial_scale, pooled[1], width)
  # Only values the kernel can pick: NaN and values <= -FLT_MAX never beat its -FLT_MAX start.
  candidates = jnp.where(features > -_FLT_MAX, features, -jnp.inf).astype(compute)
  table_max, table_arg = _row_sparse_table(candidates)
  table_max = table_max.reshape(-1, width, channels)
  table_arg = table_arg.reshape(-1, width, channels)
  spans = 2 ** jnp.arange(_num_levels(height), dtype=jnp.int32)
  cols = jnp.arange(width)

  def chunk_fn(batch, row_first, row_last, col_first, col_last):
    # Stage 1: max over the bin's rows, for every column, as two overlapping power-of-two row blocks.
    first, last = row_first.astype(jnp.int32), row_last.astype(jnp.int32)
    level = jnp.sum((last - first)[..., None] >= spans, axis=-1) - 1  # floor(log2(rows)), -1 if empty
    base = (jnp.maximum(level, 0) * batch_size + batch[:, None]) * height
    top = base + jnp.minimum(first, height - 1)
    bottom = base + jnp.maximum(last - spans[jnp.maximum(level, 0)], 0)
    col_max, col_arg = _first_max(table_max[top], table_arg[top], table_max[bottom], table_arg[bottom])
    col_max = jnp.where((level >= 0)[..., None, None], col_max, -jnp.inf)  # [c, PH, W, C]
    # Stage 2: max over the bin's columns; ties go to the smallest row-major index h * W + w.
    in_cols = (cols >= col_first[..., None]) & (cols < col_last[..., None])  # [c, PW, W]
    in_cols = in_cols[:, None, :, :, None]  # [c, 1, PW, W, 1]
    per_col = jnp.where(in_cols, col_max[:, :, None], -jnp.inf)  # [c, PH, PW, W, C]
    bin_max = jnp.max(per_col, axis=3)
    flat = col_arg[:, :, None] * width + cols[:, None]
    arg = jnp.min(jnp.where(in_cols & (per_col == bin_max[:, :, :, None]), flat, height * width), axis=3)
    return bin_max, arg

  bin_max, arg = map_chunks(chunk_fn, [batch, row_first, row_last, col_first, col_last], _CHUNK)
  picked = bin_max > -jnp.inf
  arg = jnp.where(picked, arg, 0)
  # Gather the picked element from the differentiable features so that the gradient goes to it alone.
  image_rows = features.reshape(batch_size, height * width, channels)
  value = image_rows[batch[:, None, None, None], arg, jnp.arange(channels)]
  empty = (row_last <= row_first)[:, :, None] | (col_last <= col_first)[:, None, :]
  out = jnp.where(picked, value, jnp.where(empty[..., None], 0.0, -_FLT_MAX).astype(features.dtype))
  return jnp.where(ok[:, None, None, None], out, 0.0).astype(features.dtype)



callable_module(__name__, roi_pool)  # `cvjax.ops.roi_pool(...)` calls the op; the module stays reachable
