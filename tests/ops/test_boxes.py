"""cvjax.ops.boxes against torchvision.ops itself (bit for bit in float32), torchvision's BoxCoder and torch
autograd, and against float64 NumPy ports of the same formulas (which run without torchvision)."""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.ops import boxes as B

FORMATS = ("xyxy", "xywh", "cxcywh")


# ---- float64 NumPy ports (torchvision's conventions: absolute xyxy, no +1, GIoU = IoU - (C - union) / C) ----

def ref_iou_terms(a, b):
  a, b = np.asarray(a, np.float64)[:, None], np.asarray(b, np.float64)[None]
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  wh = np.clip(np.minimum(a[..., 2:], b[..., 2:]) - np.maximum(a[..., :2], b[..., :2]), 0, None)
  inter = wh[..., 0] * wh[..., 1]
  union = area_a + area_b - inter
  wh_c = np.clip(np.maximum(a[..., 2:], b[..., 2:]) - np.minimum(a[..., :2], b[..., :2]), 0, None)
  return inter, union, wh_c[..., 0] * wh_c[..., 1]


def ref_box_iou(a, b):
  inter, union, _ = ref_iou_terms(a, b)
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / union


def ref_giou(a, b):
  inter, union, enclosing = ref_iou_terms(a, b)
  with np.errstate(invalid="ignore", divide="ignore"):
    return inter / union - (enclosing - union) / enclosing


def ref_to_xyxy(boxes, fmt):
  a, b, c, d = np.asarray(boxes, np.float64).T
  if fmt == "xywh":
    return np.stack([a, b, a + c, b + d], 1)
  if fmt == "cxcywh":
    return np.stack([a - c / 2, b - d / 2, a + c / 2, b + d / 2], 1)
  return np.stack([a, b, c, d], 1)


def ref_encode(gt, proposals, weights):
  wx, wy, ww, wh = weights
  pw, ph = proposals[:, 2] - proposals[:, 0], proposals[:, 3] - proposals[:, 1]
  px, py = proposals[:, 0] + 0.5 * pw, proposals[:, 1] + 0.5 * ph
  gw, gh = gt[:, 2] - gt[:, 0], gt[:, 3] - gt[:, 1]
  gx, gy = gt[:, 0] + 0.5 * gw, gt[:, 1] + 0.5 * gh
  return np.stack([wx * (gx - px) / pw, wy * (gy - py) / ph, ww * np.log(gw / pw), wh * np.log(gh / ph)], 1)


def ref_decode(codes, boxes, weights, clamp):
  wx, wy, ww, wh = weights
  w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
  cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
  dw, dh = np.minimum(codes[:, 2] / ww, clamp), np.minimum(codes[:, 3] / wh, clamp)
  px, py = codes[:, 0] / wx * w + cx, codes[:, 1] / wy * h + cy
  pw, ph = np.exp(dw) * w, np.exp(dh) * h
  return np.stack([px - pw / 2, py - ph / 2, px + pw / 2, py + ph / 2], 1)


def random_boxes(rng, n, scale=100.0):
  xy = rng.uniform(0, scale, (n, 2))
  wh = rng.uniform(1, scale / 2, (n, 2))
  return np.concatenate([xy, xy + wh], 1).astype(np.float32)


# ---- tests ----

@pytest.mark.parametrize("in_fmt,out_fmt", list(itertools.product(FORMATS, FORMATS)))
def test_box_convert_matches_reference_and_round_trips(in_fmt, out_fmt):
  rng = np.random.default_rng(0)
  boxes = rng.uniform(1, 50, (7, 4)).astype(np.float32)
  out = np.asarray(B.box_convert(boxes, in_fmt, out_fmt))
  np.testing.assert_allclose(ref_to_xyxy(out, out_fmt), ref_to_xyxy(boxes, in_fmt), rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(B.box_convert(out, out_fmt, in_fmt), boxes, rtol=1e-5, atol=1e-4)


def test_box_convert_rejects_unknown_format_and_bad_shape():
  with pytest.raises(ValueError, match="in_fmt"):
    B.box_convert(jnp.zeros((2, 4)), "yxyx", "xyxy")
  with pytest.raises(ValueError, match=r"boxes must have shape \[\.\.\., 4\]"):
    B.box_convert(jnp.zeros((2, 3)), "xyxy", "xywh")


def test_box_area_matches_reference():
  boxes = random_boxes(np.random.default_rng(1), 9)
  expected = (boxes[:, 2] - boxes[:, 0]).astype(np.float64) * (boxes[:, 3] - boxes[:, 1])
  np.testing.assert_allclose(B.box_area(boxes), expected, rtol=1e-6)


@pytest.mark.parametrize("fn,ref", [(B.box_iou, ref_box_iou), (B.generalized_box_iou, ref_giou)])
def test_pairwise_iou_and_giou_match_reference(fn, ref):
  rng = np.random.default_rng(2)
  a, b = random_boxes(rng, 13), random_boxes(rng, 8)
  out = np.asarray(fn(a, b))
  assert out.shape == (13, 8)
  np.testing.assert_allclose(out, ref(a, b), rtol=1e-5, atol=1e-6)
  assert (out > 0).any() and (out < 1).all()  # the random boxes overlap somewhere, never fully


@pytest.mark.parametrize("pairwise,paired", [(B.box_iou, B.elementwise_box_iou),
                                             (B.generalized_box_iou, B.elementwise_generalized_box_iou)])
def test_elementwise_is_the_pairwise_diagonal_and_batches(pairwise, paired):
  rng = np.random.default_rng(3)
  a, b = random_boxes(rng, 12).reshape(3, 4, 4), random_boxes(rng, 12).reshape(3, 4, 4)
  full = np.asarray(pairwise(a, b))
  assert full.shape == (3, 4, 4)
  for i in range(3):
    np.testing.assert_allclose(full[i], pairwise(a[i], b[i]), rtol=1e-6)
    np.testing.assert_allclose(paired(a[i], b[i]), np.diag(full[i]), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(paired)(a, b), np.diagonal(full, axis1=1, axis2=2), rtol=1e-6)
  with pytest.raises(ValueError, match="same shape"):
    paired(a[0], b[0, :3])


def test_degenerate_boxes_eps_zero_is_torchvision_and_default_is_finite():
  boxes = np.array([[1, 1, 1, 1], [2, 2, 2, 5], [0, 0, 4, 4], [5, 5, 5, 5]], np.float32)  # 3 of 4 empty
  for fn, ref in [(B.box_iou, ref_box_iou), (B.generalized_box_iou, ref_giou)]:
    expected = ref(boxes, boxes)
    assert np.isnan(expected).any()  # the reference divides 0 / 0
    np.testing.assert_allclose(fn(boxes, boxes, eps=0.0), expected, rtol=1e-6)  # NaN where it is NaN
    guarded = np.asarray(fn(boxes, boxes))
    assert np.isfinite(guarded).all()
    finite = np.isfinite(expected)
    np.testing.assert_allclose(guarded[finite], expected[finite], rtol=1e-6)
  grads = jax.grad(lambda x: B.elementwise_generalized_box_iou(x, x[::-1]).sum())(jnp.asarray(boxes))
  assert np.isfinite(np.asarray(grads)).all()


def test_giou_gradient_matches_torchvision_autograd(torchvision):
  rng = np.random.default_rng(4)
  a, b = random_boxes(rng, 6).astype(np.float64), random_boxes(rng, 6).astype(np.float64)
  ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)
  weights = np.arange(1.0, 7.0)  # distinct per pair, so that a gradient sent to the wrong pair shows
  (torchvision.ops.generalized_box_iou(ta, tb).diagonal() * torch.tensor(weights)).sum().backward()
  grad_a, grad_b = jax.grad(lambda x, y: (B.elementwise_generalized_box_iou(x, y) * weights).sum(),
                            argnums=(0, 1))(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32))
  assert np.abs(ta.grad.numpy()).min() > 1e-4  # every coordinate of these overlapping boxes moves the GIoU
  np.testing.assert_allclose(grad_a, ta.grad.numpy(), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_b, tb.grad.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_reference_and_inverts(weights):
  rng = np.random.default_rng(5)
  gt, proposals = random_boxes(rng, 10), random_boxes(rng, 10)
  codes = np.asarray(jax.jit(B.encode_boxes, static_argnums=2)(gt, proposals, weights))
  np.testing.assert_allclose(codes, ref_encode(gt.astype(np.float64), proposals.astype(np.float64), weights),
                             rtol=1e-5, atol=1e-5)
  decoded = B.decode_boxes(codes, proposals, weights)
  np.testing.assert_allclose(decoded, gt, rtol=1e-5, atol=1e-3)
  np.testing.assert_allclose(decoded, ref_decode(codes.astype(np.float64), proposals.astype(np.float64), weights,
                                                 math.log(1000 / 16)), rtol=1e-5, atol=1e-3)


def test_decode_clamps_large_scale_deltas():
  boxes = np.array([[0, 0, 10, 20]], np.float32)
  codes = np.array([[0.5, -0.5, 20.0, -3.0]], np.float32)  # exp(20) would blow the width up
  clamp = math.log(1000 / 16)
  out = np.asarray(B.decode_boxes(codes, boxes))
  np.testing.assert_allclose(out, ref_decode(codes.astype(np.float64), boxes.astype(np.float64),
                                             (1, 1, 1, 1), clamp), rtol=1e-5)
  np.testing.assert_allclose(out[0, 2] - out[0, 0], 10 * 1000 / 16, rtol=1e-5)
  with pytest.raises(ValueError, match="weights"):
    B.decode_boxes(codes, boxes, weights=(1, 1, 1))


# ---- torchvision.ops itself (the module docstring's claim: eps=0 is torchvision bit for bit) ----

def boxes_with_degenerates(rng, batch, n):
  """``[batch, n, 4]`` float32 random boxes whose last three are empty: a point, a line and one inverted in x."""
  boxes = random_boxes(rng, batch * n).reshape(batch, n, 4)
  boxes[:, -3:] = [[1, 1, 1, 1], [2, 2, 2, 5], [30, 20, 20, 25]]
  return boxes


@pytest.mark.parametrize("in_fmt,out_fmt", list(itertools.product(FORMATS, FORMATS)))
def test_box_convert_is_torchvision_bit_for_bit(torchvision, in_fmt, out_fmt):
  boxes = np.random.default_rng(6).uniform(-20, 50, (3, 7, 4)).astype(np.float32)  # batched, mixed signs
  expected = torchvision.ops.box_convert(torch.from_numpy(boxes), in_fmt, out_fmt).numpy()
  out = jax.jit(B.box_convert, static_argnums=(1, 2))(boxes, in_fmt, out_fmt)
  np.testing.assert_array_equal(out, expected)


def test_box_area_is_torchvision_bit_for_bit(torchvision):
  boxes = boxes_with_degenerates(np.random.default_rng(7), 2, 9)
  expected = torchvision.ops.box_area(torch.from_numpy(boxes)).numpy()
  assert (expected < 0).any() and (expected == 0).any() and (expected > 0).any()
  np.testing.assert_array_equal(B.box_area(boxes), expected)


@pytest.mark.parametrize("name", ["box_iou", "generalized_box_iou"])
def test_pairwise_iou_and_giou_are_torchvision_bit_for_bit(torchvision, name):
  rng = np.random.default_rng(8)
  a, b = boxes_with_degenerates(rng, 3, 13), boxes_with_degenerates(rng, 3, 8)  # [3, 13, 4] x [3, 8, 4]
  expected = getattr(torchvision.ops, name)(torch.from_numpy(a), torch.from_numpy(b)).numpy()
  assert expected.shape == (3, 13, 8)
  finite = np.isfinite(expected)
  assert not finite.all()  # 0 / 0 between the empty boxes
  assert (expected[finite] > 0).any() and (expected[finite] <= 0).any()  # overlapping and disjoint pairs
  fn = getattr(B, name)
  np.testing.assert_array_equal(jax.jit(lambda x, y: fn(x, y, eps=0.0))(a, b), expected)  # NaN where NaN
  guarded = np.asarray(jax.jit(fn)(a, b))
  assert np.isfinite(guarded).all()
  np.testing.assert_array_equal(guarded[finite], expected[finite])


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_box_coder_matches_torchvision(torchvision, weights):
  from torchvision.models.detection._utils import BoxCoder  # pylint: disable=import-outside-toplevel
  coder = BoxCoder(weights)  # its default clamp is log(1000 / 16), as decode_boxes's
  rng = np.random.default_rng(9)
  gt, proposals = random_boxes(rng, 50), random_boxes(rng, 50)
  expected = coder.encode_single(torch.from_numpy(gt), torch.from_numpy(proposals)).numpy()
  codes = np.array(jax.jit(B.encode_boxes, static_argnums=2)(gt, proposals, weights))
  np.testing.assert_allclose(codes, expected, rtol=1e-6, atol=1e-6)
  codes[:5, 2:] = 20.0  # past the clamp
  expected = coder.decode_single(torch.from_numpy(codes), torch.from_numpy(proposals)).numpy()
  decoded = np.asarray(jax.jit(B.decode_boxes, static_argnums=2)(codes, proposals, weights))
  np.testing.assert_allclose(decoded, expected, rtol=1e-6, atol=1e-4)
