"""DETR pieces: position encoding and mask resizing against HF / PyTorch, transformer masking, model shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.detr.modeling_detr import DetrSinePositionEmbedding

from cvjax.models import create_model
from cvjax.models.detection import position_encoding
from cvjax.models.detection import transformer


def _padded_masks(batch, height, width, seed=0):
  """``[B, H, W]`` bool masks, each True on a random top-left rectangle (the first image unpadded)."""
  rng = np.random.default_rng(seed)
  mask = np.zeros((batch, height, width), bool)
  mask[0] = True
  for b in range(1, batch):
    mask[b, :rng.integers(1, height + 1), :rng.integers(1, width + 1)] = True
  return mask


@pytest.mark.parametrize("normalize", [True, False])
def test_sine_position_encoding_matches_hf(normalize):
  mask = _padded_masks(3, 7, 9)
  num_pos_feats = 16
  hf = DetrSinePositionEmbedding(num_pos_feats, normalize=normalize)
  with torch.no_grad():
    expected = hf(torch.Size([3, 2 * num_pos_feats, 7, 9]), "cpu", torch.float32,
                  mask=torch.from_numpy(mask)).numpy().transpose(0, 2, 3, 1)
  got = position_encoding.sine_position_encoding(jnp.asarray(mask), num_pos_feats, normalize=normalize)
  assert got.shape == (3, 7, 9, 2 * num_pos_feats) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sine_position_encoding_rejects_bad_inputs():
  with pytest.raises(ValueError, match=r"mask must be \[B, H, W\]"):
    position_encoding.sine_position_encoding(jnp.ones((4, 4), bool), 8)
  with pytest.raises(ValueError, match="num_pos_feats must be even"):
    position_encoding.sine_position_encoding(jnp.ones((1, 4, 4), bool), 7)


@pytest.mark.parametrize("in_hw, out_hw", [((64, 96), (2, 3)), ((50, 37), (7, 5)), ((10, 33), (6, 4)),
                                           ((3, 5), (7, 8))])
def test_resize_mask_nearest_matches_torch_interpolate(in_hw, out_hw):
  mask = _padded_masks(4, *in_hw, seed=1)
  expected = torch.nn.functional.interpolate(torch.from_numpy(mask)[None].float(), size=out_hw)[0].bool().numpy()
  np.testing.assert_array_equal(position_encoding.resize_mask_nearest(jnp.asarray(mask), out_hw), expected)


def _init_apply(module, *args, **kwargs):
  variables = module.init(jax.random.PRNGKey(0), *args, train=False, **kwargs)
  return functools.partial(module.apply, variables, train=False)


def test_encoder_ignores_padded_tokens_at_real_positions():
  rng = np.random.default_rng(0)
  x, position = (jnp.asarray(rng.standard_normal((2, 12, 16), dtype=np.float32)) for _ in range(2))
  padding_mask = jnp.asarray(_padded_masks(2, 1, 12, seed=2)[:, 0])
  assert not padding_mask.all()
  encoder = transformer.Encoder(num_layers=2, num_heads=4, ffn_dim=32)
  apply = _init_apply(encoder, x, position=position, padding_mask=padding_mask)
  moved = jnp.where(padding_mask[..., None], x, x + 5.0)  # changes only padded tokens
  out, out_moved = (apply(v, position=position, padding_mask=padding_mask) for v in (x, moved))
  real = np.asarray(padding_mask)
  np.testing.assert_allclose(np.asarray(out)[real], np.asarray(out_moved)[real], rtol=1e-5, atol=1e-5)
  # Without the mask the same change reaches the real tokens: the check above can fail.
  unmasked = apply(x, position=position), apply(moved, position=position)
  assert np.abs(np.asarray(unmasked[0])[real] - np.asarray(unmasked[1])[real]).max() > 1e-3


def test_decoder_ignores_padded_memory_and_returns_every_layer():
  rng = np.random.default_rng(1)
  queries, query_position = (jnp.asarray(rng.standard_normal((2, 5, 16), dtype=np.float32)) for _ in range(2))
  memory, memory_position = (jnp.asarray(rng.standard_normal((2, 12, 16), dtype=np.float32)) for _ in range(2))
  padding_mask = jnp.asarray(_padded_masks(2, 1, 12, seed=2)[:, 0])
  decoder = transformer.Decoder(num_layers=3, num_heads=4, ffn_dim=32)
  kwargs = dict(query_position=query_position, memory_position=memory_position, memory_padding_mask=padding_mask)
  apply = _init_apply(decoder, queries, memory, **kwargs)
  out = apply(queries, memory, **kwargs)
  assert out.shape == (3, 2, 5, 16)
  # Each entry went through the shared LayerNorm (bias 0, scale 1 at init): zero mean, unit variance.
  np.testing.assert_allclose(out.mean(-1), 0.0, atol=1e-5)
  moved = apply(queries, jnp.where(padding_mask[..., None], memory, memory - 3.0), **kwargs)
  np.testing.assert_allclose(out, moved, rtol=1e-5, atol=1e-5)
  # Layers differ (the list is not one output repeated).
  assert np.abs(np.asarray(out[0] - out[-1])).max() > 1e-3


# detr_resnet18 with one block per stage and a small transformer: fast to compile on CPU.
TINY = dict(num_classes=4, num_queries=6, d_model=16, num_heads=2, num_encoder_layers=1, num_decoder_layers=3,
            ffn_dim=32, backbone_width=4, backbone_stage_sizes=(1, 1, 1, 1))


def test_detr_outputs_shapes_and_ranges():
  model = create_model("detr_resnet18", **TINY)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, 32, 32, 3), dtype=np.float32))
  pixel_mask = jnp.asarray(_padded_masks(2, 32, 32, seed=3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), images,
                                                                  pixel_mask=pixel_mask)
  assert set(variables) == {"params", "batch_stats"}  # frozen BN: nothing the optimizer trains
  apply = jax.jit(model.apply, static_argnames="train")
  out = apply(variables, images, pixel_mask=pixel_mask, train=False)
  assert out["pred_logits"].shape == (2, 6, 5) and out["pred_boxes"].shape == (2, 6, 4)
  assert len(out["aux_outputs"]) == 2
  for aux in out["aux_outputs"]:
    assert aux["pred_logits"].shape == (2, 6, 5) and aux["pred_boxes"].shape == (2, 6, 4)
  assert ((out["pred_boxes"] > 0) & (out["pred_boxes"] < 1)).all()

  train_out = apply(variables, images, pixel_mask=pixel_mask, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
  assert np.abs(np.asarray(train_out["pred_logits"] - out["pred_logits"])).max() > 1e-4  # dropout is active


def test_detr_registry_variants_and_input_errors():
  assert create_model("detr_resnet50").backbone_block_type == "bottleneck"
  assert create_model("detr_resnet101").backbone_stage_sizes == (3, 4, 23, 3)
  model = create_model("detr_resnet18", aux_outputs=False, **TINY)
  images = jnp.zeros((1, 32, 32, 3))
  # Shapes and input checks only: traced abstractly, nothing is computed.
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), images)
  apply = functools.partial(jax.eval_shape, functools.partial(model.apply, train=False), variables)
  assert "aux_outputs" not in apply(images)
  with pytest.raises(ValueError, match=r"pixel_mask must be \[B, H, W\]"):
    apply(images, pixel_mask=jnp.ones((1, 16, 16), bool))
  with pytest.raises(ValueError, match="NHWC"):
    apply(jnp.zeros((32, 32, 3)))


def test_initialisers_follow_facebookresearch_detr():
  """Queries N(0, 1); transformer weights xavier-uniform (q/k/v with the fused [3d, d] bounds), attention
  biases zero, FFN and head biases PyTorch's default U(+-1/sqrt(fan_in)); the heads' weights likewise."""
  d, ffn = 64, 128
  model = create_model("detr_resnet18", **dict(TINY, d_model=d, num_heads=4, ffn_dim=ffn, num_queries=64))
  images = jnp.zeros((1, 32, 32, 3))
  params = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0), images)["params"]

  def check_uniform(x, bound):
    x = np.asarray(x).ravel()
    assert np.abs(x).max() <= bound and np.abs(x).max() > 0.9 * bound and x.std() == pytest.approx(
        bound / np.sqrt(3), rel=0.15)

  queries = np.asarray(params["query_position_embeddings"]["embedding"])
  assert queries.std() == pytest.approx(1.0, rel=0.1) and abs(queries.mean()) < 0.1
  attention = params["encoder"]["layers_0"]["self_attn"]
  for name in ("q_proj", "k_proj", "v_proj"):
    check_uniform(attention[name]["kernel"], np.sqrt(6 / (d + 3 * d)))
  check_uniform(attention["o_proj"]["kernel"], np.sqrt(6 / (2 * d)))
  for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
    assert not np.asarray(attention[name]["bias"]).any()
  mlp = params["decoder"]["layers_0"]["mlp"]
  check_uniform(mlp["fc1"]["kernel"], np.sqrt(6 / (d + ffn)))
  check_uniform(mlp["fc1"]["bias"], 1 / np.sqrt(d))
  check_uniform(mlp["fc2"]["bias"], 1 / np.sqrt(ffn))
  head = params["class_labels_classifier"]
  check_uniform(head["kernel"], 1 / np.sqrt(d))
  assert np.abs(np.asarray(head["bias"])).max() <= 1 / np.sqrt(d) and np.asarray(head["bias"]).any()
  check_uniform(params["bbox_predictor"]["layers_0"]["kernel"], 1 / np.sqrt(d))
  c5 = 4 * 8  # backbone_width 4, basic blocks: C5 has 32 channels
  check_uniform(params["input_projection"]["kernel"], 1 / np.sqrt(c5))
