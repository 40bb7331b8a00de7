"""The train state: everything a step reads and writes, one pytree, checkpointed whole."""

from __future__ import annotations

from typing import Any, Dict

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """``step``: int32 scalar, number of updates applied. ``rng``: raw uint32 key; the step's key is
  ``fold_in(rng, step)``, so a resumed run draws the same randomness. ``nonfinite_step``: -1, or the first
  step whose loss or gradient was NaN/Inf (that step's update was skipped). ``ema``: ``{}``, or the exponential
  moving average ``{'params', 'batch_stats'}`` of the weights (``cvjax.train.ema``). ``task_state``: the task's
  own pytree (``Task.initial_state``; ``{}`` for most tasks)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array
  ema: Any
  task_state: Any

  @classmethod
  def create(cls, params, batch_stats, opt_state, rng, ema: bool = False, task_state: Any = None
             ) -> "TrainState":
    """A state at step 0; with ``ema``, its EMA starts as a copy of ``params`` and ``batch_stats``."""
    state = cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=opt_state,
                rng=rng, nonfinite_step=jnp.full((), -1, jnp.int32), ema={},
                task_state={} if task_state is None else task_state)
    return state.with_ema_reset() if ema else state

  @property
  def variables(self) -> Dict[str, Any]:
    """The trained weights as ``model.apply`` takes them: ``{'params', 'batch_stats'}``."""
    return {"params": self.params, "batch_stats": self.batch_stats}

  def with_ema_reset(self) -> "TrainState":
    """This state with its EMA set to a copy of the current weights (the start of a run, after a graft)."""
    return self.replace(ema=jax.tree.map(jnp.copy, self.variables))

  def eval_variables(self, use_ema: bool) -> Dict[str, Any]:
    """``{'params', 'batch_stats'}`` to evaluate: the EMA's when ``use_ema``, else the trained ones."""
    if use_ema and not self.ema:
      raise ValueError("config.ema.evaluate needs an EMA: set config.ema.momentum > 0")
    return self.ema if use_ema else self.variables
