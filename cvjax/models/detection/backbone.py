"""The backbone every FPN detector shares: ResNet C2..C5 or Swin stages, keyed by pyramid level.

``BackboneFeatures`` is a base class (a Flax dataclass with the backbone's attributes and one method), so that
Faster / Mask R-CNN, RetinaNet and the one-stage detectors after them configure their backbone with the same
attribute names and build it under the same parameter path (``backbone/...``, torchvision's
``backbone.body.*`` for the converters).
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from cvjax.models.backbones.resnet import ResNet
from cvjax.models.backbones.swin import Swin

BACKBONES = ("resnet", "swin")


class BackboneFeatures(nn.Module):
  """Backbone attributes and ``_features``; subclass it and call ``self._features`` in ``__call__``.

  Attributes:
    backbone: ``'resnet'`` or ``'swin'``.
    backbone_*: the ResNet's stage sizes, block type, width, stem, frozen batch norm (torchvision's
      ``FrozenBatchNorm2d``), frozen stages and conv implementation (``ResNet``'s attributes).
    swin_*: the Swin's embedding width, depths, heads, window and drop-path rate (``Swin``'s attributes).
    dtype: compute dtype of the backbone; its maps are handed on in float32.
  """
  backbone: str = "resnet"
  backbone_stage_sizes: Sequence[int] = (3, 4, 6, 3)
  backbone_block_type: str = "bottleneck"
  backbone_width: int = 64
  backbone_stem: str = "imagenet"
  backbone_frozen_bn: bool = True
  backbone_frozen_stages: int = 0
  backbone_layer_impl: str = "auto"
  swin_embed_dim: int = 96
  swin_depths: Sequence[int] = (2, 2, 6, 2)
  swin_num_heads: Sequence[int] = (3, 6, 12, 24)
  swin_window_size: int = 7
  swin_drop_path_rate: float = 0.2
  dtype: Any = jnp.float32

  def _features(self, images: jnp.ndarray, train: bool) -> Dict[int, jnp.ndarray]:
    """``[B, H, W, 3]`` -> ``{level: [B, H / 2**level, W / 2**level, C_level]}`` float32 for levels 2..5
    (ResNet's C2..C5, Swin's four stages). Call it from the subclass's compact ``__call__``."""
    if self.backbone == "resnet":
      maps = ResNet(stage_sizes=tuple(self.backbone_stage_sizes), block_type=self.backbone_block_type,
                    num_classes=0, width=self.backbone_width, stem=self.backbone_stem,
                    frozen_bn=self.backbone_frozen_bn, frozen_stages=self.backbone_frozen_stages,
                    dtype=self.dtype, layer_impl=self.backbone_layer_impl, name="backbone")(
                        images, train=train, return_features=True)
      maps = [maps[f"c{i}"] for i in range(2, 6)]
    elif self.backbone == "swin":
      stages = Swin(embed_dim=self.swin_embed_dim, depths=tuple(self.swin_depths),
                    num_heads=tuple(self.swin_num_heads), window_size=self.swin_window_size, num_classes=0,
                    drop_path_rate=self.swin_drop_path_rate, dtype=self.dtype, name="backbone")(
                        images, train=train, return_features=True)
      # The Swin paper's detector normalises every stage output it hands to the FPN.
      maps = [nn.LayerNorm(epsilon=1e-5, name=f"backbone_norm{i}")(stages[f"stage{i + 1}"])
              for i in range(len(self.swin_depths))]
    else:
      raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")
    # Consecutive stages halve the map: the first one's stride names the levels (C2 at stride 4, or at stride 1
    # with the CIFAR stem). Rounding log2 of every map's own ratio would let two stages collide when the image
    # side is not a multiple of 32 (36 px: C4 and C5 are 3 and 2 px, both "level 4").
    first = int(round(np.log2(images.shape[1] / maps[0].shape[1])))
    return {first + i: m.astype(jnp.float32) for i, m in enumerate(maps)}
