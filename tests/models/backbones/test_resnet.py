"""ResNet / plain nets: BN modes, frozen BN, zero-init, shortcuts, feature maps, dtype and Conv impls."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from cvjax.models import create_model
from cvjax.models.backbones.resnet import ResidualBlock

RNG = np.random.default_rng(0)
IMAGES = jnp.asarray(RNG.standard_normal((4, 32, 32, 3), dtype=np.float32))
# One block per stage: every behaviour under test is per block or per stage, and compiles stay short.
tiny_resnet = functools.partial(create_model, "resnet18", width=8, num_classes=10, stage_sizes=(1, 1, 1, 1))


def _init(model, images=IMAGES):
  """The model's own initialisation (only where its values are under test)."""
  # An rbg key: XLA:CPU compiles the default (partitionable threefry) random bits of a few dozen initialisers
  # 5-10x slower, which dominated these tests.
  return jax.jit(functools.partial(model.init, train=False))(jax.random.key(1, impl="rbg"), images)


def _random_variables(model, images=IMAGES):
  """Variables of the model's structure (abstract init, nothing compiled) with random, well-scaled values,
  including non-trivial BN statistics."""
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"), images)

  def sample(path, leaf):
    if path[-1] == "kernel":
      return RNG.standard_normal(leaf.shape) * np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
    if path[-1] in ("scale", "var"):
      return RNG.uniform(0.5, 1.5, leaf.shape)
    return RNG.normal(0.0, 0.1, leaf.shape)

  flat = traverse_util.flatten_dict(abstract)
  return traverse_util.unflatten_dict({p: jnp.asarray(sample(p, leaf), jnp.float32) for p, leaf in flat.items()})


def _apply(model, variables, images=IMAGES, **kwargs):
  """Jitted ``model.apply``: eager flax would compile every op of the network one by one."""
  return jax.jit(functools.partial(model.apply, **kwargs))(variables, images)


def _param_paths(model, images=IMAGES):
  return set(traverse_util.flatten_dict(_random_variables(model, images)["params"]))


def test_batch_stats_are_updated_in_train_mode_only():
  model = tiny_resnet()
  variables = _random_variables(model)
  train_logits, state = _apply(model, variables, train=True, mutable=["batch_stats", "intermediates"],
                               capture_intermediates=lambda mdl, _: mdl.name == "conv1" and mdl.parent.name is None)
  # PyTorch's momentum 0.1: new running mean = 0.9 * old + 0.1 * batch mean of the BN's input.
  batch_mean = np.asarray(state["intermediates"]["conv1"]["__call__"][0]).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(state["batch_stats"]["bn1"]["mean"],
                             0.9 * variables["batch_stats"]["bn1"]["mean"] + 0.1 * batch_mean, rtol=1e-5, atol=1e-6)
  # Eval mode writes nothing (apply raises on a write to an immutable collection) and normalises with the
  # running statistics, so its output differs from the batch-statistics output.
  eval_logits = _apply(model, variables, train=False)
  assert not np.allclose(eval_logits, train_logits, atol=1e-3)


def test_frozen_bn_is_not_trained_and_ignores_the_batch():
  model = tiny_resnet(frozen_bn=True)
  variables = _random_variables(model)
  assert all(path[-1] == "kernel" or path[0] == "fc" for path in traverse_util.flatten_dict(variables["params"])), \
      "frozen BN leaves must not be params"
  stat_names = {path[-1] for path in traverse_util.flatten_dict(variables["batch_stats"])}
  assert stat_names == {"scale", "bias", "mean", "var"}

  def train_loss(params):
    logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, IMAGES,
                                train=True, mutable=["batch_stats"])
    return logits.sum(), (logits, state)

  (_, (train_logits, state)), grads = jax.jit(jax.value_and_grad(train_loss, has_aux=True))(variables["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"], variables["batch_stats"])
  np.testing.assert_allclose(train_logits, _apply(model, variables, train=False), rtol=1e-5, atol=1e-5)
  # Gradients reach every parameter (and there is none for BN to receive).
  assert all(np.abs(g).sum() > 0 for g in jax.tree_util.tree_leaves(grads))


def test_frozen_stages_keep_their_statistics_and_normalise_with_them_in_training():
  """frozen_stages=1: the stem and layer1 batch norms behave as in eval mode while training (their outputs
  equal eval mode's, their statistics do not move); later stages still use and update batch statistics."""
  model = tiny_resnet(frozen_stages=1)
  variables = _random_variables(model)
  features = functools.partial(model.apply, return_features=True)
  train, state = jax.jit(functools.partial(features, train=True, mutable=["batch_stats"]))(variables, IMAGES)
  evaluated = jax.jit(functools.partial(features, train=False))(variables, IMAGES)
  np.testing.assert_allclose(train["c2"], evaluated["c2"], rtol=1e-5, atol=1e-5)
  assert not np.allclose(train["c3"], evaluated["c3"], atol=1e-3)
  before, after = variables["batch_stats"], state["batch_stats"]
  for frozen in ["bn1"] + [name for name in before if name.startswith("layer1_")]:
    jax.tree.map(np.testing.assert_array_equal, after[frozen], before[frozen])
  assert not np.allclose(after["layer2_0"]["bn1"]["mean"], before["layer2_0"]["bn1"]["mean"])
  with pytest.raises(ValueError, match="frozen_stages must be in"):
    _apply(tiny_resnet(frozen_stages=5), variables, train=False)


@pytest.mark.parametrize("name,last_bn", [("resnet18", "bn2"), ("resnet50", "bn3")])
def test_zero_init_last_bn_zeroes_exactly_the_last_bn_of_each_block(name, last_bn):
  model = create_model(name, width=4, zero_init_last_bn=True, stage_sizes=(1, 1, 1, 1))
  params = traverse_util.flatten_dict(_init(model)["params"])
  scales = {path[:-1]: value for path, value in params.items() if path[-1] == "scale"}
  assert any(path[-1] == last_bn for path in scales)
  for path, scale in scales.items():
    expected = 0.0 if path[-1] == last_bn else 1.0
    np.testing.assert_array_equal(scale, np.full_like(scale, expected), err_msg="/".join(path))


@pytest.mark.parametrize("block_type", ["basic", "bottleneck"])
def test_shortcut_is_present_only_in_residual_blocks(block_type):
  x = jnp.asarray(RNG.standard_normal((2, 6, 6, 8), dtype=np.float32))
  # A zero-initialised last BN silences the residual branch: what is left is the shortcut.
  residual = ResidualBlock(8, block_type=block_type, zero_init_last_bn=True)
  plain = ResidualBlock(8, block_type=block_type, zero_init_last_bn=True, residual=False)
  variables = _init(residual, x)
  np.testing.assert_allclose(_apply(residual, variables, x, train=False), jax.nn.relu(x), atol=1e-6)
  np.testing.assert_array_equal(_apply(plain, variables, x, train=False), np.zeros_like(x))


def test_plain_net_has_no_projections_and_differs_from_resnet_with_the_same_weights():
  resnet = tiny_resnet()
  plain = create_model("plain18", width=8, num_classes=10, stage_sizes=(1, 1, 1, 1))
  resnet_paths, plain_paths = _param_paths(resnet), _param_paths(plain)
  assert plain_paths < resnet_paths
  assert all("downsample_0" in p or "downsample_1" in p for p in resnet_paths - plain_paths)
  # plain18 with resnet18's weights (it reads the subset it has) computes a different function.
  variables = _random_variables(resnet)
  assert not np.allclose(_apply(plain, variables, train=False), _apply(resnet, variables, train=False),
                         atol=1e-3)


@pytest.mark.parametrize("kwargs,strides", [
    ({}, (4, 8, 16, 32)),
    ({"stem": "cifar"}, (1, 2, 4, 8)),
    ({"dilate_last_stage": True, "block_type": "bottleneck"}, (4, 8, 16, 16)),
])
def test_feature_maps_have_the_documented_strides(kwargs, strides):
  model = create_model("resnet18", width=4, stage_sizes=(1, 1, 1, 1), **kwargs)
  images = jnp.zeros((1, 64, 64, 3))
  features = jax.eval_shape(functools.partial(model.apply, train=False, return_features=True),
                            _random_variables(model, images), images)
  expansion = 4 if kwargs.get("block_type") == "bottleneck" else 1
  assert list(features) == ["c2", "c3", "c4", "c5"]
  for i, (level, stride) in enumerate(zip(features, strides)):
    assert features[level].shape == (1, 64 // stride, 64 // stride, 4 * 2**i * expansion), level


def test_dilated_last_stage_computes_what_the_strided_one_computes_at_its_sampling_points():
  # DC5 only moves the stride: the last stage's first 3x3 (dilation 1, stride 1) sees every position the
  # strided conv sees, and the following 3x3s dilate by 2 to keep their receptive field. Every other C5
  # position of the dilated net therefore equals the strided net's C5 when C5 has a single block.
  strided = create_model("resnet50", width=4, stage_sizes=(1, 1, 1, 1))
  dilated = strided.clone(dilate_last_stage=True)
  images = jnp.asarray(RNG.standard_normal((1, 64, 64, 3), dtype=np.float32))
  variables = _random_variables(strided, images)
  c5 = _apply(strided, variables, images, train=False, return_features=True)["c5"]
  c5_dilated = _apply(dilated, variables, images, train=False, return_features=True)["c5"]
  np.testing.assert_allclose(c5_dilated[:, ::2, ::2], c5, rtol=1e-4, atol=1e-4)


def test_bfloat16_compute_keeps_float32_params_and_tracks_float32():
  model32, model16 = tiny_resnet(), tiny_resnet(dtype=jnp.bfloat16)
  variables = _random_variables(model32)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(
      jax.eval_shape(functools.partial(model16.init, train=False), jax.random.key(0, impl="rbg"), IMAGES)))
  logits32, _ = _apply(model32, variables, train=True, mutable=["batch_stats"])
  logits16, state16 = _apply(model16, variables, train=True, mutable=["batch_stats"])
  assert logits16.dtype == jnp.float32 and np.isfinite(logits16).all()
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state16))
  np.testing.assert_allclose(logits16, logits32, atol=0.1 * float(np.abs(logits32).max()))


def test_layer_implementations_agree_on_a_whole_network_including_gradients():
  # At 32x32 the stem conv and layer1 stay on XLA under 'auto'; later stages (4x4 .. 1x1 maps) and every
  # 1x1 projection take the matmul path.
  models = {impl: tiny_resnet(layer_impl=impl) for impl in ("xla", "auto")}
  variables = _random_variables(models["xla"])

  def loss(params, model):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, IMAGES, train=True,
                            mutable=["batch_stats"])
    return (logits ** 2).mean()

  (loss_xla, grads_xla), (loss_auto, grads_auto) = [
      jax.jit(jax.value_and_grad(functools.partial(loss, model=model)))(variables["params"])
      for model in models.values()]
  np.testing.assert_allclose(loss_auto, loss_xla, rtol=1e-5)
  # Summation orders differ and train-mode BN amplifies float32 rounding: compare per-tensor norms.
  flat_auto = traverse_util.flatten_dict(grads_auto)
  for path, g_xla in traverse_util.flatten_dict(grads_xla).items():
    assert np.linalg.norm(flat_auto[path] - g_xla) <= 1e-4 * np.linalg.norm(g_xla), "/".join(path)


def test_bad_options_are_rejected_by_name():
  with pytest.raises(ValueError, match="stem"):
    _param_paths(tiny_resnet(stem="tiny"))
  with pytest.raises(ValueError, match="block_type"):
    _param_paths(tiny_resnet(block_type="wide"))
  with pytest.raises(ValueError, match="NHWC"):
    _param_paths(tiny_resnet(), jnp.zeros((32, 32, 3)))
