"""Masked image modelling (MAE) evaluation: the reconstruction loss over the split, and reconstruction PNGs."""

from __future__ import annotations

import math
import os
from typing import Dict, List, Tuple

import numpy as np


class ReconstructionEvaluator:
  """Accumulates the masked-patch reconstruction loss of an evaluation pass; draws the first images.

  ``update(outputs, inputs)`` reads ``outputs``: ``loss_sum [B]`` (per image, the summed per-patch loss of its
  removed patches), ``num_removed [B]``, ``mask [B]`` (False = padding), and ``preview_logits [n, L, D]`` /
  ``preview_patch_mask [n, L]`` for the first ``n`` rows of the batch; ``inputs``: the host batch (``image``).
  ``result()`` -> ``({'loss', 'num_examples'}, {})``: the loss is the mean over all removed patches of the
  split, the quantity the train loss estimates per batch.
  """

  def __init__(self, norm_pix_loss: bool, num_visualizations: int = 8):
    self.norm_pix_loss = norm_pix_loss
    self.num_visualizations = num_visualizations
    self._loss, self._removed, self._examples = 0.0, 0.0, 0
    self._preview: List[Tuple[np.ndarray, np.ndarray, np.ndarray]] = []

  def update(self, outputs: Dict[str, np.ndarray], inputs: Dict[str, np.ndarray]) -> None:
    valid = np.asarray(outputs["mask"], bool)
    self._loss += float(np.asarray(outputs["loss_sum"], np.float64)[valid].sum())
    self._removed += float(np.asarray(outputs["num_removed"], np.float64)[valid].sum())
    self._examples += int(valid.sum())
    wanted = self.num_visualizations - len(self._preview)
    rows = [i for i in range(len(outputs["preview_logits"])) if valid[i]][:max(wanted, 0)]
    for i in rows:
      self._preview.append((np.asarray(inputs["image"][i]), np.asarray(outputs["preview_logits"][i]),
                            np.asarray(outputs["preview_patch_mask"][i])))

  def result(self) -> Tuple[Dict[str, float], Dict]:
    loss = self._loss / self._removed if self._removed else 0.0
    return {"loss": loss, "num_examples": self._examples}, {}

  def write_files(self, directory: str, step: int) -> List[str]:
    """``reconstruction_step_N.png``: input, masked input and reconstruction of the first images."""
    if not self._preview:
      return []
    from cvjax.viz.mae import reconstruction_figure  # pylint: disable=import-outside-toplevel

    images, logits, masks = (np.stack(column) for column in zip(*self._preview))
    patch_size = math.isqrt(logits.shape[-1] // images.shape[-1])  # logits [n, L, p*p*C]
    path = os.path.join(directory, f"reconstruction_step_{step}.png")
    return [reconstruction_figure(images, logits, masks, patch_size, path, norm_pix_loss=self.norm_pix_loss)]
