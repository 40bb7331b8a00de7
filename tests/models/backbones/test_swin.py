"""Swin: registered sizes against HF's parameter counts, stage shapes, shifted windows, stochastic depth, the
small-map window rule, PatchMerging's channel order, dtype and input checks."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import SwinConfig, SwinForImageClassification

from cvjax.models import MODELS, create_model
from cvjax.models.backbones.swin import ARCHITECTURES, PatchMerging

RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.standard_normal((2, 32, 32, 3), dtype=np.float32))
# 8x8 tokens, window 4: 4 windows, the second block shifted.
tiny_swin = functools.partial(create_model, "swin_t", embed_dim=8, depths=(2,), num_heads=(2,), window_size=4,
                              num_classes=7, drop_path_rate=0.0)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _apply(model, variables, images, train=False, rng=None):
  """One compilation per (module, train) shared by the tests (modules are hashable dataclasses)."""
  return model.apply(variables, images, train=train, rngs=None if rng is None else {"dropout": rng})


def _init(model, images=IMAGES):
  """Random unit-scale variables of the init's structure (the std-0.02 init gives near-constant logits and a
  near-zero position bias). Drawn with NumPy: XLA:CPU compiles a few dozen jax.random initialisers slowly."""
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"), images)
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: (float(jax.tree_util.keystr(path).endswith("'scale']")) +
                          0.5 * RNG.standard_normal(leaf.shape).astype(np.float32)), abstract)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_parameter_count_matches_hf(name):
  embed_dim, depths, heads, _ = ARCHITECTURES[name]
  with torch.device("meta"):  # shapes only: nothing is allocated or initialised
    hf_model = SwinForImageClassification(SwinConfig(embed_dim=embed_dim, depths=list(depths),
                                                     num_heads=list(heads), num_labels=1000))
  variables = jax.eval_shape(functools.partial(create_model(name).init, train=False),
                             jax.random.key(0, impl="rbg"), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  num_params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables))
  assert num_params == sum(p.numel() for p in hf_model.parameters())
  table = variables["params"]["layers_2"]["blocks_0"]["attention"]["relative_position_bias_table"]
  assert table.shape == (13 * 13, heads[2])


def test_swin_t_shapes_and_published_size():
  model = create_model("swin_t")

  def init_and_apply(x):
    variables = model.init(jax.random.PRNGKey(0), x, train=False)
    return model.apply(variables, x, train=False), model.apply(variables, x, train=False,
                                                               return_features=True), variables

  logits, features, variables = jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct((2, 224, 224, 3),
                                                                                   jnp.float32))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32
  assert {k: v.shape for k, v in features.items()} == {
      "stem": (2, 56, 56, 96), "stage1": (2, 56, 56, 96), "stage2": (2, 28, 28, 192), "stage3": (2, 14, 14, 384),
      "stage4": (2, 7, 7, 768)}
  # 28M in the paper's Table 1; the exact count is HF's SwinForImageClassification(SwinConfig(num_labels=1000)).
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(variables)) == 28_288_354


def test_all_sizes_are_registered():
  assert {name for name in MODELS.names() if name.startswith("swin_")} == set(ARCHITECTURES)


def test_shifted_windows_change_the_output_and_the_ablation_keeps_the_parameters():
  shifted, plain = tiny_swin(), tiny_swin(shifted_windows=False)
  variables = _init(shifted)
  assert jax.tree.structure(variables) == jax.tree.structure(_init(plain))
  out_shifted, out_plain = _apply(shifted, variables, IMAGES), _apply(plain, variables, IMAGES)
  assert out_shifted.shape == (2, 7)
  assert np.abs(out_shifted - out_plain).max() > 1e-2


def test_stochastic_depth_and_dropout_only_in_training():
  model = tiny_swin(drop_path_rate=0.5, dropout_rate=0.1)
  variables = _init(model)
  evals = _apply(model, variables, IMAGES)
  np.testing.assert_allclose(evals, _apply(tiny_swin(), variables, IMAGES), rtol=1e-6)
  trained = [_apply(model, variables, IMAGES, True, jax.random.key(s, impl="rbg")) for s in (0, 1)]
  assert np.abs(trained[0] - evals).max() > 1e-3 and np.abs(trained[0] - trained[1]).max() > 1e-3
  with pytest.raises(Exception, match="dropout"):
    model.apply(variables, IMAGES, train=True)


def test_small_map_uses_the_central_part_of_the_bias_table():
  # A 4x4 token map with window 7 is one 4x4 window: the same as window 4 with the central 7x7 offsets.
  big = create_model("swin_t", embed_dim=8, depths=(2,), num_heads=(2,), window_size=7, num_classes=0)
  small = big.clone(window_size=4)
  images = IMAGES[:, :16, :16]
  variables = _init(big, images)
  small_variables = jax.tree_util.tree_map_with_path(
      lambda path, v: (v.reshape(13, 13, 2)[3:10, 3:10].reshape(49, 2)
                       if "relative_position_bias_table" in jax.tree_util.keystr(path) else v), variables)
  np.testing.assert_allclose(big.apply(variables, images, train=False),
                             small.apply(small_variables, images, train=False), rtol=1e-5, atol=1e-5)


def test_patch_merging_channel_order_and_odd_sizes():
  x = jnp.asarray(RNG.standard_normal((1, 3, 5, 2), dtype=np.float32))
  merging = PatchMerging()
  # Identity norm and reduction weights that pick input channel c of the concatenation: out[..., c] = cat[c].
  variables = {"params": {"norm": {"scale": jnp.ones(8), "bias": jnp.zeros(8)},
                          "reduction": {"kernel": jnp.eye(8, 4)}}}
  padded = np.pad(np.asarray(x), ((0, 0), (0, 1), (0, 1), (0, 0)))
  cat = np.concatenate([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2], padded[:, 0::2, 1::2],
                        padded[:, 1::2, 1::2]], -1)
  normed = (cat - cat.mean(-1, keepdims=True)) / np.sqrt(cat.var(-1, keepdims=True) + 1e-5)
  out = merging.apply(variables, x)
  assert out.shape == (1, 2, 3, 4)
  np.testing.assert_allclose(out, normed[..., :4], rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_params_and_logits():
  model = tiny_swin(dtype=jnp.bfloat16)
  variables = _init(model)
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(variables))
  logits, reference = _apply(model, variables, IMAGES), _apply(tiny_swin(), variables, IMAGES)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, reference, rtol=0.1, atol=0.1 * np.abs(reference).max())


def test_bad_inputs_and_settings_are_clear_errors():
  model = tiny_swin()
  with pytest.raises(ValueError, match=r"NHWC images \[B, H, W, C\].*\(32, 32, 3\)"):
    model.init(jax.random.key(0), IMAGES[0], train=False)
  with pytest.raises(ValueError, match="depths .* num_heads .* same length"):
    tiny_swin(num_heads=(2, 2)).init(jax.random.key(0), IMAGES, train=False)
  with pytest.raises(ValueError, match="stage 2 has 16 channels, not divisible by num_heads 3"):
    tiny_swin(depths=(2, 2), num_heads=(2, 3)).init(jax.random.key(0), IMAGES, train=False)
