"""cvjax.ops.matching against scipy.optimize.linear_sum_assignment (optimal totals, never tie-dependent indices)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment as scipy_lsa

from cvjax.ops import matching as M

lsa = jax.jit(M.linear_sum_assignment, static_argnums=1)
match = jax.jit(M.match_sets, static_argnames="backend")


def stand_in_costs(cost, num_rows):
  """The documented non-finite rule, written out in NumPy for scipy: NaN/+inf -> hi + big, -inf -> lo - big."""
  cost = np.asarray(cost, np.float64)
  finite = cost[np.isfinite(cost)]
  lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 0.0)
  big = (num_rows + 1) * (hi - lo + 1)
  return np.where(np.isnan(cost) | (cost == np.inf), hi + big, np.where(cost == -np.inf, lo - big, cost))


def optimality_tolerance(cost, dtype=np.float32):
  """The most an exact solver working in ``dtype`` may miss the optimal total by: 4 roundings at ``dtype``'s
  epsilon of each of its ``n`` matched reduced costs -- kept within the finite costs' spread, as the solver
  starts each row's potential at its minimum (cvjax.ops.matching) -- plus float64 summation noise. It scales
  with the spread, not the magnitude: 6e-4 for ``huge_offset`` at 25 x 25 (1e6 + steps of 0.5, totals 2.5e7),
  where one wrong swap costs 0.5 or more; the former ``rtol=1e-4`` let anything under 2,500 pass."""
  cost = np.asarray(cost, np.float64)
  finite = cost[np.isfinite(cost)]
  if finite.size == 0:
    return 0.0
  n = min(cost.shape)
  return 4 * n * np.finfo(dtype).eps * np.ptp(finite) + 4 * n * np.finfo(np.float64).eps * np.abs(finite).max()


def as_solved(cost, dtype=np.float32):
  """The cost matrix the solver saw (rounded to ``dtype``, the one it solves in), back in float64."""
  return np.asarray(cost, np.float64).astype(dtype).astype(np.float64)


def assert_optimal_total(cost, total, maximize=False):
  """``total`` equals scipy's optimal total of ``cost`` (as the solver saw it) within ``optimality_tolerance``."""
  cost = as_solved(cost)
  ref_rows, ref_cols = scipy_lsa(cost, maximize=maximize)
  np.testing.assert_allclose(total, cost[ref_rows, ref_cols].sum(), rtol=0, atol=optimality_tolerance(cost))


def assert_optimal_assignment(cost, rows, cols, maximize=False):
  """A valid scipy-shaped answer whose total is scipy's optimum (see ``assert_optimal_total``)."""
  cost = as_solved(cost)
  rows, cols = np.asarray(rows), np.asarray(cols)
  assert rows.shape == cols.shape == (min(cost.shape),)
  assert (np.diff(rows) > 0).all() and len(set(cols.tolist())) == cols.size
  assert ((0 <= cols) & (cols < cost.shape[1])).all() and ((0 <= rows) & (rows < cost.shape[0])).all()
  assert_optimal_total(cost, cost[rows, cols].sum(), maximize)


def make_cost(kind, shape, rng):
  if kind == "uniform":
    return rng.random(shape)
  if kind == "integer":
    return rng.integers(0, 5, shape)
  if kind == "all_equal":
    return np.full(shape, 3.0)
  if kind == "huge":
    return rng.random(shape) * 1e6
  if kind == "huge_offset":  # large magnitude, small differences: needs care in float32
    return 1e6 + rng.integers(0, 100, shape) * 0.5
  if kind == "negative":
    return -rng.random(shape) * 10 - 5
  raise ValueError(kind)


KINDS = ("uniform", "integer", "all_equal", "huge", "huge_offset", "negative")
SHAPES = ((6, 6), (9, 4), (4, 9), (1, 1), (1, 5), (5, 1), (25, 25))


def case_cost(kind, shape):
  """The cost matrix of a (kind, shape) case, the same in every run (``hash`` of a str is salted per process)."""
  return make_cost(kind, shape, np.random.default_rng(zlib.crc32(f"{kind} {shape}".encode())))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", KINDS)
def test_linear_sum_assignment_is_optimal(kind, shape):
  cost = case_cost(kind, shape)
  rows, cols = lsa(jnp.asarray(cost), False)
  assert rows.dtype == cols.dtype == jnp.int32
  assert_optimal_assignment(cost, rows, cols)


def closest_suboptimal_swap(cost, maximize):
  """scipy's optimum with the columns of two matched rows swapped, the swap that worsens the total least
  (but does worsen it): the hardest single mistake for the optimality check to see. None if every swap ties."""
  rows, cols = scipy_lsa(cost, maximize=maximize)
  best_total, best = cost[rows, cols].sum(), None
  sign = -1 if maximize else 1
  for i in range(rows.size):
    for j in range(i + 1, rows.size):
      swapped = cols.copy()
      swapped[[i, j]] = swapped[[j, i]]
      worsening = sign * (cost[rows, swapped].sum() - best_total)
      if worsening > 0 and (best is None or worsening < best[0]):
        best = (worsening, swapped)
  return None if best is None else (rows, best[1])


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("shape", [s for s in SHAPES if min(s) > 1])
@pytest.mark.parametrize("kind", [k for k in KINDS if k != "all_equal"])  # all_equal: every assignment ties
def test_optimality_check_detects_one_wrong_swap(kind, shape, maximize):
  """The tolerance of ``assert_optimal_assignment`` is tight enough to fail a suboptimal answer, in every case
  the solver is checked on -- ``huge_offset``'s totals of ~1e6 n included."""
  cost = as_solved(case_cost(kind, shape))
  rows, cols = closest_suboptimal_swap(cost, maximize)
  with pytest.raises(AssertionError, match="Not equal to tolerance"):
    assert_optimal_assignment(cost, rows, cols, maximize=maximize)


def test_optimality_check_resolves_one_half_step_on_a_1e6_offset():
  """25 x 25 costs of 1e6 but one 1e6 + 0.5: the identity, 0.5 above the optimum on a 2.5e7 total, fails."""
  cost = np.full((25, 25), 1e6)
  cost[0, 0] += 0.5
  rows = np.arange(25)
  assert_optimal_assignment(cost, rows, np.roll(rows, 1))
  with pytest.raises(AssertionError, match="Not equal to tolerance"):
    assert_optimal_assignment(cost, rows, rows)


@pytest.mark.parametrize("shape", [(7, 7), (3, 8), (8, 3)])
def test_maximize(shape):
  cost = np.random.default_rng(1).random(shape) * 10
  rows, cols = lsa(jnp.asarray(cost), True)
  assert_optimal_assignment(cost, rows, cols, maximize=True)


def test_identity_and_permutation_recovery():
  rng = np.random.default_rng(2)
  for size in (1, 5, 30):
    perm = rng.permutation(size)
    cost = rng.random((size, size)) + 1.0
    cost[np.arange(size), perm] = 0.0  # the unique optimum
    rows, cols = lsa(jnp.asarray(cost), False)
    np.testing.assert_array_equal(rows, np.arange(size))
    np.testing.assert_array_equal(cols, perm)


def test_empty_matrices():
  for shape in [(0, 0), (0, 3), (3, 0)]:
    rows, cols = M.linear_sum_assignment(jnp.zeros(shape))
    assert rows.shape == cols.shape == (0,)
  for backend in M.BACKENDS:
    for shape in [(2, 0, 3), (2, 3, 0), (0, 3, 4)]:
      out = M.match_sets(jnp.zeros(shape), backend=backend)
      assert out.shape == shape[:2] and out.dtype == jnp.int32 and (np.asarray(out) == -1).all()


def test_rejects_non_matrices():
  with pytest.raises(ValueError, match="2-D"):
    M.linear_sum_assignment(jnp.zeros((2, 3, 4)))


@pytest.mark.parametrize("shape", [(6, 6), (4, 7), (7, 4)])
def test_non_finite_costs_terminate_with_the_documented_optimum(shape):
  rng = np.random.default_rng(3)
  cost = rng.random(shape)
  cost[rng.random(shape) < 0.3] = np.nan
  cost[rng.random(shape) < 0.2] = np.inf
  cost[rng.random(shape) < 0.1] = -np.inf
  rows, cols = lsa(jnp.asarray(cost), False)
  # Valid and optimal for the matrix with the documented finite stand-ins (scipy itself would raise).
  assert_optimal_assignment(stand_in_costs(cost, min(shape)), rows, cols)


def test_all_non_finite_matrix_still_gives_a_valid_assignment():
  for value in (np.nan, np.inf, -np.inf):
    rows, cols = lsa(jnp.full((5, 5), value), False)
    np.testing.assert_array_equal(rows, np.arange(5))
    np.testing.assert_array_equal(np.sort(cols), np.arange(5))


def test_forbidden_edges_are_avoided_when_feasible():
  rng = np.random.default_rng(4)
  cost = rng.random((8, 8))
  cost[rng.random((8, 8)) < 0.5] = np.inf
  cost[np.arange(8), rng.permutation(8)] = rng.random(8)  # a finite perfect matching exists
  rows, cols = lsa(jnp.asarray(cost), False)
  assert np.isfinite(cost[rows, cols]).all()
  assert_optimal_assignment(cost, rows, cols)  # scipy treats +inf as forbidden


def test_vmap_over_a_batch():
  costs = np.random.default_rng(5).random((6, 5, 8)).astype(np.float32)
  rows, cols = jax.jit(jax.vmap(M.linear_sum_assignment))(jnp.asarray(costs))
  assert rows.shape == cols.shape == (6, 5)
  for c, r, k in zip(costs, np.asarray(rows), np.asarray(cols)):
    assert_optimal_assignment(c, r, k)


def detr_batch(rng, batch=4, queries=100, targets=12, counts=(0, 1, 7, 12)):
  cost = rng.random((batch, queries, targets)).astype(np.float32)
  valid = np.zeros((batch, targets), bool)
  for b, count in enumerate(counts):
    valid[b, rng.choice(targets, count, replace=False)] = True
  return cost, valid


def assert_set_matching(cost, valid, matched):
  """Each valid target matched once (min(Q, n_valid) pairs), no padded one, total = scipy's on the valid ones."""
  matched = np.asarray(matched)
  assert matched.dtype == np.int32 and matched.shape == cost.shape[:-1]
  for c, v, m in zip(cost, valid, matched):
    targets = np.flatnonzero(v)
    queries = np.flatnonzero(m >= 0)
    assert v[m[queries]].all()
    assert len(set(m[queries].tolist())) == queries.size == min(c.shape[0], targets.size)
    if targets.size:
      sub = as_solved(stand_in_costs(c[:, targets], targets.size))
      assert_optimal_total(sub, sub[queries, np.searchsorted(targets, m[queries])].sum())


@pytest.mark.parametrize("backend", M.BACKENDS)
def test_match_sets_detr_shape_with_padding(backend):
  cost, valid = detr_batch(np.random.default_rng(6))
  garbage = cost.copy()
  garbage[~np.broadcast_to(valid[:, None, :], cost.shape)] = np.nan  # padded columns must not matter
  out = match(jnp.asarray(garbage), jnp.asarray(valid), backend=backend)
  assert_set_matching(cost, valid, out)
  assert (np.asarray(out)[0] == -1).all()  # the empty target set matches nothing


@pytest.mark.parametrize("backend", ["jax", "scipy"])
def test_match_sets_fewer_queries_than_targets_and_no_mask(backend):
  rng = np.random.default_rng(7)
  cost = rng.random((3, 4, 6)).astype(np.float32)
  out = match(jnp.asarray(cost), None, backend=backend)
  assert_set_matching(cost, np.ones((3, 6), bool), out)
  valid = np.array([[1, 1, 1, 1, 1, 0], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  assert_set_matching(cost, valid, match(jnp.asarray(cost), jnp.asarray(valid), backend=backend))


@pytest.mark.parametrize("backend", ["jax", "scipy"])
def test_match_sets_non_finite_costs_and_ties(backend):
  rng = np.random.default_rng(8)
  cost, valid = detr_batch(rng, queries=20, targets=6, counts=(6, 3, 5, 2))
  cost[0] = 1.0  # all ties
  cost[1, rng.random((20, 6)) < 0.3] = np.nan
  cost[2, :, 0] = np.inf
  cost[3, 4, :] = -np.inf
  out = match(jnp.asarray(cost), jnp.asarray(valid), backend=backend)
  assert_set_matching(cost, valid, out)


@pytest.mark.parametrize("backend", ["jax", "scipy"])
def test_match_sets_vmap_and_gradient(backend):
  cost, valid = detr_batch(np.random.default_rng(9), batch=4, queries=10, targets=5, counts=(5, 2, 0, 4))
  out = jax.jit(jax.vmap(lambda c, v: M.match_sets(c, v, backend=backend)))(jnp.asarray(cost), jnp.asarray(valid))
  assert_set_matching(cost, valid, out)

  def matched_cost(c):
    m = M.match_sets(c, jnp.asarray(valid), backend=backend)
    picked = jnp.take_along_axis(c, jnp.maximum(m, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(m >= 0, picked, 0).sum()

  # The matching itself is constant (no gradient); the matched costs get a one-hot gradient.
  grad = np.asarray(jax.jit(jax.grad(matched_cost))(jnp.asarray(cost)))
  m = np.asarray(out)
  expected = np.zeros_like(cost)
  for b, q in zip(*np.nonzero(m >= 0)):
    expected[b, q, m[b, q]] = 1
  np.testing.assert_array_equal(grad, expected)


def test_match_sets_rejects_bad_arguments():
  with pytest.raises(ValueError, match="backend"):
    M.match_sets(jnp.zeros((3, 2)), backend="cuda")
  with pytest.raises(ValueError, match="target_valid"):
    M.match_sets(jnp.zeros((2, 3, 4)), jnp.ones((2, 5), bool))
