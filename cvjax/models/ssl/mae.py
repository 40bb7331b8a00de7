"""Masked autoencoder (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"), as HF ``ViTMAE``.

A pre-norm ViT encoder (``cvjax.models.backbones.vit.EncoderBlock``) sees only the visible patches: per sample,
uniform noise ``[B, L]`` is argsorted and the ``int(L * (1 - mask_ratio))`` lowest-noise patches are kept (HF's
``random_masking``). A lightweight decoder embeds the encoder output, appends a learned mask token for every
removed patch, unshuffles with ``ids_restore``, adds its own position embeddings and predicts the ``p*p*C``
pixels of every patch. Both position embeddings are fixed 2-D sin-cos tables (``sincos_position_embedding``),
not parameters; the class token's row is zeros.

Conventions:
  * images NHWC float32 (normalised by the input pipeline), ``H == W == image_size``;
  * patches in raster order (row-major over the ``H/p x W/p`` grid), each patch's pixels ordered
    ``(row, column, channel)`` -- HF's ``patchify`` order, so ``logits`` compare element-wise with HF's;
  * ``mask [B, L]`` float32, 1 = removed (the loss counts only these); ``ids_restore [B, L]`` int32: the
    position of each original patch in the shuffled order (``argsort(argsort(noise))``).

Randomness: the masking noise is ``noise=`` when given, else drawn from the flax rng stream ``'mask'``
(``rngs={'mask': key}``; ``init`` falls back to its ``'params'`` key; without the stream, a fixed key). Dropout (train only) uses ``'dropout'``.

Parameter names mirror ``cvjax.models.backbones.vit.ViT`` for the encoder -- ``patch_embedding``,
``cls_token``, ``layers_{i}/...``, ``layernorm`` are the ViT's paths unchanged -- and the ViT's learned
``position_embeddings`` get the fixed table (``vit_encoder_params``), as MAE's fine-tuning initialises them. The
decoder is ``decoder_embed``, ``mask_token``, ``decoder_layers_{i}/...``, ``decoder_norm``, ``decoder_pred``
(HF ``decoder.*`` names; ``cvjax.convert.mae`` maps HF keys one to one).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cvjax.models.backbones.vit import EncoderBlock, dense_init, gelu, sincos_position_embedding
from cvjax.models.registry import MODELS

# HF / MAE initialise the patch projection as a Linear over the flattened (C, p, p) kernel: Xavier with
# fan_in = p*p*C, fan_out = hidden (flax's xavier_uniform on a conv kernel would multiply fan_out by p*p).
_patch_init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1, 2), out_axis=-1)




def patchify(images: jnp.ndarray, patch_size: int) -> jnp.ndarray:
  """NHWC images ``[B, H, W, C]`` -> patches ``[B, L, p*p*C]``, raster order, pixels ``(row, col, channel)``.

  The same layout as HF's ``ViTMAEForPreTraining.patchify`` of the NCHW images.
  """
  batch, height, width, channels = images.shape
  if height % patch_size or width % patch_size:
    raise ValueError(f"patchify: image height and width must be multiples of patch_size {patch_size}, got "
                     f"shape {images.shape}")
  grid_h, grid_w = height // patch_size, width // patch_size
  x = images.reshape(batch, grid_h, patch_size, grid_w, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * grid_w, patch_size * patch_size * channels)


def unpatchify(patches: jnp.ndarray, patch_size: int, grid_hw: Tuple[int, int], channels: int = 3) -> jnp.ndarray:
  """The inverse of ``patchify``: ``[B, L, p*p*C]`` with ``L = grid_h * grid_w`` -> ``[B, H, W, C]``."""
  grid_h, grid_w = grid_hw
  batch, length, width = patches.shape
  if length != grid_h * grid_w or width != patch_size * patch_size * channels:
    raise ValueError(f"unpatchify: patches of shape {patches.shape} are not a {grid_h}x{grid_w} grid of "
                     f"{patch_size}x{patch_size}x{channels} patches")
  x = patches.reshape(batch, grid_h, grid_w, patch_size, patch_size, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(batch, grid_h * patch_size, grid_w * patch_size, channels)


def per_patch_loss(images: jnp.ndarray, logits: jnp.ndarray, patch_size: int, norm_pix_loss: bool = True
                   ) -> jnp.ndarray:
  """``[B, L]`` float32: each predicted patch's mean squared error against its pixels, normalised per patch
  with ``norm_pix_loss`` as ``(x - mean) / sqrt(var + 1e-6)`` with the unbiased (``ddof=1``) variance, as
  torch's ``Tensor.var`` in HF's ``forward_loss`` (Table 3 of the paper: better representations).

  Args:
    images: the model's input ``[B, H, W, C]``.
    logits: predicted patches ``[B, L, p*p*C]`` (``patchify`` layout).
    patch_size: ``p``.
  """
  target = patchify(images.astype(jnp.float32), patch_size)
  if norm_pix_loss:
    mean = jnp.mean(target, axis=-1, keepdims=True)
    var = jnp.var(target, axis=-1, keepdims=True, ddof=1)
    target = (target - mean) / jnp.sqrt(var + 1e-6)
  return jnp.mean(jnp.square(logits.astype(jnp.float32) - target), axis=-1)


def mae_loss(images: jnp.ndarray, logits: jnp.ndarray, mask: jnp.ndarray, patch_size: int,
             norm_pix_loss: bool = True) -> jnp.ndarray:
  """MAE's pixel loss, HF ``ViTMAEForPreTraining.forward_loss``: a float32 scalar, the ``per_patch_loss``
  averaged over the removed patches (``mask [B, L]``, 1 = removed): ``sum(mask * per_patch) / sum(mask)`` (NaN
  if nothing is removed, as HF; the train task guards that)."""
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch_loss(images, logits, patch_size, norm_pix_loss) * mask) / jnp.sum(mask)


def random_masking(tokens: jnp.ndarray, noise: jnp.ndarray, mask_ratio: float
                   ) -> Tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
  """Keeps the ``int(L * (1 - mask_ratio))`` lowest-noise tokens of each sample (HF's ``random_masking``).

  Args:
    tokens: ``[B, L, D]``.
    noise: ``[B, L]`` float (uniform in [0, 1) in training; any values: only their order matters).
    mask_ratio: fraction to remove, in [0, 1).

  Returns:
    kept ``[B, K, D]`` in increasing-noise order, mask ``[B, L]`` float32 (1 = removed) in the original order,
    ids_restore ``[B, L]`` int32 (``kept``'s order back to the original one: token ``l`` sits at
    ``ids_restore[b, l]`` of the shuffled sequence).
  """
  length = tokens.shape[1]
  if noise.shape != tokens.shape[:2]:
    raise ValueError(f"noise must have shape [B, L] = {tokens.shape[:2]}, got {noise.shape}")
  keep = int(length * (1 - mask_ratio))  # Python float arithmetic, as HF: the same K for the same ratio
  ids_shuffle = jnp.argsort(noise, axis=1).astype(jnp.int32)
  ids_restore = jnp.argsort(ids_shuffle, axis=1).astype(jnp.int32)
  kept = jnp.take_along_axis(tokens, ids_shuffle[:, :keep, None], axis=1)
  mask = (ids_restore >= keep).astype(jnp.float32)
  return kept, mask, ids_restore


class MAE(nn.Module):
  """Masked-autoencoder ViT for pre-training.

  Attributes:
    image_size: input height and width (square, as HF's patchify and position tables).
    patch_size: side of the square patches.
    hidden_size, depth, num_heads, mlp_dim: the encoder's width, blocks, heads, MLP inner width.
    decoder_hidden_size, decoder_depth, decoder_num_heads, decoder_mlp_dim: the decoder's.
    mask_ratio: fraction of patches removed by ``__call__`` (0.75 in the paper, Fig. 5).
    norm_pix_loss: whether the loss of this model normalises target patches (read by the task, which passes it
      to ``mae_loss``; the forward pass does not depend on it).
    num_channels: input channels ``C`` (the prediction has ``p*p*C`` values per patch).
    dropout_rate, attention_dropout_rate: as the ViT's (HF ``hidden_dropout_prob`` etc.; train only).
    layer_norm_eps: every LayerNorm's epsilon (1e-6 as MAE's code; HF configs default to 1e-12).
    qkv_bias: biases on the q/k/v projections (encoder and decoder).
    dtype: compute dtype; parameters and returned logits are float32.
    activation: the MLPs' activation (exact GELU).
  """
  image_size: int = 224
  patch_size: int = 16
  hidden_size: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  decoder_hidden_size: int = 512
  decoder_depth: int = 8
  decoder_num_heads: int = 16
  decoder_mlp_dim: int = 2048
  mask_ratio: float = 0.75
  norm_pix_loss: bool = True
  num_channels: int = 3
  dropout_rate: float = 0.0
  attention_dropout_rate: float = 0.0
  layer_norm_eps: float = 1e-6
  qkv_bias: bool = True
  dtype: Any = jnp.float32
  activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu

  def setup(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"image_size {self.image_size} must be a multiple of patch_size {self.patch_size}")
    if not 0.0 <= self.mask_ratio < 1.0:
      raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
    p = self.patch_size
    block = functools.partial(EncoderBlock, dropout_rate=self.dropout_rate,
                              attention_dropout_rate=self.attention_dropout_rate,
                              layer_norm_eps=self.layer_norm_eps, qkv_bias=self.qkv_bias, dtype=self.dtype,
                              activation=self.activation)
    norm = functools.partial(nn.LayerNorm, epsilon=self.layer_norm_eps, dtype=self.dtype)
    # Encoder: the ViT's names (a list attribute in setup names its items layers_0, layers_1, ...).
    self.patch_embedding = nn.Conv(self.hidden_size, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                                   kernel_init=_patch_init)
    self.cls_token = self.param("cls_token", nn.initializers.normal(0.02), (1, 1, self.hidden_size))
    self.layers = [block(self.num_heads, self.mlp_dim) for _ in range(self.depth)]
    self.layernorm = norm()
    # Decoder.
    self.decoder_embed = nn.Dense(self.decoder_hidden_size, dtype=self.dtype, kernel_init=dense_init)
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.decoder_hidden_size))
    self.decoder_layers = [block(self.decoder_num_heads, self.decoder_mlp_dim) for _ in range(self.decoder_depth)]
    self.decoder_norm = norm()
    self.decoder_pred = nn.Dense(p * p * self.num_channels, dtype=self.dtype, kernel_init=dense_init)

  @property
  def grid_size(self) -> int:
    """Patches per side: ``L = grid_size ** 2``."""
    return self.image_size // self.patch_size

  def encode(self, images: jnp.ndarray, *, mask_ratio: float = 0.0, noise: Optional[jnp.ndarray] = None,
             train: bool = False) -> Dict[str, jnp.ndarray]:
    """Encoder features of the visible patches of ``[B, H, W, C]`` images.

    ``mask_ratio=0`` without ``noise`` (the default: fine-tuning, linear probes) encodes every patch in the
    original order; otherwise ``random_masking`` with ``noise`` (or noise from the ``'mask'`` rng stream).
    Call it as ``module.apply(variables, images, method=MAE.encode)``.

    Returns:
      ``features [B, 1 + K, hidden_size]`` (class token first, after the final LayerNorm; ``K`` kept patches
      in shuffled order), ``mask [B, L]`` float32 (1 = removed), ``ids_restore [B, L]`` int32.
    """
    if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, self.num_channels):
      raise ValueError(f"MAE expects images [B, {self.image_size}, {self.image_size}, {self.num_channels}], got "
                       f"shape {images.shape}")
    batch = images.shape[0]
    length = self.grid_size ** 2
    tokens = self.patch_embedding(images).reshape(batch, length, self.hidden_size)
    position = sincos_position_embedding(self.grid_size, self.grid_size, self.hidden_size, cls_token=False)
    tokens = tokens + jnp.asarray(position, tokens.dtype)
    if mask_ratio == 0.0 and noise is None:
      mask = jnp.zeros((batch, length), jnp.float32)
      ids_restore = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    else:
      if noise is None:
        # Without a 'mask' stream (the train loop's evaluation) a fixed key: every evaluation of every
        # checkpoint masks the same patches, so their losses compare.
        key = self.make_rng("mask") if self.has_rng("mask") else jax.random.PRNGKey(0)
        noise = jax.random.uniform(key, (batch, length))
      tokens, mask, ids_restore = random_masking(tokens, noise, mask_ratio)
    # The class token's position row is zero: it is added as is.
    cls = jnp.broadcast_to(self.cls_token, (batch, 1, self.hidden_size)).astype(tokens.dtype)
    x = jnp.concatenate([cls, tokens], axis=1)
    for layer in self.layers:
      x, _ = layer(x, train=train)
    return dict(features=self.layernorm(x), mask=mask, ids_restore=ids_restore)

  def decode(self, features: jnp.ndarray, ids_restore: jnp.ndarray, *, train: bool = False) -> jnp.ndarray:
    """Encoder ``features [B, 1 + K, hidden_size]`` and ``ids_restore [B, L]`` -> logits ``[B, L, p*p*C]``
    float32 (every patch, in the original order; the class token's prediction is dropped)."""
    batch, length = ids_restore.shape
    x = self.decoder_embed(features)
    mask_tokens = jnp.broadcast_to(self.mask_token.astype(x.dtype),
                                   (batch, length + 1 - x.shape[1], self.decoder_hidden_size))
    shuffled = jnp.concatenate([x[:, 1:], mask_tokens], axis=1)
    patches = jnp.take_along_axis(shuffled, ids_restore[..., None], axis=1)
    x = jnp.concatenate([x[:, :1], patches], axis=1)
    position = sincos_position_embedding(self.grid_size, self.grid_size, self.decoder_hidden_size)
    x = x + jnp.asarray(position, x.dtype)
    for layer in self.decoder_layers:
      x, _ = layer(x, train=train)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:].astype(jnp.float32)

  def __call__(self, images: jnp.ndarray, *, noise: Optional[jnp.ndarray] = None, train: bool = False
               ) -> Dict[str, jnp.ndarray]:
    """Masks ``mask_ratio`` of the patches of ``[B, H, W, C]`` images and reconstructs them.

    Args:
      images: ``[B, image_size, image_size, num_channels]``.
      noise: optional ``[B, L]`` masking noise (HF's ``noise=``); else drawn from the ``'mask'`` rng stream.
      train: enables dropout (rng ``'dropout'``).

    Returns:
      ``logits [B, L, p*p*C]`` float32 (``patchify`` layout), ``mask [B, L]`` float32 (1 = removed),
      ``ids_restore [B, L]`` int32.
    """
    encoded = self.encode(images, mask_ratio=self.mask_ratio, noise=noise, train=train)
    logits = self.decode(encoded["features"], encoded["ids_restore"], train=train)
    return dict(logits=logits, mask=encoded["mask"], ids_restore=encoded["ids_restore"])


def vit_encoder_params(params: Dict[str, Any], module: MAE) -> Dict[str, Any]:
  """The ``params`` of a ``cvjax.models.backbones.vit.ViT`` (``pool='cls'``, same widths) from an MAE's.

  ``patch_embedding``, ``cls_token``, ``layers_{i}`` and ``layernorm`` are copied under the same paths;
  ``position_embeddings [1, 1 + L, hidden_size]`` is the encoder's fixed table (zero class row), which the ViT
  then learns. (MAE's own fine-tuning keeps the table fixed: a ViT with ``position_embedding='sincos'`` has no
  such parameter and takes the other entries as they are.) The decoder is dropped; a ``classifier`` head is
  left to the ViT's init (merge the result into its params).
  """
  names = ["patch_embedding", "cls_token", "layernorm"] + [f"layers_{i}" for i in range(module.depth)]
  out = {name: params[name] for name in names}
  out["position_embeddings"] = jnp.asarray(
      sincos_position_embedding(module.grid_size, module.grid_size, module.hidden_size))[None]
  return out


# mae_vit_base_patch16: the paper's ViT-B/16 pre-training model (Sec. 4, Appendix A.1: decoder 512-d, 8 blocks,
# mask 75%, normalised-pixel targets). mae_vit_tiny: 32x32 inputs for tests and CPU runs.
MODELS.register("mae_vit_base_patch16")(functools.partial(
    MAE, image_size=224, patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072,
    decoder_hidden_size=512, decoder_depth=8, decoder_num_heads=16, decoder_mlp_dim=2048, mask_ratio=0.75,
    norm_pix_loss=True))
MODELS.register("mae_vit_tiny")(functools.partial(
    MAE, image_size=32, patch_size=4, hidden_size=64, depth=4, num_heads=4, mlp_dim=128, decoder_hidden_size=64,
    decoder_depth=2, decoder_num_heads=4, decoder_mlp_dim=128))
