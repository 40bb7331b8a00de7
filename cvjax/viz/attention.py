"""Where a Vision Transformer looks: class-token attention per head, attention rollout, heatmap PNGs.

Pure NumPy (matplotlib only to draw). The input is what ``cvjax.models.backbones.vit.ViT`` returns with
``return_attention=True`` -- one array of attention probabilities per layer, ``[B, heads, N, N]`` -- moved to
host; a single image's ``[heads, N, N]`` per layer works the same (every function accepts leading batch axes
``...``). Rows are queries and columns keys, so each row sums to 1. Token order: ``num_prefix_tokens`` prefix
tokens first (1 for a class token, ``pool='cls'``; 0 for ``pool='gap'``), then the patches in row-major order of
the ``[gh, gw]`` patch grid.

The row that is read is the one the classifier sees: the class token's, or -- without a class token, where
the head averages all tokens -- the mean of all rows. Maps are restricted to the patch columns and, by
default, renormalised to sum to 1 over the patches (the class token's attention to itself is dropped).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image

from cvjax.viz.image import check_image, new_figure, save_figure

HEAD_FUSIONS = ("mean", "max", "min")
Attentions = Union[np.ndarray, Sequence[np.ndarray]]


def _stack_layers(attentions: Attentions) -> np.ndarray:
  """Per-layer ``[..., heads, N, N]`` arrays (a sequence, or one array with a leading layer axis) ->
  float64 ``[L, ..., heads, N, N]``."""
  array = np.asarray(attentions, np.float64)  # a list of jax/NumPy arrays stacks along a new axis 0
  if array.ndim < 4 or array.shape[-1] != array.shape[-2]:
    raise ValueError("attentions must be per-layer attention probabilities [..., heads, N, N] (a list over "
                     f"layers or an array [L, ..., heads, N, N]), got shape {array.shape}")
  return array


def _grid(num_tokens: int, grid_hw: Optional[Tuple[int, int]], num_prefix_tokens: int) -> Tuple[int, int]:
  """The patch grid ``(gh, gw)``: checked against the token count, or inferred as a square when None."""
  if num_prefix_tokens not in (0, 1):
    raise ValueError(f"num_prefix_tokens must be 1 (class token) or 0 (pool='gap'), got {num_prefix_tokens}")
  num_patches = num_tokens - num_prefix_tokens
  if grid_hw is None:
    side = math.isqrt(max(num_patches, 0))
    if side * side != num_patches or side == 0:
      raise ValueError(f"{num_tokens} tokens - {num_prefix_tokens} prefix = {num_patches} patches is not a "
                       "square grid; pass grid_hw=(gh, gw)")
    return side, side
  gh, gw = (int(v) for v in grid_hw)
  if gh * gw != num_patches:
    raise ValueError(f"grid_hw {tuple(grid_hw)} has {gh * gw} patches but the attention covers {num_tokens} "
                     f"tokens with {num_prefix_tokens} prefix token(s), i.e. {num_patches} patches")
  return gh, gw


def _patch_map(matrix: np.ndarray, grid_hw: Tuple[int, int], num_prefix_tokens: int,
               renormalize: bool) -> np.ndarray:
  """``[..., N, N]`` -> ``[..., gh, gw]``: the classifier's row (see the module docstring) over the patches."""
  row = matrix[..., 0, :] if num_prefix_tokens else matrix.mean(axis=-2)
  patches = row[..., num_prefix_tokens:]
  if renormalize:
    total = patches.sum(axis=-1, keepdims=True)
    # An all-zero row (e.g. a class token attending only to itself) stays zero rather than NaN.
    patches = patches / np.where(total > 0, total, 1.0)
  return patches.reshape(patches.shape[:-1] + tuple(grid_hw))


def cls_attention_maps(attentions: Attentions, grid_hw: Optional[Tuple[int, int]] = None, *, layer: int = -1,
                       num_prefix_tokens: int = 1, renormalize: bool = True) -> np.ndarray:
  """Per-head attention of the class token to every patch, in one layer (the last by default).

  Args:
    attentions: per-layer attention probabilities, ``L`` arrays ``[..., heads, N, N]`` (or one array
      ``[L, ..., heads, N, N]``), ``N = num_prefix_tokens + gh * gw``.
    grid_hw: the patch grid ``(gh, gw)``; None infers a square grid.
    layer: which layer (Python indexing; -1 = last).
    num_prefix_tokens: 1 with a class token; 0 for ``pool='gap'`` ViTs (then the mean of all query rows).
    renormalize: rescale each head's map to sum to 1 over the patches.

  Returns:
    float64 ``[..., heads, gh, gw]``, non-negative.
  """
  array = _stack_layers(attentions)
  grid = _grid(array.shape[-1], grid_hw, num_prefix_tokens)
  return _patch_map(array[layer], grid, num_prefix_tokens, renormalize)


def fuse_heads(attention: np.ndarray, head_fusion: str = "mean") -> np.ndarray:
  """``[..., heads, N, N]`` -> ``[..., N, N]`` by the mean, max or min over heads."""
  if head_fusion not in HEAD_FUSIONS:
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
  return getattr(np, head_fusion)(attention, axis=-3)


def _discard_lowest(matrix: np.ndarray, discard_ratio: float, num_prefix_tokens: int) -> np.ndarray:
  """Zeroes the ``int(discard_ratio * N * N)`` smallest weights of each ``[N, N]`` matrix in ``[..., N, N]``
  (ties broken by position), never the class token's attention to itself: as jacobgil/vit-explain, whose
  ``discard_ratio`` this is, so that the class token's row always keeps some mass."""
  n = matrix.shape[-1]
  flat = matrix.reshape(matrix.shape[:-2] + (n * n,))
  count = int(discard_ratio * n * n)
  lowest = np.argsort(flat, axis=-1, kind="stable")[..., :count]
  drop = np.zeros(flat.shape, bool)
  np.put_along_axis(drop, lowest, True, axis=-1)
  if num_prefix_tokens:
    drop[..., 0] = False
  return np.where(drop, 0.0, flat).reshape(matrix.shape)


def attention_rollout(attentions: Attentions, discard_ratio: float = 0.0, head_fusion: str = "mean", *,
                      grid_hw: Optional[Tuple[int, int]] = None, num_prefix_tokens: int = 1,
                      renormalize: bool = True) -> np.ndarray:
  """Attention rollout (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", Sec. 3).

  Per layer ``l``: fuse the heads (``head_fusion``), optionally zero the weakest ``discard_ratio`` of the
  weights, add the identity for the residual connection and renormalise the rows, ``A_l = rownorm(W_l + I)``
  (``0.5 W_l + 0.5 I`` when nothing is discarded). The rollout is ``A_L @ ... @ A_2 @ A_1``; its class-token
  row over the patches is the map.

  Args:
    attentions: per-layer attention probabilities, ``L`` arrays ``[..., heads, N, N]`` in layer order (or one
      array ``[L, ..., heads, N, N]``).
    discard_ratio: fraction in [0, 1) of each fused layer's smallest weights set to 0 before adding the
      identity (jacobgil/vit-explain's denoising; 0 = the paper's rollout).
    head_fusion: 'mean' (the paper), 'max' or 'min' over heads.
    grid_hw: the patch grid ``(gh, gw)``; None infers a square grid.
    num_prefix_tokens: 1 with a class token; 0 for ``pool='gap'`` ViTs (then the mean of the rollout's rows).
    renormalize: rescale the map to sum to 1 over the patches.

  Returns:
    float64 ``[..., gh, gw]``, non-negative.
  """
  if not 0.0 <= discard_ratio < 1.0:
    raise ValueError(f"discard_ratio must be in [0, 1), got {discard_ratio}")
  array = _stack_layers(attentions)
  n = array.shape[-1]
  grid = _grid(n, grid_hw, num_prefix_tokens)
  rollout = np.broadcast_to(np.eye(n), array.shape[1:-3] + (n, n))
  for layer in array:
    fused = fuse_heads(layer, head_fusion)
    if discard_ratio:
      fused = _discard_lowest(fused, discard_ratio, num_prefix_tokens)
    residual = fused + np.eye(n)
    rollout = (residual / residual.sum(axis=-1, keepdims=True)) @ rollout
  return _patch_map(rollout, grid, num_prefix_tokens, renormalize)


def upsample_map(heatmap: np.ndarray, size_hw: Tuple[int, int]) -> np.ndarray:
  """Bilinearly resizes a ``[gh, gw]`` map to ``size_hw = (H, W)`` (PIL, pixel-centre aligned): float32."""
  heatmap = np.asarray(heatmap, np.float32)
  if heatmap.ndim != 2:
    raise ValueError(f"a heatmap must be 2-D [gh, gw], got shape {heatmap.shape}")
  resized = Image.fromarray(heatmap).resize((int(size_hw[1]), int(size_hw[0])), Image.Resampling.BILINEAR)
  return np.asarray(resized, np.float32)


def _unit_range(values: np.ndarray) -> np.ndarray:
  low, high = float(values.min()), float(values.max())
  return (values - low) / (high - low) if high > low else np.zeros_like(values)


def save_attention_pngs(image_uint8: np.ndarray, maps: np.ndarray, path: str,
                        titles: Optional[Sequence[str]] = None, *, suptitle: Optional[str] = None,
                        alpha: float = 0.5, cmap: str = "jet", columns: Optional[int] = None,
                        panel_px: int = 160) -> str:
  """Draws an image and heatmaps of it into one PNG: panel 0 is the image, panel ``k + 1`` is ``maps[k]``
  upsampled (bilinear) to the image size and overlaid with opacity ``alpha``.

  Each heatmap is scaled to its own [min, max] for the colour map (the maps' relative layout is what is shown,
  not their absolute mass). Panels run row-major over ``columns`` columns.

  Args:
    image_uint8: uint8 ``[H, W, 3]`` RGB (``cvjax.viz.unnormalize_image`` undoes the pipeline normalisation).
    maps: ``[K, gh, gw]`` heatmaps (or one ``[gh, gw]``), e.g. from ``cls_attention_maps``/``attention_rollout``.
    path: the PNG to write; its directory is created.
    titles: ``K`` panel titles for the maps (default 'map k'); the image panel is titled 'image'.
    suptitle: an optional line above all panels (e.g. the label and the prediction).
    alpha: heatmap opacity in [0, 1].
    cmap: a matplotlib colour map name.
    columns: panels per row (default ``min(K + 1, 6)``).
    panel_px: side of one panel in pixels.

  Returns:
    ``path``. The PNG is ``columns * panel_px`` wide and ``rows * panel_px`` high, plus 24 pixels with a
    ``suptitle``.
  """
  image = check_image(image_uint8)
  maps = np.asarray(maps, np.float32)
  maps = maps[None] if maps.ndim == 2 else maps
  if maps.ndim != 3 or maps.shape[0] == 0:
    raise ValueError(f"maps must be heatmaps [K, gh, gw] or one [gh, gw], got shape {maps.shape}")
  titles = [f"map {k}" for k in range(len(maps))] if titles is None else list(titles)
  if len(titles) != len(maps):
    raise ValueError(f"titles has {len(titles)} entries for {len(maps)} maps")
  columns = columns or min(len(maps) + 1, 6)
  rows = -(-(len(maps) + 1) // columns)
  header_px = 24 if suptitle else 0
  width_px, height_px = columns * panel_px, rows * panel_px + header_px
  figure = new_figure(width_px, height_px)
  if suptitle:
    figure.text(0.5, 1 - header_px / 2 / height_px, suptitle, ha="center", va="center", fontsize=9)
  pad_px, title_px = 4, 16
  height, width = image.shape[:2]
  panels = [(None, "image")] + [(upsample_map(m, (height, width)), t) for m, t in zip(maps, titles)]
  for index, (heat, title) in enumerate(panels):
    row, column = divmod(index, columns)
    left = (column * panel_px + pad_px) / width_px
    bottom = (height_px - header_px - (row + 1) * panel_px + pad_px) / height_px
    axes = figure.add_axes((left, bottom, (panel_px - 2 * pad_px) / width_px,
                            (panel_px - 2 * pad_px - title_px) / height_px))
    axes.imshow(image, interpolation="nearest")
    if heat is not None:
      axes.imshow(_unit_range(heat), cmap=cmap, alpha=alpha, vmin=0.0, vmax=1.0, interpolation="nearest")
    axes.set_title(title, fontsize=8, pad=2)
    axes.set_axis_off()
  return save_figure(figure, path)
