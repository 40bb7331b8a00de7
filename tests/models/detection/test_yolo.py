"""YOLOv1: target assignment and the paper's loss against a direct NumPy transcription of eq. 3, the Darknet
networks' depth, the robustness cases (no objects, degenerate and out-of-image boxes) never giving NaN, and the
eval format shared with the other detectors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from detection_inputs import all_finite as _finite, padded_targets, random_images, init_detector

from cvjax.models import create_model
from cvjax.models.detection.yolo import DARKNET24, FAST, yolo_v1_targets
from cvjax.tasks.yolo import yolo_v1_losses

SIZE, CLASSES, MAX_BOXES, S, B = 32, 3, 4, 7, 2
TINY = dict(num_classes=CLASSES, backbone_width=4, backbone_frozen_bn=False, hidden_size=16,
            detections_per_img=8)



def _targets(boxes_per_image):
  return padded_targets(boxes_per_image, MAX_BOXES, CLASSES)


def _images(seed=0):
  return random_images(SIZE, seed=seed)


@pytest.fixture(scope="module")
def model_and_variables():
  return init_detector("yolov1_resnet18", SIZE, **TINY)


@pytest.fixture(scope="module")
def train_fn(model_and_variables):
  model, variables = model_and_variables

  @jax.jit
  def run(params, images, targets):
    def loss(p):
      outputs, _ = model.apply({"params": p, "batch_stats": variables["batch_stats"]}, images, train=True,
                               rngs={"dropout": jax.random.PRNGKey(1)}, mutable=["batch_stats"], **targets)
      terms = yolo_v1_losses(outputs, jnp.ones(images.shape[:1], bool))
      return sum(terms.values()), (terms, outputs)
    (total, (terms, outputs)), grads = jax.value_and_grad(loss, has_aux=True)(params)
    return total, terms, outputs, grads

  return lambda images, targets: run(variables["params"], images, targets)


def _iou(a, b):
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
  return w * h / union if union > 0 else 0.0


def reference_loss(raw, gt_boxes, gt_labels, size, lambda_coord=5.0, lambda_noobj=0.5):
  """Eq. 3 of the paper for one image, written cell by cell from its definition. ``raw [S, S, 5B + C]``."""
  grid, per_cell = raw.shape[0], raw.shape[-1]
  classes = per_cell - 5 * B
  owner = {}
  for box, label in zip(gt_boxes, gt_labels):
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    cell = (int(cy * grid), int(cx * grid))
    area = (box[2] - box[0]) * (box[3] - box[1])
    if cell not in owner or area > owner[cell][2]:
      owner[cell] = (box, label, area)
  total = 0.0
  for i in range(grid):
    for j in range(grid):
      preds = raw[i, j, :5 * B].reshape(B, 5)
      decoded = []
      for x, y, sw, sh, _ in preds:
        cx, cy, w, h = (x + j) / grid * size, (y + i) / grid * size, sw ** 2 * size, sh ** 2 * size
        decoded.append((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2))
      if (i, j) not in owner:
        total += lambda_noobj * sum(p[4] ** 2 for p in preds)
        continue
      box, label, _ = owner[(i, j)]
      ious = [_iou(d, box) for d in decoded]
      r = int(np.argmax(ious))
      target = ((box[0] + box[2]) / 2 / size * grid - j, (box[1] + box[3]) / 2 / size * grid - i,
                np.sqrt((box[2] - box[0]) / size), np.sqrt((box[3] - box[1]) / size))
      total += lambda_coord * sum((preds[r, k] - target[k]) ** 2 for k in range(4))
      total += (preds[r, 4] - ious[r]) ** 2
      total += lambda_noobj * sum(preds[k, 4] ** 2 for k in range(B) if k != r)
      total += sum((raw[i, j, 5 * B + c] - (c == label)) ** 2 for c in range(classes))
  return total


def test_loss_equals_the_papers_equation_cell_by_cell():
  rng = np.random.default_rng(0)
  # Random raw outputs with sizes near the objects' so that the IoUs (and the responsible predictor) vary.
  raw = rng.normal(size=(2, S, S, 5 * B + CLASSES)).astype(np.float32) * 0.3
  raw[..., 2:5 * B:5] = np.abs(raw[..., 2:5 * B:5]) + 0.3
  raw[..., 3:5 * B:5] = np.abs(raw[..., 3:5 * B:5]) + 0.3
  # Image 0: two objects share cell (2, 1) (the larger wins); image 1: no objects.
  boxes = [[(2, 3, 14, 20), (4, 8, 10, 14), (16, 16, 30, 28)], []]
  targets = _targets(boxes)
  from cvjax.models.detection.yolo import decode_cells
  pred_boxes = decode_cells(jnp.asarray(raw), B, (SIZE, SIZE))
  assigned = jax.vmap(functools.partial(yolo_v1_targets, image_hw=(SIZE, SIZE)))(
      pred_boxes, targets["gt_boxes"], targets["gt_labels"], targets["gt_valid"])
  outputs = dict(assigned, predictions=jnp.asarray(raw), confidence=jnp.asarray(raw[..., 4:5 * B:5]),
                 class_scores=jnp.asarray(raw[..., 5 * B:]))
  per_image = [float(sum(yolo_v1_losses(jax.tree_util.tree_map(lambda x, b=b: x[b:b + 1], outputs),
                                        jnp.ones(1, bool)).values())) for b in range(2)]
  labels = np.asarray(targets["gt_labels"])
  for b in range(2):
    expected = reference_loss(raw[b], [np.asarray(x, np.float64) for x in boxes[b]], labels[b], SIZE)
    np.testing.assert_allclose(per_image[b], expected, rtol=1e-5)
  assert np.asarray(assigned["object_mask"][0]).sum() == 2  # two cells, three objects
  assert int(assigned["class_targets"][0, 2, 1]) == 0  # the larger object (class 0) owns the shared cell
  both = yolo_v1_losses(outputs, jnp.ones(2, bool))
  np.testing.assert_allclose(float(sum(both.values())), np.mean(per_image), rtol=1e-5)


def test_networks_have_the_papers_depth():
  assert sum(item != "M" for item in DARKNET24) == 24 and sum(item != "M" for item in FAST) == 9
  model = create_model("yolov1_darknet24", num_classes=20)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 448, 448, 3)), train=False))
  assert shapes["params"]["fc1"]["kernel"].shape == (7 * 7 * 1024, 4096)  # stride 64: 448 -> 7
  assert shapes["params"]["fc2"]["kernel"].shape == (4096, 7 * 7 * 30)


def test_train_step_assigns_objects_and_is_finite(train_fn):
  total, terms, outputs, grads = train_fn(_images(), _targets([[(2, 3, 14, 20), (16, 16, 30, 28)],
                                                               [(5, 5, 25, 25)]]))
  assert _finite((total, terms, grads)) and all(float(v) > 0 for v in terms.values())
  assert np.asarray(outputs["object_mask"]).sum((1, 2)).tolist() == [2, 1]
  assert (np.asarray(outputs["responsible"]).sum(-1) == np.asarray(outputs["object_mask"])).all()


def test_images_without_objects_train_no_object_confidence_only(train_fn):
  total, terms, outputs, grads = train_fn(_images(), _targets([[], []]))
  assert _finite((total, terms, grads))
  assert float(terms["no_object"]) > 0
  assert float(terms["coordinates"]) == float(terms["object"]) == float(terms["class"]) == 0


def test_degenerate_and_out_of_image_boxes_give_no_nan(train_fn):
  total, terms, outputs, grads = train_fn(_images(), _targets([[(5, 5, 5, 20), (40, 40, 60, 50)],
                                                               [(-4, -4, 12, 12)]]))
  assert _finite((total, terms, grads))
  # The empty box and the one centred outside the image are nobody's target; the clipped one still is.
  assert np.asarray(outputs["object_mask"]).sum((1, 2)).tolist() == [0, 1]


def test_eval_outputs_follow_the_detection_convention(model_and_variables):
  model, variables = model_and_variables
  # The output layer's N(0, 0.01) init gives scores ~1e-4, below the threshold: scale it so boxes pass.
  params = dict(variables["params"], fc2=jax.tree_util.tree_map(lambda x: 100 * x, variables["params"]["fc2"]))
  outputs = jax.jit(functools.partial(model.apply, train=False))(dict(variables, params=params), _images())
  d = TINY["detections_per_img"]
  assert outputs["boxes"].shape == (2, d, 4) and outputs["labels"].dtype == jnp.int32
  assert outputs["predictions"].shape == (2, S, S, 5 * B + CLASSES) and _finite(outputs)
  valid, labels, scores = (np.asarray(outputs[k]) for k in ("valid", "labels", "scores"))
  assert valid.any() and ((labels >= 0) & (labels < CLASSES)).all() and (scores[~valid] == 0).all()
  # Scores are the class-specific confidences Pr(class | object) * confidence of some box.
  conf = np.asarray(outputs["confidence"]).reshape(2, -1)
  probs = np.asarray(outputs["class_scores"]).reshape(2, -1, CLASSES)
  for b in range(2):
    candidates = (probs[b][:, None, :] * conf[b].reshape(S * S, B)[:, :, None]).reshape(-1)
    for score in scores[b][valid[b]]:
      assert np.isclose(candidates, score, rtol=1e-5).any()


def test_bad_inputs_are_named():
  model = create_model("yolov1_resnet18", **TINY)
  # Shape-only tracing: the checks run before any compute.
  init = lambda m, shape, train: jax.eval_shape(functools.partial(m.init, train=train), jax.random.PRNGKey(0),
                                                jnp.zeros(shape))
  with pytest.raises(ValueError, match="NHWC"):
    init(model, (SIZE, SIZE, 3), False)
  with pytest.raises(ValueError, match="network"):
    init(model.clone(network="vgg"), (1, SIZE, SIZE, 3), False)
  with pytest.raises(ValueError, match="gt_boxes"):
    init(model, (1, SIZE, SIZE, 3), True)
  with pytest.raises(ValueError, match="head must be"):
    init(model.clone(head="mlp"), (1, SIZE, SIZE, 3), False)
  with pytest.raises(ValueError, match="feature_level"):
    init(model.clone(feature_level=6), (1, SIZE, SIZE, 3), False)
  # The conv head needs the map to be the grid: C3 of a 32x32 image is 4x4, not 7x7.
  with pytest.raises(ValueError, match="4x4|\\(4, 4\\)"):
    init(model.clone(head="conv", feature_level=3), (1, SIZE, SIZE, 3), False)


def test_conv_head_predicts_every_cell_with_the_same_weights():
  """``head='conv'`` on C3 (stride 8: a 4x4 grid at 32x32) gives the paper's per-cell tensor with weights
  shared over the cells: the same parameters run a 64x64 image on an 8x8 grid, where a constant image gives
  every interior cell the same prediction."""
  model = create_model("yolov1_resnet18", **dict(TINY, head="conv", feature_level=3, grid_size=4, head_convs=1))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0),
                                                                  jnp.zeros((1, SIZE, SIZE, 3)))
  assert "fc1" not in variables["params"] and variables["params"]["head_out"]["kernel"].shape[:2] == (1, 1)
  small = jax.jit(functools.partial(model.apply, train=False))(variables, _images()[:1])
  assert small["predictions"].shape == (1, 4, 4, 5 * B + CLASSES) and _finite(small)
  large = jax.jit(functools.partial(model.clone(grid_size=8).apply, train=False))(
      variables, jnp.zeros((1, 2 * SIZE, 2 * SIZE, 3)))
  assert large["predictions"].shape == (1, 8, 8, 5 * B + CLASSES)
  # A constant image gives the same prediction in every interior cell (translation equivariance).
  inner = np.asarray(large["predictions"][0, 2:6, 2:6])
  np.testing.assert_allclose(inner, np.broadcast_to(inner[:1, :1], inner.shape), atol=1e-5)
