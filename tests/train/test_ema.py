"""The EMA of the weights in the train state: its update and schedule, checkpoints, exact resume, evaluation."""

import math
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launch
from cvjax.train import ema as ema_lib
from cvjax.train.trainer import Experiment


def _ema_config(load_config, data_dir, total_steps, **overrides):
  # As tests/train/test_resume.py: a step schedule, so the 3-step run is a prefix of the 6-step one.
  return load_config("configs/resnet.py", "tiny", data_dir=data_dir, total_steps=total_steps, log_every=1,
                     **{"optimizer.schedule": "step", "optimizer.boundaries": (4,), "ema.momentum": 0.5,
                        "ema.schedule": "cosine", "ema.end_momentum": 0.9, "ema.evaluate": True, **overrides})


def _saved(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                                                         "state"))


def _close(a, b, atol=1e-6):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=atol), a, b)


def test_cosine_schedule_is_dinos_and_constant_is_constant(load_config):
  config = load_config("configs/resnet.py", "tiny", total_steps=10, **{"ema.momentum": 0.996,
                                                                         "ema.schedule": "cosine"})
  schedule = ema_lib.momentum_schedule(config)
  # DINO's cosine_scheduler(0.996, 1, ...): final + 0.5 * (base - final) * (1 + cos(pi * i / n)).
  for step in (0, 3, 5, 10):
    expected = 1 + 0.5 * (0.996 - 1) * (1 + math.cos(math.pi * step / 10))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=0, atol=1e-7)
  with config.unlocked():
    config.ema.schedule = "constant"
  assert float(ema_lib.momentum_schedule(config)(7)) == pytest.approx(0.996)


@pytest.mark.parametrize("key,value,message", [("ema.momentum", 1.0, "momentum"), ("ema.schedule", "linear", "schedule"),
                                               ("ema.end_momentum", 0.1, "end_momentum")])
def test_bad_ema_settings_name_the_key(load_config, key, value, message):
  config = load_config("configs/resnet.py", "tiny", **{"ema.momentum": 0.5, "ema.schedule": "cosine", key: value})
  with pytest.raises(ValueError, match=message):
    ema_lib.enabled(config)


def test_evaluating_the_ema_needs_one(load_config, data_dir, tmp_path):
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir, **{"ema.evaluate": True})
  with pytest.raises(ValueError, match="ema.momentum"):
    Experiment(config, str(tmp_path / "run"))


def test_ema_follows_the_weights_resumes_exactly_and_is_what_is_evaluated(load_config, data_dir, tmp_path,
                                                                          capsys):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  launch.run(_ema_config(load_config, data_dir, 6, checkpoint_every=1, keep_checkpoints=6), straight, "train")
  # Each step's EMA is the scheduled mix of the previous EMA and that step's weights (params and BN stats).
  config = _ema_config(load_config, data_dir, 6)
  momentum = ema_lib.momentum_schedule(config)
  previous = _saved(straight, 1)
  assert float(np.abs(jax.tree.leaves(previous["ema"]["params"])[0]
                      - jax.tree.leaves(previous["params"])[0]).max()) > 0  # not just a copy of the weights
  for step in range(2, 7):
    saved = _saved(straight, step)
    m = float(momentum(step - 1))
    weights = {"params": saved["params"], "batch_stats": saved["batch_stats"]}
    _close(saved["ema"], jax.tree.map(lambda e, w: m * e + (1 - m) * w, previous["ema"], weights))
    previous = saved

  # Exact resume: 3 steps, restart, 3 more give a straight run's weights and EMA. (A constant momentum: the
  # cosine one depends on total_steps, which differs between the 3-step prefix and the 6-step run here.)
  constant = {"ema.schedule": "constant", "checkpoint_every": 3}
  launch.run(_ema_config(load_config, data_dir, 6, **constant), str(tmp_path / "constant"), "train")
  launch.run(_ema_config(load_config, data_dir, 3, **constant), resumed, "train")
  capsys.readouterr()
  launch.run(_ema_config(load_config, data_dir, 6, **constant), resumed, "train")
  assert "resuming from step 3" in capsys.readouterr().out
  a, b = _saved(str(tmp_path / "constant"), 6), _saved(resumed, 6)
  _close({"params": a["params"], "ema": a["ema"]}, {"params": b["params"], "ema": b["ema"]})

  # ema.evaluate: the evaluation is that of the EMA weights, not of the trained ones.
  exp = Experiment(config, straight, train=False)
  state, _ = exp.restore(6)
  with_ema, _ = exp.evaluate(state)
  with config.unlocked():
    config.ema.evaluate = False
  plain_exp = Experiment(config, straight, train=False)
  as_weights, _ = plain_exp.evaluate(state.replace(params=state.ema["params"], batch_stats=state.ema["batch_stats"]))
  trained, _ = plain_exp.evaluate(state)
  assert with_ema["loss"] == pytest.approx(as_weights["loss"], abs=1e-6)
  assert abs(with_ema["loss"] - trained["loss"]) > 1e-4


def test_checkpoints_from_before_the_ema_field_restore_and_an_ema_run_refuses_them(load_config, data_dir, tmp_path):
  # A checkpoint as the train state was saved before it had `ema` and `task_state`.
  workdir = str(tmp_path / "old")
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir)
  exp = Experiment(config, workdir, train=False)
  state, _ = exp.initial_state()
  old = {k: getattr(state, k) for k in ("step", "params", "batch_stats", "opt_state", "rng", "nonfinite_step")}
  exp.checkpointer.save(1, old, {})
  exp.checkpointer.wait()
  restored, _ = Experiment(config, workdir, train=False).restore(1)
  assert restored.ema == {} and restored.task_state == {}
  _close(restored.params, state.params, atol=0)
  with_ema = load_config("configs/resnet.py", "tiny", data_dir=data_dir, **{"ema.momentum": 0.5})
  with pytest.raises(ValueError, match="has no \\['ema'\\]"):
    Experiment(with_ema, workdir, train=False).restore(1)
