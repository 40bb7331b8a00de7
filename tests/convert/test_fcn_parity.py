"""cvjax FCNResNet against torchvision's ``fcn_resnet50`` with the same random weights, through
``from_torch_state_dict``.

The references are torchvision's own models run by their own ``forward``: ``fcn_resnet50(weights=None,
weights_backbone=None, aux_loss=True)`` at full size, and for the cheaper cases torchvision's ``FCN`` put
together from its pieces (``IntermediateLayerGetter`` over ``ResNet(Bottleneck, [1, 1, 1, 1],
replace_stride_with_dilation=[False, True, True])``, ``FCNHead``s) as ``_fcn_resnet`` builds it. BatchNorms get
random statistics and affines, and each head's last conv is rescaled so that its logits have unit standard
deviation: a 1e-4 absolute tolerance is then a real one.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch_reference import randomise_batch_norms

from cvjax.convert import from_torch_state_dict
from cvjax.convert.fcn import fcn_from_torchvision_vgg16
from cvjax.models.segmentation.fcn import bilinear_filter, resize_bilinear

NUM_CLASSES = 5


def _unit_logits(model, x: np.ndarray):
  """Rescales the last conv of ``classifier`` (and ``aux_classifier``) so that its output has std 1 on ``x``;
  returns torchvision's outputs after that, NHWC."""
  with torch.no_grad():
    outputs = model(torch.from_numpy(x))
    for key, head in (("out", model.classifier), ("aux", model.aux_classifier)):
      if head is not None:
        scale = 1.0 / outputs[key].std()
        head[4].weight.mul_(scale)
        head[4].bias.mul_(scale)
    outputs = model(torch.from_numpy(x))
  return {key: value.numpy().transpose(0, 2, 3, 1) for key, value in outputs.items()}


def _small_fcn(torchvision, aux_loss: bool):
  """torchvision's FCN on a one-block-per-stage ResNet-50 (full width: torchvision has no width knob)."""
  from torchvision.models import resnet
  from torchvision.models._utils import IntermediateLayerGetter
  from torchvision.models.segmentation.fcn import FCN, FCNHead

  backbone = resnet.ResNet(resnet.Bottleneck, [1, 1, 1, 1], replace_stride_with_dilation=[False, True, True])
  return_layers = {"layer4": "out", "layer3": "aux"} if aux_loss else {"layer4": "out"}
  return FCN(IntermediateLayerGetter(backbone, return_layers=return_layers), FCNHead(2048, NUM_CLASSES),
             FCNHead(1024, NUM_CLASSES) if aux_loss else None)


def _compare(torch_model, name, x_nchw, **kwargs):
  expected = _unit_logits(randomise_batch_norms(torch_model), x_nchw)
  module, variables = from_torch_state_dict(name, torch_model.state_dict(), **kwargs)
  ours = jax.jit(functools.partial(module.apply, train=False))(variables, jnp.asarray(x_nchw.transpose(0, 2, 3, 1)))
  assert set(ours) == ({"logits", "aux_logits"} if "aux" in expected else {"logits"})
  for key, theirs in expected.items():
    got = np.asarray(ours["logits" if key == "out" else "aux_logits"])
    assert got.shape == theirs.shape == (x_nchw.shape[0], *x_nchw.shape[2:], NUM_CLASSES)
    np.testing.assert_allclose(got, theirs, rtol=1e-4, atol=1e-4, err_msg=key)
  return module


@pytest.mark.parametrize("size_in, size_out", [((8, 8), (64, 64)), ((8, 8), (63, 57)), ((5, 3), (17, 40)),
                                               ((1, 2), (7, 7)), ((6, 6), (6, 6))])
def test_resize_bilinear_upsamples_as_interpolate(size_in, size_out):
  x = np.random.default_rng(0).standard_normal((2, 3, *size_in), dtype=np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=size_out, mode="bilinear",
                                             align_corners=False).numpy()
  ours = resize_bilinear(jnp.asarray(x.transpose(0, 2, 3, 1)), size_out)
  np.testing.assert_allclose(ours, expected.transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_fcn_resnet50_matches_torchvision(torchvision):
  torch.manual_seed(0)
  model = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None,
                                                       num_classes=NUM_CLASSES, aux_loss=True)
  x = np.random.default_rng(0).standard_normal((1, 3, 64, 64), dtype=np.float32)
  module = _compare(model, "fcn_resnet50", x, num_classes=NUM_CLASSES, aux_loss=True)
  assert tuple(module.stage_sizes) == (3, 4, 6, 3) and module.block_type == "bottleneck"


@pytest.mark.parametrize("aux_loss, size", [(True, (50, 61)), (False, (32, 40))])
def test_small_fcn_matches_torchvision_at_uneven_sizes(torchvision, aux_loss, size):
  """Odd sides (stride-8 maps of 7x8 resized to 50x61 by a non-integer factor); ``num_classes`` and
  ``aux_loss`` read from the checkpoint."""
  torch.manual_seed(1)
  x = np.random.default_rng(1).standard_normal((2, 3, *size), dtype=np.float32)
  module = _compare(_small_fcn(torchvision, aux_loss), "fcn_resnet50", x, stage_sizes=(1, 1, 1, 1))
  assert module.num_classes == NUM_CLASSES and module.aux_loss == aux_loss


def test_mismatched_state_dicts_are_refused(torchvision):
  state_dict = _small_fcn(torchvision, aux_loss=True).state_dict()
  kwargs = dict(stage_sizes=(1, 1, 1, 1))
  broken = dict(state_dict)
  del broken["classifier.1.running_var"]
  broken["classifier.9.weight"] = broken["classifier.4.weight"]
  with pytest.raises(ValueError) as error:
    from_torch_state_dict("fcn_resnet50", broken, aux_loss=True, **kwargs)
  assert "missing keys: ['classifier.1.running_var']" in str(error.value)
  assert "unexpected keys: ['classifier.9.weight']" in str(error.value)

  with pytest.raises(ValueError, match=r"classifier.4.weight: shape \(5, 512, 1, 1\).*is \(1, 1, 512, 6\)"):
    from_torch_state_dict("fcn_resnet50", state_dict, num_classes=6, **kwargs)
  with pytest.raises(ValueError, match=r"unexpected keys: \['aux_classifier.0.weight'"):
    from_torch_state_dict("fcn_resnet50", state_dict, aux_loss=False, **kwargs)
  with pytest.raises(ValueError, match="missing keys"):  # the full-size model's layer1.1, ...
    from_torch_state_dict("fcn_resnet50", state_dict)


def test_vgg16_initialisation_convolutionalises_the_classifier(torchvision):
  """An ImageNet-style VGG-16 (torchvision's, at 1/8 width with a 32-wide head of the same layout) into fcn8s:
  on a 224x224 image pool5 is 7x7, and fc6 / fc7 at its centre pixel are torchvision's classifier.0 / .3."""
  vgg = torchvision.models.vgg
  torch.manual_seed(0)
  features = vgg.make_layers([v if v == "M" else v // 8 for v in vgg.cfgs["D"]])
  with torch.device("meta"):  # the constructor's 25088 x 4096 head is replaced below
    model = vgg.VGG(features, num_classes=10)
  model.classifier = torch.nn.Sequential(torch.nn.Linear(64 * 49, 32), torch.nn.ReLU(True), torch.nn.Dropout(),
                                         torch.nn.Linear(32, 32), torch.nn.ReLU(True), torch.nn.Dropout(),
                                         torch.nn.Linear(32, 10))
  model.eval()
  x = np.random.default_rng(0).standard_normal((1, 3, 224, 224), dtype=np.float32)
  with torch.no_grad():
    pool5 = model.features(torch.from_numpy(x))
    fc7 = model.classifier[:4](torch.flatten(pool5, 1)).numpy()

  module, variables = fcn_from_torchvision_vgg16("fcn8s", model.state_dict(), num_classes=3, width=8, fc_width=32,
                                                 input_padding=0)
  _, state = jax.jit(functools.partial(module.apply, train=False, capture_intermediates=True))(
      variables, jnp.asarray(x.transpose(0, 2, 3, 1)))
  ours = state["intermediates"]
  np.testing.assert_allclose(ours["backbone"]["__call__"][0]["pool5"], pool5.numpy().transpose(0, 2, 3, 1),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours["fc7"]["__call__"][0][:, 3, 3], fc7, rtol=1e-4, atol=1e-4)
  assert np.abs(fc7).max() > 0.1
  params = variables["params"]
  assert not np.asarray(params["score_fr"]["kernel"]).any() and not np.asarray(params["score_pool3"]["bias"]).any()
  f = bilinear_filter(4)
  np.testing.assert_allclose(params["upscore2"]["kernel"], np.einsum("i,j,cd->ijcd", f, f, np.eye(3)))
