"""Times cvjax RoIAlign / RoIPool against a vectorised NumPy port of torchvision's CPU kernels.

torchvision is not importable here, so the reference column is a NumPy port (one RoI at a time, all bins,
samples and channels vectorised, as the C++ kernel precomputes its sample taps per RoI). The torchvision
CPU times measured on this machine for the same problem size are printed as targets (cvjax should be at least
as fast; the boxes of that measurement are not known, adaptive sampling time depends on box sizes). Problem:
512 RoIs, 7x7 output, C=256, features 2x64x64 (stride 16 of a 1024 image), boxes with uniform centres in the
image and sides uniform in [32, 512] image pixels (2..32 map pixels).

Run from the repository root: ``python benchmarks/roi_ops.py``. Lines read
``name  cvjax X ms  reference Y ms  ratio R`` with R = reference / cvjax (> 1: cvjax is faster).
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from cvjax.ops.roi_align import roi_align
from cvjax.ops.roi_pool import roi_pool

NUM_ROIS, BATCH, SIZE, CHANNELS, OUTPUT = 512, 2, 64, 256, 7
IMAGE, SCALE = 1024, 1.0 / 16
# torchvision.ops.roi_align on this machine's CPU (aligned=True), measured by the lead engineer.
TORCHVISION_MS = {"sampling 2": 160.0, "adaptive": 520.0}


def make_problem(seed: int = 0):
  """``(features [B, H, W, C] float32, rois [K, 5] float32)`` for the benchmark."""
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32)
  centre = rng.uniform(0, IMAGE, (NUM_ROIS, 2))
  half = rng.uniform(32, 512, (NUM_ROIS, 2)) / 2
  rois = np.concatenate([rng.integers(0, BATCH, (NUM_ROIS, 1)), centre - half, centre + half], axis=1)
  return features, rois.astype(np.float32)


def _axis_samples(start, bin_size, grid, n_bins, size):
  """Per-axis sample taps of the kernel: (low, high, w_low, w_high) each [n_bins, grid], in start's dtype."""
  dtype = type(start)
  pos = (start + np.arange(n_bins, dtype=dtype)[:, None] * bin_size
         + (np.arange(grid, dtype=dtype) + dtype(0.5)) * bin_size / dtype(grid))
  valid = (pos >= -1.0) & (pos <= size)
  pos = np.maximum(pos, dtype(0))
  low = np.floor(pos).astype(np.int64)
  at_end = low >= size - 1
  low = np.where(at_end, size - 1, low)
  pos = np.where(at_end, low, pos).astype(dtype)
  high = np.where(at_end, low, low + 1)
  frac = pos - low.astype(dtype)
  return low, high, np.where(valid, 1 - frac, 0), np.where(valid, frac, 0)


def numpy_roi_align(features, rois, output_size, spatial_scale, sampling_ratio, aligned):
  """Vectorised NumPy port of torchvision's CPU RoIAlign forward (NHWC), in the kernel's T = features.dtype."""
  _, height, width, channels = features.shape
  out = np.zeros((len(rois), output_size, output_size, channels), features.dtype)
  t = features.dtype.type
  offset, pooled = t(0.5 if aligned else 0.0), t(output_size)
  for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(features.dtype)):
    x1, y1, x2, y2 = (v * t(spatial_scale) - offset for v in (x1, y1, x2, y2))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
      roi_w, roi_h = max(roi_w, t(1)), max(roi_h, t(1))
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / pooled)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / pooled)
    if grid_h <= 0 or grid_w <= 0:
      continue
    yl, yh, wyl, wyh = _axis_samples(y1, roi_h / pooled, grid_h, output_size, height)
    xl, xh, wxl, wxh = _axis_samples(x1, roi_w / pooled, grid_w, output_size, width)
    image = features[int(b)]
    total = 0
    for rows, wy in ((yl, wyl), (yh, wyh)):
      for cols, wx in ((xl, wxl), (xh, wxh)):
        weight = wy[:, :, None, None] * wx[None, None]  # [PH, gh, PW, gw]
        values = image[rows[:, :, None, None], cols[None, None]]  # [PH, gh, PW, gw, C]
        total = total + np.einsum("ygxh,ygxhc->yxc", weight, values)
    out[k] = total / max(grid_h * grid_w, 1)
  return out


def numpy_roi_pool(features, rois, output_size, spatial_scale):
  """Vectorised NumPy port of torchvision's CPU RoIPool forward (NHWC, T = features.dtype), bin by bin."""
  _, height, width, channels = features.shape
  out = np.zeros((len(rois), output_size, output_size, channels), features.dtype)
  t = features.dtype.type
  cpp_round = lambda v: math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)  # exact for float32 v
  for k, (b, x1, y1, x2, y2) in enumerate(rois.astype(features.dtype)):
    sx, sy, ex, ey = (cpp_round(float(v * t(spatial_scale))) for v in (x1, y1, x2, y2))
    bin_h, bin_w = t(max(ey - sy + 1, 1)) / t(output_size), t(max(ex - sx + 1, 1)) / t(output_size)
    for ph in range(output_size):
      h0 = min(max(math.floor(t(ph) * bin_h) + sy, 0), height)
      h1 = min(max(math.ceil(t(ph + 1) * bin_h) + sy, 0), height)
      for pw in range(output_size):
        w0 = min(max(math.floor(t(pw) * bin_w) + sx, 0), width)
        w1 = min(max(math.ceil(t(pw + 1) * bin_w) + sx, 0), width)
        if h1 > h0 and w1 > w0:
          out[k, ph, pw] = features[int(b), h0:h1, w0:w1].max(axis=(0, 1))
  return out


def _timed(fn, repeats: int):
  """``(best wall time in ms over repeats, last result)`` of ``fn()``."""
  best, result = float("inf"), None
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best * 1e3, result


def _line(name, cvjax_ms, reference_ms, target_ms=None):
  text = f"{name:<42s} cvjax {cvjax_ms:7.1f} ms  reference {reference_ms:7.1f} ms  ratio {reference_ms / cvjax_ms:5.2f}"
  if target_ms is not None:
    text += f"  (torchvision CPU {target_ms:.0f} ms: {target_ms / cvjax_ms:.2f}x its throughput)"
  print(text, flush=True)


def run(repeats: int = 5) -> None:
  """Prints one line per case: compiled forward pass, best of ``repeats`` (NumPy reference: best of 2).

  ``[auto]`` is what ``roi_align`` picks by itself; ``[dense]`` / ``[gather]`` force one exact path. The
  name also shows the largest absolute difference from the float32 NumPy port (float32 summation order).
  """
  features, rois = make_problem()
  jf, jr = jnp.asarray(features), jnp.asarray(rois)
  cases = [("sampling 2", 2, "auto"), ("sampling 2", 2, "dense"), ("sampling 2", 2, "gather"),
           ("adaptive", -1, "auto"), ("adaptive", -1, "dense")]
  reference = {}
  for label, sampling, method in cases:
    if label not in reference:
      reference[label] = _timed(lambda: numpy_roi_align(features, rois, OUTPUT, SCALE, sampling, True), 2)
    ref_ms, ref_out = reference[label]
    fn = jax.jit(lambda f, r, s=sampling, m=method: roi_align(f, r, OUTPUT, SCALE, s, True, method=m))
    fn(jf, jr)  # compile
    ms, out = _timed(lambda: fn(jf, jr), repeats)
    error = float(np.abs(np.asarray(out) - ref_out).max())
    _line(f"roi_align {label} aligned [{method}] err {error:.0e}", ms, ref_ms, TORCHVISION_MS[label])
  ref_ms, ref_out = _timed(lambda: numpy_roi_pool(features, rois, OUTPUT, SCALE), 1)
  fn = jax.jit(lambda f, r: roi_pool(f, r, OUTPUT, SCALE))
  fn(jf, jr)
  ms, out = _timed(lambda: fn(jf, jr), repeats)
  _line(f"roi_pool err {float(np.abs(np.asarray(out) - ref_out).max()):.0e}", ms, ref_ms)


if __name__ == "__main__":
  run()
