"""Imports every architecture module so that its ``@MODELS.register`` decorators run."""

from cvjax.models import alexnet  # noqa: F401
from cvjax.models import detr  # noqa: F401
from cvjax.models import resnet  # noqa: F401
from cvjax.models import swin  # noqa: F401
from cvjax.models import vgg  # noqa: F401
from cvjax.models import vit  # noqa: F401
