"""Masked image modelling (MAE, He et al. 2021): the normalised-pixel loss on the removed patches.

The model (``cvjax.models.ssl.mae.MAE``) masks the patches itself, from the train loop's ``mask`` rng stream
(a fixed key at evaluation, so every checkpoint is scored on the same patches); ``config.task.norm_pix_loss``
(default True, the paper's Table 3 choice) normalises each target patch by its own mean and variance. Batches
are classification batches (``image``, ``mask``); labels, if any, are not used.
"""

from __future__ import annotations

import math
from typing import Dict

import jax
import jax.numpy as jnp

from cvjax.evaluation.reconstruction import ReconstructionEvaluator
from cvjax.models.ssl import mae
from cvjax.tasks.base import TASKS, Task


def per_patch_loss(images: jax.Array, logits: jax.Array, norm_pix_loss: bool) -> jax.Array:
  """``[B, L]`` loss of each predicted patch (``cvjax.models.ssl.mae.per_patch_loss``), the patch size read
  from ``logits [B, L, p*p*C]`` and the images' ``C``."""
  return mae.per_patch_loss(images, logits, math.isqrt(logits.shape[-1] // images.shape[-1]), norm_pix_loss)


@TASKS.register("masked_image_modeling")
class MaskedImageModelingTask(Task):
  """Batch keys: ``image [B, H, W, 3]``, ``mask [B]`` bool (False = padding)."""

  @property
  def norm_pix_loss(self) -> bool:
    return bool(self.config.task.get("norm_pix_loss", True))

  def loss(self, outputs, batch):
    patch_mask = outputs["mask"] * batch["mask"].astype(jnp.float32)[:, None]   # padding rows count nothing
    errors = per_patch_loss(batch["image"], outputs["logits"], self.norm_pix_loss)
    total, removed = jnp.sum(errors * patch_mask), jnp.sum(patch_mask)
    # An all-padding batch gives 0, not HF's NaN.
    return total / jnp.maximum(removed, 1.0), {"loss": (total, removed)}

  def eval_outputs(self, outputs, batch) -> Dict[str, jax.Array]:
    errors = per_patch_loss(batch["image"], outputs["logits"], self.norm_pix_loss)
    preview = int(self.config.task.get("num_visualizations", 8))
    return {"loss_sum": jnp.sum(errors * outputs["mask"], axis=-1), "num_removed": jnp.sum(outputs["mask"], -1),
            "mask": batch["mask"], "preview_logits": outputs["logits"][:preview],
            "preview_patch_mask": outputs["mask"][:preview]}

  def evaluator(self):
    return ReconstructionEvaluator(self.norm_pix_loss, int(self.config.task.get("num_visualizations", 8)))
