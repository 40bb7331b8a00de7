"""Times cvjax RoIAlign / RoIPool against torchvision.ops.roi_align / roi_pool (CPU), in the same run.

Problem: 512 RoIs, 7x7 output, C=256, features 2x64x64 (stride 16 of a 1024 image), boxes with uniform centres
in the image and sides uniform in [32, 512] image pixels (2..32 map pixels). cvjax reads the NHWC map,
torchvision the same values as NCHW (its layout; the transposition is done once, outside the timings). Both
run in float32; "forward + backward" also computes the gradient w.r.t. the features for a fixed random output
gradient (jax.vjp under jit vs torch autograd).

Run from the repository root: ``python benchmarks/roi_ops.py`` (``benchmarks/ops.py`` runs it too). Lines read
``name  cvjax X ms  torchvision Y ms  ratio R`` with R = torchvision / cvjax (> 1: cvjax is faster). Each time
is the best of a few calls, jitted and warmed up; the name shows the largest absolute difference between the
two outputs (``fwd``) or gradients (``fwd+bwd``), float32 summation order.
"""

from __future__ import annotations

import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from cvjax.ops.roi_align import roi_align
from cvjax.ops.roi_pool import roi_pool

# torchvision's wheel needs the tests' CPU shim to import next to a CPU-only torch (see its docstring).
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers"))
import torchvision_cpu  # noqa: E402  pylint: disable=wrong-import-position

NUM_ROIS, BATCH, SIZE, CHANNELS, OUTPUT = 512, 2, 64, 256, 7
IMAGE, SCALE = 1024, 1.0 / 16


def import_torchvision():
  """torchvision, or SystemExit with how to install it: it is the reference these timings compare with."""
  torchvision = torchvision_cpu.import_torchvision()
  if torchvision is None:
    raise SystemExit("torchvision is not importable: pip install torch==2.13.0 torchvision==0.28.0")
  return torchvision


def make_problem(seed: int = 0):
  """``(features [B, H, W, C] float32, rois [K, 5] float32, output gradient [K, 7, 7, C] float32)``."""
  rng = np.random.default_rng(seed)
  features = rng.standard_normal((BATCH, SIZE, SIZE, CHANNELS)).astype(np.float32)
  centre = rng.uniform(0, IMAGE, (NUM_ROIS, 2))
  half = rng.uniform(32, 512, (NUM_ROIS, 2)) / 2
  rois = np.concatenate([rng.integers(0, BATCH, (NUM_ROIS, 1)), centre - half, centre + half], axis=1)
  cotangent = rng.standard_normal((NUM_ROIS, OUTPUT, OUTPUT, CHANNELS)).astype(np.float32)
  return features, rois.astype(np.float32), cotangent


def _timed(fn, repeats: int):
  """``(best wall time in ms over repeats, last result)`` of ``fn()`` (after one warm-up call)."""
  result = jax.block_until_ready(fn())
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = jax.block_until_ready(fn())
    best = min(best, time.perf_counter() - start)
  return best * 1e3, result


def _line(name, cvjax_ms, torchvision_ms):
  print(f"{name:<60s} cvjax {cvjax_ms:7.1f} ms  torchvision {torchvision_ms:7.1f} ms  "
        f"ratio {torchvision_ms / cvjax_ms:5.2f}", flush=True)


def _cvjax_fns(op):
  """Jitted ``forward(f, r)`` and ``forward_backward(f, r, g) -> (out, d features)`` of ``op(f, r)``."""

  def forward_backward(f, r, g):
    out, vjp = jax.vjp(lambda x: op(x, r), f)
    return out, vjp(g)[0]

  return jax.jit(op), jax.jit(forward_backward)


def _torch_fns(op, features, rois, cotangent):
  """``forward()`` and ``forward_backward()`` of torchvision ``op(features_nchw, rois)``, NHWC numpy results."""
  x = torch.from_numpy(np.ascontiguousarray(features.transpose(0, 3, 1, 2)))
  r = torch.from_numpy(rois)
  g = torch.from_numpy(np.ascontiguousarray(cotangent.transpose(0, 3, 1, 2)))

  def forward():
    with torch.no_grad():
      return op(x, r).numpy().transpose(0, 2, 3, 1)

  def forward_backward():
    leaf = x.detach().requires_grad_(True)
    out = op(leaf, r)
    out.backward(g)
    return out.detach().numpy().transpose(0, 2, 3, 1), leaf.grad.numpy().transpose(0, 2, 3, 1)

  return forward, forward_backward


def _compare(label, cvjax_op, torch_op, arrays, repeats):
  """Prints the forward and the forward + backward line of one op."""
  features, rois, cotangent = arrays
  jf, jr, jg = jnp.asarray(features), jnp.asarray(rois), jnp.asarray(cotangent)
  forward, forward_backward = _cvjax_fns(cvjax_op)
  torch_forward, torch_forward_backward = _torch_fns(torch_op, features, rois, cotangent)
  ms, out = _timed(lambda: forward(jf, jr), repeats)
  torch_ms, torch_out = _timed(torch_forward, repeats)
  _line(f"{label} fwd err {float(np.abs(np.asarray(out) - torch_out).max()):.0e}", ms, torch_ms)
  ms, (out, grad) = _timed(lambda: forward_backward(jf, jr, jg), repeats)
  torch_ms, (torch_out, torch_grad) = _timed(torch_forward_backward, repeats)
  _line(f"{label} fwd+bwd grad err {float(np.abs(np.asarray(grad) - torch_grad).max()):.0e}", ms, torch_ms)


def run(repeats: int = 5) -> None:
  """Prints two lines (forward; forward + backward) per case.

  ``[auto]`` is what ``roi_align`` picks by itself; ``[dense]`` / ``[gather]`` force one exact path.
  """
  torchvision = import_torchvision()
  arrays = make_problem()
  cases = [("sampling 2", 2, "auto"), ("sampling 2", 2, "dense"), ("sampling 2", 2, "gather"),
           ("adaptive", -1, "auto"), ("adaptive", -1, "dense")]
  for label, sampling, method in cases:
    _compare(f"roi_align {label} aligned [{method}]",
             lambda f, r, s=sampling, m=method: roi_align(f, r, OUTPUT, SCALE, s, True, method=m),
             lambda x, r, s=sampling: torchvision.ops.roi_align(x, r, OUTPUT, SCALE, s, True), arrays, repeats)
  _compare("roi_pool", lambda f, r: roi_pool(f, r, OUTPUT, SCALE),
           lambda x, r: torchvision.ops.roi_pool(x, r, OUTPUT, SCALE), arrays, repeats)


def machine_line() -> str:
  """Devices, versions, threads and the load average (the figures move with other load on shared machines)."""
  return (f"devices: {jax.devices()}  jax {jax.__version__}  torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)  host CPUs: {os.cpu_count()}  "
          f"load average (1, 5, 15 min): {', '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
  import_torchvision()
  print(machine_line(), flush=True)
  run()
  print(f"load average at the end: {', '.join(f'{v:.2f}' for v in os.getloadavg())}", flush=True)
