"""Argument checks shared by the ops: one clear error for a malformed size argument."""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np


def positive_int_pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
  """``value`` as ``(a, b)`` from an int or a pair of positive ints; ``ValueError`` naming ``name`` otherwise."""
  if isinstance(value, (int, np.integer)):
    value = (int(value), int(value))
  if (not isinstance(value, (tuple, list)) or len(value) != 2
      or not all(isinstance(s, (int, np.integer)) and s > 0 for s in value)):
    raise ValueError(f"{name} must be a positive int or a pair of positive ints, got {value!r}")
  return int(value[0]), int(value[1])
