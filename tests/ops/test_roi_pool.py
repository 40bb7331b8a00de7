"""roi_pool against torchvision.ops.roi_pool and a NumPy port of its CPU kernel, forward and backward.

The port (of ``torchvision/csrc/ops/cpu/roi_pool_kernel.cpp``; it runs without torchvision) loops over RoIs,
bins, channels and bin pixels in the kernel's scalar type ``T`` and keeps its argmax (running max from -FLT_MAX
with a strict ``>``); the backward adds each output gradient at that argmax. The same problems also run against
``torchvision.ops.roi_pool`` itself, its gradient through torch autograd. Max pooling does no arithmetic on the
values, so the forward comparisons are exact.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from rois import random_rois, torch_forward_backward

from cvjax.ops.roi_pool import roi_pool

FLT_MAX = float(np.finfo(np.float32).max)


def cpp_round(v):
  """C++ std::round: halves away from zero."""
  return math.floor(v + 0.5) if v >= 0 else -math.floor(-v + 0.5)


def port_roi_pool(features, rois, pooled, scale=1.0, dtype=np.float64):
  """torchvision's CPU RoIPool on NHWC features: (out [K, PH, PW, C], argmax [K, PH, PW, C] as h * W + w)."""
  t = np.dtype(dtype).type
  features = np.asarray(features, dtype)
  _, height, width, channels = features.shape
  ph_n, pw_n = pooled
  out = np.zeros((len(rois), ph_n, pw_n, channels), dtype)
  argmax = np.full(out.shape, -1)
  for k, roi in enumerate(np.asarray(rois, dtype)):
    b = int(roi[0])
    start_w, start_h, end_w, end_h = (cpp_round(float(t(v) * t(scale))) for v in roi[1:])
    bin_h = t(max(end_h - start_h + 1, 1)) / t(ph_n)
    bin_w = t(max(end_w - start_w + 1, 1)) / t(pw_n)
    for ph in range(ph_n):
      h0 = min(max(math.floor(t(ph) * bin_h) + start_h, 0), height)
      h1 = min(max(math.ceil(t(ph + 1) * bin_h) + start_h, 0), height)
      for pw in range(pw_n):
        w0 = min(max(math.floor(t(pw) * bin_w) + start_w, 0), width)
        w1 = min(max(math.ceil(t(pw + 1) * bin_w) + start_w, 0), width)
        empty = h1 <= h0 or w1 <= w0
        for c in range(channels):
          best, arg = (0.0 if empty else -FLT_MAX), -1
          for h in range(h0, h1):
            for w in range(w0, w1):
              if features[b, h, w, c] > best:
                best, arg = features[b, h, w, c], h * width + w
          out[k, ph, pw, c], argmax[k, ph, pw, c] = best, arg
  return out, argmax


def port_roi_pool_backward(grad, argmax, shape, rois):
  """Adds each output gradient at its argmax (nothing where argmax is -1)."""
  grad_in = np.zeros(shape)
  width = shape[2]
  for k, ph, pw, c in np.ndindex(grad.shape):
    a = argmax[k, ph, pw, c]
    if a >= 0:
      grad_in[int(rois[k, 0]), a // width, a % width, c] += grad[k, ph, pw, c]
  return grad_in


@pytest.fixture
def x64():
  with jax.enable_x64(True):
    yield


def run(features, rois, *args):
  return np.asarray(jax.jit(lambda f, r: roi_pool(f, r, *args))(features, rois))


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_random_boxes_match_port(x64, scale):
  rng = np.random.default_rng(0)
  features = rng.integers(-3, 4, (2, 9, 11, 3)).astype(np.float64)  # small integers: many ties
  rois = np.concatenate([random_rois(rng, 20, 2, -6.0, 16.0 / scale, quantum=0.25),
                         [[0, 30, 30, 40, 40], [1, 5, 6, 2, 1]]])
  expected, _ = port_roi_pool(features, rois, (3, 4), scale)
  np.testing.assert_array_equal(run(features, rois, (3, 4), scale), expected)


def test_rounding_is_half_away_from_zero(x64):
  features = np.arange(2 * 8 * 8).reshape(2, 8, 8, 1).astype(np.float64)  # every pixel distinct
  # x1 * scale = 2.5 / 0.5 / -0.5 / 1.5: std::round gives 3 / 1 / -1 / 2, NumPy's half-to-even 2 / 0 / -0 / 2.
  rois = np.array([[0, 5.0, 1.0, 12.0, 9.0], [1, 1.0, 5.0, 3.0, 13.0], [0, -1.0, -1.0, 5.0, 3.0]])
  expected, _ = port_roi_pool(features, rois, (2, 2), 0.5)
  np.testing.assert_array_equal(run(features, rois, (2, 2), 0.5), expected)
  half_even, _ = port_roi_pool(features, np.where(rois == 5.0, 4.0, rois), (2, 2), 0.5)
  assert not np.array_equal(expected, half_even)  # the test distinguishes the two roundings


def test_gradient_goes_to_first_argmax(x64):
  rng = np.random.default_rng(1)
  features = rng.integers(0, 3, (2, 7, 8, 2)).astype(np.float64)  # heavy ties
  rois = random_rois(rng, 12, 2, -3.0, 10.0, quantum=0.25)
  expected, argmax = port_roi_pool(features, rois, (2, 3))
  cotangent = rng.standard_normal(expected.shape)
  out, vjp = jax.vjp(jax.jit(lambda f: roi_pool(f, jnp.asarray(rois), (2, 3))), jnp.asarray(features))
  np.testing.assert_array_equal(out, expected)
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0],
                             port_roi_pool_backward(cotangent, argmax, features.shape, rois), rtol=1e-12)


def test_nan_and_very_negative_values_are_never_picked(x64):
  rng = np.random.default_rng(2)
  features = rng.standard_normal((1, 6, 6, 4))
  features[0, 1:3, 1:3, 0] = np.nan
  features[0, :, :, 1] = -np.inf  # nothing beats -FLT_MAX: output -FLT_MAX, no gradient
  features[0, :3, :, 2] = -1e300  # below -FLT_MAX as well (float64 input)
  features[0, 2, 2, 3] = np.nan
  rois = np.array([[0, 0.0, 0.0, 5.0, 5.0], [0, 1.0, 1.0, 2.0, 2.0], [0, 0.0, 0.0, 1.0, 1.0]])
  expected, argmax = port_roi_pool(features, rois, (2, 2))
  out, vjp = jax.vjp(jax.jit(lambda f: roi_pool(f, jnp.asarray(rois), (2, 2))), jnp.asarray(features))
  np.testing.assert_array_equal(out, expected)
  assert np.all(np.asarray(out)[:, :, :, 1] == -FLT_MAX)
  grad = np.asarray(vjp(jnp.ones(expected.shape))[0])
  np.testing.assert_array_equal(grad, port_roi_pool_backward(np.ones(expected.shape), argmax, features.shape, rois))


def test_float32_matches_float32_port():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((2, 10, 9, 3)).astype(np.float32)
  rois = random_rois(rng, 24, 2, -4.0, 40.0, quantum=0.25).astype(np.float32)
  expected, _ = port_roi_pool(features, rois, (7, 7), 0.25, dtype=np.float32)
  out = run(features, rois, 7, 0.25)
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, expected)


def test_bad_rois_give_zeros_and_vmap():
  rng = np.random.default_rng(4)
  features = rng.standard_normal((2, 5, 5, 2)).astype(np.float32)
  rois = np.array([[0, np.nan, 0, 2, 2], [1, 0, 0, np.inf, 2], [2, 0, 0, 2, 2], [0, 0, 0, 3, 3]], np.float32)
  out = run(features, rois, 2)
  np.testing.assert_array_equal(out[:3], 0.0)
  np.testing.assert_array_equal(out[3], port_roi_pool(features, rois[3:], (2, 2), dtype=np.float32)[0][0])
  stacked = np.stack([features, features[::-1]])
  batched = np.asarray(jax.jit(jax.vmap(lambda f, r: roi_pool(f, r, 2)))(stacked, np.stack([rois, rois])))
  np.testing.assert_array_equal(batched[0], out)
  np.testing.assert_array_equal(batched[1, 3], port_roi_pool(features[::-1], rois[3:], (2, 2))[0][0])


def test_empty_rois_and_bad_inputs():
  features = jnp.zeros((1, 4, 4, 3))
  assert roi_pool(features, jnp.zeros((0, 5)), (2, 3)).shape == (0, 2, 3, 3)
  with pytest.raises(ValueError, match="rois"):
    roi_pool(features, jnp.zeros((2, 6)), 2)
  with pytest.raises(ValueError, match="output_size"):
    roi_pool(features, jnp.zeros((2, 5)), -1)


# ------------------------------------------------------------------------------- torchvision.ops itself
def check_against_torchvision(torchvision, features, rois, output_size, spatial_scale, rng):
  """cvjax's forward equals torchvision's exactly, its gradient torchvision's autograd; returns the output."""
  cotangent = rng.standard_normal((len(rois), *output_size, features.shape[-1])).astype(features.dtype)
  expected, expected_grad = torch_forward_backward(torchvision.ops.roi_pool, features, rois, cotangent,
                                                   output_size, spatial_scale)
  out, vjp = jax.vjp(jax.jit(lambda f: roi_pool(f, jnp.asarray(rois), output_size, spatial_scale)),
                     jnp.asarray(features))
  np.testing.assert_array_equal(out, expected)
  # Several bins can pick the same pixel: the sums may round differently in float32.
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent))[0], expected_grad, rtol=1e-6, atol=1e-6)
  assert np.count_nonzero(expected_grad) > 0
  return expected


@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_forward_and_backward_match_torchvision(torchvision, x64, scale):
  rng = np.random.default_rng(5)
  features = rng.integers(-3, 4, (2, 9, 11, 3)).astype(np.float64)  # small integers: ties, first argmax wins
  rois = np.concatenate([random_rois(rng, 20, 2, -6.0, 16.0 / scale, quantum=0.25),
                         [[0, 30 / scale, 30 / scale, 40 / scale, 40 / scale], [1, 5, 6, 2, 1]]])
  out = check_against_torchvision(torchvision, features, rois, (3, 4), scale, rng)
  assert (out[-2] == 0).all()  # outside the map: empty bins
  assert (np.abs(out).max(axis=(1, 2, 3)) > 0).mean() > 0.5  # most RoIs pick something


def test_float32_matches_torchvision(torchvision):
  rng = np.random.default_rng(6)
  features = rng.standard_normal((2, 10, 9, 3)).astype(np.float32)
  rois = random_rois(rng, 24, 2, -4.0, 40.0, quantum=0.25).astype(np.float32)
  check_against_torchvision(torchvision, features, rois, (7, 7), 0.25, rng)


def test_nan_and_minus_inf_match_torchvision(torchvision):
  rng = np.random.default_rng(7)
  features = rng.standard_normal((1, 6, 6, 4)).astype(np.float32)
  features[0, 1:3, 1:3, 0] = np.nan
  features[0, :, :, 1] = -np.inf  # nothing beats -FLT_MAX: output -FLT_MAX, no gradient
  features[0, 2, 2, 3] = np.nan
  rois = np.array([[0, 0.0, 0.0, 5.0, 5.0], [0, 1.0, 1.0, 2.0, 2.0], [0, 0.0, 0.0, 1.0, 1.0]], np.float32)
  out = check_against_torchvision(torchvision, features, rois, (2, 2), 1.0, rng)
  assert (out[..., 1] == -FLT_MAX).all()
