"""The one train loop, for every family. Read it top to bottom.

init: ``jax.eval_shape`` of the init function gives the state's structure; shardings are derived from it; the
init is jitted with those ``out_shardings`` so parameters are created where they live. Then either the
latest checkpoint in the workdir is restored onto the same shardings ("resuming from step N") or the state is
initialised. Each step assembles the global batch from this process's slice, runs the jitted train step
(which donates the state) and accumulates (sum, count) metrics on device; the host only looks at them every
``log_every`` steps, so the loop never waits on the device between logs.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from cvjax.models import MODELS, create_model
from cvjax.tasks import Task, create_task
from cvjax.train import ema as ema_lib
from cvjax.train import initialization
from cvjax.train import sharding as sharding_lib
from cvjax.train.checkpoint import Checkpointer
from cvjax.train.logger import MetricsLogger
from cvjax.train.optim import create_optimizer, drop_frozen_gradients, frozen_mask
from cvjax.train.state import TrainState


class NonFiniteLossError(FloatingPointError):
  """The loss or gradients became NaN/Inf; the message names the step and the last good checkpoint."""


def build_model(config: ml_collections.ConfigDict, num_classes: int):
  """``create_model(config.model.name, **rest of config.model)``; ``num_classes`` 0 means from the data."""
  kwargs = dict(config.model.to_dict())
  name = kwargs.pop("name")
  kwargs["dtype"] = jnp.dtype(kwargs.get("dtype", "float32"))
  if not kwargs.get("num_classes"):
    kwargs.pop("num_classes", None)
    parameters = inspect.signature(MODELS.get(name)).parameters
    # Self-supervised models (MAE) have no classes; a factory taking **kwargs may pass them on.
    if "num_classes" in parameters or any(p.kind == p.VAR_KEYWORD for p in parameters.values()):
      kwargs["num_classes"] = num_classes
  return create_model(name, **kwargs)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """What the model, the task and the state's shapes need to know of the data.

  Attributes:
    num_classes, class_names, category_ids: the label space (``category_ids``: the dataset's own id of each
      label, e.g. COCO's, or None).
    example_batch: one host batch (only its structure, shapes and dtypes are used; rows may be zeros).
    ground_truth: None, or a callable returning the evaluation split's COCO-format annotations.
    things: segmentation: the labels that are countable things (panoptic); the others are stuff.
  """
  num_classes: int
  class_names: Sequence[str]
  example_batch: Dict[str, np.ndarray]
  category_ids: Optional[Sequence[int]] = None
  ground_truth: Optional[Callable[[], Dict[str, Any]]] = None
  things: Sequence[int] = ()

  @classmethod
  def of(cls, pipeline) -> "DataSpec":
    """The spec of an input pipeline: its labels and a zero batch of one row shaped like its batches."""
    example = next(iter(pipeline.iterator()))
    zeros = jax.tree.map(lambda x: np.zeros((1,) + x.shape[1:], x.dtype), example)
    return cls(num_classes=pipeline.num_classes, class_names=pipeline.class_names, example_batch=zeros,
               category_ids=pipeline.category_ids, ground_truth=pipeline.ground_truth, things=pipeline.things)


def _train_step(model, task: Task, tx: optax.GradientTransformation, schedule, frozen,
                ema_momentum: Optional[Callable[[jax.Array], jax.Array]],
                state: TrainState, batch: Dict[str, jax.Array]) -> Tuple[TrainState, Dict]:
  step_rng = jax.random.fold_in(state.rng, state.step)
  args, kwargs = task.model_inputs(batch)

  def loss_fn(params):
    variables = {"params": params, "batch_stats": state.batch_stats}
    # Three rng streams: ``dropout``, ``sample`` for models that draw training samples themselves (the
    # R-CNN family's anchor / RoI sampling) and ``mask`` for masked image modelling (MAE's patch masking); a
    # model ignores a stream it does not use.
    rngs = {"dropout": step_rng, "sample": jax.random.fold_in(step_rng, 1), "mask": jax.random.fold_in(step_rng, 2)}
    outputs, new_model_state = model.apply(variables, *args, train=True, rngs=rngs, mutable=["batch_stats"],
                                           **kwargs)
    loss, metrics, task_state = task.stateful_loss(outputs, batch, state.task_state)
    return loss, (metrics, new_model_state.get("batch_stats", state.batch_stats), task_state)

  (loss, (metrics, batch_stats, task_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  task_state = jax.lax.stop_gradient(task_state)
  grads = drop_frozen_gradients(grads, frozen)  # static: XLA skips the backward that only frozen leaves need
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm = optax.global_norm(grads)
  # A non-finite loss or gradient skips the update (so the state stays good) and records the step; the host
  # stops the run at the next log or checkpoint boundary with a message naming that step.
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  nonfinite_step = jnp.where((state.nonfinite_step < 0) & ~finite, state.step, state.nonfinite_step)
  one = jnp.ones((), jnp.float32)
  metrics = dict(metrics, grad_norm=(grad_norm, one), learning_rate=(schedule(state.step), one))
  ema = state.ema
  if ema_momentum is not None:
    momentum = ema_momentum(state.step)
    ema = keep(ema_lib.update(state.ema, {"params": params, "batch_stats": batch_stats}, momentum), state.ema)
    metrics["ema_momentum"] = (momentum, one)
  new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                            batch_stats=keep(batch_stats, state.batch_stats),
                            opt_state=keep(opt_state, state.opt_state), nonfinite_step=nonfinite_step, ema=ema,
                            task_state=keep(task_state, state.task_state))
  return new_state, metrics


def _eval_step(model, task: Task, use_ema: bool, state: TrainState,
               batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  args, kwargs = task.model_inputs(batch)
  outputs = model.apply(state.eval_variables(use_ema), *args, train=False, **kwargs)
  return task.eval_outputs(outputs, batch)


class Experiment:
  """Everything built from a config: mesh, pipelines, model, task, optimizer, jitted functions, state.

  ``data`` (a ``DataSpec``) replaces the input pipelines for callers that feed their own batches (benchmarks,
  research code): the model, task, state and jitted steps are then built from it, and there is no
  ``train_pipeline`` / ``eval_pipeline`` (so no ``evaluate``).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, train: bool = True,
               data: Optional[DataSpec] = None):
    self.config = config
    self.workdir = workdir
    self.mesh = sharding_lib.create_mesh(config.mesh)
    self.train_pipeline = self.eval_pipeline = None
    if data is None:
      from cvjax.data import create_pipeline  # deferred: TFDS import is slow and only needed here

      self.train_pipeline = (create_pipeline(config, config.dataset.train_split, train=True)
                             if train else None)
      self.eval_pipeline = create_pipeline(config, config.dataset.eval_split, train=False)
      data = DataSpec.of(self.eval_pipeline)
    self.data = data
    self.task = create_task(config, data.num_classes, data.class_names, data.category_ids, data.ground_truth,
                            data.things)
    self.model = build_model(config, data.num_classes)
    self.tx, self.schedule = create_optimizer(config.optimizer, config.total_steps)
    use_ema = ema_lib.enabled(config)
    self.evaluate_ema = bool(use_ema and config.ema.evaluate)
    if config.get("ema") is not None and config.ema.evaluate and not use_ema:
      raise ValueError("config.ema.evaluate=True needs an EMA: set config.ema.momentum > 0")
    init_args, init_kwargs = self.task.model_inputs(data.example_batch)

    def init(rng) -> TrainState:
      params_rng, dropout_rng = jax.random.split(rng)
      variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, *init_args, train=False,
                                  **init_kwargs)
      params = variables["params"]
      return TrainState.create(params=params, batch_stats=variables.get("batch_stats", {}),
                               opt_state=self.tx.init(params), rng=rng, ema=use_ema,
                               task_state=self.task.initial_state())

    self.rng = jax.random.PRNGKey(config.seed)
    self.abstract_state = jax.eval_shape(init, self.rng)
    self.state_sharding = sharding_lib.parameter_sharding(self.mesh, self.abstract_state)
    self._init = jax.jit(init, out_shardings=self.state_sharding)
    replicated = NamedSharding(self.mesh, P())
    frozen = frozen_mask(config.optimizer, self.abstract_state.params)
    # Steps are traced with the mesh as the context mesh, so ops can split per-example host work over its
    # 'data' axis (the scipy matcher: cvjax.ops.match_sets(batch_axis='data')).
    self.train_step = sharding_lib.jit_with_mesh(
        functools.partial(_train_step, self.model, self.task, self.tx, self.schedule, frozen,
                          ema_lib.momentum_schedule(config) if use_ema else None), self.mesh,
        donate_argnums=0, out_shardings=(self.state_sharding, replicated))
    self.eval_step = sharding_lib.jit_with_mesh(functools.partial(_eval_step, self.model, self.task,
                                                                  self.evaluate_ema), self.mesh,
                                                out_shardings=replicated)
    self.checkpointer = Checkpointer(workdir, config.keep_checkpoints)

  def global_batch(self, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    """This process's slice of a batch as global arrays sharded over the mesh's 'data' axis."""
    return sharding_lib.global_batch(self.mesh, local_batch)

  def initial_state(self) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """Restores the latest checkpoint of the workdir if there is one, else initialises from the seed (and,
    with ``config.init``, from pretrained weights)."""
    step = self.checkpointer.latest_step()
    if step is None:
      state = self._init(self.rng)
      init = self.config.init
      if init.pretrain_config or init.checkpoint_dir or init.torch_checkpoint:
        pretrained, source = pretrained_variables(self.config, self.workdir)
        variables = initialization.graft({"params": state.params, "batch_stats": state.batch_stats},
                                         pretrained, init.mapping)
        state = state.replace(params=variables["params"], batch_stats=variables["batch_stats"])
        if state.ema:
          state = state.with_ema_reset()
        if jax.process_index() == 0:
          print(f"initialised {dict(init.mapping)} from {source}", flush=True)
      elif init.mapping and jax.process_index() == 0:
        # A preset that expects pretrained weights (DETR's COCO presets: an ImageNet backbone) got none.
        logging.warning("config.init.mapping is set but no init.pretrain_config, checkpoint_dir or "
                        "torch_checkpoint: %s start from their random initialisation", dict(init.mapping))
      return state, None
    logging.info("resuming from step %d (%s)", step, self.checkpointer.directory)
    if jax.process_index() == 0:
      print(f"resuming from step {step}", flush=True)
    state, data_state = self.restore(step)
    if data_state is None and self.train_pipeline is not None:
      logging.warning("checkpoint %d has no input position for %d processes; the data order restarts",
                      step, jax.process_count())
    return state, data_state

  def restore(self, step: int) -> Tuple[TrainState, Optional[Dict[str, Any]]]:
    """Checkpoint ``step`` of the workdir on this experiment's shardings: (state, data-iterator state)."""
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          self.abstract_state, self.state_sharding)
    fields = [field.name for field in dataclasses.fields(TrainState)]
    saved = self.checkpointer.saved_state_fields(step)
    absent = [name for name in fields if name not in saved]
    if not absent:
      return self.checkpointer.restore(step, target)
    # A checkpoint written before a state field existed (``ema``, ``task_state``) restores when this run leaves
    # that field empty too; a run that needs it (an EMA, a stateful task) cannot invent it.
    needed = [name for name in absent if jax.tree.leaves(getattr(target, name))]
    if needed:
      raise ValueError(f"checkpoint {step} in {self.checkpointer.directory} has no {needed} (it was written by a "
                       "run without them, e.g. without config.ema); train this config in a new workdir")
    restored, data_state = self.checkpointer.restore(step, {name: getattr(target, name) for name in fields
                                                            if name in saved})
    return TrainState(**restored, **{name: {} for name in absent}), data_state

  def evaluate(self, state: TrainState) -> Tuple[Dict[str, float], Dict]:
    """One pass over the eval split; every real example counted once across processes."""
    if self.eval_pipeline is None:
      raise ValueError("this Experiment was built from a DataSpec and has no evaluation pipeline")
    evaluator = self.task.evaluator()
    num_batches = -(-self.eval_pipeline.num_examples // self.config.batch_size)
    if self.config.eval_steps > 0:
      num_batches = min(num_batches, self.config.eval_steps)
    iterator = iter(self.eval_pipeline.iterator())
    last = None
    for _ in range(num_batches):
      # Processes whose shard ran out feed fully masked batches so that every process runs the same
      # number of collective steps.
      local = next(iterator, None)
      if local is None:
        local = jax.tree.map(np.zeros_like, last)
      last = local
      outputs = self.eval_step(state, self.global_batch(local))
      evaluator.update(jax.device_get(outputs) if jax.process_count() == 1
                       else multihost_utils.process_allgather(outputs, tiled=True), inputs=local)
    scalars, details = evaluator.result()
    if jax.process_index() == 0 and hasattr(evaluator, "write_files"):
      step = int(jax.device_get(state.step))
      details["files"] = evaluator.write_files(os.path.join(self.workdir, "eval"), step)
    return scalars, details

  def check_finite(self, state: TrainState) -> None:
    """Raises ``NonFiniteLossError`` if a step since the start had a NaN/Inf loss or gradient."""
    bad = int(jax.device_get(state.nonfinite_step))
    if bad >= 0:
      last = self.checkpointer.latest_step()
      kept = (f"the last good checkpoint is step {last} in {self.checkpointer.directory}" if last is not None
              else "no checkpoint had been written yet")
      raise NonFiniteLossError(
          f"the loss or gradient became NaN/Inf at step {bad} (that update was skipped); stopping: {kept}. "
          "Lower the learning rate or enable config.optimizer.grad_clip_norm.")


def pretrained_variables(config: ml_collections.ConfigDict, workdir: str) -> Tuple[Dict[str, Any], str]:
  """The ``{'params', 'batch_stats'}`` that ``config.init`` names, and where they came from: a PyTorch
  checkpoint, the pretrain run (trained here first, in ``workdir/pretrain``, unless it has finished) or another
  run's workdir (its latest checkpoint)."""
  init = config.init
  if init.torch_checkpoint:
    return initialization.torch_checkpoint_variables(init), init.torch_checkpoint
  if init.pretrain_config:
    source_config, source_dir, unfinished = initialization.pretrain_run(config, workdir)
    if unfinished:
      if jax.process_index() == 0:
        print(f"pretraining {init.pretrain_config} in {source_dir} ({source_config.total_steps} steps) to "
              f"initialise {config.name}", flush=True)
      write_config(source_config, source_dir)
      train_and_evaluate(source_config, source_dir)
  else:
    source_dir = init.checkpoint_dir
    source_config = initialization.run_config(source_dir, config.data_dir)
  experiment = Experiment(source_config, source_dir, train=False)
  step = experiment.checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {source_dir} to initialise {config.name} from")
  state, _ = experiment.restore(step)
  experiment.checkpointer.close()
  # The weights the source run evaluated: its EMA when it evaluated that.
  return state.eval_variables(experiment.evaluate_ema), source_dir


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """``workdir/config.json``: the resolved config of the run (process 0)."""
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2, sort_keys=True))


def _mean(metrics: Dict[str, Tuple[Any, Any]]) -> Dict[str, float]:
  return {k: float(s) / max(float(c), 1e-12) for k, (s, c) in jax.device_get(metrics).items()}


def _write_eval(exp: Experiment, logger: MetricsLogger, step: int, scalars: Dict, details: Dict) -> None:
  logger.write(step, {f"eval/{k}": v for k, v in scalars.items()})
  if jax.process_index() == 0:
    os.makedirs(os.path.join(exp.workdir, "eval"), exist_ok=True)
    with open(os.path.join(exp.workdir, "eval", f"step_{step}.json"), "w") as f:
      json.dump({"step": step, **scalars, **details}, f, indent=1)
  logging.info("eval at step %d: %s", step, scalars)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Trains ``config.total_steps`` steps with periodic eval and checkpoints; returns the summary."""
  exp = Experiment(config, workdir, train=True)
  state, data_state = exp.initial_state()
  step = int(jax.device_get(state.step))
  train_iter = exp.train_pipeline.iterator(state=data_state)
  logger = MetricsLogger(workdir, config.total_steps, step, config.progress_bar)
  start_time, log_time, log_step = time.time(), time.time(), step
  summary: Dict[str, Any] = {"start_step": step}
  accumulated = None
  try:
    while step < config.total_steps:
      batch = exp.global_batch(next(train_iter))
      state, metrics = exp.train_step(state, batch)
      step += 1
      accumulated = metrics if accumulated is None else jax.tree.map(jnp.add, accumulated, metrics)
      is_last = step == config.total_steps
      if step % config.log_every == 0 or is_last:
        exp.check_finite(state)
        now = time.time()
        means = _mean(accumulated)
        means["learning_rate"] = float(exp.schedule(step - 1))
        record = {f"train/{k}": v for k, v in means.items()}
        record["train/steps_per_sec"] = (step - log_step) / max(now - log_time, 1e-9)
        logger.write(step, record)
        logger.progress(step, {"loss": means["loss"], "steps/s": record["train/steps_per_sec"]})
        summary.update(record)
        accumulated, log_time, log_step = None, now, step
      if step % config.checkpoint_every == 0 or is_last:
        exp.check_finite(state)  # never save a state that follows a non-finite step
        exp.checkpointer.save(step, state, train_iter.get_state())
      if (config.eval_every and step % config.eval_every == 0) or is_last:
        scalars, details = exp.evaluate(state)
        _write_eval(exp, logger, step, scalars, details)
        summary.update({f"eval/{k}": v for k, v in scalars.items()})
  finally:
    # An exception (NaN, Ctrl-C, a bad batch) still lets an in-flight async save complete.
    exp.checkpointer.wait()
    exp.checkpointer.close()
    logger.close()
  summary.update(step=step, wall_time_s=time.time() - start_time, workdir=workdir)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "summary.json"), "w") as f:
      json.dump(summary, f, indent=1)
  return summary


def evaluate_latest(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """``--mode=eval``: evaluates the latest checkpoint of ``workdir``."""
  exp = Experiment(config, workdir, train=False)
  step = exp.checkpointer.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint in {exp.checkpointer.directory}; train first with --mode=train "
                            f"and the same --workdir")
  state, _ = exp.initial_state()
  scalars, details = exp.evaluate(state)
  logger = MetricsLogger(workdir, 0, 0, progress_bar=False)
  _write_eval(exp, logger, step, scalars, details)
  logger.close()
  exp.checkpointer.close()
  return {"step": step, **{f"eval/{k}": v for k, v in scalars.items()}}
