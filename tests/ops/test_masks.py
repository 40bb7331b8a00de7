"""cvjax.ops.paste_masks_in_image against torchvision's roi_heads.paste_masks_in_image: NumPy inputs (the host
path the evaluator takes), jnp under jit and under vmap, on random boxes and the edge cases."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.ops import paste_masks_in_image

HEIGHT, WIDTH = 37, 50


def _reference(torchvision, masks, boxes, size, padding=1):
  import torch
  from torchvision.models.detection.roi_heads import paste_masks_in_image as reference
  out = reference(torch.from_numpy(masks)[:, None], torch.from_numpy(boxes), size, padding=padding)
  return out[:, 0].numpy()


def _boxes(rng, count):
  """Random boxes (many partly outside the image), then the edge cases: sub-pixel boxes at the origin, inside
  and straddling integer coordinates, boxes touching each border or covering it, a degenerate one (x2 < x1)."""
  xy = rng.uniform(-6, 34, (count, 2))
  boxes = np.concatenate([xy, xy + rng.uniform(8, 30, (count, 2))], 1)  # each overlaps the image
  edge = [[0, 0, 0.5, 0.3], [10.2, 7.6, 10.9, 8.1], [19.9, 4.95, 20.1, 5.05], [3.0, 3.0, 3.0, 3.0],
          [40, 25, WIDTH, HEIGHT], [45, 30, 60, 45], [-6, -4, 9, 7], [0, 0, WIDTH, HEIGHT],
          [-10, -10, WIDTH + 10, HEIGHT + 10], [12, 12, 11.5, 20], [0, 20, 0.8, 36.9]]
  return np.concatenate([boxes, edge]).astype(np.float32)


@pytest.mark.parametrize("seed,size,padding", [(0, 28, 1), (1, 28, 1), (2, 14, 0), (3, 7, 2)])
def test_matches_torchvision(torchvision, seed, size, padding):
  rng = np.random.default_rng(seed)
  boxes = _boxes(rng, 24)
  masks = rng.random((len(boxes), size, size)).astype(np.float32)
  theirs = _reference(torchvision, masks, boxes, (HEIGHT, WIDTH), padding)
  assert theirs.max() > 0.9 and (theirs == 0).mean() > 0.5  # not vacuous: values inside boxes, zeros outside
  ours = paste_masks_in_image(masks, boxes, (HEIGHT, WIDTH), padding=padding)
  assert isinstance(ours, np.ndarray) and ours.dtype == np.float32 and ours.shape == (len(boxes), HEIGHT, WIDTH)
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)
  jitted = jax.jit(paste_masks_in_image, static_argnums=(2, 3))(jnp.asarray(masks), jnp.asarray(boxes),
                                                                (HEIGHT, WIDTH), padding)
  np.testing.assert_allclose(np.asarray(jitted), theirs, rtol=0, atol=1e-5)


def test_vmap_over_images_and_gradient(torchvision):
  rng = np.random.default_rng(4)
  boxes = _boxes(rng, 9).reshape(2, 10, 4)
  masks = rng.random((2, 10, 28, 28)).astype(np.float32)
  batched = jax.jit(jax.vmap(lambda m, b: paste_masks_in_image(m, b, (HEIGHT, WIDTH))))(masks, boxes)
  for b in range(2):
    np.testing.assert_allclose(np.asarray(batched[b]), _reference(torchvision, masks[b], boxes[b], (HEIGHT, WIDTH)),
                               rtol=0, atol=1e-5)
  # Linear in the masks: the gradient of the pasted sum is each mask cell's total weight, positive inside.
  grad = jax.jit(jax.grad(lambda m: paste_masks_in_image(m, jnp.asarray(boxes[0]), (HEIGHT, WIDTH)).sum()))(masks[0])
  assert grad.shape == masks[0].shape and float(grad[0].max()) > 0


def test_no_boxes_and_bad_inputs():
  for masks, boxes in ((np.zeros((0, 28, 28)), np.zeros((0, 4))), (jnp.zeros((0, 28, 28)), jnp.zeros((0, 4)))):
    out = paste_masks_in_image(masks, boxes, (8, 9))
    assert out.shape == (0, 8, 9) and out.dtype == np.float32
  with pytest.raises(ValueError, match=r"masks must be square box-relative masks \[D, M, M\]"):
    paste_masks_in_image(np.zeros((2, 28, 14)), np.zeros((2, 4)), (8, 9))
  with pytest.raises(ValueError, match=r"boxes must be absolute .* \[D, 4\] with D = 2"):
    paste_masks_in_image(np.zeros((2, 28, 28)), np.zeros((3, 4)), (8, 9))
  with pytest.raises(ValueError, match="image_size"):
    paste_masks_in_image(np.zeros((2, 28, 28)), np.zeros((2, 4)), (0, 9))
