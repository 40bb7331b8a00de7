"""A test-only task with state: classification that also counts the examples it has seen and keeps a
momentum-0.9 mean of the logits (a DINO-like centre), so its state depends on every step's outputs in order.

Imported by tests in-process, and run as ``python tests/helpers/stats_task.py LAUNCH_ARGS...`` (the launcher
with this task registered) by tests that need a fresh process.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax.numpy as jnp  # noqa: E402

from cvjax.tasks.base import TASKS  # noqa: E402
from cvjax.tasks.classification import ClassificationTask  # noqa: E402

NAME = "test_classification_with_running_stats"


@TASKS.register(NAME)
class RunningStatsTask(ClassificationTask):
  """``task_state = {'examples': [], 'centre': [K]}``."""

  def initial_state(self):
    return {"examples": jnp.zeros((), jnp.float32), "centre": jnp.zeros((self.num_classes,), jnp.float32)}

  def stateful_loss(self, outputs, batch, task_state):
    loss, metrics = self.loss(outputs, batch)
    mask = batch["mask"].astype(jnp.float32)
    batch_mean = jnp.sum(outputs * mask[:, None], axis=0) / jnp.maximum(mask.sum(), 1.0)
    centre = 0.9 * task_state["centre"] + 0.1 * batch_mean
    examples = task_state["examples"] + mask.sum()
    # Logged too, so that runs in other processes (other device counts) can be compared through metrics.jsonl.
    one = jnp.ones((), jnp.float32)
    metrics = dict(metrics, examples_seen=(examples, one), centre_norm=(jnp.linalg.norm(centre), one))
    return loss, metrics, {"examples": examples, "centre": centre}


if __name__ == "__main__":
  from absl import app  # pylint: disable=import-outside-toplevel

  import launch  # pylint: disable=import-outside-toplevel

  app.run(launch.main, argv=[launch.__file__, *sys.argv[1:]])
