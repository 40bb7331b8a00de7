"""Objectives: each task turns model outputs and a batch into a loss, eval outputs and an evaluator.

``create_task(config, num_classes, class_names, category_ids)`` looks the task up by ``config.task.name``.
"""

from cvjax.tasks.base import TASKS, Task, create_task  # noqa: F401
