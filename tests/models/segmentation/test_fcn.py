"""FCN-32s/16s/8s (VGG-16) and the dilated-ResNet FCN: bilinear upsampling, zero-initialised scores, Caffe's
rounding of the pools, output shapes in both geometry modes, the crop offsets checked end to end, training
gradients, and the ResNet's dilated stages. (Parity with torchvision: tests/convert/test_fcn_parity.py.)

The alignment test gives the VGG nets weights under which they compute a per-pixel function: every conv a
centred delta passing channels 0 and 1 through, the input's channel 0 an increasing linear ramp ``a x + c y``
and channel 1 the decreasing one. A 2^n x 2^n max-pool then picks the ramp at its cell's last pixel (channel 0)
and first pixel (channel 1), ``(2^n - 1) / 2`` either side of the cell centre, so half their difference is the
ramp at the centre exactly; the bilinear upsamplings reproduce linear maps, and the output at pixel p is the
same per-pixel function of the input at p only if every crop offset is right (one pixel off shifts the ramp by
``a`` or ``c``; ``a / c`` is irrational-ish so that a shift on both axes cannot cancel).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from cvjax.models import create_model
from cvjax.models.backbones.resnet import ResNet
from cvjax.models.backbones.vgg import VGG, VGG_CHANNELS
from cvjax.models import layers
from cvjax.models.segmentation import fcn

RNG = np.random.default_rng(0)
TINY = dict(width=4, fc_width=32)


def _abstract_variables(model, shape):
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _random_variables(model, shape):
  """The model's variable structure (abstract init, nothing compiled) with random, well-scaled values."""
  flat = traverse_util.flatten_dict(_abstract_variables(model, shape))

  def sample(path, leaf):
    if path[-1] == "kernel":
      return RNG.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if path[-1] in ("scale", "var"):
      return RNG.uniform(0.5, 1.5, leaf.shape)
    return RNG.normal(0.0, 0.1, leaf.shape)

  return traverse_util.unflatten_dict({p: jnp.asarray(sample(p, leaf), jnp.float32) for p, leaf in flat.items()})


def _apply(model, variables, images, **kwargs):
  return jax.jit(functools.partial(model.apply, train=False, **kwargs))(variables, images)


# ---- upsampling ---------------------------------------------------------------------------------------------

def test_bilinear_filter_is_caffes():
  np.testing.assert_allclose(fcn.bilinear_filter(4), [0.25, 0.75, 0.75, 0.25])
  np.testing.assert_allclose(fcn.bilinear_filter(3), [0.5, 1.0, 0.5])
  f = fcn.bilinear_filter(64)
  assert f.shape == (64,) and f[31] == f[32] == 1 - 0.5 / 32 and f[0] == 0.5 / 32


@pytest.mark.parametrize("factor", [2, 8, 32])
def test_bilinear_kernels_reproduce_constant_and_linear_maps(factor):
  """Away from its borders (outputs y in [s, n s)) the per-class bilinear transposed conv returns a constant
  map unchanged and samples a ramp i at ``(y - (k - 1) / 2) / s``: the coordinate map the crops assume."""
  n, k = 5, 2 * factor
  rows = np.arange(n, dtype=np.float32)
  maps = np.stack(np.broadcast_arrays(np.float32(3.0), rows[:, None], 2 * rows[None, :]), -1)  # [n, n, 3]
  kernel = fcn.per_class_bilinear_init(None, (k, k, 3, 3))
  out = np.asarray(layers.conv_transpose2d(jnp.asarray(maps[None]), kernel, factor))[0]
  assert out.shape == ((n - 1) * factor + k,) * 2 + (3,)
  position = (np.arange(out.shape[0]) - (k - 1) / 2) / factor
  py, px = np.meshgrid(position, position, indexing="ij")
  expected = np.stack([np.full_like(py, 3.0), py, 2 * px], -1)
  inner = slice(factor, n * factor)
  np.testing.assert_allclose(out[inner, inner], expected[inner, inner], atol=1e-5)
  # Per class: a map in one class leaves the others at zero.
  one_hot = np.zeros((1, n, n, 3), np.float32)
  one_hot[0, 2, 3, 1] = 1.0
  spread = np.asarray(layers.conv_transpose2d(jnp.asarray(one_hot), kernel, factor))[0]
  assert spread[..., 1].max() > 0 and not spread[..., [0, 2]].any()


@pytest.mark.parametrize("factor, offset, size", [(32, 19, (40, 51)), (8, 4, (24, 24)), (16, 0, (20, 3))])
def test_fixed_upsampling_is_the_cropped_per_class_transposed_conv(factor, offset, size):
  x = RNG.standard_normal((2, 3, 4, 5), dtype=np.float32)
  full = layers.conv_transpose2d(jnp.asarray(x), fcn.per_class_bilinear_init(None, (2 * factor, 2 * factor, 5, 5)),
                              factor)
  ours = fcn.fixed_bilinear_upsample(jnp.asarray(x), factor, offset, size)
  np.testing.assert_allclose(ours, full[:, offset:offset + size[0], offset:offset + size[1]], atol=1e-5)
  with pytest.raises(ValueError, match="does not fit"):
    fcn.fixed_bilinear_upsample(jnp.asarray(x), factor, offset, (size[0], 5 * factor - offset + 1))


# ---- VGG FCNs -----------------------------------------------------------------------------------------------

SHAPE_CASES = [(100, (1, 1)), (100, (37, 50)), (100, (64, 64)), (100, (97, 33)), (0, (32, 32)), (0, (64, 96))]


@pytest.mark.parametrize("name", ["fcn32s", "fcn16s", "fcn8s"])
@pytest.mark.parametrize("input_padding, size", SHAPE_CASES)
def test_vgg_fcn_logits_have_the_input_size(name, input_padding, size):
  model = create_model(name, num_classes=5, input_padding=input_padding, **TINY)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
    return model.apply(variables, x, train=False)

  outputs = jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
  assert set(outputs) == {"logits"}
  assert outputs["logits"].shape == (2, *size, 5) and outputs["logits"].dtype == jnp.float32


def test_vgg_pools_round_up_as_caffe():
  """The backbone's ``ceil_mode``: odd sides keep their last row / column (PyTorch's ``ceil_mode=True``)."""
  model = VGG(VGG_CHANNELS["vgg16"], width=4, ceil_mode=True)
  images = jnp.asarray(RNG.standard_normal((1, 45, 38, 3), dtype=np.float32))
  pools, state = _apply(model, _random_variables(model, images.shape), images, return_features=True,
                        capture_intermediates=True)
  assert [pools[f"pool{i}"].shape[1:3] for i in range(1, 6)] == [(23, 19), (12, 10), (6, 5), (3, 3), (2, 2)]
  conv1_2 = np.maximum(np.asarray(state["intermediates"]["features_2"]["__call__"][0]), 0).transpose(0, 3, 1, 2)
  expected = torch.nn.functional.max_pool2d(torch.from_numpy(conv1_2), 2, 2, ceil_mode=True).numpy()
  np.testing.assert_array_equal(pools["pool1"], expected.transpose(0, 2, 3, 1))


def test_same_padding_mode_needs_sides_divisible_by_32():
  model = create_model("fcn8s", input_padding=0, **TINY)
  with pytest.raises(ValueError, match="divisible by 32"):
    _abstract_variables(model, (1, 32, 48, 3))
  with pytest.raises(ValueError, match="input_padding must be one of"):
    _abstract_variables(create_model("fcn8s", input_padding=50, **TINY), (1, 32, 32, 3))
  with pytest.raises(ValueError, match="stride must be one of"):
    _abstract_variables(fcn.FCN(stride=4, **TINY), (1, 32, 32, 3))


def test_parameters_scores_at_zero_and_upsamplings_bilinear():
  """The paper's layers and Caffe's names; score layers start at zero (so 16s / 8s start from the coarser net's
  scores), the learnable 2x upsamplings per-class bilinear, the final upsampling no parameter at all."""
  model = create_model("fcn8s", num_classes=3, input_padding=0, **TINY)  # the same parameters, a smaller init
  params = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"),
                                                              jnp.zeros((1, 32, 32, 3)))["params"]
  assert set(params) == {"backbone", "fc6", "fc7", "score_fr", "upscore2", "score_pool4", "upscore_pool4",
                         "score_pool3"}
  assert sorted(params["backbone"], key=lambda n: int(n.split("_")[1])) == [
      f"features_{i}" for i in (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)]  # torchvision's vgg16 indices
  assert params["backbone"]["features_28"]["kernel"].shape == (3, 3, 32, 32)
  assert params["fc6"]["kernel"].shape == (7, 7, 32, 32) and params["fc7"]["kernel"].shape == (1, 1, 32, 32)
  for name in ("score_fr", "score_pool4", "score_pool3"):
    assert not np.asarray(params[name]["kernel"]).any() and not np.asarray(params[name]["bias"]).any(), name
  assert params["score_pool4"]["kernel"].shape == (1, 1, 32, 3)  # pool4 has 512 * 4 / 64 channels
  f = fcn.bilinear_filter(4)
  for name in ("upscore2", "upscore_pool4"):
    assert set(params[name]) == {"kernel"}  # no bias, as Caffe's deconvolutions
    np.testing.assert_allclose(params[name]["kernel"], np.einsum("i,j,cd->ijcd", f, f, np.eye(3)))
  assert set(_abstract_variables(create_model("fcn32s", **TINY), (1, 32, 32, 3))["params"]) == {
      "backbone", "fc6", "fc7", "score_fr"}


def _per_pixel_params(model, shape, active: str, class_weights):
  """Delta convs passing channels 0 and 1 through; ``active`` (a score layer) scores ``class_weights[k] * (ch0 -
  ch1)``, the other score layers are zero; the 2x upsamplings keep their bilinear init."""
  abstract = _abstract_variables(model, shape)["params"]
  flat = traverse_util.flatten_dict(abstract)
  params = {}
  for path, leaf in flat.items():
    value = np.zeros(leaf.shape, np.float32)
    if path[0].startswith("upscore"):
      value = np.asarray(fcn.per_class_bilinear_init(None, leaf.shape))
    elif path[-1] == "kernel" and path[0] == active:
      value[0, 0, 0], value[0, 0, 1] = class_weights, -np.asarray(class_weights)
    elif path[-1] == "kernel" and not path[0].startswith("score"):
      kh, kw = leaf.shape[:2]
      value[kh // 2, kw // 2, 0, 0] = value[kh // 2, kw // 2, 1, 1] = 1.0
    params[path] = jnp.asarray(value)
  return {"params": traverse_util.unflatten_dict(params)}


ALIGNMENT_CASES = [(name, active) for name, actives in (("fcn32s", ["score_fr"]),
                                                         ("fcn16s", ["score_fr", "score_pool4"]),
                                                         ("fcn8s", ["score_fr", "score_pool4", "score_pool3"]))
                   for active in actives]


@pytest.mark.parametrize("input_padding, size", [(100, (208, 240)), (0, (224, 256))])
@pytest.mark.parametrize("name, active", ALIGNMENT_CASES)
def test_output_pixel_p_is_a_function_of_input_pixel_p(name, active, input_padding, size):
  """See the module docstring. ``active='score_fr'`` in 16s / 8s is also their state at init (skip scores zero):
  through the 2x and final upsamplings they then predict what the 32s net predicts on the same weights (here,
  where the scores are linear; in general the composed kernels are smoother than the 32x one)."""
  height, width = size
  a, c = 1.0, 0.37
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  ramp = (a * xs + c * ys).astype(np.float32)
  images = np.stack([ramp + 1.0, ramp.max() + 1.0 - ramp, np.full_like(ramp, 5.0)], -1)[None]
  class_weights = np.array([0.5, -0.25], np.float32)
  model = create_model(name, num_classes=2, input_padding=input_padding, width=4, fc_width=4)
  variables = _per_pixel_params(model, images.shape, active, class_weights)
  logits = np.asarray(_apply(model, variables, jnp.asarray(images))["logits"])[0]
  expected = (images[0, ..., :1] - images[0, ..., 1:2]) * class_weights
  # 80 pixels from the borders the output only sees pooling cells inside the image (cells at the border
  # also hold the zero padding, whose maximum is not at a cell end).
  inner = (slice(80, height - 80), slice(80, width - 80))
  np.testing.assert_allclose(logits[inner], expected[inner], atol=2e-3)


def test_dropout_is_active_in_training_only():
  model = create_model("fcn32s", num_classes=3, input_padding=0, **TINY)
  images = jnp.asarray(RNG.standard_normal((1, 32, 32, 3), dtype=np.float32))
  variables = _random_variables(model, images.shape)
  evaluated = _apply(model, variables, images)["logits"]
  trained = jax.jit(functools.partial(model.apply, train=True))(variables, images,
                                                                rngs={"dropout": jax.random.key(0)})["logits"]
  np.testing.assert_array_equal(evaluated, _apply(model, variables, images)["logits"])
  assert not np.allclose(trained, evaluated)


@pytest.mark.parametrize("name, input_padding, size", [("fcn8s", 100, (5, 6)), ("fcn_resnet18", None, (32, 40))])
def test_training_step_gradients_are_finite_and_reach_the_first_conv(name, input_padding, size):
  """train=True with dropout and, for the ResNet FCN, batch statistics; odd sides send the VGG pools through
  their ceil-mode padding (-inf, which must not leak into the gradient)."""
  kwargs = dict(TINY, input_padding=input_padding) if input_padding is not None else dict(
      width=4, stage_sizes=(1, 1, 1, 1), aux_loss=True)
  model = create_model(name, num_classes=3, **kwargs)
  images = jnp.asarray(RNG.standard_normal((2, *size, 3), dtype=np.float32))
  # Random values throughout (the VGG nets' scores start at zero, which would stop the gradient there).
  variables = _random_variables(model, images.shape)
  params = variables["params"]

  def loss(params):
    outputs, _ = model.apply({**variables, "params": params}, images, train=True, mutable=["batch_stats"],
                             rngs={"dropout": jax.random.key(1)})
    return sum(jnp.mean(jax.nn.log_softmax(value)[..., 0]) for value in outputs.values())

  grads = jax.jit(jax.grad(loss))(params)
  assert all(np.isfinite(leaf).all() for leaf in jax.tree_util.tree_leaves(grads))
  first = grads["backbone"]["features_0" if name.startswith("fcn8") else "conv1"]["kernel"]
  assert np.abs(first).max() > 0


# ---- dilated-ResNet FCN -------------------------------------------------------------------------------------

@pytest.mark.parametrize("aux_loss", [False, True])
@pytest.mark.parametrize("size", [(32, 32), (45, 61)])
def test_fcn_resnet18_shapes_and_torchvision_names(aux_loss, size):
  model = create_model("fcn_resnet18", num_classes=4, width=8, aux_loss=aux_loss)

  def init_and_apply(x):
    variables = model.init(jax.random.key(0, impl="rbg"), x, train=False)
    return model.apply(variables, x, train=False), variables

  outputs, variables = jax.eval_shape(init_and_apply, jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
  assert set(outputs) == ({"logits", "aux_logits"} if aux_loss else {"logits"})
  for value in outputs.values():
    assert value.shape == (2, *size, 4) and value.dtype == jnp.float32
  params = variables["params"]
  heads = {"classifier", "aux_classifier"} if aux_loss else {"classifier"}
  assert set(params) == {"backbone"} | {f"{head}_{i}" for head in heads for i in (0, 1, 4)}
  assert "fc" not in params["backbone"] and "layer4_1" in params["backbone"]
  # FCNHead: 3x3 to in / 4 channels without bias, BN, 1x1 to K; layer4 has 64 channels, layer3 32.
  assert set(params["classifier_0"]) == {"kernel"} and params["classifier_0"]["kernel"].shape == (3, 3, 64, 16)
  assert params["classifier_4"]["kernel"].shape == (1, 1, 16, 4)
  assert set(variables["batch_stats"]["classifier_1"]) == {"mean", "var"}
  if aux_loss:
    assert params["aux_classifier_0"]["kernel"].shape == (3, 3, 32, 8)


def test_dilated_resnet_keeps_output_stride_8():
  """layer3 and layer4 dilated: torchvision's replace_stride_with_dilation=[False, True, True]; the old
  ``dilate_last_stage`` is the flag on the last stage."""
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  model = ResNet((1, 1, 1, 1), width=4, replace_stride_with_dilation=(False, True, True))
  features = jax.eval_shape(lambda x: model.init_with_output(jax.random.key(0, impl="rbg"), x, train=False,
                                                             return_features=True)[0], images)
  assert [features[f"c{i}"].shape[1] for i in (2, 3, 4, 5)] == [16, 8, 8, 8]
  dc5 = ResNet((1, 1, 1, 2), width=4, dilate_last_stage=True)
  flagged = dc5.clone(dilate_last_stage=False, replace_stride_with_dilation=(False, False, True))
  x = jnp.asarray(RNG.standard_normal((1, 64, 64, 3), dtype=np.float32))
  variables = _random_variables(dc5, x.shape)
  np.testing.assert_array_equal(_apply(dc5, variables, x, return_features=True)["c5"],
                                _apply(flagged, variables, x, return_features=True)["c5"])
  with pytest.raises(ValueError, match="one flag per stage after the first"):
    jax.eval_shape(functools.partial(ResNet((1, 1, 1, 1), replace_stride_with_dilation=(True, True)).init,
                                     train=False), jax.random.key(0, impl="rbg"), images)
