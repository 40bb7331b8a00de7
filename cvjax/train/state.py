"""The train state: everything a step reads and writes, one pytree, checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
  """``step``: int32 scalar, number of updates applied. ``rng``: raw uint32 key; the step's key is
  ``fold_in(rng, step)``, so a resumed run draws the same randomness. ``nonfinite_step``: -1, or the first
  step whose loss or gradient was NaN/Inf (that step's update was skipped)."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  rng: jax.Array
  nonfinite_step: jax.Array

  @classmethod
  def create(cls, params, batch_stats, opt_state, rng) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats, opt_state=opt_state,
               rng=rng, nonfinite_step=jnp.full((), -1, jnp.int32))
