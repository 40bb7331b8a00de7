"""Times Swin-T on CPU: cvjax (jit) against HF's PyTorch SwinForImageClassification, and windowed against global
attention.

1. Forward pass of Swin-T (embed 96, depths 2-2-6-2, heads 3-6-12-24, window 7, 1000 classes) on one batch:
   cvjax's jitted ``Swin`` against HF ``SwinForImageClassification`` in eval mode under ``torch.no_grad`` (random
   weights from ``SwinConfig``; cvjax gets the same ones through ``cvjax.convert.from_transformers``, and the
   largest logit difference is printed as a check).
2. Attention at stage-1 scale (56x56 tokens, C=96, 3 heads, window 7): the analytic FLOPs of Swin paper Eq. (1)/(2)
   (global ``4hwC^2 + 2(hw)^2 C`` vs windowed ``4hwC^2 + 2M^2 hwC``; the ``4hwC^2`` projections are common) and
   the measured time of ``cvjax.ops.window_attention`` over the 64 windows (partition and reverse included)
   against the same function over all 3136 tokens as one window (the q/k/v/o projections are left out of both).

After warm-up the implementations take turns, ``--repeats`` rounds, so that they share the machine's load; each
one's median is printed.

  python benchmarks/swin.py --batch=16 --size=224
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import SwinConfig, SwinForImageClassification

from cvjax.convert import from_transformers
from cvjax.ops.window_attention import window_attention, window_partition, window_reverse
from train_step import median_seconds  # benchmarks/ is on sys.path when this file is run


def model_steps(batch: int, size: int):
  """Closures running one cvjax and one PyTorch Swin-T forward pass on the same weights and images."""
  torch.manual_seed(0)
  hf_model = SwinForImageClassification(SwinConfig(num_labels=1000, attn_implementation="eager")).eval()
  module, variables = from_transformers(hf_model)
  images = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
  x_torch, x_jax = torch.from_numpy(images), jnp.asarray(images.transpose(0, 2, 3, 1))
  forward = jax.jit(lambda v, x: module.apply(v, x, train=False))

  def torch_forward():
    with torch.no_grad():
      return hf_model(x_torch).logits

  difference = np.abs(np.asarray(forward(variables, x_jax)) - torch_forward().numpy()).max()
  return {"cvjax (jit)": lambda: jax.block_until_ready(forward(variables, x_jax)),
          "pytorch (HF, no_grad)": torch_forward}, difference


def attention_flops(tokens_hw: int, channels: int, window: int) -> dict:
  """Swin paper Eq. (1)/(2) for an ``hw``-token map (multiply-adds counted as 1, as the paper)."""
  hw = tokens_hw * tokens_hw
  projections = 4 * hw * channels**2
  return {"projections": projections, "global": 2 * hw**2 * channels, "windowed": 2 * window**2 * hw * channels}


def attention_steps(batch: int, tokens_hw: int, channels: int, heads: int, window: int):
  """Closures running windowed and global attention (no projections) over the same q, k, v maps."""
  head_dim = channels // heads
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(rng.standard_normal((batch, tokens_hw, tokens_hw, channels), dtype=np.float32))
             for _ in range(3))
  bias = jnp.asarray(rng.standard_normal((heads, window**2, window**2), dtype=np.float32))

  def heads_first(t, groups, tokens):  # [groups, tokens, C] -> [groups, heads, tokens, head_dim]
    return t.reshape(groups, tokens, heads, head_dim).transpose(0, 2, 1, 3)

  @jax.jit
  def windowed(q, k, v):
    groups = batch * (tokens_hw // window) ** 2
    split = lambda t: heads_first(window_partition(t, window).reshape(groups, window**2, channels), groups,
                                  window**2)
    out = window_attention(split(q), split(k), split(v), bias)
    out = out.transpose(0, 2, 1, 3).reshape(groups, window, window, channels)
    return window_reverse(out, window, tokens_hw, tokens_hw)

  @jax.jit
  def global_attention(q, k, v):
    tokens = tokens_hw * tokens_hw
    split = lambda t: heads_first(t.reshape(batch, tokens, channels), batch, tokens)
    out = window_attention(split(q), split(k), split(v))
    return out.transpose(0, 2, 1, 3).reshape(batch, tokens_hw, tokens_hw, channels)

  return {"windowed (window_attention)": lambda: jax.block_until_ready(windowed(q, k, v)),
          "global (one 3136-token window)": lambda: jax.block_until_ready(global_attention(q, k, v))}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=16, help="Swin-T forward batch")
  parser.add_argument("--size", type=int, default=224, help="square input side in pixels")
  parser.add_argument("--attention_batch", type=int, default=4, help="images in the attention comparison")
  parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median per implementation)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  parser.add_argument("--skip_model", action="store_true", help="only the attention comparison")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  print(f"{jax.default_backend()} ({os.cpu_count()} cores, torch threads {args.threads}); median of "
        f"{args.repeats} round-robin runs after warm-up; load average before: {os.getloadavg()[0]:.1f}")

  if not args.skip_model:
    steps, difference = model_steps(args.batch, args.size)
    times = median_seconds(steps, args.repeats)
    reference = times["pytorch (HF, no_grad)"]
    print(f"Swin-T forward, batch {args.batch}, {args.size}x{args.size} (max |logit difference| "
          f"{difference:.1e}):")
    for name, seconds in times.items():
      print(f"  {name:32s} {seconds * 1e3:9.1f} ms   {seconds / reference:6.2f}x pytorch   "
            f"{args.batch / seconds:7.1f} images/s")

  tokens_hw, channels, heads, window = 56, 96, 3, 7
  flops = attention_flops(tokens_hw, channels, window)
  print(f"Attention over {tokens_hw}x{tokens_hw} tokens, C={channels}, {heads} heads, window {window}:")
  print(f"  analytic (Swin Eq. 1/2, per image): projections 4hwC^2 = {flops['projections'] / 1e9:.3f} G; "
        f"attention 2(hw)^2C = {flops['global'] / 1e9:.3f} G global vs 2M^2hwC = {flops['windowed'] / 1e9:.3f} G "
        f"windowed ({flops['global'] / flops['windowed']:.0f}x); whole layer "
        f"{(flops['projections'] + flops['global']) / (flops['projections'] + flops['windowed']):.1f}x")
  times = median_seconds(attention_steps(args.attention_batch, tokens_hw, channels, heads, window), args.repeats)
  windowed, global_ = times["windowed (window_attention)"], times["global (one 3136-token window)"]
  print(f"  measured, batch {args.attention_batch}, attention only (no projections):")
  for name, seconds in times.items():
    print(f"    {name:32s} {seconds * 1e3:9.1f} ms")
  print(f"    global / windowed time: {global_ / windowed:.1f}x (analytic attention FLOPs ratio "
        f"{flops['global'] / flops['windowed']:.0f}x)")
  print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
