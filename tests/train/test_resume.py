"""Checkpoints: exact resume, a kill during a save, a non-finite loss."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import launch
from cvjax.train.trainer import NonFiniteLossError


def _params(workdir, step):
  restored = ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir), "checkpoints",
                                                             str(step), "state"))
  return restored["params"], restored["batch_stats"]


def _resume_config(load_config, data_dir, total_steps):
  # A step schedule does not depend on total_steps, so the 3-step run is a prefix of the 6-step run;
  # its decay at step 4 falls after the restart. Dropout, augmentation and shuffling all matter here.
  return load_config("configs/resnet.py", "tiny", data_dir=data_dir, total_steps=total_steps,
                     checkpoint_every=3, log_every=1, **{"optimizer.schedule": "step",
                                                         "optimizer.boundaries": (4,)})


def test_resume_is_exact(load_config, data_dir, tmp_path, capsys):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  launch.run(_resume_config(load_config, data_dir, 6), straight, "train")
  launch.run(_resume_config(load_config, data_dir, 3), resumed, "train")
  capsys.readouterr()
  launch.run(_resume_config(load_config, data_dir, 6), resumed, "train")
  assert "resuming from step 3" in capsys.readouterr().out
  a, b = _params(straight, 6), _params(resumed, 6)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
  # The resumed run continued, it did not restart: its log has steps 4..6 after 1..3.
  with open(os.path.join(resumed, "metrics.jsonl")) as f:
    steps = [json.loads(l)["step"] for l in f if "train/loss" in l]
  assert steps == [1, 2, 3, 4, 5, 6]


def test_kill_during_save_keeps_previous_checkpoint(launch_cli, load_config, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  args = ["--config=configs/resnet.py:tiny", f"--workdir={workdir}", f"--config.data_dir={data_dir}",
          "--config.total_steps=6", "--config.checkpoint_every=2"]
  killed = launch_cli(["4", *args], program="tests/helpers/kill_during_save.py")
  assert killed.returncode == -9, killed.stdout + killed.stderr
  # The half-written step 4 is not a checkpoint; step 2 is, and restores.
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  assert manager.latest_step() == 2
  params, _ = _params(workdir, 2)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  resumed = launch_cli(args)
  assert resumed.returncode == 0, resumed.stdout + resumed.stderr
  assert "resuming from step 2" in resumed.stdout
  assert ocp.CheckpointManager(os.path.join(workdir, "checkpoints")).latest_step() == 6


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(load_config, data_dir, tmp_path):
  workdir = str(tmp_path / "run")
  good = load_config("configs/resnet.py", "tiny", data_dir=data_dir, total_steps=2, checkpoint_every=2)
  launch.run(good, workdir, "train")
  exploding = load_config("configs/resnet.py", "tiny", data_dir=data_dir, total_steps=8, checkpoint_every=2,
                          **{"optimizer.learning_rate": 1e30, "optimizer.schedule": "constant"})
  with pytest.raises(NonFiniteLossError, match=r"NaN/Inf at step \d+.*last good checkpoint is step \d+"):
    launch.run(exploding, workdir, "train")
  manager = ocp.CheckpointManager(os.path.join(workdir, "checkpoints"))
  last = manager.latest_step()
  params, _ = _params(workdir, last)
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
