"""Flax linen architectures, one per file, looked up by name through ``create_model``.

Every model takes NHWC float32 images that the input pipeline has already normalised (ImageNet mean/std),
and is called as ``module.apply(variables, images, train=False)``.
"""

from cvjax.models.registry import MODELS, create_model  # noqa: F401
