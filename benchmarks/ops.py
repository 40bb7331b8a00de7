"""Times cvjax's Hungarian matching and NMS against their references, then the RoI ops (benchmarks/roi_ops.py).

Run from the repository root: ``python benchmarks/ops.py``. Lines read
``name  cvjax X ms  reference Y ms  ratio R  goal ...`` with R = reference / cvjax (> 1: cvjax is faster), the
convention of benchmarks/roi_ops.py. Each time is the best, over several rounds, of the mean of a few calls,
jitted and warmed up.

Problems:
- matching: DETR's matcher on a batch of 64 images, 100 queries x 100 padded target columns of which 5..20
  (random per image, at random positions) are valid. Reference: scipy's linear_sum_assignment per image over
  the valid columns, in a Python loop (the DETR code path). Goals: ``'jax'`` within 5x of it, ``'auto'`` (the
  scipy callback on CPU) within 1.2x.
- nms: 2000 boxes, centres uniform in a 1000 x 1000 image, sides log-uniform in [10, 100] px, so most boxes
  survive: greedy NMS's worst case, O(N^2 / 2) IoUs. torchvision.ops.nms takes about 3.3 ms for it on a CPU
  like this one (measured by the lead; torchvision has no CPU build here), so the goal is <= 6.6 ms. The
  reference column is a vectorised float64 NumPy port (one kept box at a time). A clustered problem (few kept)
  and batched_nms over 80 classes follow.
"""

from __future__ import annotations

import importlib.util
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from cvjax.ops.matching import match_sets
from cvjax.ops.nms import batched_nms, nms

BATCH, QUERIES, TARGETS = 64, 100, 100
NUM_BOXES = 2000
TORCHVISION_NMS_MS = 3.3


def _best_ms(fn, rounds: int = 7, calls: int = 10) -> float:
  jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(calls):
      jax.block_until_ready(fn())
    best = min(best, (time.perf_counter() - start) / calls)
  return best * 1e3


def _line(name: str, cvjax_ms: float, reference_ms: float, goal: str) -> None:
  print(f"{name:<40s} cvjax {cvjax_ms:8.2f} ms  reference {reference_ms:8.2f} ms  "
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
    _line(name, _best_ms(lambda: fn(jc, jv)), reference_ms, f"ratio >= {goal:.2f}")


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


def numpy_nms(boxes, scores, iou_threshold, classes=None) -> np.ndarray:
  """Float64 greedy NMS, vectorised over the remaining boxes, one kept box per step."""
  boxes = boxes.astype(np.float64)
  order = np.argsort(-scores, kind="stable")
  boxes = boxes[order]
  classes = np.zeros(len(boxes)) if classes is None else classes[order]
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  alive = np.ones(len(boxes), bool)
  keep = []
  for i in range(len(boxes)):
    if not alive[i]:
      continue
    keep.append(i)
    rest = np.arange(i + 1, len(boxes))[alive[i + 1:]]
    w = np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0])
    h = np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1])
    inter = np.maximum(w, 0) * np.maximum(h, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
      iou = inter / (areas[i] + areas[rest] - inter)
    alive[rest[(iou > iou_threshold) & (classes[rest] == classes[i])]] = False
  return order[keep]


def bench_nms() -> None:
  cases = [("sparse", None, NUM_BOXES), ("clustered", None, 100), ("sparse", 80, NUM_BOXES)]
  for kind, num_classes, max_output_size in cases:
    boxes, scores = nms_problem(kind)
    classes = None if num_classes is None else np.random.default_rng(1).integers(0, num_classes, NUM_BOXES)
    expected = numpy_nms(boxes, scores, 0.5, classes)[:max_output_size]
    reference_ms = _best_ms(lambda: numpy_nms(boxes, scores, 0.5, classes), rounds=2, calls=1)
    if classes is None:
      fn = jax.jit(lambda b, s: nms(b, s, 0.5, max_output_size))
      args = (jnp.asarray(boxes), jnp.asarray(scores))
      name = f"nms {kind} N={NUM_BOXES} max_out={max_output_size}"
    else:
      fn = jax.jit(lambda b, s, c: batched_nms(b, s, c, 0.5, max_output_size))
      args = (jnp.asarray(boxes), jnp.asarray(scores), jnp.asarray(classes))
      name = f"batched_nms {num_classes} classes N={NUM_BOXES}"
    indices, num_valid = fn(*args)
    exact = int(num_valid) == len(expected) and (np.asarray(indices)[:len(expected)] == expected).all()
    cvjax_ms = _best_ms(lambda: fn(*args))
    goal = (f"cvjax <= {2 * TORCHVISION_NMS_MS:.1f} ms (2x torchvision CPU {TORCHVISION_NMS_MS} ms)"
            if (kind, num_classes) == ("sparse", None) else "-")
    _line(f"{name} kept {len(expected)} exact {exact}", cvjax_ms, reference_ms, goal)


def bench_roi_ops() -> None:
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "roi_ops.py")
  if not os.path.exists(path):
    print("benchmarks/roi_ops.py not found: RoI ops skipped", flush=True)
    return
  spec = importlib.util.spec_from_file_location("roi_ops", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  module.run()


def main() -> None:
  print(f"devices: {jax.devices()}  jax {jax.__version__}  host CPUs: {os.cpu_count()}", flush=True)
  bench_matching()
  bench_nms()
  bench_roi_ops()


if __name__ == "__main__":
  main()
