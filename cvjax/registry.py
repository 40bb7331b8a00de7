"""One small registry type, instantiated once per kind (models, tasks, datasets).

A registry maps a config name to a factory. Lookups of an unknown name raise a ``KeyError`` that lists the
valid names, so a typo in ``--config.model.name`` is caught at start-up with the fix in the message.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, TypeVar

T = TypeVar("T")


class Registry:
  """A name -> factory mapping filled by the ``register`` decorator."""

  def __init__(self, kind: str):
    """``kind`` names the entries in messages ('model', 'task', 'dataset')."""
    self.kind = kind
    self._entries: Dict[str, Callable] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator: ``@MODELS.register('resnet50')`` above a factory or class."""

    def decorator(factory: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice")
      self._entries[name] = factory
      return factory

    return decorator

  def get(self, name: str) -> Callable:
    """The factory registered as ``name``; ``KeyError`` listing the valid names otherwise."""
    try:
      return self._entries[name]
    except KeyError:
      valid = ", ".join(sorted(self._entries))
      raise KeyError(f"unknown {self.kind} {name!r}; valid {self.kind} names: {valid}") from None

  def names(self) -> list[str]:
    """The registered names, sorted."""
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def __iter__(self) -> Iterator[str]:
    return iter(sorted(self._entries))
