"""DETR: end-to-end object detection with transformers (Carion et al. 2020).

ResNet backbone with frozen batch norm -> 1x1 projection of C5 to ``d_model`` -> post-norm transformer
encoder over the C5 pixels (2-D sine position encoding of the padding mask) -> decoder over ``num_queries``
learned query embeddings (the decoder input itself starts at zero) -> per decoder layer a class head
(``num_classes + 1`` logits, the last one "no object") and a 3-layer box MLP with a sigmoid (``cxcywh``
normalised to the image size).

Submodule names follow HF's ``DetrForObjectDetection`` (``input_projection``, ``query_position_embeddings``,
``encoder/layers_0/self_attn/q_proj``, ``class_labels_classifier``, ``bbox_predictor/layers_2``) so that
``cvjax.convert.detr`` maps one HF key to one leaf.

Input: NHWC float32 images normalised by the input pipeline (ImageNet mean/std), padded to a common size, with
a ``pixel_mask [B, H, W]`` that is ``True`` on real pixels.

Initialisation as facebookresearch/detr: query embeddings ``N(0, 1)`` (``nn.Embedding``), the transformer's
as ``cvjax.models.detection.transformer`` says, the input projection and both heads PyTorch's default
``nn.Conv2d`` / ``nn.Linear`` init (weights and biases ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``), the backbone
torchvision's ResNet init (DETR loads ImageNet weights into it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Dict, Optional, Sequence

import flax.linen as nn
import jax.numpy as jnp

from cvjax.models import layers
from cvjax.models.backbones.resnet import BLOCK_EXPANSION, ResNet
from cvjax.models.detection import position_encoding, transformer
from cvjax.models.registry import MODELS


class LearnedPositionEmbedding(nn.Module):
  """DETR's learned position embedding (the paper's positional-encoding ablation; HF ``'learned'``).

  ``row_embeddings`` / ``column_embeddings`` are ``[max_size, features]`` tables; position ``(y, x)`` gets
  ``concat(column_embeddings[x], row_embeddings[y])`` (x first, unlike the sine encoding) whatever the padding.
  """
  features: int
  max_size: int = 50  # as DETR's and HF's tables

  @nn.compact
  def __call__(self, height: int, width: int) -> jnp.ndarray:
    """``-> [height, width, 2 * features]``."""
    if max(height, width) > self.max_size:
      raise ValueError(f"a learned position embedding covers at most {self.max_size} x {self.max_size} feature "
                       f"positions, got {height} x {width}")
    embed = functools.partial(nn.Embed, self.max_size, self.features, embedding_init=nn.initializers.uniform(1.0))
    rows = embed(name="row_embeddings").embedding[:height]
    columns = embed(name="column_embeddings").embedding[:width]
    return jnp.concatenate([jnp.broadcast_to(columns[None], (height, width, self.features)),
                            jnp.broadcast_to(rows[:, None], (height, width, self.features))], axis=-1)


POSITION_EMBEDDINGS = ("sine", "learned")


class DETR(nn.Module):
  """DETR object detector.

  Attributes:
    num_classes: object classes; the class head has ``num_classes + 1`` outputs, the last is "no object"
      (91 for COCO's id space, as in the paper).
    num_queries: object queries (detection slots).
    d_model: transformer width; the position encoding uses ``d_model / 2`` channels per axis.
    num_heads, num_encoder_layers, num_decoder_layers, ffn_dim: transformer shape.
    decoder_num_heads, decoder_ffn_dim: the decoder's, when they differ from the encoder's (None = the same).
    dropout_rate, attention_dropout_rate, activation_dropout_rate: transformer dropouts (DETR: all 0.1).
    encoder_input_dropout_rate: dropout on the encoder's input (HF: ``dropout``; DETR: none).
    activation: the transformer feed-forward activation (relu; HF ``activation_function``).
    position_embedding_type: ``'sine'`` (of the padding mask, as the paper) or ``'learned'``
      (``LearnedPositionEmbedding``, at most 50 x 50 C5 positions).
    decoder_feed_normed_outputs: ``transformer.Decoder.feed_normed_outputs`` (HF ``auxiliary_loss=True``).
    aux_outputs: also return the predictions of the first ``num_decoder_layers - 1`` decoder layers.
    backbone_stage_sizes, backbone_block_type, backbone_width, backbone_stem_width, backbone_stage_widths,
    backbone_stride_in_1x1, backbone_downsample_in_first_stage: the ``ResNet`` backbone (see ``ResNet``).
    dilation: DC5, the last stage's stride replaced by dilation (C5 at stride 16).
    backbone_layer_impl: ``ResNet.layer_impl``.
    backbone_stem: ``ResNet.stem``; ``'cifar'`` (a stride-1 3x3 stem, C5 at stride 8) gives small CPU-scale
      images (64x64) a usable 8x8 encoder grid.
    backbone_frozen_bn: frozen batch norm as in DETR (whose backbone starts from ImageNet weights); False
      trains the batch norm (``batch_stats``), for backbones trained from scratch.
    backbone_frozen_stages: with trainable batch norm, the stem and the first N stages keep their batch norm
      statistics (``ResNet.frozen_stages``), for a backbone part the optimizer freezes.
    backbone_activation: ``ResNet.activation``.
    dtype: compute dtype of the backbone and input projection (e.g. bfloat16); the transformer and heads
      compute in float32.
  """
  num_classes: int = 91
  num_queries: int = 100
  d_model: int = 256
  num_heads: int = 8
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  ffn_dim: int = 2048
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  activation_dropout_rate: float = 0.1
  aux_outputs: bool = True
  backbone_stage_sizes: Sequence[int] = (3, 4, 6, 3)
  backbone_block_type: str = "bottleneck"
  backbone_width: int = 64
  backbone_stem_width: Optional[int] = None
  backbone_stage_widths: Optional[Sequence[int]] = None
  backbone_stride_in_1x1: bool = False
  backbone_downsample_in_first_stage: bool = False
  dilation: bool = False
  backbone_layer_impl: str = "auto"
  backbone_stem: str = "imagenet"
  backbone_frozen_bn: bool = True
  backbone_frozen_stages: int = 0
  dtype: Any = jnp.float32
  decoder_num_heads: Optional[int] = None
  decoder_ffn_dim: Optional[int] = None
  encoder_input_dropout_rate: float = 0.0
  activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu
  position_embedding_type: str = "sine"
  decoder_feed_normed_outputs: bool = False
  backbone_activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.relu

  def _heads(self, hidden: jnp.ndarray) -> Dict[str, jnp.ndarray]:
    """Decoder states ``[..., Q, d]`` -> ``pred_logits [..., Q, num_classes + 1]``, ``pred_boxes [..., Q, 4]``."""
    return {"pred_logits": self.class_labels_classifier(hidden),
            "pred_boxes": nn.sigmoid(self.bbox_predictor(hidden))}

  def setup(self):
    self.backbone = ResNet(
        stage_sizes=tuple(self.backbone_stage_sizes), block_type=self.backbone_block_type, num_classes=0,
        width=self.backbone_width, stem_width=self.backbone_stem_width,
        stage_widths=self.backbone_stage_widths, stride_in_1x1=self.backbone_stride_in_1x1,
        downsample_in_first_stage=self.backbone_downsample_in_first_stage, dilate_last_stage=self.dilation,
        frozen_bn=self.backbone_frozen_bn, frozen_stages=self.backbone_frozen_stages, stem=self.backbone_stem,
        dtype=self.dtype, layer_impl=self.backbone_layer_impl, activation=self.backbone_activation)
    c5_channels = (self.backbone_stage_widths[-1] if self.backbone_stage_widths
                   else self.backbone_width * 2 ** (len(self.backbone_stage_sizes) - 1)
                   * BLOCK_EXPANSION[self.backbone_block_type])
    self.input_projection = layers.Conv(self.d_model, 1, padding=0, dtype=self.dtype,
                                        kernel_init=layers.torch_default_kernel_init,
                                        bias_init=layers.torch_default_bias_init(c5_channels),
                                        impl=self.backbone_layer_impl)
    if self.position_embedding_type not in POSITION_EMBEDDINGS:
      raise ValueError(f"position_embedding_type must be one of {POSITION_EMBEDDINGS}, got "
                       f"{self.position_embedding_type!r}")
    if self.position_embedding_type == "learned":
      self.position_embedding = LearnedPositionEmbedding(self.d_model // 2)
    self.query_position_embeddings = nn.Embed(self.num_queries, self.d_model,
                                              embedding_init=nn.initializers.normal(1.0))
    settings = dict(dropout_rate=self.dropout_rate, attention_dropout_rate=self.attention_dropout_rate,
                    activation_dropout_rate=self.activation_dropout_rate, activation=self.activation)
    self.encoder = transformer.Encoder(num_layers=self.num_encoder_layers, num_heads=self.num_heads,
                                       ffn_dim=self.ffn_dim, input_dropout_rate=self.encoder_input_dropout_rate,
                                       **settings)
    self.decoder = transformer.Decoder(
        num_layers=self.num_decoder_layers, num_heads=self.decoder_num_heads or self.num_heads,
        ffn_dim=self.decoder_ffn_dim or self.ffn_dim, feed_normed_outputs=self.decoder_feed_normed_outputs,
        **settings)
    self.class_labels_classifier = layers.torch_dense(self.num_classes + 1, self.d_model)
    self.bbox_predictor = layers.PredictionMLP(self.d_model, 4)  # normalised cxcywh after a sigmoid

  def __call__(self, images: jnp.ndarray, *, pixel_mask: Optional[jnp.ndarray] = None,
               train: bool) -> Dict[str, Any]:
    """Detects objects in a padded batch.

    Args:
      images: ``[B, H, W, 3]`` float32, normalised.
      pixel_mask: ``[B, H, W]`` bool / 0-1, ``True`` on real pixels; all real when ``None``. The backbone
        sees the padded images as they are (padding values leak into nearby features, as in DETR and HF);
        the mask, brought to the C5 size by nearest resizing, drives the (sine) position encoding and removes
        padded pixels from the encoder's and decoder's attention.
      train: dropout on (rng ``dropout``); the backbone's frozen batch norm is the same either way.

    Returns:
      ``{'pred_logits': [B, Q, num_classes + 1], 'pred_boxes': [B, Q, 4]`` sigmoid ``cxcywh`` in [0, 1],
      ``'aux_outputs'``: a list of ``num_decoder_layers - 1`` dicts with the same two keys, one per earlier
      decoder layer (absent when ``aux_outputs=False``)``}``.
    """
    if images.ndim != 4:
      raise ValueError(f"DETR expects NHWC images [B, H, W, C], got shape {images.shape}")
    batch, height, width = images.shape[:3]
    if pixel_mask is None:
      pixel_mask = jnp.ones((batch, height, width), bool)
    elif pixel_mask.shape != (batch, height, width):
      raise ValueError(f"pixel_mask must be [B, H, W] = {(batch, height, width)}, got {pixel_mask.shape}")

    c5 = self.backbone(images, train=train, return_features=True)["c5"]
    mask = position_encoding.resize_mask_nearest(pixel_mask, c5.shape[1:3])
    if self.position_embedding_type == "learned":
      position = jnp.broadcast_to(self.position_embedding(*c5.shape[1:3]), (batch, *c5.shape[1:3], self.d_model))
    else:
      position = position_encoding.sine_position_encoding(mask, self.d_model // 2)
    features = self.input_projection(c5).astype(jnp.float32)
    features, position = (x.reshape(batch, -1, x.shape[-1]) for x in (features, position))  # [B, h*w, C]
    flat_mask = mask.reshape(batch, -1)
    memory = self.encoder(features, position=position, padding_mask=flat_mask, train=train)

    query_position = jnp.broadcast_to(self.query_position_embeddings.embedding,
                                      (batch, self.num_queries, self.d_model))
    hidden = self.decoder(jnp.zeros_like(query_position), memory, query_position=query_position,
                          memory_position=position, memory_padding_mask=flat_mask, train=train)
    predictions = self._heads(hidden)  # each [L, B, Q, ...]
    outputs = {key: value[-1] for key, value in predictions.items()}
    if self.aux_outputs:
      outputs["aux_outputs"] = [{key: value[i] for key, value in predictions.items()}
                                for i in range(self.num_decoder_layers - 1)]
    return outputs


_BACKBONES = {
    "detr_resnet18": ("basic", (2, 2, 2, 2)),
    "detr_resnet50": ("bottleneck", (3, 4, 6, 3)),
    "detr_resnet101": ("bottleneck", (3, 4, 23, 3)),
}

for _name, (_block, _sizes) in _BACKBONES.items():
  MODELS.register(_name)(functools.partial(DETR, backbone_block_type=_block, backbone_stage_sizes=_sizes))
