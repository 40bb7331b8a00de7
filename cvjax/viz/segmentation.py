"""Label maps drawn in colour: a fixed palette per class, and image | ground truth | prediction grids."""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
from matplotlib.patches import Patch

from cvjax.viz.image import check_image, new_figure, save_figure

IGNORE_COLOR = (255, 255, 255)  # white: pixels without a class (ignore label, padding)


def palette(num_classes: int) -> np.ndarray:
  """uint8 ``[num_classes, 3]`` colours: class 0 (background in most datasets) black, the next ones
  matplotlib's tab10 / tab20 colours, then a deterministic pseudo-random colour per class."""
  from matplotlib import colormaps  # pylint: disable=import-outside-toplevel

  base = [(0, 0, 0)] + [tuple(int(255 * c) for c in colormaps["tab20"](i)[:3]) for i in range(0, 20, 2)]
  base += [tuple(int(255 * c) for c in colormaps["tab20"](i)[:3]) for i in range(1, 20, 2)]
  colours = np.array(base[:num_classes], np.uint8).reshape(-1, 3)
  if num_classes > len(colours):
    rng = np.random.default_rng(0)
    colours = np.concatenate([colours, rng.integers(40, 256, (num_classes - len(colours), 3), dtype=np.uint8)])
  return colours


def colorize(label_map: np.ndarray, num_classes: int) -> np.ndarray:
  """Integer ``[H, W]`` label map -> uint8 ``[H, W, 3]``; values outside ``[0, num_classes)`` (the ignore
  label) are drawn in `IGNORE_COLOR`."""
  label_map = np.asarray(label_map)
  if label_map.ndim != 2:
    raise ValueError(f"colorize expects a label map [H, W], got shape {label_map.shape}")
  colours = np.concatenate([palette(num_classes), np.array([IGNORE_COLOR], np.uint8)])
  index = np.where((label_map >= 0) & (label_map < num_classes), label_map, num_classes)
  return colours[index]


def draw_segmentations(images: Sequence[np.ndarray], targets: Sequence[np.ndarray],
                       predictions: Sequence[np.ndarray], path: str, num_classes: int,
                       class_names: Optional[Sequence[str]] = None, title: str = "") -> str:
  """One row per image: the image, its ground-truth label map and the predicted one, with a class legend.

  Args:
    images: uint8 ``[H, W, 3]`` each (``cvjax.viz.unnormalize_image`` of pipeline inputs).
    targets, predictions: integer ``[H, W]`` label maps (255 = ignore in targets).
    path: the PNG to write.
    num_classes: K, for the palette.
    class_names: legend entries (default: the class indices).
    title: drawn above the grid.

  Returns:
    ``path``.
  """
  if not len(images) == len(targets) == len(predictions) > 0:
    raise ValueError(f"draw_segmentations needs as many images, targets and predictions (at least one); got "
                     f"{len(images)}, {len(targets)}, {len(predictions)}")
  images = [check_image(image, "images[i]") for image in images]
  rows, cell, top = len(images), 160, 30
  width, height = 3 * cell + 150, rows * cell + top
  figure = new_figure(width, height)
  for row, (image, target, prediction) in enumerate(zip(images, targets, predictions)):
    for col, (picture, name) in enumerate(((image, "image"), (colorize(target, num_classes), "ground truth"),
                                            (colorize(prediction, num_classes), "prediction"))):
      axes = figure.add_axes([col * cell / width, 1 - (top + (row + 1) * cell) / height, (cell - 4) / width,
                              (cell - 4) / height])
      axes.imshow(picture, interpolation="nearest")
      axes.set_axis_off()
      if row == 0:
        axes.set_title(name, fontsize=8, pad=2)
  names = list(class_names) if class_names else [str(k) for k in range(num_classes)]
  colours = palette(num_classes) / 255.0
  figure.legend(handles=[Patch(color=colours[k], label=names[k]) for k in range(num_classes)][:40],
                loc="upper right", fontsize=6, frameon=False)
  if title:
    figure.text(0.01, 1 - 8 / height, title, fontsize=8, va="top")
  return save_figure(figure, path)
