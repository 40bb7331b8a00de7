"""RoIAlign, multi-scale (FPN) RoIAlign and the FPN level rule, in pure jnp.

Reference: ``torchvision.ops.roi_align`` (CPU kernel ``roi_align_kernel.cpp``), reproduced sample for sample:
for RoI ``k`` and output bin ``(ph, pw)`` the kernel averages ``grid_h * grid_w`` bilinear samples; a sample
outside ``[-1, H] x [-1, W]`` contributes zero but still counts in the denominator. Both axes are independent,
so a bin's output is ``sum_{s,t} wy[k, ph, s] * wx[k, pw, t] * F[b_k, iy[k, ph, s], ix[k, pw, t]] / count`` where
``(iy, wy)`` are the sample "taps" of one axis (a sample's low and high neighbour with their bilinear weights,
zero for masked samples). Two exact contractions of these taps are implemented:

* ``'dense'``: scatter the taps into interpolation matrices ``Wy[K, PH, H]`` and ``Wx[K, PW, W]`` and contract
  with two matmuls, ``K * PH * (B * H * W + W * PW) * C`` multiply-adds (the batch index is routed by a
  one-hot matmul, hence the factor ``B``). Its cost does not depend on the number of samples, so it is the
  practical exact path for adaptive sampling; the gradient is a matmul too (deterministic).
* ``'gather'``: gather the ``(2 Sy) * (2 Sx)`` corner pixels of every bin (torchvision's own scheme). Cheap
  when the number of samples per bin ``S`` is small and static (fixed ``sampling_ratio``).

``method='auto'`` picks the cheaper by a static cost model (``_choose_method``).

Adaptive sampling with static shapes: torchvision's grid ``ceil(roi_h / PH)`` is data dependent and
unbounded (a box larger than the map, or partly outside it, has more samples per bin than ``ceil(H / PH)``, so
that cap is not exact). We bound instead the samples that can be *inside* the map: with ``g = ceil(b)`` samples
over a bin of size ``b``, the spacing ``b / g`` is in ``(1/2, 1]`` when ``b > 1``, and at most ``H + 2`` of
them fall in ``[-1, H]`` (if ``b < H + 1`` then ``g <= H + 1``; otherwise the count is at most
``(H + 1) g / b + 1 < H + 3``). Each bin therefore evaluates ``H + 4`` consecutive samples starting one before
its first in-range sample (one spare for that conservative start, one for float rounding at the ends), masks
samples with index ``>= g``, and divides by the true ``g_h * g_w``: exact for every box whose grid fits the
float mantissa (below 2**24 samples per axis in float32). Alternatively ``max_sampling_grid=m`` clamps the
grid to ``min(ceil(roi / P), m)`` per axis: identical to torchvision whenever the adaptive grid is ``<= m``, and
an average over ``m`` evenly spaced samples otherwise (like ``sampling_ratio=m``); use it on large maps, where
it enables the cheap gather path.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops._args import callable_module, positive_int_pair

Array = jax.Array
OutputSize = Union[int, Tuple[int, int]]

_METHODS = ("auto", "dense", "gather")
# RoIs per lax.map step: keeps the gathered corners / matmul intermediates in cache. On the benchmark problem
# (benchmarks/roi_ops.py) this made the gather path 4x and the dense path 1.4x faster than unchunked on CPU.
_GATHER_CHUNK = 8
_DENSE_CHUNK = 16
# The gathered corners of a chunk are materialised: fewer RoIs per step when a RoI's corners exceed this.
_GATHER_CHUNK_BYTES = 32 * 2**20
# One gathered multiply-add costs about this many matmul multiply-adds on XLA CPU (measured with
# benchmarks/roi_ops.py on 2x64x64x256 maps); used only to choose between the two exact paths.
_GATHER_COST_FACTOR = 20.0


def parse_output_size(output_size: OutputSize) -> Tuple[int, int]:
  """Returns ``(PH, PW)`` from an int or a pair of positive ints; raises ValueError otherwise."""
  return positive_int_pair(output_size, "output_size (PH, PW)")


def ieee_divide(numerator, denominator):
  """Correctly rounded ``numerator / denominator`` (broadcast), as the reference C++ kernels divide.

  XLA rewrites a division by a broadcast (a scalar or a constant like ``PH``) into a multiplication by the
  reciprocal, which is one ulp off for e.g. 6 / 7 in float32 and so turns ``ceil(7 * (6 / 7))`` into 7 or
  ``ceil(14 / 7)`` into 3. Hiding the materialised divisor behind an optimization barrier keeps a true
  division. Used wherever a quotient feeds a floor/ceil or a sample position.
  """
  numerator = jnp.asarray(numerator)
  numerator, denominator = jnp.broadcast_arrays(numerator, jnp.asarray(denominator, numerator.dtype))
  return numerator / jax.lax.optimization_barrier(denominator)


def check_features_and_rois(features: Array, rois: Array, name: str = "features") -> None:
  """Raises ValueError unless ``features`` is ``[B, H, W, C]`` floating and ``rois`` is ``[K, 5]``."""
  if features.ndim != 4 or not jnp.issubdtype(features.dtype, jnp.floating):
    raise ValueError(f"{name} must be a floating [B, H, W, C] array, got {features.dtype} {features.shape}")
  if min(features.shape[1:3]) < 1:
    raise ValueError(f"{name} must have H >= 1 and W >= 1, got shape {features.shape}")
  if rois.ndim != 2 or rois.shape[1] != 5:
    raise ValueError(f"rois must be [K, 5] rows (batch_index, x1, y1, x2, y2), got shape {rois.shape}")


def split_rois(rois: Array, batch_size: int, dtype) -> Tuple[Array, Array, Array]:
  """Splits ``[K, 5]`` rois into ``(batch [K] int32, boxes [K, 4] xyxy, ok [K] bool)``, without gradient.

  The batch index is truncated to an int like torchvision's ``int`` cast. A RoI with a non-finite value or a
  batch index outside ``[0, batch_size)`` is not ``ok``: its box is replaced by zeros (so that nothing
  downstream sees NaN or inf) and the callers return zeros for it.
  """
  rois = jax.lax.stop_gradient(jnp.asarray(rois, dtype))
  batch = jnp.trunc(rois[:, 0])
  ok = jnp.all(jnp.isfinite(rois), axis=1) & (batch >= 0) & (batch < batch_size)
  boxes = jnp.where(ok[:, None], rois[:, 1:], 0)
  return jnp.where(ok, batch, 0).astype(jnp.int32), boxes, ok


def _axis_taps(lo, hi, scale, size, n_bins, sampling_ratio, aligned, max_grid, max_size):
  """Sample taps of one axis for every RoI and bin.

  Args:
    lo, hi: ``[K]`` box start/end in image pixels (x1/x2 or y1/y2).
    scale, size: ``[K]`` spatial scale and map extent (H or W) of the RoI's level.
    n_bins: static number of output bins on this axis (PH or PW).
    sampling_ratio, aligned, max_grid: as in ``roi_align``.
    max_size: static largest map extent over the levels (bounds the adaptive samples, see module doc).

  Returns:
    ``(idx [K, n_bins, 2S] int32, weight [K, n_bins, 2S], grid [K])``: the low/high neighbour of each of the
    ``S`` evaluated samples with its bilinear weight (zero for masked samples), and the per-RoI sample grid
    used in the denominator.
  """
  offset = 0.5 if aligned else 0.0
  start = lo * scale - offset
  length = hi * scale - offset - start
  if not aligned:
    length = jnp.maximum(length, 1.0)
  bin_size = ieee_divide(length, n_bins)
  if sampling_ratio > 0:
    n_samples = sampling_ratio
    grid = jnp.full_like(bin_size, sampling_ratio)
  else:
    grid = jnp.maximum(jnp.ceil(bin_size), 0.0)
    n_samples = max_size + 4 if max_grid is None else max_grid
    if max_grid is not None:
      grid = jnp.minimum(grid, max_grid)
  safe_grid = jnp.maximum(grid, 1.0)[:, None, None]
  bin_start = start[:, None] + jnp.arange(n_bins, dtype=start.dtype) * bin_size[:, None]  # [K, P]
  first = jnp.zeros_like(bin_start)
  if sampling_ratio <= 0 and max_grid is None:
    # Skip the samples before the map: start one before the first sample with y >= -1.
    step = ieee_divide(bin_size[:, None], safe_grid[..., 0])
    step = jnp.where(step > 0, step, 1.0)
    first = jnp.ceil(ieee_divide(-1.0 - bin_start, step) - 0.5) - 1.0
    first = jnp.clip(first, 0.0, jnp.maximum(grid - 1.0, 0.0)[:, None])
  sample = first[..., None] + jnp.arange(n_samples, dtype=start.dtype)  # [K, P, S]
  # Same operation order as the kernel: start + p * bin + ((i + .5) * bin) / grid.
  pos = bin_start[..., None] + ieee_divide((sample + 0.5) * bin_size[:, None, None], safe_grid)
  size = size[:, None, None]
  valid = (sample < grid[:, None, None]) & (pos >= -1.0) & (pos <= size)
  pos = jnp.where(valid, jnp.maximum(pos, 0.0), 0.0)
  low = jnp.floor(pos)
  at_end = low >= size - 1
  low = jnp.where(at_end, size - 1, low)
  pos = jnp.where(at_end, low, pos)
  high = jnp.where(at_end, low, low + 1)
  frac = pos - low
  idx = jnp.concatenate([low, high], axis=-1).astype(jnp.int32)
  weight = jnp.concatenate([jnp.where(valid, 1.0 - frac, 0.0), jnp.where(valid, frac, 0.0)], axis=-1)
  return idx, weight, grid


def map_chunks(fn, args, chunk):
  """``fn(*args)`` computed ``chunk`` RoIs at a time with ``lax.map`` (shared with roi_pool).

  Every array in ``args`` has the RoIs on its leading axis; the tail is zero-padded to a full chunk and the
  padding is cut from every output of ``fn`` (a pytree of arrays with the RoIs leading).
  """
  k = args[0].shape[0]
  n = -(-k // chunk)
  pad = n * chunk - k
  args = [jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape((n, chunk) + a.shape[1:]) for a in args]
  out = jax.lax.map(lambda xs: fn(*xs), args)
  return jax.tree.map(lambda o: o.reshape((n * chunk,) + o.shape[2:])[:k], out)


def _contract_dense(maps, level, batch, taps_y, taps_x):
  """``[K, PH, PW, C]`` = sum over levels of ``Wy F Wx^T`` with batch routing by a one-hot matmul."""
  batch_size = maps[0].shape[0]

  def chunk_fn(level, batch, iy, wy, ix, wx):
    onehot = jax.nn.one_hot(batch, batch_size, dtype=wy.dtype)  # [c, B]
    out = 0.0
    for l, fmap in enumerate(maps):
      on_level = (level == l)[:, None, None]
      rows = jnp.einsum("kpt,kpth->kph", jnp.where(on_level, wy, 0.0),
                        jax.nn.one_hot(iy, fmap.shape[1], dtype=wy.dtype))
      cols = jnp.einsum("kqt,kqtw->kqw", jnp.where(on_level, wx, 0.0),
                        jax.nn.one_hot(ix, fmap.shape[2], dtype=wx.dtype))
      per_image_rows = jnp.einsum("kph,kb->kpbh", rows, onehot)
      row_pooled = jnp.einsum("kpbh,bhwc->kpwc", per_image_rows, fmap)
      out = out + jnp.einsum("kqw,kpwc->kpqc", cols, row_pooled)
    return out

  return map_chunks(chunk_fn, [level, batch, *taps_y, *taps_x], _DENSE_CHUNK)


def _contract_gather(maps, level, batch, taps_y, taps_x):
  """``[K, PH, PW, C]`` from the ``(2Sy) x (2Sx)`` gathered corners of every bin, all levels in one table."""
  channels = maps[0].shape[-1]
  table = jnp.concatenate([m.reshape(-1, channels) for m in maps], axis=0)
  offsets = np.cumsum([0] + [m.shape[0] * m.shape[1] * m.shape[2] for m in maps])[:-1]
  offsets = jnp.asarray(offsets, jnp.int32)
  heights = jnp.asarray([m.shape[1] for m in maps], jnp.int32)
  widths = jnp.asarray([m.shape[2] for m in maps], jnp.int32)

  def chunk_fn(level, batch, iy, wy, ix, wx):
    width = widths[level][:, None, None, None, None]
    image_base = offsets[level] + batch * heights[level] * widths[level]
    flat = image_base[:, None, None, None, None] + iy[:, :, None, :, None] * width + ix[:, None, :, None, :]
    weight = wy[:, :, None, :, None] * wx[:, None, :, None, :]  # [c, PH, PW, Ty, Tx]
    corners = table[flat]  # [c, PH, PW, Ty, Tx, C]
    return jnp.einsum("kpqst,kpqstc->kpqc", weight, corners)

  roi_bytes = taps_y[0][0].size * taps_x[0][0].size * channels * table.dtype.itemsize
  chunk = max(1, min(_GATHER_CHUNK, _GATHER_CHUNK_BYTES // roi_bytes))
  return map_chunks(chunk_fn, [level, batch, *taps_y, *taps_x], chunk)


def _choose_method(method, maps, pooled, taps):
  """Static choice between the two exact contractions by estimated cost per RoI and channel."""
  if method != "auto":
    return method
  ph, pw = pooled
  dense = sum(ph * (m.shape[0] * m.shape[1] * m.shape[2] + m.shape[2] * pw) for m in maps)
  gather = _GATHER_COST_FACTOR * ph * pw * taps[0] * taps[1]
  return "dense" if dense <= gather else "gather"


def _roi_align_levels(maps, scales, level, rois, output_size, sampling_ratio, aligned, max_sampling_grid,
                      method):
  """RoIAlign where RoI ``k`` reads ``maps[level[k]]`` at ``scales[level[k]]``; shared by both public ops."""
  pooled = parse_output_size(output_size)
  if method not in _METHODS:
    raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
  if not isinstance(sampling_ratio, (int, np.integer)):
    raise ValueError(f"sampling_ratio must be an int (<= 0 for adaptive), got {sampling_ratio!r}")
  if max_sampling_grid is not None and (not isinstance(max_sampling_grid, (int, np.integer))
                                        or max_sampling_grid < 1):
    raise ValueError(f"max_sampling_grid must be None or a positive int, got {max_sampling_grid!r}")
  for i, m in enumerate(maps):
    check_features_and_rois(m, rois, name=f"features[{i}]" if len(maps) > 1 else "features")
    if m.shape[0] != maps[0].shape[0] or m.shape[3] != maps[0].shape[3]:
      raise ValueError(f"all feature levels must share B and C, got shapes {[x.shape for x in maps]}")
  dtype = maps[0].dtype
  compute = jnp.promote_types(dtype, jnp.float32)
  num_rois, channels = rois.shape[0], maps[0].shape[3]
  if num_rois == 0:
    return jnp.zeros((0, *pooled, channels), dtype)
  batch, boxes, ok = split_rois(rois, maps[0].shape[0], compute)
  scale = jnp.asarray(scales, compute)[level]
  heights = jnp.asarray([m.shape[1] for m in maps], compute)[level]
  widths = jnp.asarray([m.shape[2] for m in maps], compute)[level]
  common = (sampling_ratio, aligned, max_sampling_grid)
  iy, wy, grid_y = _axis_taps(boxes[:, 1], boxes[:, 3], scale, heights, pooled[0], *common,
                              max(m.shape[1] for m in maps))
  ix, wx, grid_x = _axis_taps(boxes[:, 0], boxes[:, 2], scale, widths, pooled[1], *common,
                              max(m.shape[2] for m in maps))
  wy = jnp.where(ok[:, None, None], wy, 0.0)
  method = _choose_method(method, maps, pooled, (iy.shape[-1], ix.shape[-1]))
  contract = _contract_dense if method == "dense" else _contract_gather
  maps = [m.astype(compute) for m in maps]
  out = contract(maps, level, batch, (iy, wy), (ix, wx))
  count = jnp.maximum(grid_y * grid_x, 1.0)
  return (out / count[:, None, None, None]).astype(dtype)


def roi_align(features: Array, rois: Array, output_size: OutputSize, spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False, *, max_sampling_grid: Optional[int] = None,
              method: str = "auto") -> Array:
  """RoIAlign with exactly torchvision's semantics (``torchvision.ops.roi_align``), channels last.

  Args:
    features: ``[B, H, W, C]`` float map (NHWC; torchvision is NCHW).
    rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)``, absolute xyxy in input-image pixels. No gradient
      flows to them (as in torchvision and detectron2).
    output_size: ``PH`` or ``(PH, PW)``.
    spatial_scale: map pixels per image pixel (e.g. 1/16).
    sampling_ratio: samples per bin and axis; ``<= 0`` means adaptive ``ceil(roi_size / P)`` per RoI.
    aligned: ``True`` shifts box coordinates by -0.5 pixel (detectron2's ROIAlignV2) and keeps
      zero/negative box sizes; ``False`` forces sizes to at least one map pixel.
    max_sampling_grid: static clamp of the adaptive grid (see the module docstring); ``None`` is exact for
      every box. Ignored when ``sampling_ratio > 0``.
    method: ``'auto'``, ``'dense'`` or ``'gather'``; both paths are exact. ``'auto'`` picks the cheaper by a
      static cost model: gather for a small fixed (or clamped) sampling grid on a large map, dense otherwise
      (always for exact adaptive sampling, whose static sample bound is ``H + 4`` per axis).

  Returns:
    ``[K, PH, PW, C]`` in ``features.dtype`` (computed in float32, or float64 for float64 features). A RoI with
    a non-finite value or a batch index outside ``[0, B)`` gives zeros (torchvision reads out of bounds).
    Jit-able (all arguments but the arrays are static), vmap-able and differentiable w.r.t. ``features``
    (the gradient equals torchvision's backward kernel).
  """
  features, rois = jnp.asarray(features), jnp.asarray(rois)
  level = jnp.zeros((rois.shape[0],), jnp.int32)
  return _roi_align_levels([features], [spatial_scale], level, rois, output_size, sampling_ratio, aligned,
                           max_sampling_grid, method)


def fpn_level_assignment(boxes: Array, canonical_scale: float = 224.0, canonical_level: int = 4,
                         min_level: int = 2, max_level: int = 5, eps: float = 1e-6) -> Array:
  """FPN level of each box: ``clip(floor(canonical_level + log2(sqrt(area) / canonical_scale + eps)))``.

  The FPN paper's rule (eq. 1) as written by maskrcnn-benchmark and detectron2 (eps inside the log;
  detectron2 uses eps = 2.2e-16). torchvision's ``LevelMapper`` adds eps after the log instead, which moves
  the level boundaries by a relative 1e-6 only.

  Args:
    boxes: ``[..., 4]`` absolute xyxy in image pixels; area ``(x2 - x1) * (y2 - y1)`` (no +1). A negative
      area (and NaN, e.g. from a NaN box) counts as zero, i.e. ``min_level``.
    canonical_scale, canonical_level: a box with sqrt(area) = canonical_scale maps to canonical_level.
    min_level, max_level: inclusive clamp range.
    eps: keeps log2 finite at zero area.

  Returns:
    ``[...]`` int32 levels in ``[min_level, max_level]``.
  """
  if min_level > max_level:
    raise ValueError(f"min_level must be <= max_level, got {min_level} > {max_level}")
  boxes = jnp.asarray(boxes)
  if boxes.shape[-1] != 4:
    raise ValueError(f"boxes must be [..., 4] xyxy, got shape {boxes.shape}")
  boxes = jax.lax.stop_gradient(boxes.astype(jnp.promote_types(boxes.dtype, jnp.float32)))
  canonical_scale = jnp.asarray(canonical_scale, boxes.dtype)
  area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])
  area = jnp.where(area > 0, area, 0.0)  # also maps NaN to zero
  level = jnp.floor(canonical_level + jnp.log2(ieee_divide(jnp.sqrt(area), canonical_scale) + eps))
  return jnp.clip(level, min_level, max_level).astype(jnp.int32)


def _ordered_levels(features_per_level, min_level, max_level):
  """``(levels, maps)`` from a ``{level: map}`` dict or a list starting at ``min_level``; consecutive."""
  if isinstance(features_per_level, Mapping):
    levels = sorted(features_per_level)
    maps = [features_per_level[l] for l in levels]
  elif isinstance(features_per_level, Sequence) and len(features_per_level) > 0:
    if min_level is None:
      raise ValueError("min_level is required when features_per_level is a list (the level of its first map)")
    levels = list(range(min_level, min_level + len(features_per_level)))
    maps = list(features_per_level)
  else:
    raise ValueError(f"features_per_level must be a non-empty dict {{level: map}} or list of maps, "
                     f"got {type(features_per_level).__name__}")
  if levels != list(range(levels[0], levels[0] + len(levels))):
    raise ValueError(f"feature levels must be consecutive integers, got {levels}")
  if (min_level is not None and min_level != levels[0]) or (max_level is not None and max_level != levels[-1]):
    raise ValueError(f"min_level/max_level ({min_level}, {max_level}) do not match the given maps' levels "
                     f"{levels[0]}..{levels[-1]}")
  return levels, maps


def multiscale_roi_align(features_per_level: Union[Mapping[int, Array], Sequence[Array]], rois: Array,
                         output_size: OutputSize, sampling_ratio: int, canonical_scale: float = 224.0,
                         canonical_level: int = 4, min_level: Optional[int] = None,
                         max_level: Optional[int] = None, eps: float = 1e-6, aligned: bool = False, *,
                         max_sampling_grid: Optional[int] = None, method: str = "auto") -> Array:
  """FPN RoIAlign (torchvision ``MultiScaleRoIAlign``): each RoI is pooled from its assigned level only.

  Args:
    features_per_level: ``{level: [B, H_l, W_l, C]}`` or a list of maps for levels ``min_level,
      min_level + 1, ...``. Level ``l`` has spatial scale ``2 ** -l`` (stride ``2 ** l``); torchvision infers
      the same scales from the map and image sizes (``2 ** round(log2(H_l / H_image))``).
    rois: ``[K, 5]`` rows ``(batch_index, x1, y1, x2, y2)`` in image pixels.
    output_size, sampling_ratio, aligned, max_sampling_grid, method: as in ``roi_align``.
    canonical_scale, canonical_level, eps: the level rule, see ``fpn_level_assignment``.
    min_level, max_level: level range; required ``min_level`` for a list, inferred from a dict's keys (and
      checked when given).

  Returns:
    ``[K, PH, PW, C]``, equal to ``roi_align(features_per_level[l_k], rois[k:k+1], ..., 2 ** -l_k)`` per RoI
    with ``l_k = fpn_level_assignment(rois[k, 1:])``. The gather path reads each RoI's own level only (all
    levels share one flat table); the dense path runs every level with the other levels' RoIs masked out.
  """
  levels, maps = _ordered_levels(features_per_level, min_level, max_level)
  maps, rois = [jnp.asarray(m) for m in maps], jnp.asarray(rois)
  if rois.ndim != 2 or rois.shape[1] != 5:
    raise ValueError(f"rois must be [K, 5] rows (batch_index, x1, y1, x2, y2), got shape {rois.shape}")
  level = fpn_level_assignment(rois[:, 1:], canonical_scale, canonical_level, levels[0], levels[-1], eps)
  scales = [2.0 ** -l for l in levels]
  return _roi_align_levels(maps, scales, level - levels[0], rois, output_size, sampling_ratio, aligned,
                           max_sampling_grid, method)


callable_module(__name__, roi_align)  # `cvjax.ops.roi_align(...)` calls the op; the module stays reachable
