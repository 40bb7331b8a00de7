"""Task-owned state in the train state: updated by the step, checkpointed, restored exactly on resume."""

import os

import jax
import numpy as np
import orbax.checkpoint as ocp

import launch
import stats_task


def _config(load_config, data_dir, total_steps):
  return load_config("configs/resnet.py", "tiny", data_dir=data_dir, total_steps=total_steps, checkpoint_every=3,
                     **{"task.name": stats_task.NAME, "optimizer.schedule": "step",
                        "optimizer.boundaries": (4,)})


def _task_state(workdir, step):
  return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(workdir), "checkpoints", str(step),
                                                         "state"))["task_state"]


def test_task_state_is_updated_checkpointed_and_resumed_exactly(load_config, data_dir, tmp_path):
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  launch.run(_config(load_config, data_dir, 6), straight, "train")
  launch.run(_config(load_config, data_dir, 3), resumed, "train")
  assert float(_task_state(resumed, 3)["examples"]) == 3 * 8
  launch.run(_config(load_config, data_dir, 6), resumed, "train")
  a, b = _task_state(straight, 6), _task_state(resumed, 6)
  assert float(a["examples"]) == 6 * 8 and np.abs(a["centre"]).max() > 0
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-6), a, b)
