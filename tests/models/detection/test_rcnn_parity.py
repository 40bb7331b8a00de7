"""cvjax Faster / Mask R-CNN against torchvision's ``MaskRCNN`` with the same random weights.

torchvision's model is built from its own pieces at CPU scale (ResNet-18 FPN backbone with frozen batch norm,
anchors 8..128 for a 64x64 image, fewer proposals) and converted with ``cvjax.convert.from_torch_state_dict``.
Random weights are rescaled so that the comparison is not vacuous: frozen-BN statistics randomised, the
predictors' weights scaled up so that class scores separate and boxes move. The image is 64x64 (a multiple
of 32) and torchvision's transform is made the identity (mean 0, std 1, min/max size 64), so both see the same
tensor. Stages compared: FPN maps, RPN objectness and deltas, proposals, box-head outputs on given proposals,
mask logits on given boxes, and the end-to-end detections (boxes, scores, labels, masks).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

NUM_CLASSES = 3  # object classes; torchvision's num_classes is 4 (with background)
ANCHORS = ((8,), (16,), (32,), (64,), (128,))
SETTINGS = dict(rpn_pre_nms_top_n_test=200, rpn_post_nms_top_n_test=50, box_detections_per_img=20,
                box_score_thresh=0.05)


@pytest.fixture(scope="module")
def models(torchvision):
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.anchor_utils import AnchorGenerator
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.ops.misc import FrozenBatchNorm2d

  from cvjax.convert import from_torch_state_dict

  torch.manual_seed(0)
  backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=FrozenBatchNorm2d,
                                 trainable_layers=5)
  reference = MaskRCNN(
      backbone, num_classes=NUM_CLASSES + 1, min_size=64, max_size=64, image_mean=[0.0] * 3, image_std=[1.0] * 3,
      rpn_anchor_generator=AnchorGenerator(ANCHORS, ((0.5, 1.0, 2.0),) * 5),
      rpn_pre_nms_top_n_test=SETTINGS["rpn_pre_nms_top_n_test"],
      rpn_post_nms_top_n_test=SETTINGS["rpn_post_nms_top_n_test"],
      box_detections_per_img=SETTINGS["box_detections_per_img"]).eval()
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, buffer in reference.named_buffers():
      if name.endswith("running_mean"):
        buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))
      elif name.endswith("running_var"):
        buffer.copy_(0.5 + torch.rand(buffer.shape, generator=generator))
    for name, param in reference.named_parameters():
      if name.startswith("backbone.body") and name.endswith("bn1.weight") or ".bn" in name and "weight" in name:
        param.copy_(0.5 + torch.rand(param.shape, generator=generator))
    reference.rpn.head.cls_logits.weight.mul_(30.0)
    reference.rpn.head.bbox_pred.weight.mul_(5.0)
    reference.roi_heads.box_predictor.cls_score.weight.mul_(20.0)
    reference.roi_heads.box_predictor.bbox_pred.weight.mul_(5.0)
    reference.roi_heads.mask_predictor.mask_fcn_logits.weight.mul_(10.0)
  module, variables = from_torch_state_dict(
      "maskrcnn_resnet18_fpn", reference.state_dict(), num_classes=NUM_CLASSES, fpn_channels=256,
      anchor_sizes=ANCHORS, **SETTINGS)
  return reference, module, variables


@pytest.fixture(scope="module")
def image():
  return np.random.default_rng(0).normal(size=(1, 64, 64, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def cvjax_eval(models, image):
  _, module, variables = models
  # One compiled program (op-by-op dispatch of the whole detector took ~30 s).
  compared = lambda m, method: m.name in ("fpn", "rpn_head") and method == "__call__"
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False, capture_intermediates=compared))
  outputs, state = apply(variables, jnp.asarray(image))
  return outputs, state["intermediates"]


def _torch(image):
  return torch.from_numpy(image.transpose(0, 3, 1, 2).copy())


def test_fpn_and_rpn_match(models, image, cvjax_eval):
  reference, _, _ = models
  outputs, intermediates = cvjax_eval
  with torch.no_grad():
    features = reference.backbone(_torch(image))
  ours = intermediates["fpn"]["__call__"][0]
  assert len(ours) == len(features) == 5
  for (level, ours_map), (name, theirs) in zip(sorted(ours.items()), features.items()):
    np.testing.assert_allclose(np.asarray(ours_map), theirs.numpy().transpose(0, 2, 3, 1), atol=1e-4, rtol=1e-4,
                               err_msg=f"FPN level {level} ({name})")
  with torch.no_grad():
    objectness, deltas = reference.rpn.head(list(features.values()))
  theirs_logits = torch.cat([o.permute(0, 2, 3, 1).reshape(1, -1) for o in objectness], 1).numpy()
  ours_logits, ours_deltas = intermediates["rpn_head"]["__call__"][0]
  np.testing.assert_allclose(np.asarray(ours_logits), theirs_logits, atol=1e-4, rtol=1e-4)
  theirs_deltas = torch.cat([d.view(1, -1, 4, d.shape[2], d.shape[3]).permute(0, 3, 4, 1, 2).reshape(1, -1, 4)
                             for d in deltas], 1).numpy()
  np.testing.assert_allclose(np.asarray(ours_deltas), theirs_deltas, atol=1e-4, rtol=1e-4)
  assert np.std(theirs_logits) > 1.0  # scaled up: objectness ranks are not ties


def test_proposals_match(models, image, cvjax_eval):
  reference, _, _ = models
  outputs, _ = cvjax_eval
  with torch.no_grad():
    images, _ = reference.transform(list(_torch(image)))
    features = reference.backbone(images.tensors)
    proposals, _ = reference.rpn(images, features)
  theirs = proposals[0].numpy()
  valid = np.asarray(outputs["proposal_valid"][0])
  assert valid.sum() == len(theirs) > 10
  np.testing.assert_allclose(np.asarray(outputs["proposals"][0])[valid], theirs, atol=1e-3, rtol=1e-4)


def test_heads_on_given_rois_match(models, image, cvjax_eval):
  reference, module, variables = models
  with torch.no_grad():
    images, _ = reference.transform(list(_torch(image)))
    features = reference.backbone(images.tensors)
  boxes = torch.tensor([[4.0, 6.0, 40.0, 30.0], [10.5, 2.0, 60.0, 63.0], [0.0, 0.0, 16.0, 16.0]])
  with torch.no_grad():
    box_features = reference.roi_heads.box_head(reference.roi_heads.box_roi_pool(features, [boxes], [(64, 64)]))
    class_logits, box_regression = reference.roi_heads.box_predictor(box_features)
    mask_logits = reference.roi_heads.mask_predictor(reference.roi_heads.mask_head(
        reference.roi_heads.mask_roi_pool(features, [boxes], [(64, 64)])))
  rois = jnp.concatenate([jnp.zeros((3, 1)), jnp.asarray(boxes.numpy())], 1)
  labels = np.array([0, 2, 1])
  _, intermediates = cvjax_eval
  pyramid = intermediates["fpn"]["__call__"][0]
  p2_p5 = {level: pyramid[level] for level in sorted(pyramid)[:4]}
  params = variables["params"]
  from cvjax.models.detection.rcnn import BoxHead, MaskHead
  from cvjax.ops import multiscale_roi_align

  @jax.jit
  def heads(params, maps, rois):
    box = BoxHead(NUM_CLASSES, 1024).apply({"params": params["box_head"]}, multiscale_roi_align(maps, rois, 7, 2))
    mask = MaskHead(NUM_CLASSES + 1).apply({"params": params["mask_head"]}, multiscale_roi_align(maps, rois, 14, 2))
    return box, mask

  (logits, deltas), masks = heads(params, p2_p5, rois)
  masks = np.asarray(masks)[np.arange(3), :, :, labels + 1]
  np.testing.assert_allclose(np.asarray(logits), class_logits.numpy(), atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(deltas).reshape(3, -1), box_regression.numpy(), atol=1e-4, rtol=1e-4)
  theirs_masks = mask_logits.numpy()[np.arange(3), labels + 1]
  # The logits are scaled up to ~100: compare at 1e-4 of their magnitude (float32 sums over 4 conv layers).
  np.testing.assert_allclose(np.asarray(masks), theirs_masks, atol=1e-4 * np.abs(theirs_masks).max())
  assert class_logits.std() > 1.0


def test_end_to_end_detections_match(models, image, cvjax_eval):
  reference, _, _ = models
  outputs, _ = cvjax_eval
  with torch.no_grad():
    (theirs,) = reference(list(_torch(image)))
  valid = np.asarray(outputs["valid"][0])
  assert valid.sum() == len(theirs["boxes"]) > 3
  np.testing.assert_allclose(np.asarray(outputs["boxes"][0])[valid], theirs["boxes"].numpy(), atol=1e-3)
  np.testing.assert_allclose(np.asarray(outputs["scores"][0])[valid], theirs["scores"].numpy(), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(outputs["labels"][0])[valid] + 1, theirs["labels"].numpy())
  # Probabilities of logits scaled to ~100, whose float32 differences (~1e-3) pass through the sigmoid's slope.
  theirs_masks = theirs["masks"][:, 0].numpy()
  assert (theirs_masks > 0.5).mean() > 0.01
  np.testing.assert_allclose(np.asarray(outputs["masks"][0])[valid], theirs_masks, atol=1e-3)
