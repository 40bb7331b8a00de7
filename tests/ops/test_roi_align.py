"""roi_align / multiscale_roi_align / fpn_level_assignment against torchvision.ops.roi_align and a NumPy port.

The port below is a direct loop-over-RoIs/bins/samples transcription of torchvision's CPU kernel
(``torchvision/csrc/ops/cpu/roi_align_kernel.cpp`` and its ``roi_align_common.h``, forward and backward), done
in the kernel's scalar type ``T`` (float64 or float32 NumPy scalars); it runs without torchvision and covers
cvjax's own ``max_sampling_grid``. The same cases also run against ``torchvision.ops.roi_align`` itself, forward
and backward (torch autograd). Most tests run JAX with x64 enabled so that both sides do the same float64
arithmetic and agree to ~1e-12.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rois import random_rois, torch_forward_backward

from cvjax.ops.roi_align import fpn_level_assignment, multiscale_roi_align, roi_align

METHODS = ("dense", "gather")


# ----------------------------------------------------------------------------------------------- the port
def _bilinear_taps(y, x, height, width):
  """[(row, col, weight)] of one sample, or [] when it lies outside [-1, H] x [-1, W]."""
  if y < -1.0 or y > height or x < -1.0 or x > width:
    return []
  t = type(y)
  y, x = max(y, t(0)), max(x, t(0))
  y_low, x_low = int(y), int(x)
  if y_low >= height - 1:
    y_high = y_low = height - 1
    y = t(y_low)
  else:
    y_high = y_low + 1
  if x_low >= width - 1:
    x_high = x_low = width - 1
    x = t(x_low)
  else:
    x_high = x_low + 1
  ly, lx = y - t(y_low), x - t(x_low)
  hy, hx = t(1) - ly, t(1) - lx
  return [(y_low, x_low, hy * hx), (y_low, x_high, hy * lx), (y_high, x_low, ly * hx), (y_high, x_high, ly * lx)]


def _port_bins(roi, height, width, pooled, scale, sampling_ratio, aligned, max_grid, dtype):
  """Yields (ph, pw, taps, count) for one RoI, in the kernel's operation order and scalar type."""
  t = np.dtype(dtype).type
  ph_n, pw_n = pooled
  offset = t(0.5) if aligned else t(0)
  x1, y1, x2, y2 = (t(v) * t(scale) - offset for v in roi[1:])
  roi_w, roi_h = x2 - x1, y2 - y1
  if not aligned:
    roi_w, roi_h = max(roi_w, t(1)), max(roi_h, t(1))
  bin_h, bin_w = roi_h / t(ph_n), roi_w / t(pw_n)
  grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_h / t(ph_n))
  grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(roi_w / t(pw_n))
  if sampling_ratio <= 0 and max_grid is not None:  # cvjax's documented clamp, absent from torchvision
    grid_h, grid_w = min(grid_h, max_grid), min(grid_w, max_grid)
  count = max(grid_h * grid_w, 1)
  for ph in range(ph_n):
    for pw in range(pw_n):
      taps = []
      for iy in range(grid_h):
        y = y1 + t(ph) * bin_h + t(iy + 0.5) * bin_h / t(grid_h)
        for ix in range(grid_w):
          x = x1 + t(pw) * bin_w + t(ix + 0.5) * bin_w / t(grid_w)
          taps += _bilinear_taps(y, x, height, width)
      yield ph, pw, taps, t(count)


def port_roi_align(features, rois, pooled, scale=1.0, sampling_ratio=-1, aligned=False, max_grid=None,
                   dtype=np.float64):
  """torchvision's CPU RoIAlign forward on NHWC features: [K, PH, PW, C]."""
  features = np.asarray(features, dtype)
  _, height, width, channels = features.shape
  out = np.zeros((len(rois), *pooled, channels), dtype)
  for k, roi in enumerate(np.asarray(rois, dtype)):
    for ph, pw, taps, count in _port_bins(roi, height, width, pooled, scale, sampling_ratio, aligned, max_grid,
                                          dtype):
      for y, x, w in taps:
        out[k, ph, pw] += w * features[int(roi[0]), y, x]
      out[k, ph, pw] /= count
  return out


def port_roi_align_backward(grad, shape, rois, pooled, scale=1.0, sampling_ratio=-1, aligned=False):
  """torchvision's CPU RoIAlign backward: d features [B, H, W, C] from d output [K, PH, PW, C]."""
  _, height, width, _ = shape
  grad_in = np.zeros(shape)
  for k, roi in enumerate(np.asarray(rois, np.float64)):
    for ph, pw, taps, count in _port_bins(roi, height, width, pooled, scale, sampling_ratio, aligned, None,
                                          np.float64):
      for y, x, w in taps:
        grad_in[int(roi[0]), y, x] += grad[k, ph, pw] * w / count
  return grad_in


# ------------------------------------------------------------------------------------------------ helpers
@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def edge_rois(height, width):
  """[12, 5] rois at the kernel's edge cases, on a map of the given size (scale 1).

  Fully and partly outside the map; single samples exactly at -1 and at H (inside: clamped to the border pixel)
  and just beyond -1 (outside: a zero that still counts in the average); zero and negative sizes (kept by
  aligned=True, raised to 1 pixel by aligned=False); sub-pixel; much larger than the map; exact multiples of the
  output size; the whole map.
  """
  h, w = float(height), float(width)
  return np.array([
      [0, 30.0, 30.0, 40.0, 45.0],  # fully outside (bottom right)
      [1, -20.0, -9.0, -3.0, -2.5],  # fully outside (top left)
      [0, -5.0, -3.0, 4.0, 6.0],  # partly outside
      [1, -2.0, -2.0, 0.0, 0.0],  # 1x1 grid: the sample lands exactly on (-1, -1)
      [0, w - 1, h - 1, w + 1, h + 1],  # ... exactly on (H, W)
      [1, -2.5, -2.5, 0.0, 0.0],  # ... just outside at -1.25
      [0, 3.0, 3.0, 3.0, 3.0],  # zero size
      [1, 5.0, 6.0, 2.0, 1.0],  # negative size
      [0, 2.2, 3.1, 2.6, 3.3],  # sub-pixel
      [1, -30.0, -25.0, 40.0, 35.0],  # much larger than the map: adaptive grid far above ceil(H / PH)
      [0, 0.0, 0.0, 14.0, 7.0],  # sizes that are exact multiples of the output size
      [1, 0.0, 0.0, w, h],  # the whole map
  ])


def run(features, rois, *args, **kwargs):
  """roi_align under jit (all non-array arguments static)."""
  return np.asarray(jax.jit(lambda f, r: roi_align(f, r, *args, **kwargs))(features, rois))


# -------------------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_random_boxes_match_port(x64, method, sampling_ratio, aligned):
  rng = np.random.default_rng(0)
  features = rng.standard_normal((2, 9, 11, 3))  # H != W
  rois = random_rois(rng, 16, 2, -8.0, 26.0)  # image coordinates, scale 0.5 -> partly outside the map
  expected = port_roi_align(features, rois, (3, 4), 0.5, sampling_ratio, aligned)
  out = run(features, rois, (3, 4), 0.5, sampling_ratio, aligned, method=method)
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 3])
@pytest.mark.parametrize("aligned", [False, True])
def test_edge_cases_match_port(x64, method, sampling_ratio, aligned):
  rng = np.random.default_rng(1)
  features = rng.standard_normal((2, 7, 9, 2))
  rois = edge_rois(7, 9)
  pooled = (1, 1) if sampling_ratio == 1 else (2, 3)
  expected = port_roi_align(features, rois, pooled, 1.0, sampling_ratio, aligned)
  out = run(features, rois, pooled, 1.0, sampling_ratio, aligned, method=method)
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
  if sampling_ratio == 1 and not aligned:
    # The samples at exactly -1 and at H are inside (clamped to the border pixel); -1.25 is outside.
    np.testing.assert_allclose(out[3, 0, 0], features[1, 0, 0], rtol=1e-12)
    np.testing.assert_allclose(out[4, 0, 0], features[0, 6, 8], rtol=1e-12)
    np.testing.assert_array_equal(out[5], 0.0)


def test_float32_matches_float32_port():
  # Same kernel arithmetic in float32: integer box sizes that are multiples of the output size must keep
  # ceil(14 / 7) == 2 (a reciprocal-multiply division would make it 3).
  rng = np.random.default_rng(2)
  features = rng.standard_normal((2, 7, 9, 3)).astype(np.float32)
  rois = np.concatenate([edge_rois(7, 9), random_rois(rng, 8, 2, -4.0, 12.0)]).astype(np.float32)
  for sampling_ratio in (-1, 2):
    expected = port_roi_align(features, rois, (7, 7), 1.0, sampling_ratio, True, dtype=np.float32)
    out = run(jnp.asarray(features), jnp.asarray(rois), 7, 1.0, sampling_ratio, True)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("method", METHODS)
def test_max_sampling_grid_clamps_adaptive_grid(x64, method):
  rng = np.random.default_rng(3)
  features = rng.standard_normal((2, 9, 11, 2))
  rois = np.concatenate([edge_rois(9, 11), random_rois(rng, 8, 2, -4.0, 14.0)])
  expected = port_roi_align(features, rois, (3, 3), 1.0, -1, True, max_grid=2)
  out = run(features, rois, (3, 3), 1.0, -1, True, max_sampling_grid=2, method=method)
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
  # Bins whose adaptive grid is within the cap are torchvision's exactly.
  small = (rois[:, 3] - rois[:, 1] <= 6) & (rois[:, 4] - rois[:, 2] <= 6)
  np.testing.assert_allclose(out[small], port_roi_align(features, rois[small], (3, 3), 1.0, -1, True),
                             rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_gradient_matches_port_backward(x64, method, sampling_ratio):
  rng = np.random.default_rng(4)
  features = rng.standard_normal((2, 8, 10, 3))
  rois = np.concatenate([edge_rois(8, 10), random_rois(rng, 8, 2, -3.0, 12.0)])
  cotangent = rng.standard_normal((len(rois), 2, 3, 3))
  fn = jax.jit(lambda f, r: roi_align(f, r, (2, 3), 1.0, sampling_ratio, True, method=method))
  _, vjp = jax.vjp(fn, jnp.asarray(features), jnp.asarray(rois))
  grad_features, grad_rois = vjp(jnp.asarray(cotangent))
  expected = port_roi_align_backward(cotangent, features.shape, rois, (2, 3), 1.0, sampling_ratio, True)
  np.testing.assert_allclose(grad_features, expected, rtol=1e-11, atol=1e-12)
  np.testing.assert_array_equal(grad_rois, 0.0)


@pytest.mark.parametrize("method", METHODS)
def test_non_finite_and_bad_batch_rois_give_zeros(method):
  rng = np.random.default_rng(5)
  features = rng.standard_normal((2, 6, 6, 2)).astype(np.float32)
  good = random_rois(rng, 3, 2, 0.0, 6.0)
  bad = np.array([[0, np.nan, 1, 2, 3], [1, 1, 1, np.inf, 3], [0, -np.inf, 1, 2, np.nan],
                  [np.nan, 1, 1, 2, 2], [2, 1, 1, 3, 3], [-1, 1, 1, 3, 3]])
  huge = np.array([[0, -1e30, -1e30, 1e30, 1e30], [1, 3e38, 1, -3e38, 2]])
  rois = np.concatenate([good, bad, huge]).astype(np.float32)
  for sampling_ratio in (-1, 2):
    fn = jax.jit(lambda f, r: roi_align(f, r, 2, 1.0, sampling_ratio, True, method=method))
    out = np.asarray(fn(features, rois))
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[3:9], 0.0)
    np.testing.assert_allclose(out[:3], port_roi_align(features, good, (2, 2), 1.0, sampling_ratio, True),
                               rtol=1e-5, atol=1e-6)
    grad = jax.grad(lambda f: jnp.sum(fn(f, rois)))(jnp.asarray(features))
    assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("method", METHODS)
def test_vmap_agrees_with_per_example_port(x64, method):
  rng = np.random.default_rng(6)
  features = rng.standard_normal((3, 2, 6, 7, 2))  # 3 independent problems
  rois = np.stack([random_rois(rng, 5, 2, -2.0, 9.0) for _ in range(3)])
  fn = lambda f, r: roi_align(f, r, (2, 3), 1.0, -1, True, method=method)
  batched = np.asarray(jax.jit(jax.vmap(fn))(features, rois))
  for i in range(3):
    np.testing.assert_allclose(batched[i], port_roi_align(features[i], rois[i], (2, 3), 1.0, -1, True),
                               rtol=1e-12, atol=1e-12)


def test_empty_rois_and_bad_inputs():
  features = jnp.zeros((1, 4, 4, 3))
  assert roi_align(features, jnp.zeros((0, 5)), (2, 3)).shape == (0, 2, 3, 3)
  with pytest.raises(ValueError, match="rois"):
    roi_align(features, jnp.zeros((2, 4)), 2)
  with pytest.raises(ValueError, match="features"):
    roi_align(jnp.zeros((4, 4, 3)), jnp.zeros((2, 5)), 2)
  with pytest.raises(ValueError, match="output_size"):
    roi_align(features, jnp.zeros((2, 5)), (0, 2))
  with pytest.raises(ValueError, match="method"):
    roi_align(features, jnp.zeros((2, 5)), 2, method="fast")


# ------------------------------------------------------------------------------- torchvision.ops itself
def torchvision_problem(rng, dtype, height, width, spatial_scale):
  """``(features [2, H, W, 3], rois [28, 5])``: the edge cases (in image pixels) and random partly-outside boxes."""
  features = rng.standard_normal((2, height, width, 3)).astype(dtype)
  edges = edge_rois(height, width)
  edges[:, 1:] /= spatial_scale
  corners = random_rois(rng, 16, 2, -4.0 / spatial_scale, (max(height, width) + 2) / spatial_scale)
  return features, np.concatenate([edges, corners]).astype(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_forward_and_backward_match_torchvision(torchvision, x64, method, sampling_ratio, aligned):
  rng = np.random.default_rng(8)
  features, rois = torchvision_problem(rng, np.float64, 9, 11, 0.5)
  cotangent = rng.standard_normal((len(rois), 3, 4, 3))
  args = ((3, 4), 0.5, sampling_ratio, aligned)
  expected, expected_grad = torch_forward_backward(torchvision.ops.roi_align, features, rois, cotangent, *args)
  out, vjp = jax.vjp(jax.jit(lambda f: roi_align(f, jnp.asarray(rois), *args, method=method)), jnp.asarray(features))
  assert (np.abs(expected).max(axis=(1, 2, 3)) > 0.05).sum() > len(rois) / 2  # most RoIs pool something
  np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
@pytest.mark.parametrize("aligned", [False, True])
def test_float32_matches_torchvision(torchvision, sampling_ratio, aligned):
  # float32 end to end, at a scale that is not a power of two (x * 0.3 rounds) and a 7x7 output.
  rng = np.random.default_rng(9)
  features, rois = torchvision_problem(rng, np.float32, 10, 13, 0.3)
  cotangent = rng.standard_normal((len(rois), 7, 7, 3)).astype(np.float32)
  args = (7, 0.3, sampling_ratio, aligned)
  expected, expected_grad = torch_forward_backward(torchvision.ops.roi_align, features, rois, cotangent, *args)
  out, vjp = jax.vjp(jax.jit(lambda f: roi_align(f, jnp.asarray(rois), *args)), jnp.asarray(features))
  assert out.dtype == np.float32 and np.abs(expected).max() > 0.5
  np.testing.assert_allclose(out, expected, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad, rtol=1e-4, atol=1e-5)


# -------------------------------------------------------------------------------------------- multi-scale
def port_level(boxes, canonical_scale=224.0, canonical_level=4, min_level=2, max_level=5, eps=1e-6):
  """The FPN rule in float64 NumPy."""
  area = np.maximum((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), 0.0)
  with np.errstate(divide="ignore"):
    level = np.floor(canonical_level + np.log2(np.sqrt(area) / canonical_scale + eps))
  return np.clip(level, min_level, max_level).astype(np.int32)


def test_fpn_level_assignment_at_the_boundaries():
  sides = np.array([0.0, 111.9, 112.0, 223.9, 224.0, 447.9, 448.0, 1000.0, 20.0])
  boxes = np.stack([np.full_like(sides, 10.0), np.full_like(sides, 5.0), 10.0 + sides, 5.0 + sides], axis=1)
  levels = np.asarray(fpn_level_assignment(jnp.asarray(boxes, jnp.float32)))
  np.testing.assert_array_equal(levels, port_level(boxes))
  # The same numbers spelled out: canonical 224 -> level 4, one level per octave, clamped to [2, 5].
  np.testing.assert_array_equal(levels, [2, 2, 3, 3, 4, 4, 5, 5, 2])
  degenerate = jnp.asarray([[5.0, 5.0, 1.0, 9.0], [np.nan, 0.0, 1.0, 1.0]])  # negative area, NaN
  np.testing.assert_array_equal(fpn_level_assignment(degenerate, min_level=3), [3, 3])


@pytest.mark.parametrize("method", METHODS)
def test_multiscale_pools_each_roi_from_its_level(x64, method):
  rng = np.random.default_rng(7)
  image = 64
  maps = {level: rng.standard_normal((2, image >> level, image >> level, 3)) for level in range(2, 6)}
  sides = np.array([8.0, 30.0, 60.0, 120.0, 200.0, 300.0, 0.0, 64.0])
  corner = rng.uniform(-10, 50, (len(sides), 2))
  rois = np.concatenate([rng.integers(0, 2, (len(sides), 1)), corner, corner + sides[:, None] * [1.0, 0.7]], 1)
  out = np.asarray(jax.jit(lambda m, r: multiscale_roi_align(m, r, 2, 2, aligned=True, method=method))(maps, rois))
  levels = port_level(rois[:, 1:])
  assert len(set(levels)) >= 3  # the test spans several levels
  for k, level in enumerate(levels):
    expected = port_roi_align(maps[level], rois[k:k + 1], (2, 2), 2.0 ** -level, 2, True)
    np.testing.assert_allclose(out[k:k + 1], expected, rtol=1e-12, atol=1e-12)
  if method == "gather":
    as_list = jax.jit(lambda m, r: multiscale_roi_align(m, r, 2, 2, min_level=2, aligned=True, method=method))
    np.testing.assert_allclose(as_list([maps[l] for l in range(2, 6)], rois), out, rtol=1e-12, atol=1e-12)


def test_multiscale_bad_levels():
  maps = {2: jnp.zeros((1, 8, 8, 1)), 4: jnp.zeros((1, 2, 2, 1))}
  with pytest.raises(ValueError, match="consecutive"):
    multiscale_roi_align(maps, jnp.zeros((1, 5)), 2, 2)
  with pytest.raises(ValueError, match="min_level"):
    multiscale_roi_align([jnp.zeros((1, 8, 8, 1))], jnp.zeros((1, 5)), 2, 2)
