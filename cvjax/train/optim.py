"""optax optimisers from the config: schedule, clipping, weight decay, per-group lr multipliers, freezing."""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"


def create_schedule(opt: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to the peak, then cosine / step / constant / poly (``peak * (1 - t / T) ** 0.9``
  over the steps after the warm-up, the segmentation schedule of DeepLab and MaskFormer; ``poly_power``)."""
  peak = opt.learning_rate
  warmup = int(opt.warmup_steps)
  if opt.schedule == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=peak * opt.end_lr_fraction)
  if opt.schedule == "step":
    main = optax.piecewise_constant_schedule(
        peak, {int(b) - warmup: opt.decay_factor for b in opt.boundaries})
  elif opt.schedule == "constant":
    main = optax.constant_schedule(peak)
  elif opt.schedule == "poly":
    main = optax.polynomial_schedule(peak, peak * opt.end_lr_fraction, float(opt.get("poly_power", 0.9)),
                                     max(total_steps - warmup, 1))
  else:
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r}; expected 'cosine', 'step', 'constant' or "
                     "'poly'")
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def _base_optimizer(opt: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
  if opt.name == "adamw":
    # Decoupled weight decay as in torch.optim.AdamW (decay scaled by the learning rate).
    return optax.adamw(lr, b1=opt.beta1, b2=opt.beta2, eps=opt.eps, weight_decay=opt.weight_decay)
  if opt.name in ("sgd", "momentum", "nesterov"):
    # torch.optim.SGD semantics: L2 term added to the gradient before momentum.
    momentum = None if opt.name == "sgd" else opt.momentum
    return optax.chain(
        optax.add_decayed_weights(opt.weight_decay) if opt.weight_decay else optax.identity(),
        optax.sgd(lr, momentum=momentum, nesterov=opt.name == "nesterov"))
  raise ValueError(f"config.optimizer.name={opt.name!r}; expected 'sgd', 'momentum', 'nesterov' or 'adamw'")


def parameter_labels(params: Any, multipliers: Sequence[Tuple[str, float]],
                     freeze: Sequence[str]) -> Any:
  """Labels each leaf of ``params`` with its group: 'frozen', a multiplier's regex, or 'default'."""

  def label(path: Tuple[str, ...], _) -> str:
    name = "/".join(path)
    if any(re.fullmatch(f, name) for f in freeze):
      return FROZEN
    for pattern, _ in multipliers:
      if re.fullmatch(pattern, name):
        return pattern
    return "default"

  return flax.traverse_util.path_aware_map(label, params)


def frozen_mask(opt: ml_collections.ConfigDict, params: Any) -> Any:
  """``params``-shaped tree of Python bools: True where ``opt.freeze`` freezes the leaf (static at trace time,
  so the train step can drop those gradients and XLA never computes them)."""
  freeze = [str(f) for f in opt.freeze]
  return jax.tree.map(lambda l: l == FROZEN, parameter_labels(params, (), freeze))


def drop_frozen_gradients(grads: Any, frozen: Any) -> Any:
  """Replaces the gradients of frozen leaves (``frozen_mask``) by zeros: constants, so XLA computes neither
  them nor the backward through layers that only lead to frozen parameters (e.g. DETR's frozen stem and first
  stage), as PyTorch skips parameters with ``requires_grad=False``."""
  return jax.tree.map(lambda g, is_frozen: jnp.zeros_like(g) if is_frozen else g, grads, frozen)


def create_optimizer(opt: ml_collections.ConfigDict, total_steps: int
                     ) -> Tuple[optax.GradientTransformation, optax.Schedule]:
  """Returns ``(tx, schedule)``; ``schedule(step)`` is the base (multiplier 1) learning rate.

  Freezing (``opt.freeze``) is one rule, ``frozen_mask``, applied at its two ends: the train step replaces
  frozen leaves' gradients by zeros before ``tx`` sees them (``drop_frozen_gradients``: XLA then skips their
  backward, and they do not count in the clipping norm, as parameters with ``requires_grad=False`` in
  PyTorch), and ``tx`` gives them zero updates (no weight decay either).
  """
  schedule = create_schedule(opt, total_steps)
  multipliers = [(str(p), float(m)) for p, m in opt.lr_multipliers]
  freeze = [str(f) for f in opt.freeze]
  for pattern in [p for p, _ in multipliers] + freeze:
    try:
      re.compile(pattern)
    except re.error as e:
      raise ValueError(f"config.optimizer lr_multipliers/freeze: bad regex {pattern!r}: {e}") from None
  labels = lambda params: parameter_labels(params, multipliers, freeze)
  if multipliers or freeze:
    scaled: Callable[[float], optax.Schedule] = lambda m: (lambda step: schedule(step) * m)
    transforms = {"default": _base_optimizer(opt, schedule), FROZEN: optax.set_to_zero()}
    transforms.update({p: _base_optimizer(opt, scaled(m)) for p, m in multipliers})
    tx = optax.multi_transform(transforms, labels)
  else:
    tx = _base_optimizer(opt, schedule)
  if opt.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx, schedule
