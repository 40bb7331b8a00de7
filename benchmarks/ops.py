"""Times cvjax's Hungarian matching and NMS against their references, then the RoI ops (benchmarks/roi_ops.py).

Run from the repository root: ``python benchmarks/ops.py``. Lines read
``name  cvjax X ms  <reference> Y ms  ratio R  goal ...`` with R = reference / cvjax (> 1: cvjax is faster), the
convention of benchmarks/roi_ops.py. Each time is the best, over several rounds, of the mean of a few calls,
jitted and warmed up. The first and last lines give the machine's load average: shared machines move the
figures by 2x.

Problems:
- matching: DETR's matcher on a batch of 64 images, 100 queries x 100 padded target columns of which 5..20
  (random per image, at random positions) are valid. Reference: scipy's linear_sum_assignment per image over
  the valid columns, in a Python loop (the DETR code path). Goals: ``'jax'`` within 5x of it, ``'auto'`` (the
  scipy callback on CPU) within 1.2x.
- nms: 2000 boxes, centres uniform in a 1000 x 1000 image, sides log-uniform in [10, 100] px, so most boxes
  survive: greedy NMS's worst case, O(N^2 / 2) IoUs. Reference: torchvision.ops.nms on the CPU, timed in the
  same run on the same float32 boxes; the goal is cvjax within 2x of it. A clustered problem (few kept) and
  batched_nms over 80 classes (torchvision's per-class loop at this size) follow. ``exact`` says whether cvjax
  kept torchvision's indices in torchvision's order. Fast NMS (``cvjax.ops.fast_nms``, YOLACT's, which keeps a
  subset of greedy NMS's boxes) is timed on the single-class problems against torchvision and cvjax's greedy nms.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
import torch

from cvjax.ops.matching import match_sets
from cvjax.ops.nms import batched_nms, fast_nms, nms

BATCH, QUERIES, TARGETS = 64, 100, 100
NUM_BOXES = 2000


def _best_ms(fn, rounds: int = 7, calls: int = 10) -> float:
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(fn())
    best = min(best, (time.perf_counter() - start) / calls)
  return best * 1e3


def _line(name: str, cvjax_ms: float, reference: str, reference_ms: float, goal: str) -> None:
  print(f"{name:<52s} cvjax {cvjax_ms:8.2f} ms  {reference} {reference_ms:8.2f} ms  "
        f"ratio {reference_ms / cvjax_ms:6.2f}  goal {goal}", flush=True)


def matching_problem(seed: int = 0):
  """``(cost [B, Q, G] float32, valid [B, G] bool)``: 5..20 valid targets per image at random columns."""
  rng = np.random.default_rng(seed)
  cost = rng.random((BATCH, QUERIES, TARGETS)).astype(np.float32)
  valid = np.zeros((BATCH, TARGETS), bool)
  for row, count in zip(valid, rng.integers(5, 21, BATCH)):
    row[rng.choice(TARGETS, count, replace=False)] = True
  return cost, valid


def scipy_matching(cost: np.ndarray, valid: np.ndarray) -> list:
  """The reference: DETR's per-image scipy loop over the valid columns."""
  return [scipy.optimize.linear_sum_assignment(c[:, np.flatnonzero(v)]) for c, v in zip(cost, valid)]


def bench_matching() -> None:
  cost, valid = matching_problem()
  reference_ms = _best_ms(lambda: scipy_matching(cost, valid))
  expected = sum(c[:, np.flatnonzero(v)][r, k].sum() for c, v, (r, k) in zip(cost, valid,
                                                                            scipy_matching(cost, valid)))
  jc, jv = jnp.asarray(cost), jnp.asarray(valid)
  for backend, goal in (("jax", 0.2), ("auto", 1 / 1.2)):
    fn = jax.jit(lambda c, v, b=backend: match_sets(c, v, backend=b))
    matched = np.asarray(fn(jc, jv))
    rows, cols = np.nonzero(matched >= 0)
    total = cost[rows, cols, matched[rows, cols]].sum()
    name = f"match_sets [{backend}] B={BATCH} opt.gap {abs(total - expected) / expected:.0e}"
    _line(name, _best_ms(lambda: fn(jc, jv)), "scipy", reference_ms, f"ratio >= {goal:.2f}")


def nms_problem(kind: str, seed: int = 0):
  """``(boxes [N, 4] xyxy float32, scores [N] float32)``; 'sparse' (most kept) or 'clustered' (few kept)."""
  rng = np.random.default_rng(seed)
  if kind == "sparse":
    corner = rng.uniform(0, 1000, (NUM_BOXES, 2))
    size = np.exp(rng.uniform(np.log(10), np.log(100), (NUM_BOXES, 2)))
  else:  # jittered detections around 20 objects
    centres, sizes = rng.uniform(0, 800, (20, 2)), np.exp(rng.uniform(np.log(40), np.log(200), (20, 2)))
    obj = rng.integers(0, 20, NUM_BOXES)
    corner = centres[obj] + rng.normal(0, 10, (NUM_BOXES, 2))
    size = sizes[obj] * rng.uniform(0.8, 1.2, (NUM_BOXES, 2))
  boxes = np.concatenate([corner, corner + size], 1).astype(np.float32)
  return boxes, rng.random(NUM_BOXES).astype(np.float32)


def bench_nms(torchvision) -> None:
  cases = [("sparse", None, NUM_BOXES), ("clustered", None, 100), ("sparse", 80, NUM_BOXES)]
  for kind, num_classes, max_output_size in cases:
    boxes, scores = nms_problem(kind)
    classes = None if num_classes is None else np.random.default_rng(1).integers(0, num_classes, NUM_BOXES)
    tb, ts = torch.from_numpy(boxes), torch.from_numpy(scores)
    if classes is None:
      reference = lambda: torchvision.ops.nms(tb, ts, 0.5)
      fn = jax.jit(lambda b, s: nms(b, s, 0.5, max_output_size))
      args = (jnp.asarray(boxes), jnp.asarray(scores))
      name = f"nms {kind} N={NUM_BOXES} max_out={max_output_size}"
    else:
      tc = torch.from_numpy(classes)
      reference = lambda: torchvision.ops.batched_nms(tb, ts, tc, 0.5)
      fn = jax.jit(lambda b, s, c: batched_nms(b, s, c, 0.5, max_output_size))
      args = (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes))
      name = f"batched_nms {num_classes} classes N={NUM_BOXES}"
    expected = reference().numpy()[:max_output_size]
    indices, num_valid = fn(*args)
    exact = int(num_valid) == len(expected) and (np.asarray(indices)[:len(expected)] == expected).all()
    goal = "ratio >= 0.50" if (kind, num_classes) == ("sparse", None) else "-"
    reference_ms = _best_ms(reference)
    _line(f"{name} kept {len(expected)} exact {exact}", _best_ms(lambda: fn(*args)), "torchvision",
          reference_ms, goal)
    if classes is None:  # Fast NMS (YOLACT): one IoU matrix, suppressed boxes suppress too (keeps fewer)
      fast = jax.jit(lambda b, s: fast_nms(b, s, 0.5, max_output_size))
      kept = int(fast(*args)[1])
      _line(f"fast_nms {kind} N={NUM_BOXES} kept {kept} (greedy {len(expected)})", _best_ms(lambda: fast(*args)),
            "torchvision", reference_ms, "-")
      greedy_ms = _best_ms(lambda: fn(*args))
      _line(f"fast_nms {kind} vs cvjax greedy nms", _best_ms(lambda: fast(*args)), "cvjax nms", greedy_ms, "-")


def _load_roi_ops():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roi_ops.py")
  spec = importlib.util.spec_from_file_location("roi_ops", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def main() -> None:
  roi_ops = _load_roi_ops()  # also the torchvision import, shared with it
  torchvision = roi_ops.import_torchvision()
  print(roi_ops.machine_line(), flush=True)
  bench_matching()
  bench_nms(torchvision)
  roi_ops.run()
  print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)


if __name__ == "__main__":
  main()
