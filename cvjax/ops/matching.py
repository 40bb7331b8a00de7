"""Exact minimum-cost bipartite matching (Hungarian algorithm) in pure jnp, and DETR's set matcher.

``linear_sum_assignment`` reproduces ``scipy.optimize.linear_sum_assignment`` for finite costs: the same
signature and output layout and an exact optimum (ties may pick a different optimal matching with the same
total cost). The solver is the shortest-augmenting-path method with row / column potentials (the e-maxx /
Jonker-Volgenant formulation, with the lazy potential updates of Crouse's algorithm that scipy implements): one
augmentation per row of the short side, each a Dijkstra-like search over columns. A problem runs as one flat
``lax.while_loop`` whose iteration does a search step and / or one step of walking back the augmenting path,
so under vmap a batch costs the largest per-problem step count, not the sum over rows of per-row maxima.
Costs are solved in their float dtype (float32 unless x64 is enabled); each row's potential starts at its
minimum cost so large common offsets (1e6 + x) keep their float32 resolution.

Non-finite costs never hang the solver and always yield a valid matching. The rule: costs are first made
finite -- NaN and +inf become ``hi + (k + 1) * (hi - lo + 1)`` and -inf becomes ``lo - (k + 1) * (hi - lo + 1)``,
with ``[lo, hi]`` the range of the finite entries (``[0, 0]`` if none) and ``k`` the number of rows to match
(the short side; the valid targets in ``match_sets``) -- and the result is the exact optimum of that finite
matrix. Without -inf entries it therefore uses as few NaN / +inf edges as any assignment can and is optimal for
the finite costs among those (scipy raises instead: "infeasible" for +inf, "invalid" for NaN and -inf).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("auto", "jax", "scipy")


def _stand_ins(cost, entry_active, num_matched, xp):
  """The finite values that replace (NaN, +inf) and -inf: the rule of the module docstring (np or jnp)."""
  finite = xp.isfinite(cost) & entry_active
  any_finite = finite.any()
  lo = xp.where(any_finite, xp.where(finite, cost, xp.inf).min(), 0)
  hi = xp.where(any_finite, xp.where(finite, cost, -xp.inf).max(), 0)
  big = (num_matched + 1) * (hi - lo + 1)
  return (hi + big).astype(cost.dtype), (lo - big).astype(cost.dtype)


def _replace_nonfinite(cost, stand_ins, xp):
  too_big, too_small = stand_ins
  cost = xp.where(xp.isnan(cost) | (cost == xp.inf), too_big, cost)
  return xp.where(cost == -xp.inf, too_small, cost)


class _State(NamedTuple):
  u: jnp.ndarray  # [n] row potentials
  v: jnp.ndarray  # [m] column potentials
  col4row: jnp.ndarray  # [n] int32, -1 while unmatched
  row4col: jnp.ndarray  # [m] int32, -1 while free
  shortest: jnp.ndarray  # [m] shortest reduced path cost from the new row to each column
  path: jnp.ndarray  # [m] int32, the row through which that shortest path reaches the column
  row_dist: jnp.ndarray  # [n] shortest path cost to the row (to its matched column); 0 for the new row
  scanned_rows: jnp.ndarray  # [n] bool
  scanned_cols: jnp.ndarray  # [m] bool
  min_val: jnp.ndarray  # scalar, length of the last shortest path found
  row: jnp.ndarray  # scalar int32, the row whose edges the search expands next
  new_row: jnp.ndarray  # scalar int32, the row being added to the matching
  col: jnp.ndarray  # scalar int32, the column the augmentation walks back from
  augmenting: jnp.ndarray  # scalar bool
  rows_done: jnp.ndarray  # scalar int32


def _step(cost_t: jnp.ndarray, row_active: jnp.ndarray, stand_ins, s: _State) -> _State:
  """One search step (unless augmenting), then one step back along the augmenting path (if one was found).

  Straight-line code with masks instead of ``lax.cond`` and one-hot compares instead of scatters: under vmap
  a cond evaluates both branches anyway, and XLA fuses masked elementwise updates far better than scatters.
  """
  m, n = cost_t.shape
  rows_iota, cols_iota = jnp.arange(n), jnp.arange(m)
  search = ~s.augmenting
  # Search: expand s.row, then scan the closest unscanned column.
  costs = _replace_nonfinite(cost_t[:, s.row], stand_ins, jnp)
  # The new row's potential starts at its minimum cost, so reduced costs are differences of nearby numbers:
  # float32 stays exact for large offsets such as 1e6 + x (any start value is valid for an unmatched row).
  first = search & (s.row == s.new_row)
  u_row = jnp.where(first, costs.min(), s.u[s.row])
  reduced = costs - u_row - s.v + s.min_val
  better = search & ~s.scanned_cols & (reduced < s.shortest)
  shortest = jnp.where(better, reduced, s.shortest)
  path = jnp.where(better, s.row, s.path)
  masked = jnp.where(s.scanned_cols, jnp.inf, shortest)
  lowest = masked.min()
  closest = ~s.scanned_cols & (masked == lowest)
  free = s.row4col < 0
  # Preference: closest and free (ends the search early on ties, e.g. padded or all-equal costs), then
  # closest, then any unscanned column -- the last keeps the loop finite even if NaN crept into the sums.
  pick = jnp.argmax(4 * (closest & free) + 2 * closest + ~s.scanned_cols).astype(jnp.int32)
  scanned_cols = s.scanned_cols | (search & (cols_iota == pick))
  scanned_rows = s.scanned_rows | (search & (rows_iota == s.row))
  found = search & free[pick]
  next_row = s.row4col[pick]
  row_dist = jnp.where(search & ~found & (rows_iota == next_row), lowest, s.row_dist)
  # Potentials are settled once per augmentation (Crouse's lazy update) rather than at every step.
  u = jnp.where(first & (rows_iota == s.row), u_row, s.u)
  u = jnp.where(found & scanned_rows, u + (lowest - row_dist), u)
  v = jnp.where(found & scanned_cols, s.v - (lowest - shortest), s.v)
  row = jnp.where(search & ~found, next_row, s.row)
  col = jnp.where(search, pick, s.col)
  augmenting = s.augmenting | found
  # Augment: give column `col` to the row that reached it; that row's old column is the next to fix.
  path_row = path[col]
  col4row = jnp.where(augmenting & (rows_iota == path_row), col, s.col4row)
  row4col = jnp.where(augmenting & (cols_iota == col), path_row, s.row4col)
  col = jnp.where(augmenting, s.col4row[path_row], col)
  # After the new row's own edge, start the next active row.
  done = augmenting & (path_row == s.new_row)
  new_row = jnp.where(done, jnp.argmax(row_active & (rows_iota > s.new_row)).astype(jnp.int32), s.new_row)
  return _State(
      u=u, v=v, col4row=col4row, row4col=row4col, shortest=jnp.where(done, jnp.inf, shortest),
      # Every column starts reachable from the new row, so the walk back always ends there even if a NaN
      # (from overflowing potentials) leaves a column unimproved.
      path=jnp.where(done, new_row, path), row_dist=row_dist, scanned_rows=scanned_rows & ~done,
      scanned_cols=scanned_cols & ~done, min_val=jnp.where(done, 0, lowest), row=jnp.where(done, new_row, row),
      new_row=new_row, col=col, augmenting=augmenting & ~done, rows_done=s.rows_done + done)


def _solve(cost_t: jnp.ndarray, row_active: jnp.ndarray) -> jnp.ndarray:
  """Optimal matching of the active rows of ``cost_t [m, n]`` (entry ``(j, r)``: row ``r`` to column ``j``).

  Needs ``row_active.sum() <= m``; non-finite entries follow the module docstring's rule. Returns
  ``col4row [n]`` int32, -1 for inactive rows. Rows are read as columns of ``cost_t`` so callers holding a
  ``[Q, G]`` matrix with targets as rows need no transpose.
  """
  m, n = cost_t.shape
  num_rows = row_active.sum(dtype=jnp.int32)
  stand_ins = _stand_ins(cost_t, row_active[None, :], num_rows, jnp)
  first_row = jnp.argmax(row_active).astype(jnp.int32)
  zero = jnp.zeros((), jnp.int32)
  state = _State(
      u=jnp.zeros((n,), cost_t.dtype), v=jnp.zeros((m,), cost_t.dtype), col4row=jnp.full((n,), -1, jnp.int32),
      row4col=jnp.full((m,), -1, jnp.int32), shortest=jnp.full((m,), jnp.inf, cost_t.dtype),
      path=jnp.full((m,), first_row), row_dist=jnp.zeros((n,), cost_t.dtype), scanned_rows=jnp.zeros((n,), bool),
      scanned_cols=jnp.zeros((m,), bool), min_val=jnp.zeros((), cost_t.dtype), row=first_row, new_row=first_row,
      col=zero, augmenting=jnp.array(False), rows_done=zero)
  # Each row scans at most m columns and walks back at most n edges, so the loop always terminates.
  step = functools.partial(_step, cost_t, row_active, stand_ins)
  return jax.lax.while_loop(lambda s: s.rows_done < num_rows, step, state).col4row


def _float_costs(cost, name: str) -> jnp.ndarray:
  cost = jnp.asarray(cost)
  if not (jnp.issubdtype(cost.dtype, jnp.floating) or jnp.issubdtype(cost.dtype, jnp.integer)
          or cost.dtype == bool):
    raise ValueError(f"{name} must be a real-valued array; got dtype {cost.dtype}")
  if not jnp.issubdtype(cost.dtype, jnp.floating):
    cost = cost.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
  return cost


def linear_sum_assignment(cost: jnp.ndarray, maximize: bool = False) -> Tuple[jnp.ndarray, jnp.ndarray]:
  """Exact linear assignment, ``scipy.optimize.linear_sum_assignment``'s signature and output, in jnp.

  Jit-able (``N``, ``M`` static) and vmap-able over leading batch axes; no gradient (the outputs are indices).

  Args:
    cost: ``[N, M]`` float or integer cost matrix (integers are solved in the default float dtype, exact up
      to 2**24 with float32). Non-finite entries follow the rule of the module docstring.
    maximize: maximise the total instead (solved as the minimisation of ``-cost``; NaN stays forbidden).

  Returns:
    ``(row_ind, col_ind)``, int32 arrays of length ``min(N, M)``, ``row_ind`` ascending; the optimum is
    ``cost[row_ind, col_ind].sum()``. A tall matrix is solved transposed, as in scipy.
  """
  cost = _float_costs(cost, "cost")
  if cost.ndim != 2:
    raise ValueError(f"cost must be a 2-D [N, M] matrix (vmap for batches); got shape {cost.shape}")
  if maximize:
    cost = -cost
  n, m = cost.shape
  transposed = n > m
  if transposed:
    cost, n, m = cost.T, m, n
  if n == 0:
    empty = jnp.zeros((0,), jnp.int32)
    return empty, empty
  col4row = _solve(cost.T, jnp.ones((n,), bool))
  rows = jnp.arange(n, dtype=jnp.int32)
  if not transposed:
    return rows, col4row
  order = jnp.argsort(col4row)
  return col4row[order], rows[order]


def _match_one(cost: jnp.ndarray, valid: jnp.ndarray) -> jnp.ndarray:
  """``cost [Q, G]``, ``valid [G]`` -> ``[Q]`` matched target or -1, matching only the valid targets."""
  num_queries, num_targets = cost.shape
  # Targets are the rows (the short side), so the loop does one augmentation per valid target. Missing query
  # columns (Q < G) are +inf, i.e. "unmatched", so min(Q, n_valid) of the pairs are real.
  if num_queries < num_targets:
    cost = jnp.pad(cost, ((0, num_targets - num_queries), (0, 0)), constant_values=jnp.inf)
  col4row = _solve(cost, valid)
  # Unmatched rows (-1) and dummy columns (>= Q) scatter out of bounds, where mode="drop" discards them.
  col4row = jnp.where((col4row >= 0) & (col4row < num_queries), col4row, num_queries)
  targets = jnp.arange(num_targets, dtype=jnp.int32)
  return jnp.full((num_queries,), -1, jnp.int32).at[col4row].set(targets, mode="drop")


def _scipy_match(cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
  """Host side of the scipy backend: ``cost [..., Q, G]``, ``valid [..., G]`` -> ``[..., Q]`` int32.

  scipy is imported here, when the backend first runs, so that ``import cvjax.ops`` does not need it.
  """
  import scipy.optimize  # pylint: disable=import-outside-toplevel
  num_queries, num_targets = cost.shape[-2:]
  batch_shape = cost.shape[:-2]
  cost_t = np.asarray(cost).reshape(-1, num_queries, num_targets).transpose(0, 2, 1)
  valid = np.broadcast_to(np.asarray(valid), batch_shape + (num_targets,)).reshape(-1, num_targets)
  out = np.full((cost_t.shape[0], num_queries), -1, np.int32)
  # One gather of all valid target rows ([T, Q], float64 as scipy wants), then one solve per image.
  images, targets = np.nonzero(valid)
  rows = cost_t[images, targets].astype(np.float64)
  bounds = np.searchsorted(images, np.arange(cost_t.shape[0] + 1)).tolist()
  nonfinite_images = set() if np.isfinite(rows).all() else set(images[~np.isfinite(rows).all(axis=1)].tolist())
  matched = np.ones(len(rows), bool)  # all rows of a wide block are matched; a tall one leaves some out
  matched_cols = []
  for image, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
    block = rows[start:end]
    if image in nonfinite_images:
      block = _replace_nonfinite(block, _stand_ins(block, True, end - start, np), np)
    r, c = scipy.optimize.linear_sum_assignment(block)
    if end - start > num_queries:
      matched[start:end] = False
      matched[start + r] = True
    matched_cols.append(c)
  out[images[matched], np.concatenate(matched_cols)] = targets[matched]
  return out.reshape(batch_shape + (num_queries,))


def _scipy_callback(cost: jnp.ndarray, target_valid: jnp.ndarray, batch_axis: Optional[str]) -> jnp.ndarray:
  """``_scipy_match`` as a ``pure_callback``; split over the context mesh's ``batch_axis`` when there is one.

  A callback alone is placed on one device (XLA gives it maximal sharding): a batch sharded over devices is
  first gathered there, and with several processes one host would solve every image. Under a mesh with
  ``batch_axis`` dividing the leading dim, ``shard_map`` instead hands each device its own rows, solved by its
  own host (replicated over the mesh's other axes).
  """
  def solve(cost, valid):
    out_type = jax.ShapeDtypeStruct(cost.shape[:-1], jnp.int32)
    return jax.pure_callback(_scipy_match, out_type, cost, valid, vmap_method="broadcast_all")

  mesh = jax.sharding.get_abstract_mesh()
  if (batch_axis is None or mesh.empty or batch_axis not in mesh.axis_names or cost.ndim < 3
      or cost.shape[0] % mesh.shape[batch_axis]):
    return solve(cost, target_valid)
  spec = jax.sharding.PartitionSpec(batch_axis)
  return jax.shard_map(solve, mesh=mesh, in_specs=(spec, spec), out_specs=spec)(cost, target_valid)


def match_sets(cost: jnp.ndarray, target_valid: Optional[jnp.ndarray] = None,
               backend: str = "auto", batch_axis: Optional[str] = None) -> jnp.ndarray:
  """DETR's Hungarian matcher: per query, the index of its matched target or -1.

  Solves, per image, the exact minimum-cost matching between the ``Q`` queries and the valid targets only
  (``min(Q, n_valid)`` pairs; DETR has ``Q >= n_valid`` so every valid target is matched). Padded targets are
  never matched and never influence the result.

  Args:
    cost: ``[..., Q, G]`` float cost of assigning query ``q`` to target ``g``; leading axes are a batch.
      Non-finite entries follow ``linear_sum_assignment``'s rule (applied over the valid targets).
    target_valid: ``[..., G]`` bool, which targets are real; None means all.
    backend: ``'jax'``: the jnp solver, work bounded by the number of valid targets (the loop runs for the
      largest ``n_valid`` of the batch); ``'scipy'``: ``jax.pure_callback`` to scipy per image (a device-to-host
      sync on accelerators); ``'auto'``: ``'scipy'`` when JAX's default backend is the CPU (fastest there),
      ``'jax'`` on GPU / TPU.
    batch_axis: for ``'scipy'`` under a context mesh (``jax.set_mesh``; the train loop traces its steps with
      its mesh): the mesh axis the leading batch dim is sharded over (the loop's ``'data'``). Each device then
      hands its own images to its own host's scipy; otherwise (None, no mesh, the axis absent or not dividing
      the batch) the callback receives the whole batch on one device.

  Returns:
    ``[..., Q]`` int32 target indices in ``[0, G)`` or -1, under ``stop_gradient`` (the cost gets no gradient).
  """
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS}; got {backend!r}")
  cost = jax.lax.stop_gradient(_float_costs(cost, "cost"))
  if cost.ndim < 2:
    raise ValueError(f"cost must have shape [..., Q, G]; got shape {cost.shape}")
  batch_shape, (num_queries, num_targets) = cost.shape[:-2], cost.shape[-2:]
  if target_valid is None:
    target_valid = jnp.ones(batch_shape + (num_targets,), bool)
  target_valid = jnp.asarray(target_valid, bool)
  try:
    target_valid = jnp.broadcast_to(target_valid, batch_shape + (num_targets,))
  except ValueError:
    raise ValueError(f"target_valid must have shape {batch_shape + (num_targets,)} to match cost "
                     f"{cost.shape}; got {target_valid.shape}") from None
  if cost.size == 0:  # no queries, no targets or an empty batch: nothing to match
    return jnp.full(batch_shape + (num_queries,), -1, jnp.int32)
  if backend == "auto":
    backend = "scipy" if jax.default_backend() == "cpu" else "jax"
  if backend == "scipy":
    return _scipy_callback(cost, target_valid, batch_axis)
  flat = jax.vmap(_match_one)(cost.reshape((-1, num_queries, num_targets)),
                              target_valid.reshape((-1, num_targets)))
  return flat.reshape(batch_shape + (num_queries,))
