"""from_transformers: small random HF ViTMAEForPreTraining models (no download) against their conversion, and the
MAE pieces around it: the loss, random masking from the 'mask' rng, the encoder graft into ViT, the figure."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from torch_reference import assert_same_variables, rename_keys
from transformers import ViTMAEConfig, ViTMAEForPreTraining
from transformers.models.vit_mae import modeling_vit_mae

from cvjax.convert import common, from_transformers, mae
from cvjax.models import create_model
from cvjax.models.backbones.vit import ViT
from cvjax.models.ssl.mae import MAE, mae_loss, patchify, unpatchify, vit_encoder_params
from cvjax.viz.mae import reconstruction_figure, reconstruction_images

SMALL = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, decoder_hidden_size=32, decoder_num_hidden_layers=2,
             decoder_num_attention_heads=4, decoder_intermediate_size=64, mask_ratio=0.75)

# transformers 5 key -> 4.x key, as 4.45's ViTMAEForPreTraining names them (written out here, independently of
# the converter's rules).
_TO_4X = [(r"^vit\.layers\.(\d+)\.", r"vit.encoder.layer.\1."),
          (r"\.attention\.([qkv])_proj\.",
           lambda m: f".attention.attention.{dict(q='query', k='key', v='value')[m[1]]}."),
          (r"\.attention\.o_proj\.", ".attention.output.dense."),
          (r"\.mlp\.fc1\.", ".intermediate.dense."),
          (r"\.mlp\.fc2\.", ".output.dense.")]


def _hf_sincos(grid, dim):
  """HF's own table (its builder, then its h/w half rotation to the released checkpoints' layout)."""
  table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
  return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=-1)[None]


def small_hf_mae(seed=0, **overrides):
  """The small MAE in eval mode, every weight redrawn at unit-ish scale (HF's std-0.02 init leaves near-zero
  logits and uniform attention, which would hide a misplaced layer) and the frozen position tables set to the
  sin-cos ones of the released checkpoints (transformers 5's random init leaves them at zero)."""
  torch.manual_seed(seed)
  model = ViTMAEForPreTraining(ViTMAEConfig(attn_implementation="eager", **{**SMALL, **overrides}))
  config = model.config
  grid = config.image_size // config.patch_size
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name in mae.POSITION_KEYS:
        continue
      if "norm" in name and name.endswith("weight"):
        param.uniform_(0.5, 1.5)
      else:
        param.normal_(0.0, 0.5 if param.ndim < 2 else param.shape[-1] ** -0.5 * 2)
    model.vit.embeddings.position_embeddings.copy_(_hf_sincos(grid, config.hidden_size))
    model.decoder.decoder_pos_embed.copy_(_hf_sincos(grid, config.decoder_hidden_size))
  return model.eval()


def _inputs(config, seed=0, batch=2):
  rng = np.random.default_rng(seed)
  side, grid = config.image_size, config.image_size // config.patch_size
  x = rng.standard_normal((batch, config.num_channels, side, side), dtype=np.float32)
  noise = rng.uniform(size=(batch, grid * grid)).astype(np.float32)
  return torch.from_numpy(x), x.transpose(0, 2, 3, 1), noise


@functools.lru_cache(maxsize=None)
def _forward(module):
  """One jitted forward + loss per (hashable) module."""
  def run(variables, images, noise):
    out = module.apply(variables, images, noise=noise, train=False)
    return out, mae_loss(images, out["logits"], out["mask"], module.patch_size, module.norm_pix_loss)
  return jax.jit(run)


def _check_against_hf(hf_model, seed=0):
  x_nchw, x_nhwc, noise = _inputs(hf_model.config, seed)
  with torch.no_grad():
    expected = hf_model(x_nchw, noise=torch.from_numpy(noise))
  module, variables = from_transformers(hf_model)
  out, loss = _forward(module)(variables, x_nhwc, noise)
  np.testing.assert_array_equal(out["mask"], expected.mask.numpy())
  np.testing.assert_array_equal(out["ids_restore"], expected.ids_restore.numpy())
  assert out["ids_restore"].dtype == jnp.int32
  logits = expected.logits.numpy()
  assert np.abs(logits).max() > 0.5  # the comparison is not between near-zeros
  np.testing.assert_allclose(out["logits"], logits, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(loss, expected.loss.item(), rtol=1e-4, atol=1e-4)
  print(f"max |logits diff| {np.abs(np.asarray(out['logits']) - logits).max():.2e}, "
        f"|loss diff| {abs(float(loss) - expected.loss.item()):.2e}")
  return module, variables


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_mask_ids_restore_logits_and_loss_match_hf(norm_pix_loss):
  module, _ = _check_against_hf(small_hf_mae(norm_pix_loss=norm_pix_loss))
  assert module.norm_pix_loss is norm_pix_loss


def test_every_other_config_field_off_its_default_is_carried_over():
  # The tanh GELU, a large LayerNorm epsilon, no q/k/v bias, one input channel, a 3-layer encoder with 8-wide
  # heads, a narrower decoder with other heads and MLP, another mask ratio (int(16 * 0.4) = 6 kept), 4x4 grid of
  # 16-pixel patches on 64-pixel images, dropout rates (train only: checked as fields).
  hf_model = small_hf_mae(seed=3, hidden_act="gelu_new", layer_norm_eps=1e-3, qkv_bias=False, num_channels=1,
                          num_hidden_layers=3, hidden_size=24, num_attention_heads=3, intermediate_size=40,
                          decoder_hidden_size=16, decoder_num_attention_heads=2, decoder_intermediate_size=24,
                          decoder_num_hidden_layers=1, mask_ratio=0.6, image_size=64, patch_size=16,
                          hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.2)
  module, variables = _check_against_hf(hf_model, seed=3)
  assert module.activation is common.HF_ACTIVATIONS["gelu_new"]
  assert (module.layer_norm_eps, module.qkv_bias, module.num_channels, module.mask_ratio) == (1e-3, False, 1, 0.6)
  assert (module.dropout_rate, module.attention_dropout_rate) == (0.1, 0.2)
  assert "bias" not in variables["params"]["decoder_layers_0"]["attention"]["q_proj"]


def test_encode_without_masking_matches_hf_and_grafts_into_vit():
  hf_model = small_hf_mae(seed=4)
  module, variables = from_transformers(hf_model)
  x_nchw, x_nhwc, _ = _inputs(hf_model.config, seed=4)
  features = module.apply(variables, x_nhwc, method=MAE.encode)["features"]
  # HF always shuffles: at ratio 0 an increasing noise keeps the original order.
  hf_model.config.mask_ratio = 0.0
  with torch.no_grad():
    expected = hf_model.vit(x_nchw, noise=torch.arange(16.0).expand(2, 16)).last_hidden_state.numpy()
  assert features.shape == (2, 17, 32)
  np.testing.assert_allclose(features, expected, rtol=1e-4, atol=1e-4)
  vit = ViT(image_size=32, patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, num_classes=0,
            layer_norm_eps=module.layer_norm_eps)
  pooled = vit.apply({"params": vit_encoder_params(variables["params"], module)}, x_nhwc, train=False)
  np.testing.assert_allclose(pooled, features[:, 0], rtol=1e-5, atol=1e-5)
  # The same encoder in a ViT with MAE's fixed table (no position parameter): the fine-tuning configs' graft.
  fixed = ViT(image_size=32, patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, num_classes=0,
              layer_norm_eps=module.layer_norm_eps, position_embedding="sincos")
  grafted = {k: v for k, v in vit_encoder_params(variables["params"], module).items() if k != "position_embeddings"}
  assert jax.tree.structure(fixed.init(jax.random.PRNGKey(0), x_nhwc, train=False)["params"]) == jax.tree.structure(
      grafted)
  np.testing.assert_allclose(fixed.apply({"params": grafted}, x_nhwc, train=False), features[:, 0], rtol=1e-5,
                             atol=1e-5)


def test_transformers_4_state_dict_layout_loads_to_the_same_variables():
  hf_model = small_hf_mae(seed=5)
  legacy = rename_keys(hf_model.state_dict(), _TO_4X)
  assert "vit.encoder.layer.1.attention.attention.query.weight" in legacy
  assert "decoder.decoder_layers.1.attention.output.dense.bias" in legacy
  assert "decoder.decoder_layers.0.intermediate.dense.weight" in legacy
  _, variables = mae.convert(hf_model.config, legacy)
  _, expected = from_transformers(hf_model)
  assert_same_variables(variables, expected)


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=(32, 48)), r"image_size=\(32, 48\)"),
    (dict(patch_size=(8, 16)), r"patch_size=\(8, 16\)"),
    (dict(mask_ratio=1.0), r"mask_ratio=1.0"),
    (dict(hidden_act="laplace"), r"hidden_act='laplace'"),
    (dict(head_dim=4), r"head_dim=4 x num_attention_heads=4 != hidden_size=32"),
    (dict(decoder_hidden_size=30, decoder_num_attention_heads=3), r"decoder_hidden_size=30 \(the sin-cos"),
])
def test_unsupported_configs_are_errors_that_name_the_field(overrides, message):
  config = ViTMAEConfig(**{**SMALL, **overrides})
  with pytest.raises(ValueError, match=r"HF ViTMAEConfig not supported .*" + message):
    mae.convert(config, {})


def test_unsupported_model_and_non_sincos_position_table_are_clear_errors():
  with pytest.raises(ValueError, match=r"hidden_act='laplace'"):
    from_transformers(small_hf_mae(hidden_act="laplace"))
  hf_model = small_hf_mae()
  with torch.no_grad():
    hf_model.decoder.decoder_pos_embed.zero_()
  with pytest.raises(ValueError, match=r"decoder\.decoder_pos_embed is not MAE's fixed sin-cos table"):
    from_transformers(hf_model)


def test_every_config_field_of_the_installed_transformers_is_accounted_for():
  unaccounted = set(ViTMAEConfig().to_dict()) - common.generic_config_fields() - set(mae.CONFIG_FIELDS)
  assert not unaccounted, f"transformers {transformers.__version__} config fields the converter ignores"


def test_base_preset_has_hf_default_config_parameter_count():
  with torch.device("meta"):
    hf_model = ViTMAEForPreTraining(ViTMAEConfig())
  expected = sum(p.numel() for n, p in hf_model.named_parameters() if n not in mae.POSITION_KEYS)
  model = create_model("mae_vit_base_patch16")
  assert (model.mask_ratio, model.norm_pix_loss, model.decoder_hidden_size, model.decoder_depth) == (0.75, True,
                                                                                                    512, 8)
  params = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 224, 224, 3))))["params"]
  assert sum(leaf.size for leaf in jax.tree_util.tree_leaves(params)) == expected


def test_tiny_preset_shapes_and_random_masking_from_the_mask_rng():
  model = create_model("mae_vit_tiny")
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 32, 32, 3), dtype=np.float32))

  def run(key):
    variables = model.init(jax.random.PRNGKey(0), x)
    return model.apply(variables, x, rngs={"mask": key})

  length, kept = 64, int(64 * (1 - 0.75))
  outs = [jax.jit(run)(jax.random.PRNGKey(seed)) for seed in (1, 2)]
  for out in outs:
    assert out["logits"].shape == (3, length, 4 * 4 * 3) and out["logits"].dtype == jnp.float32
    mask, ids_restore = np.asarray(out["mask"]), np.asarray(out["ids_restore"])
    np.testing.assert_array_equal(mask.sum(axis=1), length - kept)
    np.testing.assert_array_equal(np.sort(ids_restore, axis=1), np.broadcast_to(np.arange(length), (3, length)))
    np.testing.assert_array_equal(mask, ids_restore >= kept)  # removed = shuffled past the kept ones
  assert not np.array_equal(outs[0]["mask"], outs[1]["mask"])
  assert not np.array_equal(outs[0]["mask"][0], outs[0]["mask"][1])  # per-sample noise


def test_loss_counts_only_removed_patches_and_gradients_are_finite():
  hf_model = small_hf_mae(seed=6)
  module, variables = from_transformers(hf_model)
  _, x, noise = _inputs(hf_model.config, seed=6)
  out, _ = _forward(module)(variables, x, noise)
  visible = (1 - out["mask"])[..., None]
  loss_of = jax.jit(lambda logits: mae_loss(x, logits, out["mask"], 8, True))
  loss = loss_of(out["logits"])
  np.testing.assert_allclose(loss_of(out["logits"] + 10.0 * visible), loss, rtol=1e-6)
  assert abs(float(loss_of(out["logits"] + 1.0 - visible)) - float(loss)) > 1e-2

  def objective(params, key):
    result = module.apply({"params": params}, x, rngs={"mask": key}, train=False)
    return mae_loss(x, result["logits"], result["mask"], 8, True)

  grads = jax.jit(jax.grad(objective))(variables["params"], jax.random.PRNGKey(0))
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
  assert float(jnp.abs(grads["mask_token"]).sum()) > 0  # removed patches reach the loss through the mask token


def test_patchify_unpatchify_round_trip_in_hf_layout():
  rng = np.random.default_rng(7)
  x_nhwc = rng.standard_normal((2, 16, 16, 3), dtype=np.float32)
  patches = patchify(jnp.asarray(x_nhwc), 4)
  hf_model = ViTMAEForPreTraining(ViTMAEConfig(**{**SMALL, "image_size": 16, "patch_size": 4}))
  np.testing.assert_array_equal(patches, hf_model.patchify(torch.from_numpy(x_nhwc.transpose(0, 3, 1, 2))).numpy())
  np.testing.assert_array_equal(unpatchify(patches, 4, (4, 4)), x_nhwc)


def test_reconstruction_figure_writes_a_png(tmp_path):
  hf_model = small_hf_mae(seed=8, norm_pix_loss=True)
  module, variables = from_transformers(hf_model)
  _, x, noise = _inputs(hf_model.config, seed=8)
  out, _ = _forward(module)(variables, x, noise)
  path = reconstruction_figure(x, out["logits"], out["mask"], 8, str(tmp_path / "viz" / "mae.png"))
  with Image.open(path) as image:
    assert image.format == "PNG" and image.size == (2 * 128, 3 * 128)
  # Perfect normalised-pixel predictions, mapped back with the input patches' statistics, give the input.
  target = np.asarray(patchify(jnp.asarray(x), 8))
  perfect = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, keepdims=True, ddof=1) + 1e-6)
  np.testing.assert_allclose(reconstruction_images(x, perfect, out["mask"], 8), x, atol=1e-5)
