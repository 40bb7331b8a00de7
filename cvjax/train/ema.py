"""An exponential moving average of the weights, kept in the train state (``TrainState.ema``).

``config.ema`` (``cvjax.train.config.base_config``): ``momentum`` > 0 turns it on; after every update
``ema <- m * ema + (1 - m) * weights`` over the parameters and the batch-norm statistics (timm's ``ModelEmaV2``
averages every buffer likewise), with ``m`` constant (DeiT / timm: 0.99996 per step at ImageNet scale) or, with
``schedule='cosine'``, rising from ``momentum`` to ``end_momentum`` over the run along half a cosine, DINO's
teacher schedule (Caron et al. 2021, Sec. 3.1: 0.996 -> 1). It starts as a copy of the initial weights (after
any pretrained graft), is checkpointed and restored with the rest of the state, and a step whose loss or
gradient is not finite leaves it unchanged. ``ema.evaluate`` evaluates (and explains) the EMA weights instead
of the trained ones; tasks can read it as a teacher.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections

SCHEDULES = ("constant", "cosine")


def enabled(config: ml_collections.ConfigDict) -> bool:
  """Whether ``config.ema`` asks for an EMA (validating its values)."""
  ema = config.get("ema")
  if ema is None or not ema.momentum:
    return False
  if not 0.0 < ema.momentum < 1.0:
    raise ValueError(f"config.ema.momentum must be in (0, 1) (0 = no EMA), got {ema.momentum}")
  if ema.schedule not in SCHEDULES:
    raise ValueError(f"config.ema.schedule must be one of {SCHEDULES}, got {ema.schedule!r}")
  if ema.schedule == "cosine" and not ema.momentum <= ema.end_momentum <= 1.0:
    raise ValueError(f"config.ema.end_momentum must be in [momentum, 1] = [{ema.momentum}, 1], got "
                     f"{ema.end_momentum}")
  return True


def momentum_schedule(config: ml_collections.ConfigDict) -> Callable[[jax.Array], jax.Array]:
  """``step -> m``: the momentum of the update that follows update ``step`` (0-based)."""
  ema = config.ema
  base = float(ema.momentum)
  if ema.schedule == "constant":
    return lambda step: jnp.asarray(base, jnp.float32)
  end, total = float(ema.end_momentum), max(int(config.total_steps), 1)

  def cosine(step):
    # DINO's cosine_scheduler: end + (base - end) * (1 + cos(pi * step / total)) / 2.
    return end + (base - end) * 0.5 * (1.0 + jnp.cos(math.pi * jnp.minimum(step, total) / total))

  return cosine


def update(ema: Any, weights: Any, momentum: jax.Array) -> Any:
  """``momentum * ema + (1 - momentum) * weights`` leaf by leaf, in each leaf's dtype."""
  return jax.tree.map(lambda e, w: (momentum * e + (1.0 - momentum) * w).astype(e.dtype), ema, weights)
