"""Optimiser construction: schedules, per-group learning-rate multipliers, freezing, clipping."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cvjax.train.config import base_config
from cvjax.train.optim import (create_optimizer, create_schedule, drop_frozen_gradients, frozen_mask,
                               parameter_labels)


def _opt(**kw):
  c = base_config().optimizer
  for k, v in kw.items():
    c[k] = v
  return c


def test_warmup_then_cosine_reaches_peak_and_floor():
  s = create_schedule(_opt(learning_rate=0.4, warmup_steps=10, schedule="cosine", end_lr_fraction=0.1), 110)
  np.testing.assert_allclose([s(0), s(5), s(10), s(110)], [0.0, 0.2, 0.4, 0.04], rtol=1e-6, atol=1e-7)
  assert s(60) < 0.4


def test_step_schedule_decays_at_boundaries_after_warmup():
  s = create_schedule(_opt(learning_rate=1.0, warmup_steps=4, schedule="step", boundaries=(10, 20),
                           decay_factor=0.1), 30)
  np.testing.assert_allclose([s(2), s(9), s(10), s(19), s(20), s(29)], [0.5, 1, 0.1, 0.1, 0.01, 0.01],
                             rtol=1e-6)


def test_poly_schedule_is_deeplabs_after_warmup():
  s = create_schedule(_opt(learning_rate=1e-4, warmup_steps=10, schedule="poly"), 110)
  for t in (10, 35, 60, 109):
    np.testing.assert_allclose(s(t), 1e-4 * (1 - (t - 10) / 100) ** 0.9, rtol=1e-5)
  np.testing.assert_allclose([s(5), s(110)], [5e-5, 0.0], atol=1e-12)


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match="schedule"):
    create_schedule(_opt(schedule="linear"), 10)
  with pytest.raises(ValueError, match="optimizer.name"):
    create_optimizer(_opt(name="lamb"), 10)


def _params():
  return {"backbone": {"conv": {"kernel": jnp.ones((3,))}}, "head": {"kernel": jnp.ones((3,)),
                                                                     "bias": jnp.ones((2,))}}


def test_labels_first_match_wins_and_freeze_has_priority():
  labels = parameter_labels(_params(), [("backbone/.*", 0.1), (".*kernel", 2.0)], ["head/bias"])
  assert labels == {"backbone": {"conv": {"kernel": "backbone/.*"}},
                    "head": {"kernel": ".*kernel", "bias": "frozen"}}


def test_multiplier_scales_the_update_and_frozen_params_stay():
  opt = _opt(name="sgd", learning_rate=1.0, schedule="constant", lr_multipliers=(("backbone/.*", 0.1),),
             freeze=("head/bias",))
  tx, _ = create_optimizer(opt, 10)
  params = _params()
  grads = jax.tree.map(jnp.ones_like, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_allclose(updates["backbone"]["conv"]["kernel"], -0.1)
  np.testing.assert_allclose(updates["head"]["kernel"], -1.0)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)


def test_frozen_gradients_do_not_count_in_the_clipping_norm_nor_decay():
  # As the train step does: frozen gradients are dropped, then the optimizer runs. The trainable part's
  # gradient norm is 2 (four ones); the frozen part would add a huge norm, and weight decay would move it.
  opt = _opt(name="sgd", learning_rate=1.0, schedule="constant", grad_clip_norm=1.0, weight_decay=0.5,
             freeze=("frozen/.*",))
  tx, _ = create_optimizer(opt, 10)
  params = {"frozen": {"w": jnp.ones((4,))}, "train": {"w": jnp.ones((4,))}}
  grads = {"frozen": {"w": jnp.full((4,), 1e6)}, "train": {"w": jnp.ones((4,))}}
  frozen = frozen_mask(opt, params)
  assert frozen == {"frozen": {"w": True}, "train": {"w": False}}
  dropped = drop_frozen_gradients(grads, frozen)
  assert float(optax.global_norm(dropped)) == pytest.approx(2.0)
  updates, _ = tx.update(dropped, tx.init(params), params)
  # Clipped to norm 1: each trainable gradient 0.5, plus the L2 term wd * p = 0.5 (frozen grads counted in the
  # norm would have shrunk the 0.5 to ~1e-6).
  np.testing.assert_allclose(updates["train"]["w"], -1.0, rtol=1e-5)
  np.testing.assert_allclose(updates["frozen"]["w"], 0.0)


def test_sgd_weight_decay_matches_torch_semantics():
  # torch.optim.SGD(momentum=0.9, weight_decay=wd): buf = g + wd * p; p -= lr * buf (first step).
  opt = _opt(name="momentum", learning_rate=0.5, schedule="constant", weight_decay=0.1, momentum=0.9)
  tx, _ = create_optimizer(opt, 10)
  p = {"w": jnp.array([2.0, -1.0])}
  g = {"w": jnp.array([0.3, 0.4])}
  state = tx.init(p)
  u1, state = tx.update(g, state, p)
  p1 = optax.apply_updates(p, u1)
  buf1 = g["w"] + 0.1 * p["w"]
  np.testing.assert_allclose(p1["w"], p["w"] - 0.5 * buf1, rtol=1e-6)
  u2, _ = tx.update(g, state, p1)
  buf2 = 0.9 * buf1 + g["w"] + 0.1 * p1["w"]
  np.testing.assert_allclose(optax.apply_updates(p1, u2)["w"], p1["w"] - 0.5 * buf2, rtol=1e-6)


def test_bad_regex_names_itself():
  with pytest.raises(Exception, match=r"\(unclosed"):
    create_optimizer(_opt(lr_multipliers=(("(unclosed", 0.1),)), 10)
