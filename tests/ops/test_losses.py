"""cvjax.ops.losses: values and gradients against torch (CPU autograd, float64) references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cvjax.ops import losses as L

TORCH_REDUCE = {"none": lambda x: x, "mean": torch.mean, "sum": torch.sum}


def torch_value_and_grad(fn, *arrays):
  """fn's value and its gradient w.r.t. the first array, in float64 torch, for a weighted sum of the output."""
  tensors = [torch.tensor(np.asarray(a, np.float64)) for a in arrays]
  tensors[0].requires_grad_(True)
  out = fn(*tensors)
  weights = torch.linspace(0.5, 1.5, out.numel(), dtype=torch.float64).reshape(out.shape)
  (out * weights).sum().backward()
  return out.detach().numpy(), tensors[0].grad.numpy(), weights.numpy()


def assert_matches_torch(jax_fn, torch_fn, *arrays, rtol=1e-5, atol=1e-6):
  expected, expected_grad, weights = torch_value_and_grad(torch_fn, *arrays)
  inputs = [jnp.asarray(a, jnp.float32) for a in arrays]
  value = jax.jit(jax_fn)(*inputs)
  grad = jax.jit(jax.grad(lambda x, *rest: (jax_fn(x, *rest) * weights).sum()))(*inputs)
  np.testing.assert_allclose(value, expected, rtol=rtol, atol=atol)
  np.testing.assert_allclose(grad, expected_grad, rtol=rtol * 10, atol=atol * 10)


def torch_focal(logits, targets, alpha, gamma, reduction):
  """torchvision.ops.sigmoid_focal_loss, written out on plain tensors."""
  p = torch.sigmoid(logits)
  ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
  p_t = p * targets + (1 - p) * (1 - targets)
  loss = ce * ((1 - p_t) ** gamma)
  if alpha >= 0:
    loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
  return TORCH_REDUCE[reduction](loss)


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 2.0), (0.5, 0.0), (0.25, 1.5)])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_sigmoid_focal_loss(alpha, gamma, reduction):
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 6))
  targets = (rng.random((4, 6)) < 0.3).astype(np.float64)
  assert_matches_torch(lambda x, t: L.sigmoid_focal_loss(x, t, alpha, gamma, reduction),
                       lambda x, t: torch_focal(x, t, alpha, gamma, reduction), logits, targets)


def test_focal_loss_is_finite_for_saturated_logits_and_vmaps():
  logits = jnp.array([[-60.0, 60.0, 0.0], [60.0, -60.0, 3.0]])
  targets = jnp.array([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
  grads = jax.grad(lambda x: L.sigmoid_focal_loss(x, targets, reduction="sum"))(logits)
  assert np.isfinite(np.asarray(grads)).all()
  np.testing.assert_allclose(jax.vmap(L.sigmoid_focal_loss)(logits, targets), L.sigmoid_focal_loss(logits, targets),
                             rtol=1e-6)


def torch_dice(inputs, targets, from_logits, reduction):
  """DETR's dice_loss (sigmoid, flatten, 1 - (2 sum(pt) + 1) / (sum p + sum t + 1)), before / num_boxes."""
  p = (torch.sigmoid(inputs) if from_logits else inputs).flatten(1)
  t = targets.flatten(1)
  return TORCH_REDUCE[reduction](1 - (2 * (p * t).sum(1) + 1) / (p.sum(-1) + t.sum(-1) + 1))


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_dice_loss(from_logits, reduction):
  rng = np.random.default_rng(1)
  inputs = rng.normal(0, 2, (3, 5, 4)) if from_logits else rng.random((3, 5, 4))
  targets = (rng.random((3, 5, 4)) < 0.4).astype(np.float64)
  assert_matches_torch(lambda x, t: L.dice_loss(x, t, from_logits=from_logits, reduction=reduction),
                       lambda x, t: torch_dice(x, t, from_logits, reduction), inputs, targets)


def torch_giou_loss(boxes1, boxes2, reduction, eps=1e-7):
  """torchvision.ops.generalized_box_iou_loss on plain tensors (its eps is added, ours floors: see giou_loss)."""
  x1, y1, x2, y2 = boxes1.unbind(-1)
  u1, v1, u2, v2 = boxes2.unbind(-1)
  inter = (torch.min(x2, u2) - torch.max(x1, u1)).clamp(min=0) * (torch.min(y2, v2) - torch.max(y1, v1)).clamp(min=0)
  union = (x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter
  area_c = (torch.max(x2, u2) - torch.min(x1, u1)) * (torch.max(y2, v2) - torch.min(y1, v1))
  giou = inter / (union + eps) - (area_c - union) / (area_c + eps)
  return TORCH_REDUCE[reduction](1 - giou)


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_giou_loss(reduction):
  rng = np.random.default_rng(2)
  xy1, xy2 = rng.uniform(0, 10, (2, 8, 2))
  boxes1 = np.concatenate([xy1, xy1 + rng.uniform(1, 6, (8, 2))], 1)
  boxes2 = np.concatenate([xy2, xy2 + rng.uniform(1, 6, (8, 2))], 1)
  assert_matches_torch(lambda a, b: L.giou_loss(a, b, reduction), lambda a, b: torch_giou_loss(a, b, reduction),
                       boxes1, boxes2)
  identical = L.giou_loss(jnp.asarray(boxes1), jnp.asarray(boxes1))
  np.testing.assert_allclose(identical, 0.0, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0, 1.0 / 9])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_smooth_l1_loss(beta, reduction):
  rng = np.random.default_rng(3)
  inputs, targets = rng.normal(0, 1, (2, 5, 4))
  inputs[0, 0] = targets[0, 0]  # d = 0: the L1 (beta = 0) subgradient there is 0 in both
  assert_matches_torch(lambda x, t: L.smooth_l1_loss(x, t, beta, reduction),
                       lambda x, t: F.smooth_l1_loss(x, t, beta=beta, reduction=reduction), inputs, targets)


# Each loss on inputs with no elements: (loss(inputs, targets, reduction), a non-empty input, its target), where
# the loss is taken of the first 0 rows. Boxes [0, 4] are an image without objects; masks [0, H, W] one
# without instances.
EMPTY_CASES = {
    "sigmoid_focal_loss": (lambda x, t, r: L.sigmoid_focal_loss(x, t, reduction=r), np.ones((3, 5)),
                           np.ones((3, 5))),
    "dice_loss": (lambda x, t, r: L.dice_loss(x, t, reduction=r), np.ones((3, 4, 4)), np.ones((3, 4, 4))),
    "giou_loss": (lambda x, t, r: L.giou_loss(x, t, reduction=r), np.array([[0.0, 0.0, 2.0, 3.0]] * 3),
                  np.array([[1.0, 1.0, 4.0, 4.0]] * 3)),
    "smooth_l1_loss": (lambda x, t, r: L.smooth_l1_loss(x, t, reduction=r), np.ones((3, 4)), np.zeros((3, 4))),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_reduced_loss_of_empty_inputs_is_zero_with_zero_gradient(name, reduction):
  loss_fn, inputs, targets = EMPTY_CASES[name]
  inputs, targets = jnp.asarray(inputs, jnp.float32), jnp.asarray(targets, jnp.float32)

  # The empty loss added to a non-empty one, as in a detection total: a NaN there would poison the sum.
  def total(x):
    return loss_fn(x[:0], targets[:0], reduction) + loss_fn(x, targets, reduction)

  value, grad = jax.jit(jax.value_and_grad(total))(inputs)
  expected_grad = jax.grad(lambda x: loss_fn(x, targets, reduction))(inputs)
  np.testing.assert_allclose(value, loss_fn(inputs, targets, reduction), rtol=1e-6)
  np.testing.assert_allclose(grad, expected_grad, rtol=1e-6)  # the empty term adds nothing, not NaN

  empty_value, empty_grad = jax.jit(jax.value_and_grad(lambda x: loss_fn(x[:0], targets[:0], reduction)))(inputs)
  assert empty_value.shape == () and float(empty_value) == 0.0
  assert empty_grad.shape == inputs.shape and (np.asarray(empty_grad) == 0).all()
  # vmap over images that have no boxes / masks: one 0 per image.
  batched = jax.jit(jax.vmap(lambda x, t: loss_fn(x, t, reduction)))(
      jnp.zeros((2, 0, *inputs.shape[1:])), jnp.zeros((2, 0, *targets.shape[1:])))
  np.testing.assert_array_equal(batched, np.zeros(2, np.float32))


@pytest.mark.parametrize("name", sorted(EMPTY_CASES))
def test_unreduced_loss_of_empty_inputs_is_empty(name):
  loss_fn, inputs, targets = EMPTY_CASES[name]
  out = jax.jit(lambda x, t: loss_fn(x, t, "none"))(jnp.asarray(inputs[:0]), jnp.asarray(targets[:0]))
  # Row losses (dice: [N]; giou: [N] of [N, 4]) or elementwise ones (focal, smooth L1): [0, ...] either way.
  expected_shape = inputs[:0].shape[:1] if name in ("dice_loss", "giou_loss") else inputs[:0].shape
  assert out.shape == expected_shape


def test_smooth_l1_rejects_negative_beta():
  with pytest.raises(ValueError, match="beta"):
    L.smooth_l1_loss(jnp.zeros(3), jnp.zeros(3), beta=-1.0)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("masked", [False, True])
def test_weighted_softmax_cross_entropy(reduction, masked):
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (3, 7, 5))
  labels = rng.integers(0, 5, (3, 7))
  weights = np.array([1.0, 1.0, 0.5, 2.0, 0.1])  # last = DETR's no-object weight
  mask = rng.random((3, 7)) < 0.7 if masked else np.ones((3, 7), bool)
  torch_labels = torch.tensor(np.where(mask, labels, -100))  # PyTorch's ignore_index for the masked ones

  def torch_ce(x):  # with reduction='none' PyTorch gives 0 at ignored positions, as ours does where masked
    return F.cross_entropy(x.permute(0, 2, 1), torch_labels, weight=torch.tensor(weights), reduction=reduction)

  assert_matches_torch(
      lambda x: L.weighted_softmax_cross_entropy(x, jnp.asarray(labels), weights, mask if masked else None,
                                                 reduction), torch_ce, logits)


def test_cross_entropy_all_masked_is_zero_not_nan_and_validates():
  logits = jnp.zeros((2, 3))
  labels = jnp.array([0, 2])
  loss, grad = jax.value_and_grad(
      lambda x: L.weighted_softmax_cross_entropy(x, labels, mask=jnp.zeros(2, bool)))(logits)
  assert float(loss) == 0.0 and np.isfinite(np.asarray(grad)).all()
  with pytest.raises(ValueError, match="class_weights"):
    L.weighted_softmax_cross_entropy(logits, labels, class_weights=jnp.ones(4))
  with pytest.raises(ValueError, match="labels"):
    L.weighted_softmax_cross_entropy(logits, jnp.array([0.0, 1.0]))
  with pytest.raises(ValueError, match="reduction"):
    L.sigmoid_focal_loss(logits, logits, reduction="avg")
