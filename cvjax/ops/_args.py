"""Helpers shared by the ops: one clear error for a malformed size argument, and modules callable as their op."""

from __future__ import annotations

import sys
import types
from typing import Callable, Sequence, Tuple, Union

import numpy as np


def positive_int_pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
  """``value`` as ``(a, b)`` from an int or a pair of positive ints; ``ValueError`` naming ``name`` otherwise."""
  if isinstance(value, (int, np.integer)):
    value = (int(value), int(value))
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(s, (int, np.integer)) and s > 0 for s in value)):
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
  return int(value[0]), int(value[1])


def callable_module(module_name: str, function: Callable) -> None:
  """Makes the module ``module_name`` callable as ``function``.

  ``cvjax.ops.nms`` is then both the function (``cvjax.ops.nms(boxes, scores, 0.5, 100)``, as
  ``torchvision.ops.nms``) and the module that defines it (``cvjax.ops.nms.batched_nms``,
  ``import cvjax.ops.nms as m``): a package attribute can only be one object, and binding the function there
  would hide the module.
  """
  module = sys.modules[module_name]
  module.__class__ = type(f"CallableModule[{function.__name__}]", (types.ModuleType,),
                          {"__call__": staticmethod(function)})
