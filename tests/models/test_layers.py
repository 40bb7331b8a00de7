"""cvjax.models.layers: the fast conv / pool paths forced on (so on every backend) against lax and flax, what
'auto' picks per backend, frozen BN, and pooling against PyTorch."""

import functools

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


# (kernel_size, strides, padding, dilation, input hw, output hw). Output maps of at most
# PATCHES_MAX_OUTPUT_PIXELS (16, where 'auto' takes patches on CPU) and larger ones (where it does not, but a
# forced 'patches' must be just as right), 1x1 kernels on both sides of it.
CONV_CASES = {
    "3x3 out 2x2": (3, 1, 1, 1, (2, 2), (2, 2)),
    "3x3 out 4x4": (3, 1, 1, 1, (4, 4), (4, 4)),
    "3x3 out 9x7": (3, 1, 1, 1, (9, 7), (9, 7)),
    "3x3 stride 2 out 3x4": (3, 2, 1, 1, (6, 7), (3, 4)),
    "3x3 stride 2 SAME out 6x6": (3, 2, "SAME", 1, (11, 11), (6, 6)),
    "3x3 VALID out 3x4": (3, 1, "VALID", 1, (5, 6), (3, 4)),
    "3x3 asymmetric pads out 4x5": (3, 1, ((2, 0), (1, 2)), 1, (4, 4), (4, 5)),
    "3x3 dilation 2 out 3x3": (3, 2, 2, 2, (6, 6), (3, 3)),
    "3x3 dilation 2 out 5x5": (3, 1, 2, 2, (5, 5), (5, 5)),
    "3x3 dilation 2 SAME out 6x6": (3, 1, "SAME", 2, (6, 6), (6, 6)),
    "1x1 stride 2 out 3x3": (1, 2, 0, 1, (5, 5), (3, 3)),
    "1x1 out 8x8": (1, 1, 0, 1, (8, 8), (8, 8)),
    "1x1 stride 2 out 6x6": (1, 2, 0, 1, (12, 11), (6, 6)),
    "7x7 stride 2 out 5x5": (7, 2, 3, 1, (9, 9), (5, 5)),
    "3x1 stride (2, 1) out 2x5": ((3, 1), (2, 1), ((1, 1), (0, 0)), 1, (4, 5), (2, 5)),
}


def _pair(value):
  """An int or (h, w) argument (kernel size, stride, dilation) as (h, w)."""
  return (value, value) if isinstance(value, int) else tuple(value)


def test_conv_cases_cover_tiny_and_large_outputs_of_spatial_and_1x1_kernels():
  tiny = {(_pair(k) == (1, 1), out[0] * out[1] <= layers.PATCHES_MAX_OUTPUT_PIXELS)
          for k, _, _, _, _, out in CONV_CASES.values()}
  assert tiny == {(False, True), (False, False), (True, True), (True, False)}


def _lax_conv(x, kernel, strides, padding, dilation):
  """The reference: lax.conv_general_dilated with conv2d's arguments in lax's spelling."""
  if isinstance(padding, int):
    padding = ((padding, padding), (padding, padding))
  return jax.lax.conv_general_dilated(x, kernel, _pair(strides), padding, rhs_dilation=_pair(dilation),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_patches_equals_lax_conv_including_gradients(case):
  kernel_size, strides, padding, dilation, hw, out_hw = CONV_CASES[case]
  x = jnp.asarray(RNG.standard_normal((2, *hw, 5)), jnp.float32)
  kernel = jnp.asarray(RNG.standard_normal((*_pair(kernel_size), 5, 6)), jnp.float32)
  cotangent = jnp.asarray(RNG.standard_normal((2, *out_hw, 6)), jnp.float32)
  args = dict(strides=strides, padding=padding, dilation=dilation)
  functions = {"lax": functools.partial(_lax_conv, **args),
               "patches": functools.partial(layers.conv2d, impl="patches", **args),
               "xla": functools.partial(layers.conv2d, impl="xla", **args),
               "xla_gemm_grad": functools.partial(layers.conv2d, impl="xla_gemm_grad", **args)}
  # Forced 'patches' is im2col + matmul on every backend, forward and backward: no convolution primitive.
  def vjp_jaxpr(impl):
    return str(jax.make_jaxpr(lambda a, b: jax.vjp(functions[impl], a, b)[1](cotangent))(x, kernel))
  patches_jaxpr = vjp_jaxpr("patches")
  assert "conv_general_dilated" not in patches_jaxpr and "dot_general" in patches_jaxpr
  # 'xla_gemm_grad': XLA's convolution forward and for d input, matmuls for d kernel (one per window element).
  gemm_jaxpr = vjp_jaxpr("xla_gemm_grad")
  assert gemm_jaxpr.count("dot_general") == np.prod(_pair(kernel_size)), gemm_jaxpr

  @jax.jit  # one compilation for all three
  def run(inputs, weights):
    results = {}
    for name, fn in functions.items():
      y, vjp = jax.vjp(fn, inputs, weights)
      results[name] = (y, *vjp(cotangent))
    return results

  with jax.default_matmul_precision("highest"):  # GPUs would otherwise run either side in TF32
    results = run(x, kernel)
  y_ref, dx_ref, dkernel_ref = results.pop("lax")
  assert y_ref.shape == (2, *out_hw, 6)
  for impl, (y, dx, dkernel) in results.items():
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5, err_msg=impl)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} dx")
    np.testing.assert_allclose(dkernel, dkernel_ref, rtol=1e-5, atol=1e-5, err_msg=f"{impl} dkernel")


@pytest.mark.parametrize("case", ["3x3 out 4x4", "3x3 stride 2 SAME out 6x6", "1x1 out 8x8",
                                  "3x1 stride (2, 1) out 2x5"])
def test_conv_module_equals_nn_conv_including_gradients(case):
  """``Conv`` with each forced impl against ``nn.Conv`` with shared params: output, d input, d kernel, d bias."""
  kernel_size, strides, padding, dilation, hw, _ = CONV_CASES[case]
  x = jnp.asarray(RNG.standard_normal((2, *hw, 5)), jnp.float32)
  kwargs = dict(strides=strides, padding=padding, kernel_dilation=dilation)
  # nn.Conv reads an int kernel_size as a 1-D convolution; ours as a square one.
  modules = {"nn.Conv": nn.Conv(6, _pair(kernel_size), **kwargs)}
  for impl in ("patches", "xla", "xla_gemm_grad"):
    modules[impl] = layers.Conv(6, kernel_size, impl=impl, **kwargs)
  params = _random_like(jax.eval_shape(modules["nn.Conv"].init, jax.random.PRNGKey(1), x))
  cotangent = _random_like(jax.eval_shape(modules["nn.Conv"].apply, params, x))

  @jax.jit
  def run(p, inputs):
    results = {}
    for name, module in modules.items():
      y, vjp = jax.vjp(module.apply, p, inputs)
      results[name] = (y, vjp(cotangent))
    return results

  with jax.default_matmul_precision("highest"):
    results = run(params, x)
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


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_auto_takes_patches_only_on_cpu_for_tiny_maps_and_1x1_kernels(backend, monkeypatch):
  """What 'auto' picks, whatever backend the suite runs on: the rule, and conv2d / Conv / max_pool following it."""
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  on_cpu = backend == "cpu"
  assert layers.conv_uses_patches((2, 2), (3, 3)) == on_cpu
  assert layers.conv_uses_patches((4, 4), (3, 3)) == on_cpu  # exactly PATCHES_MAX_OUTPUT_PIXELS
  assert layers.conv_uses_patches((56, 56), (1, 1)) == on_cpu
  assert not layers.conv_uses_patches((4, 5), (3, 3))
  assert not layers.conv_uses_patches((32, 32), (3, 3))
  for case, (kernel_size, strides, padding, dilation, hw, out_hw) in CONV_CASES.items():
    x, kernel = jnp.zeros((1, *hw, 2)), jnp.zeros((*_pair(kernel_size), 2, 3))
    jaxpr = str(jax.make_jaxpr(functools.partial(layers.conv2d, strides=strides, padding=padding,
                                                 dilation=dilation))(x, kernel))
    expected = on_cpu and (_pair(kernel_size) == (1, 1)
                           or out_hw[0] * out_hw[1] <= layers.PATCHES_MAX_OUTPUT_PIXELS)
    assert layers.conv_uses_patches(out_hw, _pair(kernel_size)) == expected, case
    assert ("conv_general_dilated" not in jaxpr) == expected, case
  # Convolutions left to XLA take the GEMM kernel gradient on CPU only, and only when large enough.
  assert layers.conv_uses_gemm_kernel_grad(256 * 14 * 14, (3, 3, 256, 256)) == on_cpu  # mask head
  assert layers.conv_uses_gemm_kernel_grad(2 * 256 * 256, (7, 7, 3, 64)) == on_cpu  # stem at 512^2
  assert not layers.conv_uses_gemm_kernel_grad(32 * 64 * 64, (3, 3, 16, 16))  # 16 outputs
  assert not layers.conv_uses_gemm_kernel_grad(8 * 32 * 32, (3, 3, 32, 32))  # 2^26 multiply-adds
  x, kernel = jnp.zeros((256, 14, 14, 256)), jnp.zeros((3, 3, 256, 256))
  grad_jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: layers.conv2d(x, k, padding=1).sum()))(kernel))
  assert (grad_jaxpr.count("dot_general") == 9) == on_cpu
  module = layers.Conv(3, 3, padding=1)  # impl='auto' is the default
  x = jnp.zeros((1, 2, 2, 2))
  jaxpr = str(jax.make_jaxpr(module.apply)(jax.eval_shape(module.init, jax.random.PRNGKey(0), x), x))
  assert ("conv_general_dilated" not in jaxpr) == on_cpu
  x = jnp.zeros((1, 8, 8, 2))
  pool_jaxpr = str(jax.make_jaxpr(jax.grad(lambda v: layers.max_pool(v, 3, 2, 1).sum()))(x))
  assert ("reduce_window_max" not in pool_jaxpr and "select_and_scatter" not in pool_jaxpr) == on_cpu


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


# (window, stride, padding, input hw): outputs of 4x4, 2x2, 3x3, then larger ones (8x8, 6x5, 9x9).
POOL_CASES = [(3, 2, 1, (7, 8)), (2, 2, 0, (5, 5)), (3, 2, 0, (7, 7)), (3, 2, 1, (16, 16)), (2, 2, 0, (12, 11)),
              (3, 1, 1, (9, 9))]


@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES)
def test_max_pool_patches_equals_nn_max_pool_including_gradient(window, stride, padding, hw):
  # Continuous values (no ties, so any correct gradient routing agrees) of both signs: -inf padding matters.
  x = jnp.asarray(RNG.standard_normal((2, *hw, 3)), jnp.float32)
  pads = ((padding, padding), (padding, padding))
  reference = lambda v: nn.max_pool(v, (window, window), (stride, stride), pads)
  patches = lambda v: layers.max_pool(v, window, stride, padding, impl="patches")
  cotangent = _random_like(jax.eval_shape(reference, x))
  assert "reduce_window" not in str(jax.make_jaxpr(lambda v: jax.vjp(patches, v)[1](cotangent))(x))

  @jax.jit
  def run(inputs):
    return [(y, *vjp(cotangent)) for y, vjp in (jax.vjp(fn, inputs) for fn in (reference, patches))]

  (y_ref, dx_ref), (y, dx) = run(x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)


@pytest.mark.parametrize("impl", ["xla", "patches"])
@pytest.mark.parametrize("window,stride,padding,hw", POOL_CASES[:4])
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


# ---- transposed convolution ---------------------------------------------------------------------------------

@pytest.mark.parametrize("stride, kernel_hw", [(2, (4, 4)), (3, (5, 2)), (1, (3, 3)), (2, (2, 2)), (4, (4, 4))])
def test_conv_transpose2d_is_pytorchs(stride, kernel_hw):
  """Overlapping taps (the dilated-convolution path) and kernel == stride (the matmul + depth-to-space path)."""
  x = RNG.standard_normal((2, 3, 5, 4), dtype=np.float32)  # NCHW
  weight = RNG.standard_normal((3, 6, *kernel_hw), dtype=np.float32)  # PyTorch's [Cin, Cout, KH, KW]
  expected = torch.nn.functional.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(weight), stride=stride)
  ours = layers.conv_transpose2d(jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(weight.transpose(2, 3, 0, 1)),
                                 stride)
  np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


def test_conv_transpose_module_is_pytorchs_with_bias_and_gradients():
  reference = torch.nn.ConvTranspose2d(4, 3, 2, stride=2)
  with torch.no_grad():
    reference.bias.normal_()
  x = torch.from_numpy(RNG.standard_normal((2, 4, 3, 5), dtype=np.float32)).requires_grad_()
  expected = reference(x)
  (expected ** 2).sum().backward()
  module = layers.ConvTranspose(3, 2, 2)
  variables = {"params": {"kernel": jnp.asarray(reference.weight.detach().numpy().transpose(2, 3, 0, 1)),
                          "bias": jnp.asarray(reference.bias.detach().numpy())}}
  xj = jnp.asarray(x.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(module.apply(variables, xj), expected.detach().numpy().transpose(0, 2, 3, 1),
                             rtol=1e-5, atol=1e-5)
  grads = jax.grad(lambda v, x: (module.apply(v, x) ** 2).sum(), argnums=(0, 1))(variables, xj)
  np.testing.assert_allclose(grads[1], x.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(grads[0]["params"]["kernel"], reference.weight.grad.numpy().transpose(2, 3, 0, 1),
                             rtol=1e-4, atol=1e-4)
