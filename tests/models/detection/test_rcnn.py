"""cvjax's Mask R-CNN in training and evaluation: output contract, sampling budgets, and the robustness cases
(no objects, degenerate / out-of-image boxes, empty masks, no overlapping proposals) never giving NaN."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.models import create_model
from cvjax.tasks.rcnn import box_losses, mask_loss, rpn_losses

SIZE, CLASSES, MAX_BOXES = 32, 3, 4
TINY = dict(num_classes=CLASSES, backbone_width=4, backbone_frozen_bn=False, fpn_channels=8,
            anchor_sizes=((4,), (8,), (16,), (32,), (64,)), representation_size=16, mask_head_channels=8,
            rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=20, rpn_batch_size_per_image=32, box_batch_size_per_image=16,
            box_detections_per_img=8, canonical_scale=56.0)


def _targets(boxes_per_image):
  """Padded GT of a batch: boxes [B, M, 4] xyxy, labels, valid, masks [B, M, H, W] (each box filled)."""
  batch = len(boxes_per_image)
  boxes = np.zeros((batch, MAX_BOXES, 4), np.float32)
  labels = np.zeros((batch, MAX_BOXES), np.int32)
  valid = np.zeros((batch, MAX_BOXES), bool)
  masks = np.zeros((batch, MAX_BOXES, SIZE, SIZE), np.uint8)
  for b, image_boxes in enumerate(boxes_per_image):
    for m, box in enumerate(image_boxes):
      boxes[b, m], labels[b, m], valid[b, m] = box, m % CLASSES, True
      x1, y1, x2, y2 = (int(round(v)) for v in np.clip(box, 0, SIZE))
      masks[b, m, y1:y2, x1:x2] = 1
  return dict(gt_boxes=jnp.asarray(boxes), gt_labels=jnp.asarray(labels), gt_valid=jnp.asarray(valid),
              gt_masks=jnp.asarray(masks))


@pytest.fixture(scope="module")
def model_and_variables():
  model = create_model("maskrcnn_resnet18_fpn", **TINY)
  images = jnp.zeros((2, SIZE, SIZE, 3))
  # The same variables without tracing the mask pasting (init runs the eval path).
  init = model.clone(return_pasted_masks=False).init
  variables = jax.jit(functools.partial(init, train=False))(jax.random.PRNGKey(0), images)
  return model, variables


@pytest.fixture(scope="module")
def train_fn(model_and_variables):
  model, variables = model_and_variables

  @jax.jit
  def run(params, images, targets, rng):
    def loss(p):
      outputs, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                               rngs={"sample": rng}, mutable=["batch_stats"], **targets)
      mask = jnp.ones(images.shape[:1], bool)
      terms = dict(rpn_losses(outputs, mask), **box_losses(outputs, mask), loss_mask=mask_loss(outputs, mask))
      return sum(v for k, v in terms.items() if k.startswith("loss_")), (terms, outputs)
    (total, (terms, outputs)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return total, terms, outputs, grads

  return lambda images, targets, seed=0: run(variables["params"], images, targets, jax.random.PRNGKey(seed))


def _images(seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(2, SIZE, SIZE, 3)).astype(np.float32))


def _finite(tree):
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


def test_train_outputs_respect_the_sampling_budgets(train_fn):
  targets = _targets([[(2, 3, 14, 20), (16, 16, 30, 28)], [(5, 5, 25, 25)]])
  total, terms, outputs, grads = train_fn(_images(), targets)
  assert _finite((total, terms, grads)) and float(total) > 0
  rpn = np.asarray(outputs["rpn_labels"])
  assert ((rpn >= 0).sum(1) <= 32).all() and ((rpn == 1).sum(1) <= 16).all() and (rpn == 1).sum(1).min() >= 1
  roi = np.asarray(outputs["roi_labels"])
  assert roi.shape == (2, 16) and ((roi > 0).sum(1) <= 4).all() and (roi > 0).sum(1).min() >= 1
  # Positive labels are the matched GT's class + 1: image 1 has one object, of class 0.
  assert set(roi[1][roi[1] > 0]) == {1}
  assert outputs["mask_logits"].shape == (2, 4, 28, 28)
  assert np.asarray(outputs["mask_valid"]).sum() == (roi > 0).sum()
  targets_in_range = np.asarray(outputs["mask_targets"])
  assert targets_in_range.min() >= 0 and targets_in_range.max() <= 1 and targets_in_range.max() > 0.5
  for name in ("loss_objectness", "loss_rpn_box_reg", "loss_classifier", "loss_box_reg", "loss_mask"):
    assert float(terms[name]) > 0, name


def test_sampling_depends_on_the_rng(train_fn):
  targets = _targets([[(2, 3, 14, 20), (16, 16, 30, 28)], [(5, 5, 25, 25)]])
  first = np.asarray(train_fn(_images(), targets, seed=0)[2]["rpn_labels"])
  again = np.asarray(train_fn(_images(), targets, seed=0)[2]["rpn_labels"])
  other = np.asarray(train_fn(_images(), targets, seed=1)[2]["rpn_labels"])
  np.testing.assert_array_equal(first, again)
  assert (first != other).any()


def test_images_without_objects_train_on_negatives_only(train_fn):
  total, terms, outputs, grads = train_fn(_images(), _targets([[], []]))
  assert _finite((total, terms, grads))
  assert (np.asarray(outputs["rpn_labels"]) != 1).all() and (np.asarray(outputs["rpn_labels"]) == 0).any()
  assert (np.asarray(outputs["roi_labels"]) <= 0).all()
  assert float(terms["loss_rpn_box_reg"]) == 0 and float(terms["loss_box_reg"]) == 0
  assert float(terms["loss_mask"]) == 0 and float(terms["loss_objectness"]) > 0


def test_degenerate_out_of_image_boxes_and_empty_masks_give_no_nan(train_fn):
  targets = _targets([[(5, 5, 5, 20), (20, 20, 60, 50)], [(-10, -10, 8, 8)]])
  targets["gt_masks"] = targets["gt_masks"].at[1].set(0)  # an object whose mask is empty
  total, terms, outputs, grads = train_fn(_images(), targets)
  assert _finite((total, terms, grads))
  # The zero-width box is no target: image 0's positives all match its second box (label 1 -> 2).
  roi = np.asarray(outputs["roi_labels"][0])
  assert set(roi[roi > 0]) == {2}


def test_eval_outputs_follow_the_detection_convention(model_and_variables):
  model, variables = model_and_variables
  outputs = jax.jit(functools.partial(model.apply, train=False))(variables, _images())
  d = TINY["box_detections_per_img"]
  assert outputs["boxes"].shape == (2, d, 4) and outputs["scores"].shape == (2, d)
  assert outputs["labels"].dtype == jnp.int32 and outputs["valid"].shape == (2, d)
  assert outputs["masks"].shape == (2, d, SIZE, SIZE) and outputs["mask_probs"].shape == (2, d, 28, 28)
  assert _finite(outputs)
  valid = np.asarray(outputs["valid"])
  labels = np.asarray(outputs["labels"])
  assert ((labels >= 0) & (labels < CLASSES)).all()
  boxes = np.asarray(outputs["boxes"])[valid]
  assert (boxes >= 0).all() and (boxes <= SIZE).all()
  masks = np.asarray(outputs["masks"])
  assert masks.min() >= 0 and masks.max() <= 1 and (masks[~valid] == 0).all()


def test_swin_backbone_feeds_every_stage_normalised_to_the_fpn():
  """``maskrcnn_swin_t_fpn`` (the Swin paper's detector) at toy width: four stages at strides 4..32, each
  LayerNorm-ed, become P2..P5 (+ the max-pool P6); detections follow the same convention as the ResNet ones."""
  model = create_model("maskrcnn_swin_t_fpn", swin_embed_dim=8, swin_depths=(1, 1, 1, 1),
                       swin_num_heads=(1, 1, 1, 1), swin_window_size=2, return_pasted_masks=False,
                       **{k: v for k, v in TINY.items() if not k.startswith("backbone")})
  images = jnp.asarray(np.random.default_rng(3).normal(size=(1, SIZE, SIZE, 3)), jnp.float32)
  fpn_only = lambda module, method: module.name == "fpn" and method == "__call__"
  outputs, variables = jax.jit(lambda key, x: model.init_with_output(key, x, train=False,
                                                                     capture_intermediates=fpn_only))(
      jax.random.PRNGKey(0), images)
  params = variables["params"]
  assert [params[f"backbone_norm{i}"]["scale"].shape for i in range(4)] == [(8,), (16,), (32,), (64,)]
  pyramid = variables["intermediates"]["fpn"]["__call__"][0]
  assert {level: p.shape[1:3] for level, p in pyramid.items()} == {2: (8, 8), 3: (4, 4), 4: (2, 2), 5: (1, 1),
                                                                   6: (1, 1)}
  d = TINY["box_detections_per_img"]
  assert outputs["boxes"].shape == (1, d, 4) and outputs["mask_probs"].shape == (1, d, 28, 28)
  assert _finite(outputs) and np.asarray(outputs["proposal_valid"]).any()


def test_mask_branch_on_the_positives_only_equals_running_it_on_every_slot(model_and_variables, train_fn):
  """``mask_roi_buckets`` (default 4: the head and targets run on the positive RoIs, bucketed) gives the
  outputs, loss and gradients of the one-size branch that runs on all ``B * 128``-style slots."""
  model, variables = model_and_variables
  every_slot = model.clone(mask_roi_buckets=1, return_pasted_masks=False)
  targets = _targets([[(2, 3, 14, 20)], [(5, 5, 25, 25), (16, 16, 30, 28)]])

  @jax.jit
  def reference(params, images, rng):
    def loss(p):
      outputs, _ = every_slot.apply({"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                                    rngs={"sample": rng}, mutable=["batch_stats"], **targets)
      return mask_loss(outputs, jnp.ones(images.shape[:1], bool)), outputs
    return jax.value_and_grad(loss, has_aux=True)(params)

  _, terms, outputs, grads = train_fn(_images(), targets)
  (loss, expected), expected_grads = reference(variables["params"], _images(), jax.random.PRNGKey(0))
  valid = np.asarray(outputs["mask_valid"])
  assert 0 < valid.sum() < valid.size  # some slots are padding: the bucketed branch ran on fewer rows
  np.testing.assert_array_equal(valid, expected["mask_valid"])
  for name in ("mask_logits", "mask_targets"):
    np.testing.assert_allclose(np.asarray(outputs[name])[valid], np.asarray(expected[name])[valid],
                               rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(terms["loss_mask"], loss, rtol=1e-5)
  for ours, theirs in zip(jax.tree.leaves(grads["mask_head"]), jax.tree.leaves(expected_grads["mask_head"])):
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-6)
  assert np.abs(np.asarray(grads["mask_head"]["mask_fcn_logits"]["kernel"])).max() > 0
