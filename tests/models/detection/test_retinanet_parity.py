"""cvjax RetinaNet against torchvision's ``RetinaNet`` with the same random weights.

torchvision's model is built from its own pieces at CPU scale (ResNet-18 backbone with frozen batch norm,
C3..C5 into the FPN with ``LastLevelP6P7(256, 256)`` as ``retinanet_resnet50_fpn`` has it, torchvision's
three-octave anchors from base sizes 8..128 for a 64x64 image) and converted with
``cvjax.convert.from_torch_state_dict``. Random weights are rescaled so the comparison is not vacuous: frozen-BN
statistics randomised, the subnets' convs scaled so that the class logits spread (std ~5: scores separate
without saturating to tied 1.0s) and the box deltas move boxes (std ~0.5). torchvision's classifier column 0 (its unused background label) is made a constant -30 logit, since
cvjax drops that column. Compared: anchors, head outputs per level, the losses on given targets, and end-to-end
detections (boxes, scores, labels).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.models.detection.retinanet import retinanet_anchor_sizes
from cvjax.tasks.retinanet import retinanet_losses

torch = pytest.importorskip("torch")

NUM_CLASSES = 3  # object classes; torchvision's classifier has 4 columns (column 0 unused)
ANCHORS = retinanet_anchor_sizes((8, 16, 32, 64, 128))
SETTINGS = dict(topk_candidates=60, detections_per_img=40)
SIZE = 96


@pytest.fixture(scope="module")
def models(torchvision):
  from torchvision.models import resnet18
  from torchvision.models.detection import RetinaNet
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor
  from torchvision.ops.feature_pyramid_network import LastLevelP6P7
  from torchvision.ops.misc import FrozenBatchNorm2d

  from cvjax.convert import from_torch_state_dict

  torch.manual_seed(0)
  backbone = _resnet_fpn_extractor(resnet18(norm_layer=FrozenBatchNorm2d), 5, returned_layers=[2, 3, 4],
                                   extra_blocks=LastLevelP6P7(256, 256))
  reference = RetinaNet(backbone, num_classes=NUM_CLASSES + 1, min_size=SIZE, max_size=SIZE,
                        image_mean=[0.0] * 3, image_std=[1.0] * 3,
                        anchor_generator=AnchorGenerator(ANCHORS, ((0.5, 1.0, 2.0),) * 5), **SETTINGS)
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, buffer in reference.named_buffers():
      if name.endswith("running_mean"):
        buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
      elif name.endswith("running_var"):
        buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    for name, param in reference.named_parameters():
      if name.startswith("backbone.body") and ".bn" in name and "weight" in name:
        param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    head = reference.head
    for conv in list(head.classification_head.conv) + list(head.regression_head.conv):
      conv[0].weight.mul_(3.0)  # N(0, 0.01) convs would shrink the features to nothing
    head.classification_head.cls_logits.weight.mul_(2.5)
    # Column 0 of every anchor: constant -30 (weights 0), so that it neither detects nor adds to the loss.
    head.classification_head.cls_logits.weight.view(-1, NUM_CLASSES + 1, 256, 3, 3)[:, 0] = 0.0
    head.classification_head.cls_logits.bias.view(-1, NUM_CLASSES + 1)[:, 0] = -30.0
    head.regression_head.bbox_reg.weight.mul_(0.2)
  module, variables = from_torch_state_dict("retinanet_resnet18_fpn", reference.state_dict(),
                                            num_classes=NUM_CLASSES, anchor_sizes=ANCHORS, **SETTINGS)
  return reference, module, variables


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def cvjax_eval(models, image):
  _, module, variables = models
  return jax.jit(lambda v, x: module.apply(v, x, train=False))(variables, jnp.asarray(image))


def _torch(image):
  return torch.from_numpy(image.transpose(0, 3, 1, 2).copy())


def _reference_head(reference, image):
  with torch.no_grad():
    images, _ = reference.transform(list(_torch(image)))
    features = list(reference.backbone(images.tensors).values())
    return images, features, reference.head(features), reference.anchor_generator(images, features)


def test_anchors_and_head_outputs_match_per_level(models, image, cvjax_eval):
  reference, _, _ = models
  _, features, head, anchors = _reference_head(reference, image)
  np.testing.assert_allclose(np.asarray(cvjax_eval["anchors"]), anchors[0].numpy(), atol=1e-4)
  theirs_logits = head["cls_logits"][0].numpy()
  theirs_deltas = head["bbox_regression"][0].numpy()
  start = 0
  for level, feature in enumerate(features):
    count = feature.shape[2] * feature.shape[3] * 9
    np.testing.assert_allclose(np.asarray(cvjax_eval["cls_logits"][0, start:start + count]),
                               theirs_logits[start:start + count, 1:], atol=1e-4, rtol=1e-4, err_msg=f"P{level + 3}")
    np.testing.assert_allclose(np.asarray(cvjax_eval["bbox_regression"][0, start:start + count]),
                               theirs_deltas[start:start + count], atol=1e-4, rtol=1e-4, err_msg=f"P{level + 3}")
    start += count
  assert start == theirs_logits.shape[0]
  assert np.std(theirs_logits[:, 1:]) > 1.0 and np.std(theirs_deltas) > 0.1  # not vacuous


def test_losses_match_torchvision_on_given_targets(models, image):
  """Two images (one without objects), GT with ties and an out-of-range label column: torchvision's
  ``compute_loss`` on its head outputs against ``retinanet_losses`` on cvjax's training outputs."""
  reference, module, variables = models
  images = np.concatenate([image, image[:, ::-1]], 0)
  boxes = np.array([[[4.0, 6.0, 40.0, 30.0], [10.5, 2.0, 90.0, 93.0], [50.0, 50.0, 66.0, 66.0]],
                    [[0.0, 0.0, 0.0, 0.0]] * 3], np.float32)
  labels = np.array([[0, 2, 1], [0, 0, 0]])
  valid = np.array([[True, True, True], [False, False, False]])
  targets = [{"boxes": torch.from_numpy(boxes[0]), "labels": torch.from_numpy(labels[0] + 1)},
             {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)}]
  with torch.no_grad():
    reference.train()
    try:
      theirs = reference(list(_torch(images)), targets)
    finally:
      reference.eval()
  outputs = jax.jit(lambda v, x: module.apply(v, x, train=True, gt_boxes=jnp.asarray(boxes),
                                              gt_labels=jnp.asarray(labels), gt_valid=jnp.asarray(valid)))(
                                                  variables, jnp.asarray(images))
  ours = retinanet_losses(outputs, jnp.ones((2,), bool))
  assert np.asarray(outputs["anchor_labels"][0] >= 0).sum() >= 3 and (np.asarray(outputs["anchor_labels"][1]) == -1).all()
  for name in ("classification", "bbox_regression"):
    np.testing.assert_allclose(float(ours[name]), float(theirs[name]), rtol=1e-4, err_msg=name)
    assert float(theirs[name]) > 0.01


def test_end_to_end_detections_match(models, image, cvjax_eval):
  reference, _, _ = models
  with torch.no_grad():
    theirs = reference(list(_torch(image)))[0]
  valid = np.asarray(cvjax_eval["valid"][0])
  # More candidates than topk_candidates on P3 and P4, and the detections cap reached: both cuts are compared.
  assert valid.sum() == len(theirs["boxes"]) == SETTINGS["detections_per_img"]
  np.testing.assert_allclose(np.asarray(cvjax_eval["boxes"][0])[valid], theirs["boxes"].numpy(), atol=1e-3, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(cvjax_eval["scores"][0])[valid], theirs["scores"].numpy(), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(cvjax_eval["labels"][0])[valid] + 1, theirs["labels"].numpy())
  assert not np.asarray(cvjax_eval["valid"][0])[valid.sum():].any()
