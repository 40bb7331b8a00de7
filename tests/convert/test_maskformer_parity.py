"""from_transformers: small random HF MaskFormerForInstanceSegmentation models (no download) against their
conversion -- class and mask logits, both auxiliary semantics -- and the inference functions against HF's
MaskFormerImageProcessor on the converted model's outputs."""

import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from torch_reference import assert_same_variables, rename_keys
from transformers import (DetrConfig, MaskFormerConfig, MaskFormerForInstanceSegmentation, MaskFormerImageProcessor,
                          MaskFormerSwinConfig, ResNetConfig, SwinConfig)

from cvjax.convert import common, from_transformers, maskformer
from cvjax.models import create_model
from cvjax.models.backbones.swin import Swin
from cvjax.models.segmentation import maskformer_inference

TOLERANCE = dict(rtol=0, atol=1e-4)  # on outputs of std >= 0.2
ALL_STAGES = ["stage1", "stage2", "stage3", "stage4"]
RESNET = dict(embedding_size=8, hidden_sizes=[32, 32, 64, 64], depths=[1, 1, 1, 1], layer_type="basic",
              out_features=ALL_STAGES)
# 64 px: stage maps of 16, 8, 4 and 2 tokens a side, the last smaller than the window (MaskFormerSwin pads it).
SWIN = dict(embed_dim=16, depths=[2, 1, 2, 1], num_heads=[2, 2, 4, 4], window_size=4)
DECODER = dict(d_model=32, decoder_layers=3, decoder_attention_heads=4, decoder_ffn_dim=64, num_queries=10)

# transformers 5 key -> 4.x key, as 4.45's MaskFormer names its decoder (written out here, independently of the
# converter's LEGACY_KEYS).
_TO_4X = [(r"\.o_proj\.", ".out_proj."), (r"\.mlp\.(fc1|fc2)\.", r".\1.")]


def _config(backbone=None, decoder=None, **overrides):
  kwargs = dict(backbone_config=backbone or ResNetConfig(**RESNET), fpn_feature_size=32, mask_feature_size=16,
                decoder_config=DetrConfig(**{**DECODER, **(decoder or {})}), num_labels=4, use_auxiliary_loss=True,
                output_auxiliary_logits=True)
  return MaskFormerConfig(**{**kwargs, **overrides})


def randomised_hf_maskformer(config, seed=0):
  """``MaskFormerForInstanceSegmentation(config)`` in eval mode with every float tensor redrawn (HF's init
  leaves biases and bias tables at zero, statistics at identity)."""
  torch.manual_seed(seed)
  model = MaskFormerForInstanceSegmentation(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point() or name.startswith("criterion."):
        continue
      noise = torch.randn(tensor.shape, generator=generator)
      if name.endswith("running_var"):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
      elif tensor.ndim >= 2 and "queries_embedder" not in name and "bias_table" not in name:
        tensor.copy_(noise / np.sqrt(tensor[0].numel()))  # conv / linear weights: fan-in scaling
      elif name.endswith("weight") and tensor.ndim == 1:  # norm scales
        tensor.copy_(1 + 0.2 * noise)
      else:  # biases, running means, queries, relative position bias tables
        tensor.copy_(0.2 * noise if tensor.ndim == 1 else noise)
  return model


def spread_queries(model, images):
  """Rescales ``model`` so that its queries predict different classes and masks on ``images``.

  At random weights a zero-input decoder gives every query nearly the same output (the queries differ only
  through their position embeddings in the attention weights), which would leave the inference comparisons
  with one class and one mask. Sharper attention (query embeddings x2, q / k projections x1.5) spreads them;
  the class and mask heads' biases then remove the part common to all queries and their weights scale the
  rest: class logits of std 3 (confident queries), mask logits whose std over queries is 1.
  """
  decoder = model.model.transformer_module.decoder
  last = model.mask_embedder.get_submodule("2").get_submodule("0")
  with torch.no_grad():
    model.model.transformer_module.queries_embedder.weight.mul_(2.0)
    for layer in decoder.layers:
      for attention in (layer.self_attn, layer.encoder_attn):
        attention.q_proj.weight.mul_(1.5)
        attention.k_proj.weight.mul_(1.5)
    out = model(torch.from_numpy(images), output_hidden_states=True)
    hidden, pixels = out.transformer_decoder_last_hidden_state, out.pixel_decoder_last_hidden_state
    mean = hidden.mean((0, 1))
    model.class_predictor.weight.mul_(3.0 / ((hidden - mean) @ model.class_predictor.weight.T).std())
    model.class_predictor.bias.copy_(-model.class_predictor.weight @ mean)
    last.bias.sub_(model.mask_embedder(hidden).mean((0, 1)))
    masks = torch.einsum("bqc,bchw->bqhw", model.mask_embedder(hidden), pixels)
    scale = 1.0 / masks.std(1).mean()
    last.weight.mul_(scale)
    last.bias.mul_(scale)
  return model


def _images(height=64, width=64, seed=0, channels=3):
  return np.random.default_rng(seed).standard_normal((2, channels, height, width), dtype=np.float32)


def _hf_outputs(model, images):
  """HF's predictions; its ``auxiliary_logits``; and the paper's auxiliary predictions: the heads on each
  earlier decoder layer's output after the decoder LayerNorm, the layer outputs read by hooks."""
  decoder = model.model.transformer_module.decoder
  layer_outputs = []
  hooks = [layer.register_forward_hook(lambda _, __, out: layer_outputs.append(out[0] if isinstance(out, tuple)
                                                                               else out)) for layer in decoder.layers]
  try:
    with torch.no_grad():
      # transformers 5 computes auxiliary_logits only with output_hidden_states (else it stacks None).
      out = model(torch.from_numpy(images), output_hidden_states=model.config.use_auxiliary_loss)
      pixels = out.pixel_decoder_last_hidden_state
      paper = [{"pred_logits": model.class_predictor(h).numpy(),
                "pred_masks": torch.einsum("bqc,bchw->bqhw", model.mask_embedder(h), pixels).numpy()}
               for h in map(decoder.layernorm, layer_outputs[:-1])]
  finally:
    for hook in hooks:
      hook.remove()
  hf = [{"pred_logits": aux["class_queries_logits"].numpy(), "pred_masks": aux["masks_queries_logits"].numpy()}
        for aux in out.auxiliary_logits or []]
  return {"pred_logits": out.class_queries_logits.numpy(), "pred_masks": out.masks_queries_logits.numpy(),
          "paper_aux": paper, "hf_aux": hf, "output": out}


def _cvjax_outputs(module, variables, images):
  @jax.jit
  def both(variables, x):  # one compilation for both auxiliary semantics
    return (module.apply(variables, x, train=False),
            module.clone(aux_semantics="hf").apply(variables, x, train=False))

  return both(variables, images.transpose(0, 2, 3, 1))


def _check_parity(model, images):
  """Converts ``model``; compares final and auxiliary predictions of both semantics; returns the module, its
  variables, its (paper) outputs and HF's."""
  expected = _hf_outputs(model, images)
  module, variables = from_transformers(model)
  paper, hf = _cvjax_outputs(module, variables, images)
  # Not a comparison of near-zeros or of saturated values.
  assert expected["pred_logits"].std() > 0.2 and expected["pred_masks"].std() > 0.2
  for got in (paper, hf):
    np.testing.assert_allclose(got["pred_logits"], expected["pred_logits"], **TOLERANCE)
    np.testing.assert_allclose(got["pred_masks"], expected["pred_masks"], **TOLERANCE)
  layers = model.config.decoder_config.decoder_layers
  assert len(paper["aux_outputs"]) == len(expected["paper_aux"]) == layers - 1
  assert len(hf["aux_outputs"]) == layers
  assert len(expected["hf_aux"]) == (layers if model.config.use_auxiliary_loss else 0)
  for got, reference in ((paper["aux_outputs"], expected["paper_aux"]), (hf["aux_outputs"], expected["hf_aux"])):
    for got_aux, expected_aux in zip(got, reference):
      for key in ("pred_logits", "pred_masks"):
        np.testing.assert_allclose(got_aux[key], expected_aux[key], **TOLERANCE)
  return types.SimpleNamespace(module=module, variables=variables, got=paper, expected=expected)


@pytest.fixture(scope="module")
def resnet_parity():
  # Queries that differ, for the inference comparisons below.
  images = _images()
  return _check_parity(spread_queries(randomised_hf_maskformer(_config()), images), images)


def test_resnet_backbone_matches_hf(resnet_parity):
  module, variables = resnet_parity.module, resnet_parity.variables
  assert module.backbone == "resnet" and not module.backbone_frozen_bn  # HF's BatchNorm2d, trainable
  assert "input_projection" in variables["params"] and "backbone_norm0" not in variables["params"]
  assert resnet_parity.got["pred_masks"].shape == (2, 10, 16, 16)


def test_swin_backbone_matches_hf_on_a_non_square_image():
  # 52 x 76 px: 13x19, 7x10, 4x5 and 2x3 tokens: every stage pads to whole windows of 4, the last two are
  # smaller than one window (and still shifted, as in HF MaskFormerSwin); both merges see odd sides.
  model = randomised_hf_maskformer(_config(SwinConfig(**SWIN)), seed=1)
  assert type(model.model.pixel_level_module.encoder).__name__ == "MaskFormerSwinBackbone"
  images = _images(52, 76, seed=1)
  parity = _check_parity(model, images)
  assert parity.got["pred_masks"].shape == (2, 10, 13, 19)
  # The window rule of HF's SwinModel (one smaller window, no shift, on small maps) gives other last stages.
  swin = Swin(**{key.removeprefix("swin_"): getattr(parity.module, key) for key in (
      "swin_embed_dim", "swin_depths", "swin_num_heads", "swin_window_size")}, num_classes=0)
  stage4 = jax.jit(lambda params, shrink: swin.clone(shrink_small_windows=shrink).apply(
      {"params": params}, images.transpose(0, 2, 3, 1), train=False, return_features=True)["stage4"],
                   static_argnums=1)
  params = parity.variables["params"]["backbone"]
  assert np.abs(stage4(params, True) - stage4(params, False)).max() > 1e-2


def test_bottleneck_backbone_odd_size_normed_decoder_feed_and_no_input_projection():
  # C5 has d_model channels, so neither HF nor cvjax projects it; decoder_config.auxiliary_loss makes HF feed
  # each decoder layer the normalised output of the one before; 70 x 90 px exercises the ResNet's rounding.
  # HF cannot compute its auxiliary_logits then (transformers 5 takes the decoder's intermediate states for its
  # hidden states and fails), so use_auxiliary_loss is off and only the paper's auxiliary outputs are compared.
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[32, 32, 64, 64], depths=[1, 2, 1, 1],
                          layer_type="bottleneck", out_features=ALL_STAGES, hidden_act="silu")
  config = _config(backbone, decoder=dict(d_model=64, auxiliary_loss=True, activation_function="gelu", dropout=0.2,
                                          attention_dropout=0.3, activation_dropout=0.4), fpn_feature_size=64,
                   mask_feature_size=24, use_auxiliary_loss=False)
  model = randomised_hf_maskformer(config, seed=2)
  assert model.model.transformer_module.input_projection is None
  parity = _check_parity(model, _images(70, 90, seed=2))
  module = parity.module
  assert "input_projection" not in parity.variables["params"] and module.decoder_feed_normed_outputs
  assert module.activation is common.HF_ACTIVATIONS["gelu"]
  assert module.backbone_activation is common.HF_ACTIVATIONS["silu"]
  assert (module.dropout_rate, module.attention_dropout_rate, module.activation_dropout_rate) == (0.2, 0.3, 0.4)
  assert parity.got["pred_masks"].shape == (2, 10, 18, 23)


@pytest.mark.parametrize("make_config, table", [
    pytest.param(MaskFormerConfig, maskformer.CONFIG_FIELDS, id="MaskFormerConfig"),
    pytest.param(lambda: MaskFormerConfig().decoder_config, maskformer.DECODER_CONFIG_FIELDS, id="decoder_config"),
    pytest.param(lambda: ResNetConfig(out_features=ALL_STAGES), maskformer.BACKBONE_CONFIG_FIELDS["resnet"],
                 id="backbone_config.resnet"),
    pytest.param(lambda: MaskFormerConfig().backbone_config, maskformer.BACKBONE_CONFIG_FIELDS["swin"],
                 id="backbone_config.swin"),
    # What HF turns a SwinConfig into when it builds the model.
    pytest.param(MaskFormerSwinConfig, maskformer.BACKBONE_CONFIG_FIELDS["swin"], id="backbone_config.maskformer_swin"),
])
def test_every_config_field_of_the_installed_transformers_is_accounted_for(make_config, table):
  unaccounted = set(make_config().to_dict()) - common.generic_config_fields() - set(table)
  assert not unaccounted, f"transformers {transformers.__version__} config fields the converter ignores"
  assert all(isinstance(use, str) and use for use in table.values())


@pytest.mark.parametrize("overrides, message", [
    (dict(backbone_config=ResNetConfig(**{**RESNET, "out_features": ["stage4"]})),
     r"backbone_config\.out_features=\['stage4'\]"),
    (dict(backbone_config=ResNetConfig(**{**RESNET, "hidden_act": "laplace"})),
     r"backbone_config\.hidden_act='laplace'"),
    (dict(decoder_config=DetrConfig(**DECODER, activation_function="laplace")), r"activation_function='laplace'"),
    (dict(decoder_config=DetrConfig(**DECODER, decoder_layerdrop=0.1)), r"decoder_layerdrop=0\.1"),
    (dict(backbone_config=SwinConfig(**SWIN, use_absolute_embeddings=True)),
     r"backbone_config\.use_absolute_embeddings=True"),
])
def test_unsupported_configs_are_errors_that_name_the_field(overrides, message):
  torch.manual_seed(0)
  with pytest.raises(ValueError, match=r"HF MaskFormerConfig not supported .*" + message):
    from_transformers(MaskFormerForInstanceSegmentation(_config(**overrides)))


def test_a_backbone_other_than_resnet_and_maskformer_swin_is_an_error():
  problems = maskformer.config_problems(_config(), "TimmBackbone")
  assert len(problems) == 1 and problems[0].startswith("backbone_config='resnet' (built as TimmBackbone")


def test_transformers_4_state_dict_layout_loads_to_the_same_variables():
  model = randomised_hf_maskformer(_config())
  legacy = rename_keys(model.state_dict(), _TO_4X)
  for key in ("model.transformer_module.decoder.layers.0.self_attn.out_proj.weight",
              "model.transformer_module.decoder.layers.2.encoder_attn.out_proj.bias",
              "model.transformer_module.decoder.layers.1.fc2.weight"):
    assert key in legacy
  _, variables = maskformer.convert(model.config, legacy, "ResNetBackbone")
  assert_same_variables(variables, from_transformers(model)[1])


def test_mismatched_state_dict_is_a_clear_error():
  model = randomised_hf_maskformer(_config())
  state_dict = model.state_dict()
  state_dict["model.pixel_level_module.decoder.fpn.layers.1.proj.0.weight"] = torch.zeros(32, 8, 1, 1)
  del state_dict["mask_embedder.2.0.bias"]
  with pytest.raises(ValueError, match=r"(?s)missing keys: \['mask_embedder\.2\.0\.bias'\].*fpn\.layers\.1\.proj\.0\."
                                       r"weight: shape"):
    maskformer.convert(model.config, state_dict, "ResNetBackbone")


@pytest.mark.parametrize("name, backbone", [
    ("maskformer_resnet50", ResNetConfig(out_features=ALL_STAGES)),
    # MaskFormer's Swin-T for ADE20K (HF's facebook/maskformer-swin-tiny-ade sizes).
    ("maskformer_swin_t", SwinConfig(embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=7)),
])
def test_registered_paper_models_have_hf_parameter_counts(name, backbone):
  with torch.device("meta"):  # shapes only
    model = MaskFormerForInstanceSegmentation(MaskFormerConfig(backbone_config=backbone, num_labels=150))
  hf_count = sum(p.numel() for p in model.parameters())
  unused = model.model.pixel_level_module.encoder.model.layernorm if name.endswith("swin_t") else None
  hf_count -= sum(p.numel() for p in unused.parameters()) if unused is not None else 0
  variables = jax.eval_shape(functools.partial(create_model(name).init, train=False), jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables["params"]))
  # The frozen batch norms' affine parameters sit in batch_stats (HF trains them).
  count += sum(leaf.size for path, leaf in jax.tree_util.tree_leaves_with_path(variables.get("batch_stats", {}))
               if path[-1].key in ("scale", "bias"))
  assert count == hf_count


# ---- Inference against HF's MaskFormerImageProcessor --------------------------------------------------------

@pytest.fixture(scope="module")
def processor():
  return MaskFormerImageProcessor()


@pytest.mark.parametrize("output_size", [None, (64, 64), (11, 13)])
def test_semantic_inference_matches_hf(resnet_parity, processor, output_size):
  got = jax.jit(functools.partial(maskformer_inference.semantic_inference, output_size=output_size))(
      resnet_parity.got["pred_logits"], resnet_parity.got["pred_masks"])
  target_sizes = None if output_size is None else [output_size] * 2
  expected = processor.post_process_semantic_segmentation(resnet_parity.expected["output"], target_sizes=target_sizes,
                                                          return_segmentation_scores=True)
  for b, hf in enumerate(expected):
    np.testing.assert_allclose(got["scores"][b], hf.segmentation_scores.permute(1, 2, 0).numpy(), rtol=1e-4,
                               atol=1e-5)
    np.testing.assert_array_equal(got["labels"][b], hf.segmentation.numpy())
  assert len(np.unique(got["labels"])) > 1


def _hf_panoptic_maps(expected, shape):
  """HF's segmentation maps, its all ``-1`` map of an image without segments written as cvjax's zeros."""
  maps = []
  for item in expected:
    segmentation = item["segmentation"].numpy().astype(np.int64)
    maps.append(np.zeros(shape, np.int64) if not item["segments_info"] and (segmentation == -1).all()
                else segmentation)
  return np.stack(maps)


def _panoptic(pred_logits, pred_masks, output_size, **kwargs):
  return jax.jit(functools.partial(maskformer_inference.panoptic_inference, output_size=output_size, **kwargs))(
      pred_logits, pred_masks)


# HF's defaults; stuff classes fused (the first image has two segments of class 2); other thresholds.
PANOPTIC_CASES = [dict(), dict(threshold=0.3, overlap_mask_area_threshold=0.3, label_ids_to_fuse=(0, 2)),
                  dict(threshold=0.3, mask_threshold=0.2, overlap_mask_area_threshold=0.5)]


@pytest.mark.parametrize("output_size", [None, (64, 64)])
def test_panoptic_inference_matches_hf(resnet_parity, processor, output_size):
  seen = {"segments": 0, "fused_repeats": 0, "rejected": 0}
  for case in PANOPTIC_CASES:
    got = _panoptic(resnet_parity.got["pred_logits"], resnet_parity.got["pred_masks"], output_size, **case)
    hf_kwargs = {**case, "label_ids_to_fuse": set(case.get("label_ids_to_fuse", ()))}
    expected = processor.post_process_panoptic_segmentation(
        resnet_parity.expected["output"], target_sizes=None if output_size is None else [output_size] * 2,
        **hf_kwargs)
    segment_map = np.asarray(got["panoptic"][..., 1])
    np.testing.assert_array_equal(segment_map, _hf_panoptic_maps(expected, segment_map.shape[1:]), err_msg=str(case))
    info = maskformer_inference.segments_info(got)
    for b, item in enumerate(expected):
      assert [(s["id"], s["label_id"], s["was_fused"]) for s in info[b]] == \
          [(s["id"], s["label_id"], s["was_fused"]) for s in item["segments_info"]], case
      # HF rounds the scores to 6 decimals; the two models' logits differ by ~1e-5.
      np.testing.assert_allclose([s["score"] for s in info[b]], [s["score"] for s in item["segments_info"]],
                                 atol=1e-5)
      # The category channel is each segment's label.
      labels = {s["id"]: s["label_id"] for s in item["segments_info"]}
      np.testing.assert_array_equal(got["panoptic"][b, ..., 0], np.vectorize(lambda i: labels.get(i, -1))(
          segment_map[b]))
      ids = [s["id"] for s in info[b]]
      seen["segments"] += len(set(ids))
      seen["fused_repeats"] += len(ids) - len(set(ids))
    kept = (np.asarray(got["labels"]) != 4) & (np.asarray(got["scores"]) > case.get("threshold", 0.5))
    seen["rejected"] += int((kept & (np.asarray(got["segment_ids"]) == 0)).sum())
  # The cases exercise segments, fused stuff and kept queries that the area ratio rejects.
  assert min(seen.values()) > 0, seen


def test_panoptic_ids_stay_distinct_where_hf_reuses_one(processor):
  # Queries in order: stuff class 1 (segment 1), thing class 0 (2), stuff class 1 again (fused into 1), thing
  # class 0 (3 here; HF numbers it 2 again, counting on from the fused segment's id).
  logits = np.eye(3, dtype=np.float32)[[1, 0, 1, 0]][None] * 8
  masks = np.full((1, 4, 4, 8), -10.0, np.float32)
  for q in range(4):
    masks[0, q, :, 2 * q:2 * q + 2] = 10.0
  hf_output = types.SimpleNamespace(class_queries_logits=torch.from_numpy(logits),
                                    masks_queries_logits=torch.from_numpy(masks))
  expected = processor.post_process_panoptic_segmentation(hf_output, label_ids_to_fuse={1})[0]
  assert [s["id"] for s in expected["segments_info"]] == [1, 2, 1, 2]  # HF: two thing segments with id 2
  got = _panoptic(logits, masks, None, label_ids_to_fuse=(1,))
  np.testing.assert_array_equal(got["segment_ids"][0], [1, 2, 1, 3])
  # The same pixels, HF's ids merged.
  to_hf = {0: 0, 1: 1, 2: 2, 3: 2}
  np.testing.assert_array_equal(np.vectorize(to_hf.get)(np.asarray(got["panoptic"][0, ..., 1])),
                                expected["segmentation"].numpy())
