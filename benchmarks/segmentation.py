"""Times segmentation inference on this CPU, cvjax against its reference in the same run: torchvision's
``fcn_resnet50`` and HF's ``MaskFormerForInstanceSegmentation`` (ResNet-50 backbone), same random weights.

Both references are converted with cvjax's own converters (``from_torch_state_dict('fcn_resnet50', ...)``,
``from_transformers``), so the two sides compute the same function; cvjax runs ``jax.jit(module.apply)``. After
warm-up the two take turns, ``--steps`` rounds; medians printed with the throughput ratio (above 1: cvjax faster).

  python benchmarks/segmentation.py --steps=3
"""

from __future__ import annotations

import argparse
import os

import jax
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable on CPU-only machines)
from _torch_imports import TORCHVISION as torchvision  # noqa: E402

from cvjax.convert import from_torch_state_dict, from_transformers  # noqa: E402
from train_step import median_seconds  # noqa: E402


def _timed(name, cvjax_fn, torch_fn, steps):
  times = median_seconds({"cvjax": cvjax_fn, "reference": torch_fn}, steps, warmup=1)
  print(f"  {name:38s} cvjax {times['cvjax'] * 1e3:8.0f} ms  reference {times['reference'] * 1e3:8.0f} ms  "
        f"throughput ratio cvjax/reference {times['reference'] / times['cvjax']:.2f}x", flush=True)


def fcn(args, images):
  torch.manual_seed(0)
  reference = torchvision.models.segmentation.fcn_resnet50(weights=None, weights_backbone=None, num_classes=21,
                                                           aux_loss=True).eval()
  module, variables = from_torch_state_dict("fcn_resnet50", reference.state_dict(), num_classes=21,
                                            aux_loss=True)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  x = jax.device_put(images)
  torch_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def run_torch():
    with torch.no_grad():
      reference(torch_x)

  _timed(f"fcn_resnet50 inference, batch {args.batch}", lambda: jax.block_until_ready(apply(variables, x)),
         run_torch, args.steps)


def maskformer(args, images):
  from transformers import MaskFormerConfig, MaskFormerForInstanceSegmentation, ResNetConfig

  torch.manual_seed(0)
  backbone = ResNetConfig(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck",
                          out_features=["stage1", "stage2", "stage3", "stage4"])
  config = MaskFormerConfig(backbone_config=backbone, num_labels=150, num_queries=100)
  reference = MaskFormerForInstanceSegmentation(config).eval()
  module, variables = from_transformers(reference)
  apply = jax.jit(lambda v, x: module.apply(v, x, train=False))
  x = jax.device_put(images)
  torch_x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())

  def run_torch():
    with torch.no_grad():
      reference(pixel_values=torch_x)

  _timed(f"MaskFormer-R50 forward, batch {args.batch}", lambda: jax.block_until_ready(apply(variables, x)),
         run_torch, args.steps)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--models", default="fcn,maskformer")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  print(f"{args.size}x{args.size} inputs, {args.threads} torch threads, jax {jax.__version__}, "
        f"torch {torch.__version__}", flush=True)
  for name in args.models.split(","):
    {"fcn": fcn, "maskformer": maskformer}[name](args, images)


if __name__ == "__main__":
  main()
