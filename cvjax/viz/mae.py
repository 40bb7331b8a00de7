"""MAE reconstructions drawn to PNG: the input, the masked input, and the reconstruction with the visible
patches pasted back (as the MAE demo notebook shows them)."""

from __future__ import annotations

import numpy as np

from cvjax.viz.image import new_figure, save_figure, unnormalize_image

# The fill of removed patches in the masked-input row (mid grey).
MASKED_GREY = 128
ROW_TITLES = ("input", "masked", "reconstruction + visible")


def _patchify(images: np.ndarray, patch_size: int) -> np.ndarray:
  """``[B, H, W, C]`` -> ``[B, L, p*p*C]``, the layout of ``cvjax.models.ssl.mae.patchify`` (NumPy here: viz
  draws without JAX and sits beside, not above, the models)."""
  batch, height, width, channels = images.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  x = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * grid_w, -1)


def _unpatchify(patches: np.ndarray, patch_size: int, height: int, width: int) -> np.ndarray:
  batch, _, _ = patches.shape
  grid_h, grid_w = height // patch_size, width // patch_size
  x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, -1).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, height, width, -1)


def reconstruction_images(images: np.ndarray, logits: np.ndarray, mask: np.ndarray, patch_size: int,
                          norm_pix_loss: bool = True) -> np.ndarray:
  """The reconstruction in input space, ``[B, H, W, C]`` float32, visible patches taken from the input.

  With ``norm_pix_loss`` the predictions are per-patch normalised pixels: they are mapped back with the input
  patch's own mean and (unbiased, +1e-6) variance -- what the MAE demo does, the statistics of a removed patch
  being the one thing the model was not asked for.
  """
  images = np.asarray(images, np.float32)
  height, width = images.shape[1:3]
  target = _patchify(images, patch_size)
  pred = np.asarray(logits, np.float32)
  if pred.shape != target.shape:
    raise ValueError(f"logits must be [B, L, p*p*C] = {target.shape} for images {images.shape} and patch_size "
                     f"{patch_size}, got {pred.shape}")
  if norm_pix_loss:
    mean = target.mean(axis=-1, keepdims=True)
    var = target.var(axis=-1, keepdims=True, ddof=1)
    pred = pred * np.sqrt(var + 1e-6) + mean
  removed = np.asarray(mask, np.float32)[..., None]
  return _unpatchify(removed * pred + (1 - removed) * target, patch_size, height, width)


def reconstruction_figure(images: np.ndarray, logits: np.ndarray, mask: np.ndarray, patch_size: int, path: str,
                          *, norm_pix_loss: bool = True, imagenet_normalized: bool = True,
                          panel_px: int = 128) -> str:
  """Writes a PNG with one column per image and three rows: input, masked input (removed patches grey), and
  the reconstruction with the visible patches pasted back.

  Args:
    images: the model's input ``[B, H, W, 3]`` float.
    logits: the MAE's ``logits [B, L, p*p*3]`` (``cvjax.models.ssl.mae.patchify`` layout).
    mask: ``[B, L]``, 1 = removed.
    patch_size: ``p``.
    path: the PNG to write; its directory is created.
    norm_pix_loss: whether ``logits`` are normalised pixels (see ``reconstruction_images``).
    imagenet_normalized: ``images`` are normalised with the ImageNet mean/std (undone with
      ``cvjax.viz.unnormalize_image``); else they are RGB in [0, 1].
    panel_px: side of one panel in pixels.

  Returns:
    ``path``; the PNG is ``B * panel_px`` wide and ``3 * panel_px`` high.
  """
  images = np.asarray(images, np.float32)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"images must be RGB [B, H, W, 3], got shape {images.shape}")
  if images.shape[1] % patch_size or images.shape[2] % patch_size:
    raise ValueError(f"images {images.shape} are not a whole number of {patch_size}x{patch_size} patches")
  mask = np.asarray(mask, np.float32)
  if mask.shape != (images.shape[0], (images.shape[1] // patch_size) * (images.shape[2] // patch_size)):
    raise ValueError(f"mask must be [B, L] for images {images.shape} and patch_size {patch_size}, got {mask.shape}")

  def to_uint8(x):
    if imagenet_normalized:
      return unnormalize_image(x)
    return np.clip(np.round(x * 255.0), 0, 255).astype(np.uint8)

  height, width = images.shape[1:3]
  pixel_mask = _unpatchify(np.repeat(mask[..., None], patch_size * patch_size, axis=-1), patch_size, height,
                           width) > 0.5
  inputs = to_uint8(images)
  masked = np.where(pixel_mask, np.uint8(MASKED_GREY), inputs)
  rebuilt = to_uint8(reconstruction_images(images, logits, mask, patch_size, norm_pix_loss))

  batch = images.shape[0]
  width_px, height_px = batch * panel_px, len(ROW_TITLES) * panel_px
  figure = new_figure(width_px, height_px)
  pad_px, title_px = 4, 14
  for row, (title, panels) in enumerate(zip(ROW_TITLES, (inputs, masked, rebuilt))):
    for column in range(batch):
      left = (column * panel_px + pad_px) / width_px
      bottom = (height_px - (row + 1) * panel_px + pad_px) / height_px
      axes = figure.add_axes((left, bottom, (panel_px - 2 * pad_px) / width_px,
                              (panel_px - 2 * pad_px - title_px) / height_px))
      axes.imshow(panels[column], interpolation="nearest")
      axes.set_title(title, fontsize=7, pad=2)
      axes.set_axis_off()
  return save_figure(figure, path)
