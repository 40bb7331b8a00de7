"""RoIs for the RoIAlign / RoIPool tests, and torchvision's ops run on cvjax's NHWC layout.

On the test path through pytest.ini's ``pythonpath``: ``from rois import random_rois``.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np
import torch


def random_rois(rng: np.random.Generator, num: int, batch: int, low: float, high: float,
                quantum: Optional[float] = None) -> np.ndarray:
  """``[num, 5]`` float64 rows ``(batch_index, x1, y1, x2, y2)`` with x1 <= x2 and y1 <= y2.

  Corners are uniform in ``[low, high)``, so that boxes partly or fully outside a map occur; with ``quantum``
  they are rounded to its multiples (0.25 puts scaled corners on the .5 ties of RoIPool's rounding).
  """
  xy = rng.uniform(low, high, (num, 4))
  if quantum is not None:
    xy = np.round(xy / quantum) * quantum
  boxes = np.concatenate([np.minimum(xy[:, :2], xy[:, 2:]), np.maximum(xy[:, :2], xy[:, 2:])], axis=1)
  return np.concatenate([rng.integers(0, batch, (num, 1)), boxes], axis=1)


def torch_forward_backward(op: Callable, features: np.ndarray, rois: np.ndarray, cotangent: np.ndarray,
                           *args) -> Tuple[np.ndarray, np.ndarray]:
  """``op`` (``torchvision.ops.roi_align`` / ``roi_pool``) and its autograd gradient, in NHWC.

  Args:
    op: called as ``op(features_nchw, rois, *args)``, returning ``[K, C, PH, PW]``.
    features: ``[B, H, W, C]`` (cvjax's layout); run in its dtype (torchvision's CPU kernels take float64 too).
    rois: ``[K, 5]``, cast to the features' dtype as torchvision requires.
    cotangent: ``[K, PH, PW, C]``, the output gradient that is pulled back.

  Returns:
    ``(output [K, PH, PW, C], d features [B, H, W, C])``.
  """
  x = torch.tensor(features.transpose(0, 3, 1, 2), requires_grad=True)
  out = op(x, torch.tensor(rois, dtype=x.dtype), *args)
  out.backward(torch.tensor(cotangent.transpose(0, 3, 1, 2), dtype=x.dtype))
  return out.detach().numpy().transpose(0, 2, 3, 1), x.grad.numpy().transpose(0, 2, 3, 1)
