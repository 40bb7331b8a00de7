"""cvjax's RetinaNet in training and evaluation: anchor targets, the robustness cases (no objects, degenerate
and out-of-image boxes) never giving NaN, the eval format shared with the R-CNN models, and the FPN's P6
source. Parity with torchvision is in ``test_retinanet_parity.py``."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detection_inputs import all_finite as _finite, padded_targets, random_images, init_detector

from cvjax.models import create_model
from cvjax.ops.proposals import BETWEEN_THRESHOLDS
from cvjax.tasks.retinanet import retinanet_losses

SIZE, CLASSES, MAX_BOXES = 32, 3, 4
TINY = dict(num_classes=CLASSES, backbone_width=4, backbone_frozen_bn=False, fpn_channels=8, head_convs=1,
            min_level=2, max_level=6,
            anchor_sizes=((4, 5, 6), (8, 10, 12), (16, 20, 25), (32, 40, 50), (64, 80, 101)),
            topk_candidates=20, detections_per_img=8)



def _targets(boxes_per_image):
  return padded_targets(boxes_per_image, MAX_BOXES, CLASSES)


def _images(seed=0):
  return random_images(SIZE, seed=seed)


@pytest.fixture(scope="module")
def model_and_variables():
  return init_detector("retinanet_resnet18_fpn", SIZE, **TINY)


@pytest.fixture(scope="module")
def train_fn(model_and_variables):
  model, variables = model_and_variables

  @jax.jit
  def run(params, images, targets):
    def loss(p):
      outputs, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                               mutable=["batch_stats"], **targets)
      terms = retinanet_losses(outputs, jnp.ones(images.shape[:1], bool))
      return terms["classification"] + terms["bbox_regression"], (terms, outputs)
    (total, (terms, outputs)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return total, terms, outputs, grads

  return lambda images, targets: run(variables["params"], images, targets)


def test_anchor_targets_label_foreground_with_the_matched_class(train_fn):
  targets = _targets([[(2, 3, 14, 20), (16, 16, 30, 28)], [(5, 5, 25, 25)]])
  total, terms, outputs, grads = train_fn(_images(), targets)
  assert _finite((total, terms, grads)) and float(terms["classification"]) > 0
  assert float(terms["bbox_regression"]) > 0
  labels = np.asarray(outputs["anchor_labels"])
  anchors = np.asarray(outputs["anchors"])
  num_anchors = sum(s * s * 9 for s in (8, 4, 2, 1, 1))  # P2..P6 of a 32x32 image, 9 anchors per location
  assert labels.shape == (2, num_anchors) and anchors.shape == (num_anchors, 4)
  # Low-quality matches give every object at least one anchor; labels are the objects' classes.
  assert set(labels[0][labels[0] >= 0]) == {0, 1} and set(labels[1][labels[1] >= 0]) == {0}
  assert set(np.unique(labels)) <= {-1, BETWEEN_THRESHOLDS, 0, 1}
  # Foreground box targets decode back onto their object; background targets are zero.
  targets_out = np.asarray(outputs["box_targets"])
  assert (targets_out[labels < 0] == 0).all() and np.abs(targets_out[labels >= 0]).max() > 0
  assert float(terms["num_foreground"]) == pytest.approx((labels >= 0).sum() / 2)


def test_images_without_objects_train_the_classifier_on_negatives_only(train_fn):
  total, terms, outputs, grads = train_fn(_images(), _targets([[], []]))
  assert _finite((total, terms, grads))
  assert (np.asarray(outputs["anchor_labels"]) == -1).all()
  assert float(terms["bbox_regression"]) == 0 and float(terms["classification"]) > 0
  assert float(terms["num_foreground"]) == 0


def test_degenerate_and_out_of_image_boxes_give_no_nan(train_fn):
  targets = _targets([[(5, 5, 5, 20), (20, 20, 60, 50)], [(-10, -10, 8, 8)]])
  total, terms, outputs, grads = train_fn(_images(), targets)
  assert _finite((total, terms, grads))
  # The zero-width box is no object: image 0's foreground anchors all match its second box (class 1).
  labels = np.asarray(outputs["anchor_labels"][0])
  assert set(labels[labels >= 0]) == {1}


def test_padding_images_do_not_count_in_the_losses(train_fn):
  _, _, outputs, _ = train_fn(_images(), _targets([[(2, 3, 14, 20)], [(5, 5, 25, 25), (1, 1, 9, 9)]]))
  both = retinanet_losses(outputs, jnp.asarray([True, True]))
  first = retinanet_losses(outputs, jnp.asarray([True, False]))
  only_first = retinanet_losses(jax.tree_util.tree_map(lambda x: x[:1] if x.ndim > 1 and x.shape[0] == 2
                                                       else x, outputs), jnp.asarray([True]))
  for name in ("classification", "bbox_regression"):
    np.testing.assert_allclose(float(first[name]), float(only_first[name]), rtol=1e-6)
    assert float(both[name]) != pytest.approx(float(first[name]))


def test_eval_outputs_follow_the_detection_convention(model_and_variables):
  model, variables = model_and_variables
  pixel_mask = jnp.ones((2, SIZE, SIZE), bool).at[1, :, 20:].set(False)  # image 1 is 20 px wide
  # At init every score is near the prior 0.01: a lower threshold lets candidates through.
  model = model.clone(score_thresh=0.005)
  outputs = jax.jit(functools.partial(model.apply, train=False))(variables, _images(), pixel_mask=pixel_mask)
  d = TINY["detections_per_img"]
  assert outputs["boxes"].shape == (2, d, 4) and outputs["scores"].shape == (2, d)
  assert outputs["labels"].dtype == jnp.int32 and outputs["valid"].shape == (2, d)
  assert outputs["cls_logits"].shape[-1] == CLASSES
  assert _finite(outputs)
  valid = np.asarray(outputs["valid"])
  assert valid.any()
  labels, scores, boxes = (np.asarray(outputs[k]) for k in ("labels", "scores", "boxes"))
  assert ((labels >= 0) & (labels < CLASSES)).all()
  assert (scores[valid] > 0.005).all() and (scores[~valid] == 0).all()
  assert (np.diff(np.where(valid, scores, -1), axis=1) <= 1e-7).all()  # best first, padding last
  assert (boxes[valid] >= 0).all() and (boxes[0][valid[0]] <= SIZE).all()
  assert (boxes[1][valid[1]][:, [0, 2]] <= 20).all()  # clipped to the real image, not the padding


def test_bad_inputs_are_named():
  model = create_model("retinanet_resnet18_fpn", **TINY)
  # Shape-only tracing: the checks run before any compute.
  init = lambda m, shape, train: jax.eval_shape(functools.partial(m.init, train=train), jax.random.PRNGKey(0),
                                                jnp.zeros(shape))
  with pytest.raises(ValueError, match="NHWC"):
    init(model, (SIZE, SIZE, 3), False)
  with pytest.raises(ValueError, match="anchor_sizes"):
    init(model.clone(anchor_sizes=((4,), (8,))), (1, SIZE, SIZE, 3), False)
  with pytest.raises(ValueError, match="gt_boxes"):
    init(model, (1, SIZE, SIZE, 3), True)


@pytest.mark.parametrize("source", ["p5", "c5"])
def test_p6_is_built_from_the_chosen_source(source):
  from cvjax.models.detection.fpn import FPN
  rng = np.random.default_rng(0)
  features = {3: rng.normal(size=(1, 8, 8, 6)), 4: rng.normal(size=(1, 4, 4, 10)),
              5: rng.normal(size=(1, 2, 2, 12))}
  features = {k: jnp.asarray(v, jnp.float32) for k, v in features.items()}
  fpn = FPN(8, "p6p7", p6p7_source=source)
  variables = fpn.init(jax.random.PRNGKey(0), features)
  # P6's conv reads P5 (FPN width, 8 channels) or C5 (12 channels).
  assert variables["params"]["p6"]["kernel"].shape[2] == (8 if source == "p5" else 12)
  pyramid = fpn.apply(variables, features)
  assert sorted(pyramid) == [3, 4, 5, 6, 7] and pyramid[6].shape == (1, 1, 1, 8)
  assert pyramid[7].shape == (1, 1, 1, 8)
