"""Static-shape work on a data-dependent number of rows: run a function on the valid rows only, bucketed.

Under ``jit`` every shape is static, so a head that torchvision runs on "the positive RoIs" (a number known only
at run time) is run by a static-shape implementation on all of its slots, padding included: Mask R-CNN's mask
head has ``B * 128`` slots of which an image with ten objects fills about ten. ``map_valid_rows`` instead
moves the valid rows to the front and runs the function on the smallest of a few static sizes (halvings of
the slot count) that holds them, chosen at run time with ``lax.switch``: every size is compiled once, only the
chosen one runs, and the result is exactly that of running the function row by row on the valid rows.
"""

from __future__ import annotations

from typing import Callable, Sequence, Tuple

import jax
import jax.numpy as jnp


def bucket_sizes(num_rows: int, num_buckets: int) -> Tuple[int, ...]:
  """The static sizes ``ceil(num_rows / 2 ** k)`` for ``k < num_buckets``, ascending, without repeats."""
  if num_buckets < 1:
    raise ValueError(f"num_buckets must be >= 1, got {num_buckets!r}")
  return tuple(sorted({-(-num_rows // 2 ** k) for k in range(num_buckets)} - {0})) or (0,)


def map_valid_rows(fn: Callable, args: Sequence[jax.Array], valid: jax.Array, num_buckets: int):
  """``fn`` on the rows of ``args`` where ``valid``, at the smallest static bucket size that holds them.

  Args:
    fn: pure function of ``len(args)`` arrays with the rows on their leading axis, returning a pytree of
      arrays with the rows leading; it must treat rows independently (a row's output depends on that row only),
      as a per-RoI head does. Not a bound Flax module: call ``module.apply`` inside it.
    args: arrays ``[N, ...]``.
    valid: ``[N]`` bool, the rows whose outputs are wanted.
    num_buckets: how many static sizes to compile: ``N, ceil(N / 2), ..., ceil(N / 2 ** (num_buckets - 1))``.
      ``1`` runs ``fn`` on all ``N`` rows (no switch). The last bucket is used when more rows are valid than
      the smaller sizes hold.

  Returns:
    ``fn``'s outputs ``[N, ...]`` in the rows' original order, zeros on the rows that are not valid (their
    gradient is zero too). Differentiable; jit-able; the row permutation is a gather and its inverse.
  """
  valid = jnp.asarray(valid, bool)
  num_rows = valid.shape[0]
  if valid.ndim != 1 or any(a.shape[:1] != (num_rows,) for a in args):
    raise ValueError(f"valid must be [N] and every arg [N, ...]; got valid {valid.shape} and args "
                     f"{[a.shape for a in args]}")
  zero_invalid = lambda o: jnp.where(valid.reshape((-1,) + (1,) * (o.ndim - 1)), o, jnp.zeros_like(o))
  sizes = bucket_sizes(num_rows, num_buckets)
  if len(sizes) == 1:
    return jax.tree.map(zero_invalid, fn(*args))
  order = jnp.argsort(~valid, stable=True)  # valid rows first, each group in its original order
  front = [a[order] for a in args]

  def branch(size):
    def run(front):
      out = fn(*[a[:size] for a in front])
      return jax.tree.map(lambda o: jnp.pad(o, [(0, num_rows - size)] + [(0, 0)] * (o.ndim - 1)), out)
    return run

  count = valid.sum(dtype=jnp.int32)
  index = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes, jnp.int32), count), len(sizes) - 1)
  out = jax.lax.switch(index, [branch(size) for size in sizes], front)
  inverse = jnp.argsort(order)
  return jax.tree.map(lambda o: zero_invalid(o[inverse]), out)
