"""cvjax.viz.attention against NumPy references written from the definitions, and the PNGs it draws.

The rollout reference follows Abnar & Zuidema (2020) as written: ``A_l = 0.5 * mean_heads(W_l) + 0.5 * I``,
rollout ``A_L @ ... @ A_1``, the class token's row over the patches (the implementation renormalises
``W + I`` instead, which equals it for row-stochastic ``W``).
"""

import numpy as np
import pytest
from PIL import Image

from cvjax.data.preprocessing import normalize
from cvjax.viz import attention_rollout, cls_attention_maps, save_attention_pngs, unnormalize_image


def random_attention(rng, *shape):
  """Row-stochastic attention probabilities ``[*shape[:-1], N]`` (softmax of normal logits)."""
  logits = rng.normal(size=shape) * 2
  probs = np.exp(logits)
  return probs / probs.sum(-1, keepdims=True)


def reference_rollout(layers, grid_hw):
  n = layers[0].shape[-1]
  result = np.eye(n)
  for attention in layers:
    result = (0.5 * attention.mean(0) + 0.5 * np.eye(n)) @ result
  row = result[0, 1:]
  return (row / row.sum()).reshape(grid_hw)


def test_rollout_of_two_layers_is_the_product_of_the_residual_attentions():
  rng = np.random.default_rng(0)
  layers = [random_attention(rng, 3, 7, 7) for _ in range(2)]  # 3 heads, class token + 2x3 patches
  got = attention_rollout(layers, grid_hw=(2, 3))
  assert got.shape == (2, 3)
  np.testing.assert_allclose(got, reference_rollout(layers, (2, 3)), rtol=1e-12)
  np.testing.assert_allclose(got.sum(), 1.0)


def test_rollout_and_maps_take_batches_and_a_stacked_array():
  rng = np.random.default_rng(1)
  layers = [random_attention(rng, 2, 4, 17, 17) for _ in range(3)]  # [B=2, heads=4, 1 + 4x4, same]
  rollout = attention_rollout(np.stack(layers))                     # [L, B, heads, N, N], square grid inferred
  maps = cls_attention_maps(layers)
  assert rollout.shape == (2, 4, 4) and maps.shape == (2, 4, 4, 4)
  for b in range(2):
    np.testing.assert_allclose(rollout[b], reference_rollout([a[b] for a in layers], (4, 4)), rtol=1e-12)
    np.testing.assert_allclose(maps[b], cls_attention_maps([a[b] for a in layers]))


def test_identity_attention_keeps_every_token_to_itself():
  eye = np.broadcast_to(np.eye(5), (2, 5, 5))                       # 2 heads, class token + 2x2 patches
  # The class token attends only to itself: no mass on any patch, and zeros rather than NaN.
  np.testing.assert_array_equal(attention_rollout([eye, eye]), np.zeros((2, 2)))
  np.testing.assert_array_equal(cls_attention_maps([eye]), np.zeros((2, 2, 2)))
  # Without a class token (pool='gap') the head reads every token equally: a uniform map.
  eye4 = np.broadcast_to(np.eye(4), (2, 4, 4))
  np.testing.assert_allclose(attention_rollout([eye4, eye4], num_prefix_tokens=0), np.full((2, 2), 0.25))


def test_uniform_attention_gives_a_uniform_map():
  uniform = np.full((3, 10, 10), 0.1)                                # class token + 3x3 patches
  np.testing.assert_allclose(attention_rollout([uniform] * 4), np.full((3, 3), 1 / 9))
  np.testing.assert_allclose(cls_attention_maps([uniform]), np.full((3, 3, 3), 1 / 9))


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
def test_head_fusion_and_discard_ratio_follow_the_definition(fusion):
  rng = np.random.default_rng(2)
  layer = random_attention(rng, 3, 5, 5)
  fused = getattr(np, fusion)(layer, axis=0)
  flat = fused.reshape(-1).copy()
  count = int(0.2 * flat.size)
  drop = flat <= np.sort(flat)[count - 1]                            # the `count` smallest (values are distinct)
  drop[0] = False                                                    # the class token's weight to itself stays
  flat[drop] = 0.0
  residual = flat.reshape(5, 5) + np.eye(5)
  row = (residual / residual.sum(-1, keepdims=True))[0, 1:]
  assert row.sum() > 0  # the class token still reaches some patch: the test compares more than zeros
  got = attention_rollout([layer], discard_ratio=0.2, head_fusion=fusion)
  np.testing.assert_allclose(got, (row / row.sum()).reshape(2, 2), rtol=1e-12)


def test_cls_attention_maps_are_the_class_token_rows_of_one_layer():
  rng = np.random.default_rng(3)
  layers = [random_attention(rng, 4, 7, 7) for _ in range(2)]
  last = layers[-1][:, 0, 1:]
  expected = (last / last.sum(-1, keepdims=True)).reshape(4, 2, 3)
  maps = cls_attention_maps(layers, (2, 3))
  np.testing.assert_allclose(maps, expected, rtol=1e-12)
  np.testing.assert_allclose(maps.sum((1, 2)), np.ones(4))
  np.testing.assert_allclose(cls_attention_maps(layers, (2, 3), layer=0, renormalize=False),
                             layers[0][:, 0, 1:].reshape(4, 2, 3))
  # Without a class token (pool='gap') the head averages the tokens: the mean of all query rows.
  gap_layer = random_attention(rng, 4, 6, 6)                          # 2x3 patches, no prefix token
  np.testing.assert_allclose(cls_attention_maps([gap_layer], (2, 3), num_prefix_tokens=0, renormalize=False),
                             gap_layer.mean(1).reshape(4, 2, 3))


def test_bad_inputs_name_what_was_expected():
  eye = np.broadcast_to(np.eye(5), (2, 5, 5))
  with pytest.raises(ValueError, match="grid_hw"):
    cls_attention_maps([eye], (2, 3))
  with pytest.raises(ValueError, match="not a square grid"):
    attention_rollout([np.broadcast_to(np.eye(7), (2, 7, 7))])
  with pytest.raises(ValueError, match="heads, N, N"):
    attention_rollout(np.ones((5, 5)))
  with pytest.raises(ValueError, match="head_fusion"):
    attention_rollout([eye], head_fusion="median")
  with pytest.raises(ValueError, match="discard_ratio"):
    attention_rollout([eye], discard_ratio=1.0)


def test_unnormalize_inverts_the_pipeline_normalisation():
  image = np.random.default_rng(4).integers(0, 256, (2, 8, 8, 3), dtype=np.uint8)
  np.testing.assert_array_equal(unnormalize_image(normalize(image)), image)


def test_pngs_have_the_documented_size_and_show_the_maps(tmp_path):
  rng = np.random.default_rng(5)
  image = np.full((32, 32, 3), 128, np.uint8)
  maps = cls_attention_maps([random_attention(rng, 4, 65, 65)])      # 4 heads over 8x8 patches
  heads = save_attention_pngs(image, maps, str(tmp_path / "a" / "heads.png"), [f"head {h}" for h in range(4)],
                              suptitle="label circle")
  rollout = save_attention_pngs(image, maps[0], str(tmp_path / "rollout.png"), panel_px=100)
  with Image.open(heads) as png:
    assert png.format == "PNG" and png.size == (5 * 160, 160 + 24)
    pixels = np.asarray(png.convert("RGB"), np.int32)
  with Image.open(rollout) as png:
    assert png.size == (2 * 100, 100)
  # Panel 0 is the plain grey image; panel 1 the heatmap over it: coloured.
  centre = lambda column: pixels[24 + 90, column * 160 + 80]
  np.testing.assert_array_equal(centre(0), [128, 128, 128])
  assert np.abs(centre(1) - 128).max() > 20


def test_png_inputs_are_checked(tmp_path):
  with pytest.raises(ValueError, match="image_uint8 must be a uint8"):
    save_attention_pngs(np.zeros((32, 32, 3), np.float32), np.ones((2, 2)), str(tmp_path / "x.png"))
  with pytest.raises(ValueError, match="titles has 1 entries for 2 maps"):
    save_attention_pngs(np.zeros((32, 32, 3), np.uint8), np.ones((2, 2, 2)), str(tmp_path / "x.png"), ["a"])
