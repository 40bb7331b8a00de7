"""The interface the train loop uses for every family, and the task registry."""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_collections

from cvjax.registry import Registry

TASKS = Registry("task")

# Metrics travel as {name: (sum, count)}: summed over the global batch on device, divided on the host.
Metrics = Dict[str, Tuple[jax.Array, jax.Array]]


class Task:
  """One family's objective. Subclasses register with ``@TASKS.register(name)``.

  ``num_classes``, ``class_names`` and ``category_ids`` (the dataset's own id of each contiguous label, e.g.
  COCO's, or None) describe the input pipeline's labels. ``ground_truth`` is None or a zero-argument callable
  returning the evaluation split's annotations as a COCO-format dict (datasets with an annotation file), which
  evaluators use instead of the targets in the batches. ``things`` (segmentation) lists the labels that are
  countable things; the other labels are stuff.
  """

  def __init__(self, config: ml_collections.ConfigDict, num_classes: int, class_names: Sequence[str],
               category_ids: Optional[Sequence[int]] = None,
               ground_truth: Optional[Callable[[], Dict[str, Any]]] = None, things: Sequence[int] = ()):
    self.config = config
    self.num_classes = num_classes
    self.class_names = list(class_names)
    self.category_ids = None if category_ids is None else list(category_ids)
    self.ground_truth = ground_truth
    self.things = tuple(int(t) for t in things)

  def model_inputs(self, batch: Dict[str, Any]) -> Tuple[tuple, dict]:
    """Positional and keyword arguments of ``model.apply`` (besides variables and ``train``)."""
    return (batch["image"],), {}

  def loss(self, outputs: Any, batch: Dict[str, jax.Array]) -> Tuple[jax.Array, Metrics]:
    """Scalar loss to minimise and metrics as (sum, count) pairs."""
    raise NotImplementedError

  def initial_state(self) -> Any:
    """The task's own state (a pytree of arrays, e.g. DINO's centre of the teacher outputs): part of the train
    state, checkpointed and restored with it, updated by ``stateful_loss``. Default: none (``{}``)."""
    return {}

  def stateful_loss(self, outputs: Any, batch: Dict[str, jax.Array], task_state: Any
                    ) -> Tuple[jax.Array, Metrics, Any]:
    """What the train step calls: ``(loss, metrics, new task_state)``. The loss is differentiated; the new
    state is not (it is taken as computed, without gradient), and a step with a non-finite loss keeps the old
    one. Default: ``loss`` with the state unchanged; a task with state overrides this."""
    loss, metrics = self.loss(outputs, batch)
    return loss, metrics, task_state

  def eval_outputs(self, outputs: Any, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
    """Per-example arrays (leading batch axis) the host evaluator needs; must include ``mask``."""
    raise NotImplementedError

  def evaluator(self):
    """A fresh host-side accumulator with ``update(np_outputs, inputs=host_batch)`` and
    ``result() -> (scalars, details)``; optionally ``write_files(directory, step) -> paths`` for artefacts
    (predictions, drawings) that process 0 writes to ``workdir/eval``."""
    raise NotImplementedError


def create_task(config: ml_collections.ConfigDict, num_classes: int, class_names: Sequence[str],
                category_ids: Optional[Sequence[int]] = None,
                ground_truth: Optional[Callable[[], Dict[str, Any]]] = None, things: Sequence[int] = ()) -> Task:
  """The task registered under ``config.task.name``, for a dataset with these labels (see ``Task``).

  Raises ``KeyError`` listing the registered names when the name is unknown.
  """
  from cvjax.tasks import (classification, detr, mae, maskformer, rcnn, retinanet,  # noqa: F401  (registers)
                           segmentation, yolact, yolo)
  return TASKS.get(config.task.name)(config, num_classes, class_names, category_ids, ground_truth, things)
