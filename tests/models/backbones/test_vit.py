"""ViT: registered sizes, pooling, position-embedding resizing, dropout, dtype and input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.models import MODELS, create_model
from cvjax.models.backbones.vit import WIDTHS, resize_position_grid

RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.standard_normal((2, 32, 32, 3), dtype=np.float32))
tiny_vit = functools.partial(create_model, "vit_ti16", image_size=32, patch_size=8, hidden_size=16, depth=2,
                             num_heads=2, mlp_dim=32, num_classes=7)
# (width, patch) of each registered name, as the ViT / DeiT papers name them.
REGISTERED = {"vit_ti16": ("ti", 16), "vit_s16": ("s", 16), "vit_b16": ("b", 16), "vit_b32": ("b", 32),
              "vit_l16": ("l", 16), "vit_l32": ("l", 32)}


def _init(model, images=IMAGES):
  return jax.jit(functools.partial(model.init, train=False))(jax.random.key(1, impl="rbg"), images)


def _randomised(variables):
  """Noise on every leaf: the init's zero head would make all logits equal (and dropout invisible)."""
  leaves, treedef = jax.tree_util.tree_flatten(variables)
  return treedef.unflatten([v + 0.3 * RNG.standard_normal(v.shape).astype(np.float32) for v in leaves])


def _expected_num_params(width, patch, image=224, classes=1000):
  """Counted from the paper's architecture: patch conv, class token, position embeddings, blocks (4 biased
  DxD projections, 2 LayerNorms, a 2-layer MLP), final LayerNorm, head."""
  d, depth, _, m = WIDTHS[width]
  tokens = (image // patch) ** 2 + 1
  block = 4 * (d * d + d) + 2 * 2 * d + (d * m + m) + (m * d + d)
  return (patch * patch * 3 * d + d) + d + tokens * d + depth * block + 2 * d + (d * classes + classes)


def test_all_sizes_are_registered():
  assert {name for name in MODELS.names() if name.startswith("vit_")} == set(REGISTERED)


@pytest.mark.parametrize("name", sorted(REGISTERED))
def test_full_size_shapes_and_parameter_count(name):
  model = create_model(name)

  def init_and_apply(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model.apply(variables, x, train=False, return_attention=True), variables

  (logits, attentions), variables = jax.eval_shape(
      init_and_apply, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  width, patch = REGISTERED[name]
  _, depth, heads, _ = WIDTHS[width]
  tokens = (224 // patch) ** 2 + 1
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert [a.shape for a in attentions] == [(2, heads, tokens, tokens)] * depth
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables)) == _expected_num_params(width, patch)


def test_vit_b16_count_is_the_published_one():
  # 86.6M for ViT-B/16 (ViT paper, Table 1; timm's vit_base_patch16_224 reports 86,567,656).
  assert _expected_num_params("b", 16) == 86_567_656


def test_gap_pooling_is_the_mean_of_the_normalised_patch_tokens():
  model = tiny_vit(pool="gap", depth=0, num_classes=0)
  variables = _init(model)
  params = variables["params"]
  assert "cls_token" not in params and params["position_embeddings"].shape == (1, 16, 16)
  # Reference: patchify by reshape, project, add positions, LayerNorm (eps 1e-6), mean over tokens.
  x = np.asarray(IMAGES, np.float64).reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, -1)
  kernel = np.asarray(params["patch_embedding"]["kernel"], np.float64).reshape(-1, 16)
  tokens = x @ kernel + np.asarray(params["patch_embedding"]["bias"]) + np.asarray(params["position_embeddings"])
  mean, var = tokens.mean(-1, keepdims=True), tokens.var(-1, keepdims=True)
  normed = (tokens - mean) / np.sqrt(var + 1e-6) * np.asarray(params["layernorm"]["scale"]) + \
      np.asarray(params["layernorm"]["bias"])
  np.testing.assert_allclose(model.apply(variables, IMAGES, train=False), normed.mean(1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("out_hw", [(7, 5), (2, 3), (4, 4)])
def test_position_grid_resize_matches_torch_bicubic(out_hw):
  grid = RNG.standard_normal((4, 4, 6)).astype(np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(grid).permute(2, 0, 1)[None], size=out_hw,
                                             mode="bicubic", align_corners=False)[0].permute(1, 2, 0).numpy()
  resized = resize_position_grid(jnp.asarray(grid), out_hw)
  np.testing.assert_allclose(resized, expected, rtol=1e-5, atol=1e-5)
  if out_hw == (4, 4):
    np.testing.assert_allclose(resized, grid, atol=1e-6)


def test_other_resolution_uses_resized_embeddings_with_the_same_parameters():
  model = tiny_vit()
  variables = _init(model)
  images = jnp.asarray(RNG.standard_normal((2, 48, 40, 3), dtype=np.float32))
  logits, attentions = model.apply(variables, images, train=False, return_attention=True)
  assert logits.shape == (2, 7) and np.all(np.isfinite(logits))
  assert attentions[0].shape == (2, 2, 6 * 5 + 1, 6 * 5 + 1)
  np.testing.assert_allclose(attentions[0].sum(-1), 1.0, rtol=1e-5)


def test_dropout_only_in_train():
  model = tiny_vit(dropout_rate=0.3, attention_dropout_rate=0.3)
  variables = _randomised(_init(model))
  apply = jax.jit(model.apply, static_argnames="train")
  rngs = [{"dropout": jax.random.key(seed)} for seed in (0, 1)]
  eval_logits = [apply(variables, IMAGES, train=False, rngs=r) for r in rngs]
  without_dropout = tiny_vit().apply(variables, IMAGES, train=False)
  np.testing.assert_array_equal(eval_logits[0], eval_logits[1])
  np.testing.assert_allclose(eval_logits[0], without_dropout, rtol=1e-5, atol=1e-6)
  train_logits = [apply(variables, IMAGES, train=True, rngs=r) for r in rngs]
  assert not np.allclose(train_logits[0], train_logits[1])
  assert not np.allclose(train_logits[0], eval_logits[0])


def test_drop_path_is_random_in_train_only_and_spares_the_first_block():
  variables = _randomised(_init(tiny_vit()))
  eval_logits = tiny_vit().apply(variables, IMAGES, train=False)
  # DeiT's linear rule: block i of depth drops with rate * i / (depth - 1); the first block never does, so a
  # one-block model trains as it evaluates.
  one_block = _randomised(_init(tiny_vit(depth=1)))
  np.testing.assert_allclose(
      tiny_vit(depth=1, drop_path_rate=0.9).apply(one_block, IMAGES, train=True,
                                                   rngs={"dropout": jax.random.key(0)}),
      tiny_vit(depth=1).apply(one_block, IMAGES, train=False), rtol=1e-5, atol=1e-6)
  # With two blocks the second one's branches (rate 0.5) are dropped or kept per sample, by the rng.
  model = tiny_vit(drop_path_rate=0.5)
  train = [model.apply(variables, IMAGES, train=True, rngs={"dropout": jax.random.key(s)}) for s in range(8)]
  assert any(not np.allclose(t, train[0]) for t in train[1:])
  np.testing.assert_array_equal(model.apply(variables, IMAGES, train=False), eval_logits)


def test_bfloat16_compute_returns_float32_logits_close_to_float32():
  variables = _randomised(_init(tiny_vit()))
  reference = tiny_vit().apply(variables, IMAGES, train=False)
  logits = tiny_vit(dtype=jnp.bfloat16).apply(variables, IMAGES, train=False)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05 * np.abs(reference).max())


def test_bad_inputs_are_clear_errors():
  variables = _init(tiny_vit())
  with pytest.raises(ValueError, match="multiples of patch_size"):
    tiny_vit().apply(variables, IMAGES[:, :30], train=False)
  with pytest.raises(ValueError, match="NHWC"):
    tiny_vit().apply(variables, IMAGES[0], train=False)
  with pytest.raises(ValueError, match="pool must be one of"):
    _init(tiny_vit(pool="max"))
