"""The model registry: ``@MODELS.register('resnet50')`` on a factory, ``create_model('resnet50', **kw)``."""

from cvjax.registry import Registry

MODELS = Registry("model")


def create_model(name: str, **kwargs):
  """Builds the flax module registered under ``name`` with keyword overrides (``num_classes=10``, ...).

  Raises ``KeyError`` listing the valid names when ``name`` is unknown.
  """
  return MODELS.get(name)(**kwargs)
