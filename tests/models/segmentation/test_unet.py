"""U-Net: the paper's valid-convolution geometry (572 -> 388), outputs at the input resolution in every mode,
mirrored tiles aligned with the input, and the ablation's options changing what they should."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.models import create_model
from cvjax.models.segmentation.unet import UNet, valid_input_padding, valid_output_side


def test_valid_geometry_is_the_papers():
  assert valid_output_side(572, 4) == 388           # Fig. 1 of the paper
  assert valid_output_side(570, 4) is None          # a pooled map would have an odd side
  for side, depth in [(388, 4), (64, 3), (37, 2), (20, 1)]:
    before, after = valid_input_padding(side, depth)
    assert before == (12 * 2**depth - 8) // 2
    assert valid_output_side(side + before + after, depth) >= side


MODES = [dict(padding="same"), dict(padding="valid"), dict(padding="same", upsample="bilinear"),
         dict(padding="valid", skips=False), dict(padding="same", batch_norm=True, dropout_rate=0.5)]


@pytest.mark.parametrize("options", MODES, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_logits_at_input_resolution(options):
  model = UNet(num_classes=5, width=4, depth=2, **options)
  images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  out = model.apply(variables, images, train=False)
  assert out["logits"].shape == (2, 32, 32, 5) and out["logits"].dtype == jnp.float32
  assert jnp.isfinite(out["logits"]).all() and float(out["logits"].std()) > 1e-3
  if options.get("batch_norm"):
    _, updated = model.apply(variables, images, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(2)})
    assert not jax.tree.all(jax.tree.map(jnp.array_equal, updated["batch_stats"], variables["batch_stats"]))


def test_valid_output_pixel_sees_the_input_around_it():
  """Output pixel (i, j) of the mirrored-tile valid U-Net depends on input pixels centred on (i, j): the
  centroid of |d logit(i, j) / d input| is within two pixels of (i, j) (random weights make the receptive field
  lopsided by about a pixel). A wrong tile offset moves it by dozens."""
  model = UNet(num_classes=1, width=4, depth=2, padding="valid")
  images = jax.random.normal(jax.random.key(0), (1, 48, 48, 3))
  variables = model.init(jax.random.key(1), images, train=False)
  pixel_grad = jax.jit(jax.grad(lambda x, i, j: model.apply(variables, x, train=False)["logits"][0, i, j, 0]))
  for i, j in [(24, 24), (20, 27), (25, 21)]:
    grad = pixel_grad(images, i, j)
    weight = np.abs(np.asarray(grad[0])).sum(-1)
    rows, cols = np.mgrid[0:48, 0:48]
    centroid = (weight * rows).sum() / weight.sum(), (weight * cols).sum() / weight.sum()
    assert abs(centroid[0] - i) < 2.0 and abs(centroid[1] - j) < 2.0, (i, j, centroid)


def test_skips_and_upsampling_change_the_network():
  images = jnp.zeros((1, 16, 16, 3))
  def names(**options):
    variables = UNet(num_classes=2, width=4, depth=2, padding="same", **options).init(
        jax.random.key(0), images, train=False)
    return {k: v["kernel"].shape for k, v in variables["params"].items() if "kernel" in v}
  with_skips, without = names(), names(skips=False)
  # The decoder's first conv reads the upsampled map concatenated with the skip: twice the channels.
  assert with_skips["up0_conv1"][2] == 2 * without["up0_conv1"][2]
  assert "up1_upconv" in names() and "up1_conv1x1" in names(upsample="bilinear")


def test_registered_and_bad_options_are_named():
  model = create_model("unet_small", num_classes=3)
  assert model.depth == 3 and model.padding == "same"
  with pytest.raises(ValueError, match="divisible by 8"):
    model.init(jax.random.key(0), jnp.zeros((1, 20, 20, 3)), train=False)
  with pytest.raises(ValueError, match="upsample must be one of"):
    UNet(num_classes=2, upsample="nearest").init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
