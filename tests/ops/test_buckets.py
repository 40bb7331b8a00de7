"""map_valid_rows: the function on the valid rows only, at a bucketed static size, equals running it on every
row and zeroing the rest -- values and gradients, for every count of valid rows, under jit."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.ops.buckets import bucket_sizes, map_valid_rows


def test_bucket_sizes_are_halvings_of_the_row_count():
  assert bucket_sizes(256, 4) == (32, 64, 128, 256)
  assert bucket_sizes(10, 3) == (3, 5, 10)
  assert bucket_sizes(3, 5) == (1, 2, 3)
  assert bucket_sizes(7, 1) == (7,)
  with pytest.raises(ValueError, match="num_buckets"):
    bucket_sizes(8, 0)


def _fn(weight, x, label):
  """A per-row nonlinear function of two arguments, returning a pytree."""
  hidden = jnp.tanh(x @ weight)
  return {"out": hidden * (label[:, None] + 1.0), "sum": hidden.sum(-1)}


@pytest.fixture(scope="module")
def compiled():
  def run(weight, x, label, valid, buckets):
    def loss(w):
      out = map_valid_rows(lambda a, b: _fn(w, a, b), [x, label], valid, buckets)
      return (out["out"] ** 2).sum() + out["sum"].sum(), out
    return jax.value_and_grad(loss, has_aux=True)(weight)
  return jax.jit(run, static_argnums=4)


@pytest.mark.parametrize("count", [0, 1, 3, 4, 5, 9, 10])
def test_equals_all_rows_with_the_invalid_ones_zeroed(compiled, count):
  rng = np.random.default_rng(count)
  weight = jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
  x = jnp.asarray(rng.normal(size=(10, 6)), jnp.float32)
  label = jnp.asarray(rng.integers(0, 3, 10), jnp.float32)
  valid = np.zeros(10, bool)
  valid[rng.permutation(10)[:count]] = True  # scattered, not a prefix
  (loss, out), grad = compiled(weight, x, label, jnp.asarray(valid), 3)
  (ref_loss, ref_out), ref_grad = compiled(weight, x, label, jnp.asarray(valid), 1)
  expected = _fn(weight, x, label)
  np.testing.assert_allclose(out["out"], np.where(valid[:, None], expected["out"], 0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(out["sum"], np.where(valid, expected["sum"], 0), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-5, atol=1e-6)
  assert count == 0 or np.abs(grad).max() > 0


def test_only_the_chosen_bucket_runs():
  """The function sees the bucket's static size: the smallest of the halvings holding the valid rows."""
  seen = []

  def fn(x):
    seen.append(x.shape[0])  # trace time: one entry per compiled size
    return jax.pure_callback(lambda v: np.full(v.shape[:1], v.shape[0], np.int32),
                             jax.ShapeDtypeStruct(x.shape[:1], jnp.int32), x)

  valid = jnp.arange(16) % 5 == 0  # 4 valid rows -> bucket 4
  out = jax.jit(lambda x, v: map_valid_rows(fn, [x], v, 3))(jnp.ones((16, 2)), valid)
  assert sorted(seen) == [4, 8, 16]
  assert set(np.asarray(out)[np.asarray(valid)]) == {4} and (np.asarray(out)[~np.asarray(valid)] == 0).all()


def test_bad_shapes_are_named():
  with pytest.raises(ValueError, match="valid must be"):
    map_valid_rows(lambda x: x, [jnp.ones((4, 2))], jnp.ones(3, bool), 2)
