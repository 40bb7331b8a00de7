"""from_transformers: a tiny HF DetrForObjectDetection (random weights, no download) against its conversion."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

from cvjax.convert import from_transformers
from cvjax.models import create_model
from detr_reference import padded_batch, randomised_hf_detr

TOLERANCE = dict(rtol=1e-4, atol=1e-4)


def _config(**overrides):
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 24], depths=[1, 1, 1, 1], layer_type="basic",
                          out_features=["stage4"])
  kwargs = dict(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=backbone, d_model=32,
                encoder_layers=2, decoder_layers=3, encoder_attention_heads=4, decoder_attention_heads=4,
                encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=10, num_labels=5)
  return DetrConfig(**{**kwargs, **overrides})


def _hf_predictions(model, images, mask):
  """HF logits and boxes of the final layer and of each decoder layer (heads on the LayerNormed states)."""
  with torch.no_grad():
    out = model(torch.from_numpy(images), pixel_mask=torch.from_numpy(mask), output_hidden_states=True)
    # decoder_hidden_states = (decoder input, layer 1, ..., layer L), before the decoder LayerNorm.
    per_layer = [model.model.decoder.layernorm(h) for h in out.decoder_hidden_states[1:]]
    aux = [{"pred_logits": model.class_labels_classifier(h).numpy(),
            "pred_boxes": model.bbox_predictor(h).sigmoid().numpy()} for h in per_layer[:-1]]
  return {"pred_logits": out.logits.numpy(), "pred_boxes": out.pred_boxes.numpy(), "aux_outputs": aux}


def _cvjax_predictions(module, variables, images, mask):
  apply = jax.jit(functools.partial(module.apply, train=False))
  return apply(variables, images.transpose(0, 2, 3, 1), pixel_mask=mask.astype(bool))


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_detr_matches_hf_on_a_padded_batch(attn_implementation):
  model = randomised_hf_detr(_config())
  # Set after construction: at construction HF would also ask the ResNet backbone for it, which has none.
  model.config._attn_implementation = attn_implementation
  assert model.model.encoder.layers[0].self_attn.config._attn_implementation == attn_implementation
  images, mask = padded_batch()
  expected = _hf_predictions(model, images, mask)
  module, variables = from_transformers(model)
  got = _cvjax_predictions(module, variables, images, mask)

  np.testing.assert_allclose(got["pred_logits"], expected["pred_logits"], **TOLERANCE)
  np.testing.assert_allclose(got["pred_boxes"], expected["pred_boxes"], **TOLERANCE)
  assert len(got["aux_outputs"]) == len(expected["aux_outputs"]) == 2
  for got_aux, expected_aux in zip(got["aux_outputs"], expected["aux_outputs"]):
    for key in ("pred_logits", "pred_boxes"):
      np.testing.assert_allclose(got_aux[key], expected_aux[key], **TOLERANCE)


def test_the_padding_mask_matters_in_the_paritypadded_batch():
  # Guards the test above: were the mask ignored on either side, the padded image's outputs would change.
  model = randomised_hf_detr(_config())
  images, mask = padded_batch()
  masked = _hf_predictions(model, images, mask)["pred_logits"][1]
  unmasked = _hf_predictions(model, images, np.ones_like(mask))["pred_logits"][1]
  assert np.abs(masked - unmasked).max() > 1e-2


def test_bottleneck_backbone_and_variables_layout():
  backbone = ResNetConfig(embedding_size=8, hidden_sizes=[16, 32, 48, 64], depths=[1, 2, 1, 1],
                          layer_type="bottleneck", out_features=["stage4"])
  config = _config(backbone_config=backbone, decoder_layers=1)
  model = randomised_hf_detr(config, seed=1)
  images, mask = padded_batch(seed=1)
  module, variables = from_transformers(model)
  # Frozen BN: statistics and affine only in batch_stats, so no optimizer can touch them.
  assert "bn1" not in variables["params"]["backbone"] and "bn1" in variables["batch_stats"]["backbone"]
  got = _cvjax_predictions(module, variables, images, mask)
  np.testing.assert_allclose(got["pred_logits"], _hf_predictions(model, images, mask)["pred_logits"], **TOLERANCE)
  assert got["aux_outputs"] == []


@pytest.mark.parametrize("overrides, message", [
    (dict(position_embedding_type="learned"), "position_embedding_type 'learned'"),
    (dict(activation_function="gelu"), "activation_function 'gelu'"),
    (dict(decoder_ffn_dim=32), "ffn dims 64/32"),
])
def test_unsupported_configs_are_clear_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    from_transformers(DetrForObjectDetection(_config(**overrides)))


def test_full_size_detr_resnet50_has_hf_parameter_and_buffer_counts():
  model = DetrForObjectDetection(DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False,
                                            backbone_config=ResNetConfig(out_features=["stage4"])))
  hf_params = sum(p.numel() for p in model.parameters())
  hf_buffers = sum(b.numel() for b in model.buffers())  # the frozen batch norms' four arrays
  detr = create_model("detr_resnet50", num_classes=model.config.num_labels)
  variables = jax.eval_shape(functools.partial(detr.init, train=False), jax.random.PRNGKey(0),
                             jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32))
  count = lambda tree: sum(leaf.size for leaf in jax.tree_util.tree_leaves(tree))  # noqa: E731
  assert (count(variables["params"]), count(variables["batch_stats"])) == (hf_params, hf_buffers)
