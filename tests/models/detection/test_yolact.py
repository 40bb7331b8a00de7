"""cvjax's YOLACT: the mask-assembly ops against their definitions, the training targets, the losses against a
NumPy transcription of the official ``MultiBoxLoss``, the protonet against PyTorch's layers, the robustness
cases (no objects, degenerate boxes) and the eval format the shared COCO evaluator reads."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detection_inputs import all_finite, padded_targets, random_images, init_detector

from cvjax.models.detection.yolact import ProtoNet, crop_masks, downsample_masks
from cvjax.tasks.yolact import hard_negatives, yolact_losses

SIZE, CLASSES, MAX_BOXES = 32, 3, 4
TINY = dict(num_classes=CLASSES, backbone_width=4, backbone_frozen_bn=False, fpn_channels=8, min_level=2,
            max_level=4, anchor_sizes=((6, 8, 10), (12, 15, 19), (24, 30, 38)), proto_level=2,
            proto_channels=8, proto_convs=1, num_prototypes=4, masks_to_train=6, top_k=20, detections_per_img=8)
BOXES = [[(2, 3, 14, 20), (16, 16, 30, 28)], [(5, 5, 25, 25)]]


def _targets(boxes_per_image):
  """Padded targets whose masks are the boxes' inscribed ellipses (so a mask is not its box)."""
  targets = padded_targets(boxes_per_image, MAX_BOXES, CLASSES)
  yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
  masks = np.zeros((len(boxes_per_image), MAX_BOXES, SIZE, SIZE), np.uint8)
  for b, image_boxes in enumerate(boxes_per_image):
    for m, (x1, y1, x2, y2) in enumerate(image_boxes):
      cx, cy, rx, ry = (x1 + x2) / 2, (y1 + y2) / 2, max(x2 - x1, 1e-3) / 2, max(y2 - y1, 1e-3) / 2
      masks[b, m] = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
  return dict(targets, gt_masks=jnp.asarray(masks))


@pytest.fixture(scope="module")
def model_and_variables():
  return init_detector("yolact_resnet18_fpn", SIZE, **TINY)


@pytest.fixture(scope="module")
def train_fn(model_and_variables):
  model, variables = model_and_variables

  @jax.jit
  def run(params, images, targets):
    def loss(p):
      outputs, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                               mutable=["batch_stats"], rngs={"sample": jax.random.PRNGKey(1)}, **targets)
      terms = yolact_losses(outputs, jnp.ones(images.shape[:1], bool))
      return sum(terms[k] for k in ("classification", "box", "mask", "semantic")), (terms, outputs)
    (total, (terms, outputs)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return total, terms, outputs, grads

  return lambda images, targets: run(variables["params"], images, targets)


def test_crop_masks_keeps_the_pixels_of_the_padded_box():
  rng = np.random.default_rng(0)
  masks = rng.uniform(size=(5, 9, 11)).astype(np.float32)
  boxes = rng.uniform(-2, 12, size=(5, 4)).astype(np.float32)
  out = np.asarray(crop_masks(jnp.asarray(masks), jnp.asarray(boxes), padding=1.0))
  for m, (x1, y1, x2, y2) in zip(range(5), boxes):
    for i in range(9):
      for j in range(11):
        inside = (min(x1, x2) - 1 <= j < max(x1, x2) + 1) and (min(y1, y2) - 1 <= i < max(y1, y2) + 1)
        assert out[m, i, j] == (masks[m, i, j] if inside else 0.0)


def test_downsample_masks_is_the_cell_average():
  rng = np.random.default_rng(1)
  masks = (rng.uniform(size=(2, 3, 10, 7)) > 0.5).astype(np.uint8)
  out = np.asarray(downsample_masks(jnp.asarray(masks), 4))
  padded = np.zeros((2, 3, 12, 8), np.float32)
  padded[:, :, :10, :7] = masks
  assert out.shape == (2, 3, 3, 2)
  np.testing.assert_allclose(out, padded.reshape(2, 3, 3, 4, 2, 4).mean((3, 5)), rtol=1e-6)


def test_protonet_matches_pytorch_convs_and_bilinear_upsampling():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(2).normal(size=(2, 5, 6, 3)).astype(np.float32)
  net = ProtoNet(channels=4, num_prototypes=3, num_convs=2)
  variables = net.init(jax.random.PRNGKey(0), jnp.asarray(x))
  out = np.asarray(net.apply(variables, jnp.asarray(x)))
  params = variables["params"]
  t = torch.from_numpy(x).permute(0, 3, 1, 2)
  conv = lambda t, name, pad: torch.nn.functional.conv2d(
      t, torch.from_numpy(np.array(params[name]["kernel"])).permute(3, 2, 0, 1),
      torch.from_numpy(np.array(params[name]["bias"])), padding=pad)
  for i in range(2):
    t = torch.relu(conv(t, f"conv_{i}", 1))
  t = torch.nn.functional.interpolate(t, scale_factor=2, mode="bilinear", align_corners=False)
  t = torch.relu(conv(torch.relu(conv(t, "conv_2", 1)), "prototypes", 0))
  assert out.shape == (2, 10, 12, 3)
  np.testing.assert_allclose(out, t.permute(0, 2, 3, 1).numpy(), rtol=1e-4, atol=1e-5)


def test_training_targets(train_fn):
  targets = _targets(BOXES)
  total, terms, outputs, grads = train_fn(random_images(SIZE), targets)
  assert all_finite((total, terms, grads))
  assert all(float(terms[k]) > 0 for k in ("classification", "box", "mask", "semantic"))
  labels = np.asarray(outputs["anchor_labels"])
  assert set(labels[0][labels[0] >= 0]) == {0, 1} and set(labels[1][labels[1] >= 0]) == {0}
  # Prototypes at stride 2 (P2 upsampled x2); every trained mask is a positive anchor's object.
  stride = 2
  hp = SIZE // stride
  assert outputs["prototypes"].shape == (2, hp, hp, TINY["num_prototypes"])
  valid = np.asarray(outputs["mask_valid"])
  num_pos = (labels >= 0).sum(1)
  np.testing.assert_array_equal(valid.sum(1), np.minimum(num_pos, TINY["masks_to_train"]))
  np.testing.assert_array_equal(np.asarray(outputs["num_positive"]), num_pos)
  small = np.asarray(targets["gt_masks"], np.float32).reshape(2, MAX_BOXES, hp, stride, hp, stride).mean((3, 5))
  gt = np.asarray(targets["gt_boxes"]) / stride
  mask_targets, crops, areas = (np.asarray(outputs[k]) for k in ("mask_targets", "mask_crop", "mask_box_area"))
  for b in range(2):
    for p in np.flatnonzero(valid[b]):
      # The target is one of the image's objects, and the crop and area are that object's box.
      m = next(m for m in range(len(BOXES[b])) if np.array_equal(mask_targets[b, p], small[b, m] > 0.5))
      x1, y1, x2, y2 = gt[b, m]
      assert areas[b, p] == pytest.approx((x2 - x1) * (y2 - y1))
      cols, rows = np.arange(hp), np.arange(hp)
      expected = ((rows[:, None] >= y1 - 1) & (rows[:, None] < y2 + 1)
                  & (cols[None] >= x1 - 1) & (cols[None] < x2 + 1))
      np.testing.assert_array_equal(crops[b, p], expected)
  # Semantic targets: per class the union of that class's masks at P2's resolution (stride 4).
  sem = np.asarray(outputs["segm_targets"])
  coarse = np.asarray(targets["gt_masks"], np.float32).reshape(2, MAX_BOXES, 8, 4, 8, 4).mean((3, 5)) > 0.5
  np.testing.assert_array_equal(sem[0, ..., 0], coarse[0, 0])
  np.testing.assert_array_equal(sem[0, ..., 1], coarse[0, 1])
  np.testing.assert_array_equal(sem[1, ..., 0], coarse[1, 0])
  assert not sem[..., 2].any() and not sem[1, ..., 1].any()


def test_images_without_objects_give_finite_losses_and_no_nan(train_fn):
  total, terms, outputs, grads = train_fn(random_images(SIZE), _targets([[], []]))
  assert all_finite((total, terms, grads))
  assert (np.asarray(outputs["anchor_labels"]) == -1).all()
  assert float(terms["classification"]) == 0 and float(terms["box"]) == 0 and float(terms["mask"]) == 0
  assert float(terms["semantic"]) > 0


def test_degenerate_and_out_of_image_boxes_give_no_nan(train_fn):
  total, terms, outputs, grads = train_fn(random_images(SIZE), _targets([[(5, 5, 5, 20), (20, 20, 60, 50)],
                                                                         [(-10, -10, 8, 8)]]))
  assert all_finite((total, terms, grads))
  labels = np.asarray(outputs["anchor_labels"][0])
  assert set(labels[labels >= 0]) == {1}


def test_hard_negatives_pick_the_highest_losses():
  rng = np.random.default_rng(3)
  loss = rng.uniform(size=(3, 40)).astype(np.float32)
  negative = rng.uniform(size=(3, 40)) > 0.3
  num_pos = np.array([2, 0, 20])
  chosen = np.asarray(hard_negatives(jnp.asarray(loss), jnp.asarray(negative), jnp.asarray(num_pos), 3.0))
  for b in range(3):
    candidates = np.flatnonzero(negative[b])
    expected = candidates[np.argsort(-loss[b, candidates], kind="stable")][:3 * num_pos[b]]
    np.testing.assert_array_equal(np.flatnonzero(chosen[b]), np.sort(expected))


def _reference_losses(o, example_mask):
  """The official MultiBoxLoss's terms (softmax conf with OHEM, smooth-L1, lincomb mask loss with
  emulate-RoI-pooling normalisation, semantic segmentation), written per image in NumPy."""
  o = {k: np.asarray(v, np.float64) for k, v in o.items()}
  labels = o["anchor_labels"].astype(int)
  batch = labels.shape[0]
  total_pos = sum(int((labels[b] >= 0).sum()) for b in range(batch) if example_mask[b])
  conf = box = mask = sem = 0.0
  for b in range(batch):
    if not example_mask[b]:
      continue
    pos = labels[b] >= 0
    logits = o["cls_logits"][b]
    lse = np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1)) + logits.max(1)
    background = lse - logits[:, 0]
    background[pos] = 0
    background[labels[b] < -1] = 0
    order = np.argsort(-background, kind="stable")
    negatives = np.zeros_like(pos)
    negatives[order[:3 * pos.sum()]] = True
    negatives &= labels[b] == -1
    target = np.where(pos, labels[b] + 1, 0)
    ce = lse - logits[np.arange(len(target)), target]
    conf += ce[pos | negatives].sum()
    d = np.abs(o["bbox_regression"][b] - o["box_targets"][b])
    box += np.where(d < 1, 0.5 * d ** 2, d - 0.5)[pos].sum()
    trained = o["mask_valid"][b] > 0
    x, t = o["mask_logits"][b], o["mask_targets"][b]
    bce = np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))
    per = (bce * o["mask_crop"][b]).sum((1, 2)) / o["mask_box_area"][b]
    if trained.any():
      mask += per[trained].sum() * pos.sum() / trained.sum()
    x, t = o["segm_logits"][b], o["segm_targets"][b]
    sem += (np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))).sum() / (x.shape[0] * x.shape[1])
  n = max(total_pos, 1)
  return {"classification": conf / n, "box": 1.5 * box / n, "mask": 6.125 * mask / n,
          "semantic": sem / max(int(np.sum(example_mask)), 1)}


def test_losses_match_the_official_formulas(train_fn):
  _, _, outputs, _ = train_fn(random_images(SIZE, seed=4), _targets(BOXES))
  outputs = dict(outputs)
  # Make some anchors ignored, and give the head non-trivial logits, so every branch of the loss is exercised.
  rng = np.random.default_rng(5)
  labels = np.asarray(outputs["anchor_labels"]).copy()
  labels[(labels == -1) & (rng.uniform(size=labels.shape) < 0.2)] = -2
  outputs["anchor_labels"] = jnp.asarray(labels)
  outputs["cls_logits"] = jnp.asarray(rng.normal(size=outputs["cls_logits"].shape) * 3, jnp.float32)
  outputs["mask_logits"] = jnp.asarray(rng.normal(size=outputs["mask_logits"].shape) * 3, jnp.float32)
  for example_mask in ([True, True], [True, False]):
    ours = yolact_losses(outputs, jnp.asarray(example_mask))
    ref = _reference_losses(outputs, example_mask)
    for name in ref:
      np.testing.assert_allclose(float(ours[name]), ref[name], rtol=2e-5, err_msg=name)


def test_eval_outputs_follow_the_detection_convention(model_and_variables):
  model, variables = model_and_variables
  pixel_mask = jnp.ones((2, SIZE, SIZE), bool).at[1, :, 20:].set(False)  # image 1 is 20 px wide
  # At init the 4 softmax scores are near 1/4: a score above 0.05 everywhere, so detections exist.
  outputs = jax.jit(functools.partial(model.apply, train=False))(variables, random_images(SIZE),
                                                                  pixel_mask=pixel_mask)
  d = TINY["detections_per_img"]
  assert outputs["boxes"].shape == (2, d, 4) and outputs["mask_probs"].shape == (2, d, 28, 28)
  assert outputs["instance_masks"].shape == (2, d, SIZE // 2, SIZE // 2)
  assert outputs["cls_logits"].shape[-1] == CLASSES + 1 and "segm_logits" not in outputs
  assert all_finite(outputs)
  valid, scores, boxes = (np.asarray(outputs[k]) for k in ("valid", "scores", "boxes"))
  labels = np.asarray(outputs["labels"])
  assert valid.all() and ((labels >= 0) & (labels < CLASSES)).all()
  assert (np.diff(scores, axis=1) <= 1e-7).all()
  assert (boxes[1, :, [0, 2]] <= 20).all() and (boxes >= 0).all()  # clipped to each image's real region
  probs = np.asarray(outputs["mask_probs"])
  assert (probs >= 0).all() and (probs <= 1).all() and probs.max() > 0
  # Instance masks are zero outside their (1-pixel padded) box in prototype pixels.
  masks = np.asarray(outputs["instance_masks"])
  for b in range(2):
    for k in range(d):
      x1, y1, x2, y2 = boxes[b, k] / 2
      rows, cols = np.nonzero(masks[b, k])
      assert ((cols >= x1 - 1) & (cols < x2 + 1) & (rows >= y1 - 1) & (rows < y2 + 1)).all()


def test_training_without_masks_is_an_error(model_and_variables):
  model, variables = model_and_variables
  targets = padded_targets(BOXES, MAX_BOXES, CLASSES)
  with pytest.raises(ValueError, match="gt_masks"):
    model.apply(variables, random_images(SIZE), train=True, mutable=["batch_stats"],
                rngs={"sample": jax.random.PRNGKey(0)}, **targets)
  with pytest.raises(ValueError, match=r"gt_masks must be \[B, M, H, W\]"):
    model.apply(variables, random_images(SIZE), train=True, mutable=["batch_stats"],
                rngs={"sample": jax.random.PRNGKey(0)}, gt_masks=jnp.zeros((2, MAX_BOXES, 16, 16)), **targets)


@pytest.mark.parametrize("size", [36, 550])
def test_targets_match_the_maps_when_the_size_is_not_a_multiple_of_the_strides(model_and_variables, size):
  """Sides that are not multiples of 32 (36: C2..C5 are 9, 5, 3, 2 px; 550, the paper's: 138 .. 18): the
  backbone's levels stay distinct, the prototype stride stays 2 and the mask and semantic targets have exactly
  their logits' shapes (shape-only trace)."""
  model, variables = model_and_variables
  targets = padded_targets(BOXES, MAX_BOXES, CLASSES)
  outputs, _ = jax.eval_shape(
      functools.partial(model.apply, train=True, mutable=["batch_stats"]), variables,
      jnp.zeros((2, size, size, 3)), rngs={"sample": jax.random.PRNGKey(0)},
      gt_masks=jnp.zeros((2, MAX_BOXES, size, size), jnp.uint8), **targets)
  assert outputs["mask_targets"].shape == outputs["mask_logits"].shape
  assert outputs["mask_crop"].shape == outputs["mask_logits"].shape
  assert outputs["segm_targets"].shape == outputs["segm_logits"].shape
  assert outputs["mask_logits"].shape[2:] == (2 * outputs["segm_logits"].shape[1],) * 2
