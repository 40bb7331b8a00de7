"""Images for drawing: undo the input pipeline's normalisation, and write matplotlib figures without pyplot."""

from __future__ import annotations

import os

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def unnormalize_image(image: np.ndarray) -> np.ndarray:
  """Pipeline input -> drawable image: ``x * IMAGENET_STD + IMAGENET_MEAN``, scaled to uint8.

  Args:
    image: float ``[..., H, W, 3]`` RGB normalised with the ImageNet mean/std (as the input pipeline does).

  Returns:
    uint8 ``[..., H, W, 3]`` in [0, 255] (rounded, values outside clipped).
  """
  # Deferred: the cvjax.data package imports TFDS and grain, which drawing does not otherwise need.
  from cvjax.data.preprocessing import IMAGENET_MEAN, IMAGENET_STD

  image = np.asarray(image, np.float32)
  if image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(f"unnormalize_image expects RGB images [..., H, W, 3], got shape {image.shape}")
  pixels = (image * IMAGENET_STD + IMAGENET_MEAN) * 255.0
  return np.clip(np.round(pixels), 0, 255).astype(np.uint8)


def check_image(image: np.ndarray, name: str = "image_uint8") -> np.ndarray:
  """``image`` as a uint8 ``[H, W, 3]`` array, or a ValueError naming ``name`` and what was expected."""
  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
    raise ValueError(f"{name} must be a uint8 RGB image [H, W, 3] (see cvjax.viz.unnormalize_image), got "
                     f"{image.dtype} array of shape {image.shape}")
  return image


def new_figure(width_px: int, height_px: int, dpi: int = 100) -> Figure:
  """A figure of exactly ``width_px x height_px`` pixels on an Agg canvas.

  The figure is built without pyplot so that drawing never changes (or depends on) the global matplotlib
  backend, holds no global figure registry, and is safe from threads.
  """
  figure = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
  FigureCanvasAgg(figure)
  return figure


def save_figure(figure: Figure, path: str) -> str:
  """Writes ``figure`` as PNG at its own size (no tight bounding box, so the pixel size is predictable)."""
  directory = os.path.dirname(path)
  if directory:
    os.makedirs(directory, exist_ok=True)
  figure.savefig(path, format="png", dpi=figure.dpi)
  return path
