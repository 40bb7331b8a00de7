"""Flax linen architectures grouped by family, looked up by name through ``create_model``.

  ``cvjax.models.layers``      shared building blocks (fast CPU conv, batch norms, pooling, DropPath)
  ``cvjax.models.backbones``   alexnet, vgg, resnet, vit, swin (classifiers and feature extractors)
  ``cvjax.models.detection``   detr, its transformer and position encoding
  ``cvjax.models.segmentation`` fcn, unet (dense per-pixel logits)
  ``cvjax.models.ssl``         mae (self-supervised pre-training)

Every model takes NHWC float32 images that the input pipeline has already normalised (ImageNet mean/std),
and is called as ``module.apply(variables, images, train=False)``.
"""

import sys as _sys

from cvjax.models.registry import MODELS, create_model  # noqa: F401
# Importing the families runs their ``@MODELS.register`` lines.
from cvjax.models import backbones, detection, layers, segmentation, ssl  # noqa: F401

# The paths from before the layout by family (``cvjax.models.resnet``, ``from cvjax.models.detr import DETR``)
# keep working: they are the same module objects, registered under their old names too.
for _family in (backbones, detection, segmentation):
  for _name in _family.MODULES:
    _module = getattr(_family, _name)
    _sys.modules[f"{__name__}.{_name}"] = _module
    globals()[_name] = _module
