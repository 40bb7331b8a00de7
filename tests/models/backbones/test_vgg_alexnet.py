"""VGG and AlexNet: small-input heads, dropout in training only, input checks. (Values vs PyTorch: convert/.)"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.models import create_model


def _variables_and_logits(model, images, **apply_kwargs):
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(0, impl="rbg"), images)
  return variables, jax.jit(functools.partial(model.apply, **apply_kwargs))(variables, images)


@pytest.mark.parametrize("name,side,kwargs,first_linear,first_linear_shape", [
    # small_input: global pool, dropout, one Linear from the last conv width (512 * 4 / 64 = 32).
    ("vgg11_bn", 32, {"small_input": True}, "classifier", (32, 5)),
    ("vgg13", 32, {"pool_size": 2, "classifier_width": 16}, "classifier_0", (2 * 2 * 32, 16)),
    ("alexnet", 64, {"classifier_width": 16}, "classifier_1", (6 * 6 * 256 * 4 // 64, 16)),
])
def test_tiny_models_with_dropout_in_training_only(name, side, kwargs, first_linear, first_linear_shape):
  model = create_model(name, width=4, num_classes=5, **kwargs)
  images = jnp.asarray(np.random.default_rng(0).standard_normal((2, side, side, 3), dtype=np.float32))
  variables, eval_logits = _variables_and_logits(model, images, train=False)
  assert eval_logits.shape == (2, 5) and eval_logits.dtype == jnp.float32
  # The first Linear reads pool_size**2 positions of the last conv's channels.
  assert variables["params"][first_linear]["kernel"].shape == first_linear_shape

  def train_logits(seed):
    logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"],
                            rngs={"dropout": jax.random.key(seed, impl="rbg")})
    return logits

  train_a, train_b = jax.jit(jax.vmap(train_logits))(jnp.arange(2))
  assert not np.allclose(train_a, train_b)  # dropout masks differ with the rng
  assert np.isfinite(train_a).all()


@pytest.mark.parametrize("name,side", [("vgg11", 16), ("alexnet", 62)])
def test_too_small_inputs_are_rejected_with_the_minimum(name, side):
  model = create_model(name, width=4, classifier_width=8)
  with pytest.raises(ValueError, match=r">= (32|63)"):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0, impl="rbg"),
                   jnp.zeros((1, side, side, 3)))
