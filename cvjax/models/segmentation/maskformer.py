"""MaskFormer (Cheng et al. 2021): N mask queries, each classified over K + 1 classes, against per-pixel embeddings.

Pixel-level module: a ResNet (C2..C5) or Swin (its stages, each LayerNormed: HF ``MaskFormerSwinBackbone``)
backbone, then the FPN-style pixel decoder (HF ``MaskFormerPixelDecoder``, the reference's ``BasePixelDecoder``):
a 3x3 conv + GroupNorm(32) + ReLU stem on the coarsest map; for each finer map, coarse to fine, a 1x1 lateral
conv + GroupNorm added to the running map brought to its size by PyTorch ``nearest`` resizing, then 3x3 conv +
GroupNorm + ReLU (the convs before a GroupNorm have no bias); finally a 3x3 conv with bias to
``mask_feature_size`` channels: the per-pixel embeddings at the finest map's resolution (stride 4).

Transformer module: the coarsest backbone map, projected to ``d_model`` by a 1x1 conv when its channels differ
(as HF and the reference), is the memory of a post-norm DETR decoder (``transformer.Decoder``; no encoder, the
paper's ``ENC_LAYERS: 0``) with the 2-D sine position encoding of the whole map (no padding mask: neither HF
nor the reference uses one) on its keys, ``num_queries`` learned query position embeddings and a zero input.

Heads on a decoder output: ``class_predictor`` Linear(d_model, K + 1) (the last class is "no object") and
``mask_embedder``, a 3-layer MLP (ReLU between; widths d_model, d_model, mask_feature_size) whose output is
dotted with the pixel embeddings: ``einsum('bqc,bhwc->bqhw')``, the mask logits.

Auxiliary outputs (``aux_semantics``; the final predictions are the same either way):
  ``'paper'``  the heads on each earlier decoder layer's output after the decoder's shared LayerNorm: the
               reference's deep supervision (DETR's ``return_intermediate``), ``num_decoder_layers - 1`` entries;
  ``'hf'``     HF's ``auxiliary_logits`` (``use_auxiliary_loss=True``): the heads on the decoder's zero input and
               on the un-normalised output of each earlier layer, ``num_decoder_layers`` entries.

Submodule names follow HF ``MaskFormerForInstanceSegmentation`` below a flat top level (``backbone``,
``backbone_norm<i>``, ``pixel_decoder/layers_0/proj/conv``, ``input_projection``, ``queries_embedder``,
``decoder/layers_0/self_attn/q_proj``, ``class_predictor``, ``mask_embedder/layers_2``), so that
``cvjax.convert.maskformer`` maps one HF key to one leaf.

Initialisation as the reference: the pixel decoder's convs and the input projection ``c2_xavier_fill``
(kaiming-uniform a=1, zero bias), queries ``N(0, 1)``, the decoder as ``transformer`` says, the class head
and mask MLP PyTorch's default ``nn.Linear``, the backbone as its module (it starts from ImageNet weights).

Input: NHWC float32 images normalised by the input pipeline (ImageNet mean/std). Post-processing (semantic and
panoptic inference) is in ``cvjax.models.segmentation.maskformer_inference``.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.backbones.resnet import ResNet
from cvjax.models.backbones.swin import Swin
from cvjax.models.backbones.vit import gelu
from cvjax.models.detection import position_encoding, transformer
from cvjax.models.detection.fpn import fpn_kernel_init, nearest_resize
from cvjax.models.registry import MODELS

GROUP_NORM_GROUPS = 32  # the reference's GN in the pixel decoder (HF: nn.GroupNorm(32, C))
BACKBONES = ("resnet", "swin")
AUX_SEMANTICS = ("paper", "hf")
# The reference initialises the pixel decoder's convs and the input projection with detectron2's
# c2_xavier_fill: kaiming_uniform(a=1) = U(+-sqrt(3 / fan_in)), bias zero, which is torchvision's FPN init.
c2_xavier_fill = fpn_kernel_init


class ConvNormReLU(nn.Module):
  """Bias-free ``kernel_size`` conv -> GroupNorm(32) -> ReLU (HF ``MaskFormerFPNConvLayer``: ``conv`` is its
  ``.0``, ``norm`` its ``.1``); ``relu=False`` is the lateral projection (HF ``MaskFormerFPNLayer.proj``)."""
  features: int
  kernel_size: int
  relu: bool = True
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    """``[B, H, W, Cin]`` -> ``[B, H, W, features]``."""
    if self.features % GROUP_NORM_GROUPS:
      raise ValueError(f"the pixel decoder's width (fpn_feature_size) must be a multiple of the "
                       f"{GROUP_NORM_GROUPS} GroupNorm groups, got {self.features}")
    x = layers.Conv(self.features, self.kernel_size, padding=self.kernel_size // 2, use_bias=False,
                    dtype=self.dtype, kernel_init=c2_xavier_fill, impl=self.layer_impl, name="conv")(x)
    # Two-pass variance: FPN inputs can have a mean large against their spread.
    x = nn.GroupNorm(GROUP_NORM_GROUPS, epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name="norm")(x)
    return nn.relu(x) if self.relu else x


class FPNLayer(nn.Module):
  """One top-down step (HF ``MaskFormerFPNLayer``): ``block(nearest_resize(coarse) + proj(lateral))``."""
  features: int
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, coarse: jnp.ndarray, lateral: jnp.ndarray) -> jnp.ndarray:
    """``coarse [B, h, w, features]``, ``lateral [B, H, W, C]`` -> ``[B, H, W, features]``."""
    conv = functools.partial(ConvNormReLU, self.features, dtype=self.dtype, layer_impl=self.layer_impl)
    lateral = conv(1, relu=False, name="proj")(lateral)
    return conv(3, name="block")(nearest_resize(coarse, lateral.shape[1:3]) + lateral)


class PixelDecoder(nn.Module):
  """MaskFormer's FPN pixel decoder (HF ``MaskFormerPixelDecoder``; see the module doc).

  Attributes:
    feature_size: width of the FPN maps (HF ``fpn_feature_size``; a multiple of 32).
    mask_feature_size: channels of the per-pixel embeddings (HF ``mask_feature_size``).
  """
  feature_size: int = 256
  mask_feature_size: int = 256
  dtype: Any = jnp.float32
  layer_impl: str = "auto"

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray]) -> jnp.ndarray:
    """Backbone maps ``[B, H_i, W_i, C_i]``, finest first -> pixel embeddings ``[B, H_0, W_0,
    mask_feature_size]``."""
    *finer, coarsest = features
    x = ConvNormReLU(self.feature_size, 3, dtype=self.dtype, layer_impl=self.layer_impl, name="stem")(coarsest)
    for i, lateral in enumerate(reversed(finer)):
      x = FPNLayer(self.feature_size, self.dtype, self.layer_impl, name=f"layers_{i}")(x, lateral)
    return layers.Conv(self.mask_feature_size, 3, padding=1, dtype=self.dtype, kernel_init=c2_xavier_fill,
                       impl=self.layer_impl, name="mask_projection")(x)


class MaskFormer(nn.Module):
  """MaskFormer mask classifier (see the module doc).

  Attributes:
    num_classes: classes K; the class head has ``K + 1`` outputs, the last "no object" (ADE20K: 150).
    num_queries: mask queries N.
    d_model: transformer width; the sine encoding uses ``d_model / 2`` channels per axis.
    num_heads, num_decoder_layers, ffn_dim: the decoder's shape.
    dropout_rate, attention_dropout_rate, activation_dropout_rate: decoder dropouts (the reference: all 0.1).
    activation: the decoder's feed-forward activation (relu; HF ``activation_function``).
    decoder_feed_normed_outputs: ``transformer.Decoder.feed_normed_outputs`` (HF ``decoder_config.
      auxiliary_loss=True``).
    fpn_feature_size, mask_feature_size: the pixel decoder's widths (``PixelDecoder``).
    aux_outputs: also return the auxiliary predictions (``aux_semantics``).
    aux_semantics: ``'paper'`` or ``'hf'`` (module doc).
    backbone: ``'resnet'`` or ``'swin'``.
    backbone_stage_sizes, backbone_block_type, backbone_width, backbone_stem_width, backbone_stage_widths,
    backbone_stride_in_1x1, backbone_downsample_in_first_stage, backbone_stem, backbone_frozen_bn,
    backbone_frozen_stages, backbone_activation: the ``ResNet``'s attributes of those names (the reference's
      R50: torchvision v1.5 with detectron2's FrozenBN; ``backbone_stem='cifar'`` keeps C2 at stride 1 for tiny
      CPU images, and the masks at the input resolution).
    swin_patch_size, swin_embed_dim, swin_depths, swin_num_heads, swin_window_size, swin_mlp_ratio,
    swin_qkv_bias, swin_drop_path_rate, swin_dropout_rate, swin_attention_dropout_rate, swin_layer_norm_eps,
    swin_activation: the ``Swin``'s attributes of those names; it runs with ``shrink_small_windows=False``
      (the reference's segmentation backbone, HF ``MaskFormerSwin``).
    backbone_layer_impl: ``layers.conv2d`` implementation of the ResNet and the pixel decoder.
    dtype: compute dtype of the backbone, the pixel decoder and the input projection (e.g. bfloat16); the
      transformer, heads and mask logits compute in float32.
  """
  num_classes: int = 150
  num_queries: int = 100
  d_model: int = 256
  num_heads: int = 8
  num_decoder_layers: int = 6
  ffn_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.1
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
  decoder_feed_normed_outputs: bool = False
  fpn_feature_size: int = 256
  mask_feature_size: int = 256
  aux_outputs: bool = True
  aux_semantics: str = "paper"
  backbone: str = "resnet"
  backbone_stage_sizes: Sequence[int] = (3, 4, 6, 3)
  backbone_block_type: str = "bottleneck"
  backbone_width: int = 64
  backbone_stem_width: Optional[int] = None
  backbone_stage_widths: Optional[Sequence[int]] = None
  backbone_stride_in_1x1: bool = False
  backbone_downsample_in_first_stage: bool = False
  backbone_stem: str = "imagenet"
  backbone_frozen_bn: bool = True
  backbone_frozen_stages: int = 0
  backbone_activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
  swin_patch_size: Union[int, Tuple[int, int]] = 4
  swin_embed_dim: int = 96
  swin_depths: Sequence[int] = (2, 2, 6, 2)
  swin_num_heads: Sequence[int] = (3, 6, 12, 24)
  swin_window_size: int = 7
  swin_mlp_ratio: float = 4.0
  swin_qkv_bias: bool = True
  swin_drop_path_rate: float = 0.3
  swin_dropout_rate: float = 0.0
  swin_attention_dropout_rate: float = 0.0
  swin_layer_norm_eps: float = 1e-5
  swin_activation: Callable[[jnp.ndarray], jnp.ndarray] = gelu
  backbone_layer_impl: str = "auto"
  dtype: Any = jnp.float32

  def _backbone_features(self, images: jnp.ndarray, train: bool) -> List[jnp.ndarray]:
    """``[B, H, W, 3]`` -> every backbone stage's map, finest first (ResNet's C2.., Swin's LayerNormed
    stages, in the compute dtype)."""
    if self.backbone == "resnet":
      maps = ResNet(
          stage_sizes=tuple(self.backbone_stage_sizes), block_type=self.backbone_block_type, num_classes=0,
          width=self.backbone_width, stem_width=self.backbone_stem_width, stage_widths=self.backbone_stage_widths,
          stem=self.backbone_stem, stride_in_1x1=self.backbone_stride_in_1x1,
          downsample_in_first_stage=self.backbone_downsample_in_first_stage, frozen_bn=self.backbone_frozen_bn,
          frozen_stages=self.backbone_frozen_stages, dtype=self.dtype, layer_impl=self.backbone_layer_impl,
          activation=self.backbone_activation, name="backbone")(images, train=train, return_features=True)
      return [maps[f"c{i + 2}"] for i in range(len(self.backbone_stage_sizes))]
    if self.backbone == "swin":
      stages = Swin(
          patch_size=self.swin_patch_size, embed_dim=self.swin_embed_dim, depths=tuple(self.swin_depths),
          num_heads=tuple(self.swin_num_heads), window_size=self.swin_window_size, mlp_ratio=self.swin_mlp_ratio,
          num_classes=0, drop_path_rate=self.swin_drop_path_rate, dropout_rate=self.swin_dropout_rate,
          qkv_bias=self.swin_qkv_bias, layer_norm_eps=self.swin_layer_norm_eps, dtype=self.dtype,
          activation=self.swin_activation, attention_dropout_rate=self.swin_attention_dropout_rate,
          shrink_small_windows=False, name="backbone")(images, train=train, return_features=True)
      # HF MaskFormerSwinBackbone's hidden_states_norms: torch's default epsilon, whatever layer_norm_eps.
      return [nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name=f"backbone_norm{i}")(stages[f"stage{i + 1}"])
              for i in range(len(self.swin_depths))]
    raise ValueError(f"backbone must be one of {BACKBONES}, got {self.backbone!r}")

  @nn.compact
  def __call__(self, images: jnp.ndarray, *, train: bool) -> Dict[str, Any]:
    """Predicts ``num_queries`` (class, mask) pairs per image.

    Args:
      images: ``[B, H, W, 3]`` float32, normalised. ResNet: any size; the maps follow torchvision's
        rounding. Swin: any size, padded as ``Swin`` says.
      train: dropout on (rng ``dropout``), stochastic depth in the Swin (rng ``dropout``), and the ResNet's
        batch norm in training mode unless frozen.

    Returns:
      ``{'pred_logits': [B, Q, num_classes + 1]`` class logits (the last "no object"), ``'pred_masks': [B, Q,
      h, w]`` mask logits at the finest backbone map's size (``H / 4, W / 4``: ``ceil`` for Swin, the
      ResNet stem's rounding for ResNet), ``'aux_outputs'``: a list of dicts with the same two keys (module
      doc; absent when ``aux_outputs=False``)``}``, all float32.
    """
    if images.ndim != 4:
      raise ValueError(f"MaskFormer expects NHWC images [B, H, W, C], got shape {images.shape}")
    if self.aux_semantics not in AUX_SEMANTICS:
      raise ValueError(f"aux_semantics must be one of {AUX_SEMANTICS}, got {self.aux_semantics!r}")
    features = self._backbone_features(images, train)
    pixel_embeddings = PixelDecoder(self.fpn_feature_size, self.mask_feature_size, self.dtype,
                                    self.backbone_layer_impl, name="pixel_decoder")(features)
    pixel_embeddings = pixel_embeddings.astype(jnp.float32)

    image_features = features[-1]
    if image_features.shape[-1] != self.d_model:
      image_features = layers.Conv(self.d_model, 1, padding=0, dtype=self.dtype, kernel_init=c2_xavier_fill,
                                   impl=self.backbone_layer_impl, name="input_projection")(image_features)
    batch, height, width, _ = image_features.shape
    position = position_encoding.sine_position_encoding(jnp.ones((batch, height, width), bool), self.d_model // 2)
    memory, position = (x.astype(jnp.float32).reshape(batch, height * width, -1) for x in (image_features, position))
    queries = nn.Embed(self.num_queries, self.d_model, embedding_init=nn.initializers.normal(1.0),
                       name="queries_embedder").embedding
    query_position = jnp.broadcast_to(queries, (batch, self.num_queries, self.d_model))
    decoder_input = jnp.zeros_like(query_position)
    hidden, layer_outputs = transformer.Decoder(
        num_layers=self.num_decoder_layers, num_heads=self.num_heads, ffn_dim=self.ffn_dim,
        dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
        activation_dropout_rate=self.activation_dropout_rate, activation=self.activation,
        feed_normed_outputs=self.decoder_feed_normed_outputs, name="decoder")(
            decoder_input, memory, query_position=query_position, memory_position=position, train=train,
            return_layer_outputs=True)

    class_predictor = layers.torch_dense(self.num_classes + 1, self.d_model, "class_predictor")
    # HF MaskformerMLPPredictionHead
    mask_embedder = layers.PredictionMLP(self.d_model, self.mask_feature_size, name="mask_embedder")

    def heads(states):  # [..., B, Q, d] -> logits [..., B, Q, K + 1], masks [..., B, Q, h, w]
      return class_predictor(states), jnp.einsum("...bqc,bhwc->...bqhw", mask_embedder(states), pixel_embeddings)

    pred_logits, pred_masks = heads(hidden[-1])
    outputs = {"pred_logits": pred_logits, "pred_masks": pred_masks}
    if self.aux_outputs:
      if self.aux_semantics == "paper":
        earlier = hidden[:-1]
      else:
        earlier = jnp.concatenate([decoder_input[None], layer_outputs[:-1]])
      aux_logits, aux_masks = heads(earlier)
      outputs["aux_outputs"] = [{"pred_logits": aux_logits[i], "pred_masks": aux_masks[i]}
                                for i in range(earlier.shape[0])]
    return outputs


# The paper's ADE20K models (MaskFormer's configs/ade20k-150: GN pixel decoder of width 256, 100 queries, a
# 6-layer decoder of width 256, 8 heads, FFN 2048, dropout 0.1; R50 as torchvision's with FrozenBN; Swin-T
# from ImageNet-1K at window 7 with stochastic depth 0.3). ADE20K val mIoU (single scale): R50 44.5, Swin-T 46.7.
MODELS.register("maskformer_resnet50")(functools.partial(
    MaskFormer, backbone="resnet", backbone_block_type="bottleneck", backbone_stage_sizes=(3, 4, 6, 3)))
MODELS.register("maskformer_swin_t")(functools.partial(
    MaskFormer, backbone="swin", swin_embed_dim=96, swin_depths=(2, 2, 6, 2), swin_num_heads=(3, 6, 12, 24),
    swin_window_size=7, swin_drop_path_rate=0.3))
# CPU scale: ResNet-18's basic blocks at width 16 (``backbone_width`` sets it), a 64-wide pixel decoder and
# transformer, the paper's depth and query count.
MODELS.register("maskformer_resnet18")(functools.partial(
    MaskFormer, backbone="resnet", backbone_block_type="basic", backbone_stage_sizes=(2, 2, 2, 2),
    backbone_width=16, d_model=64, num_heads=4, ffn_dim=256, fpn_feature_size=64, mask_feature_size=64))
