"""torchvision ``fcn_resnet50`` / ``fcn_resnet101`` state_dicts -> cvjax ``FCNResNet`` variables.

cvjax's ``FCNResNet`` carries torchvision's module names with ``.<index>`` written ``_<index>``, so every key maps
by the one rule of ``cvjax.convert.torchvision``:

  backbone.layer3.0.downsample.0.weight     backbone/layer3_0/downsample_0/kernel
  classifier.0.weight / classifier.1.*      classifier_0/kernel / classifier_1/{scale, bias, mean, var}
  aux_classifier.4.bias                     aux_classifier_4/bias

(torchvision's ``IntermediateLayerGetter`` keeps the ResNet's attribute names and drops its ``fc``.)

``fcn_from_torchvision_vgg16`` starts the paper's VGG nets (``fcn32s`` / ``fcn16s`` / ``fcn8s``) from an ImageNet
VGG-16 as the paper does (Sec. 3.1, 4.1): conv1_1 .. conv5_3 as they are, the classifier's first two Linears
"convolutionalised" into fc6 (7x7) and fc7 (1x1), the 1000-way Linear dropped.
"""

from __future__ import annotations

import functools
from typing import Any, Dict, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp

from cvjax.convert import common
from cvjax.convert.torchvision import from_torch_state_dict, torchvision_module_name
from cvjax.models import create_model
from cvjax.models.segmentation.fcn import FCN

_CLASSIFIER = "classifier.4.weight"


def from_torchvision_fcn(model_name: str, state_dict: Mapping[str, Any], **model_kwargs) -> Tuple[Any, Dict]:
  """``(module, variables)`` of ``create_model(model_name, **model_kwargs)`` from a torchvision FCN.

  Args:
    model_name: ``'fcn_resnet50'``, ``'fcn_resnet101'`` (or ``'fcn_resnet18'``, which torchvision lacks, for a
      checkpoint of the same layout).
    state_dict: torchvision's keys (``backbone.conv1.weight``, ``classifier.4.bias``, ``aux_classifier.0.weight``).
    **model_kwargs: model options; ``num_classes`` defaults to the checkpoint's (``classifier.4``'s rows) and
      ``aux_loss`` to whether it has ``aux_classifier`` keys. Given explicitly, a disagreeing checkpoint is an
      error that lists the mismatched keys.

  Returns:
    ``(module, variables)``; ``module.apply(variables, images_nhwc, train=False)`` gives torchvision's ``'out'``
    as ``logits`` and ``'aux'`` as ``aux_logits``, NHWC.
  """
  if _CLASSIFIER in state_dict:
    model_kwargs.setdefault("num_classes", common.to_numpy(state_dict[_CLASSIFIER]).shape[0])
  model_kwargs.setdefault("aux_loss", any(key.startswith("aux_classifier.") for key in state_dict))
  module = create_model(model_name, **model_kwargs)
  variables = common.load_state_dict(module, state_dict, input_shape=(1, 64, 64, 3),
                                     torch_module_name=torchvision_module_name,
                                     source=f"torchvision {model_name} state_dict")
  return module, variables


def fcn_from_torchvision_vgg16(model_name: str, state_dict: Mapping[str, Any], *, rng: Optional[jax.Array] = None,
                               **model_kwargs) -> Tuple[Any, Dict]:
  """``(module, variables)`` of ``create_model(model_name, **model_kwargs)``, an ``FCN``, initialised from a
  torchvision VGG-16 (``torchvision.models.vgg16().state_dict()``, e.g. its ImageNet weights).

  The VGG's ``features.<i>`` become ``backbone/features_<i>``; its ``classifier.0`` (``[fc_width, C * 7 * 7]``
  over the flattened 7x7 pool5) becomes the 7x7 ``fc6`` and ``classifier.3`` the 1x1 ``fc7``, so that fc6 at a
  pixel computes the Linear on the 7x7 window around it; ``classifier.6`` is dropped. The score and upsampling
  layers keep their initialisation (zero scores, bilinear upsamplings: deterministic; ``rng`` seeds the rest of
  ``module.init``, which the VGG weights then replace). The model's ``width`` and ``fc_width`` must be the
  checkpoint's (64 and 4096 for torchvision's); mismatches are reported as by ``from_torch_state_dict``.
  """
  module = create_model(model_name, **model_kwargs)
  if not isinstance(module, FCN):
    raise ValueError(f"fcn_from_torchvision_vgg16 initialises the VGG-16 FCNs (fcn32s, fcn16s, fcn8s), not "
                     f"{model_name!r} ({type(module).__name__})")
  last_linear = state_dict.get("classifier.6.weight")  # dropped, but its width is the checkpoint's
  num_classes = 1000 if last_linear is None else common.to_numpy(last_linear).shape[0]
  _, vgg = from_torch_state_dict("vgg16", state_dict, width=module.width, classifier_width=module.fc_width,
                                 num_classes=num_classes, pool_size=7)
  vgg = vgg["params"]
  variables = jax.jit(functools.partial(module.init, train=False))(
      jax.random.PRNGKey(0) if rng is None else rng, jnp.zeros((1, 32, 32, 3), jnp.float32))
  params = dict(variables["params"])
  params["backbone"] = {name: value for name, value in vgg.items() if name.startswith("features_")}
  # The converted classifier_0 kernel's rows are in NHWC flatten order, (h * 7 + w) * C + c: a 7x7 HWIO kernel.
  fc6 = vgg["classifier_0"]
  params["fc6"] = {"kernel": fc6["kernel"].reshape(7, 7, -1, module.fc_width), "bias": fc6["bias"]}
  params["fc7"] = {"kernel": vgg["classifier_3"]["kernel"][None, None], "bias": vgg["classifier_3"]["bias"]}
  return module, {**variables, "params": params}
