"""cvjax.models.layers: the fast Conv against nn.Conv, frozen BN, and pooling against PyTorch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.models import layers

RNG = np.random.default_rng(0)


def _random_like(tree):
  """Random float32 arrays of an (abstract) pytree's shapes: no jax random bits, nothing to compile."""
  return jax.tree_util.tree_map(lambda leaf: jnp.asarray(RNG.standard_normal(leaf.shape), jnp.float32), tree)


def _conv_outputs_and_gradients(x, features, kernel_size, **conv_kwargs):
  """Outputs and gradients (w.r.t. input and params) of nn.Conv and of cvjax's Conv impls, shared params."""
  # nn.Conv reads an int kernel_size as a 1-D convolution; ours as a square one.
  square = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
  modules = {"nn.Conv": nn.Conv(features, square, **conv_kwargs)}
  for impl in ("patches", "auto"):
    modules[impl] = layers.Conv(features, kernel_size, impl=impl, **conv_kwargs)
  params = _random_like(jax.eval_shape(modules["nn.Conv"].init, jax.random.PRNGKey(1), x))
  cotangent = _random_like(jax.eval_shape(modules["nn.Conv"].apply, params, x))

  @jax.jit  # one compilation for all three
  def run(p, inputs):
    results = {}
    for name, module in modules.items():
      y, vjp = jax.vjp(module.apply, p, inputs)
      results[name] = (y, vjp(cotangent))
    return results

  return run(params, x)


@pytest.mark.parametrize("kernel_size,strides,padding,dilation,hw", [
    (3, 1, 1, 1, (5, 5)),
    (3, 2, 1, 1, (6, 7)),
    (3, 2, "SAME", 1, (6, 6)),
    (3, 1, ((2, 0), (1, 2)), 1, (4, 4)),
    (3, 1, 2, 2, (5, 5)),
    (1, 2, 0, 1, (5, 5)),
    (1, 1, 0, 1, (3, 3)),
    (7, 2, 3, 1, (9, 9)),
    ((3, 1), (2, 1), ((1, 1), (0, 0)), 1, (4, 5)),
])
def test_conv_equals_nn_conv_including_gradients(kernel_size, strides, padding, dilation, hw):
  x = jnp.asarray(RNG.standard_normal((2, *hw, 5)), jnp.float32)
  results = _conv_outputs_and_gradients(x, 6, kernel_size, strides=strides, padding=padding,
                                        kernel_dilation=dilation)
  (y_ref, (dparams_ref, dx_ref)) = results.pop("nn.Conv")
  for impl, (y, (dparams, dx)) in results.items():
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5, err_msg=impl)
    for name in ("kernel", "bias"):
      np.testing.assert_allclose(dparams["params"][name], dparams_ref["params"][name], rtol=1e-5, atol=1e-5,
                                 err_msg=f"{impl} d{name}")


def test_conv_keeps_nn_conv_variable_layout_and_dtype_policy():
  x = jnp.ones((1, 4, 4, 3))
  ours = layers.Conv(8, 3, padding=1, dtype=jnp.bfloat16)
  variables = jax.eval_shape(ours.init, jax.random.PRNGKey(0), x)
  assert variables == jax.eval_shape(nn.Conv(8, (3, 3), padding=1).init, jax.random.PRNGKey(0), x)
  assert variables["params"]["kernel"].dtype == jnp.float32
  assert jax.eval_shape(ours.apply, variables, x).dtype == jnp.bfloat16


def test_auto_rule_uses_matmul_only_for_tiny_maps_and_pointwise_kernels():
  assert jax.default_backend() == "cpu"
  assert layers.conv_uses_patches((2, 2), (3, 3))
  assert layers.conv_uses_patches((56, 56), (1, 1))
  assert not layers.conv_uses_patches((32, 32), (3, 3))


def test_conv_rejects_bad_input():
  with pytest.raises(ValueError, match="impl"):
    layers.conv2d(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), impl="fast")
  with pytest.raises(ValueError, match=r"kernel \[KH, KW, C, Cout\]"):
    layers.conv2d(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 2)))
  with pytest.raises(ValueError, match="smaller than"):
    layers.conv2d(jnp.ones((1, 2, 2, 2)), jnp.ones((3, 3, 2, 2)), padding=0)


def test_frozen_batch_norm_matches_float64_formula_and_is_not_a_param():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 3, 3, 4)).astype(np.float32)
  stats = {"scale": rng.standard_normal(4), "bias": rng.standard_normal(4),
           "mean": rng.standard_normal(4), "var": rng.uniform(0.1, 2.0, 4)}
  module = layers.FrozenBatchNorm()
  variables = module.init(jax.random.PRNGKey(0), x)
  assert set(variables) == {"batch_stats"}
  variables = {"batch_stats": {k: jnp.asarray(v, jnp.float32) for k, v in stats.items()}}
  expected = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
  np.testing.assert_allclose(module.apply(variables, x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_hw,output_size", [((7, 7), 3), ((5, 9), 7), ((9, 6), 6), ((6, 6), 6), ((1, 1), 7)])
def test_adaptive_avg_pool_matches_torch(in_hw, output_size):
  x = np.random.default_rng(0).standard_normal((2, *in_hw, 3)).astype(np.float32)
  expected = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(x.transpose(0, 3, 1, 2)), output_size)
  np.testing.assert_allclose(layers.adaptive_avg_pool(jnp.asarray(x), output_size),
                             expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["xla", "patches"])
@pytest.mark.parametrize("window,stride,padding,hw", [(3, 2, 1, (7, 8)), (2, 2, 0, (5, 5)), (3, 2, 0, (7, 7))])
def test_max_pool_and_its_gradient_match_torch(window, stride, padding, hw, impl):
  # All-negative inputs: a zero-padded max-pool would be caught returning 0 at the borders. Values on a
  # coarse grid tie inside windows: the gradient must go to the first maximum, as in PyTorch.
  x = -np.random.default_rng(0).integers(1, 4, (2, *hw, 3)).astype(np.float32)
  x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2)).requires_grad_()
  y_torch = torch.nn.functional.max_pool2d(x_torch, window, stride, padding)
  cotangent = np.random.default_rng(1).standard_normal(y_torch.shape).astype(np.float32)
  y_torch.backward(torch.from_numpy(cotangent))

  pool = jax.jit(lambda inputs: layers.max_pool(inputs, window, stride, padding, impl=impl))
  y, vjp = jax.vjp(pool, jnp.asarray(x))
  np.testing.assert_array_equal(y, y_torch.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(vjp(jnp.asarray(cotangent.transpose(0, 2, 3, 1)))[0],
                             x_torch.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


def test_max_pool_propagates_nan():
  x = jnp.zeros((1, 4, 4, 1)).at[0, 1, 1, 0].set(jnp.nan)
  y = layers.max_pool(x, 2, 2, impl="patches")
  assert np.isnan(y[0, 0, 0, 0]) and not np.isnan(y[0, 1, 1, 0])
