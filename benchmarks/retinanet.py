"""Times RetinaNet (ResNet-50-FPN) inference, cvjax against torchvision on this machine's CPU.

Both are ``retinanet_resnet50_fpn`` with the same random weights (torchvision's model, frozen batch norm,
converted with ``cvjax.convert.from_torch_state_dict``), batch 2 at 512 x 512, torchvision's inference settings
(score > 0.05, top 1000 candidates per level, NMS 0.5, 300 detections). torchvision's transform is the identity
at 512 (min/max size 512, mean 0 / std 1), so both see the same tensors. The subnets' weights are scaled up as
in the parity test so that scores spread and every level fills its 1,000 candidates: with the N(0, 0.01) init
all scores sit at the prior 0.01, below the threshold, and NMS would have nothing to do -- unlike a trained
model. cvjax runs the jitted ``module.apply(..., train=False)``; after warm-up the two take turns,
``--steps`` rounds; medians printed, with the number of detections each returned.

  python benchmarks/retinanet.py --steps=5
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable on CPU-only machines)
from _torch_imports import TORCHVISION as torchvision  # noqa: E402

from cvjax.convert import from_torch_state_dict  # noqa: E402
from train_step import median_seconds  # noqa: E402

NUM_CLASSES = 90  # torchvision's COCO head: 91 columns, column 0 unused


def torch_model(size: int):
  from torchvision.models.detection import retinanet_resnet50_fpn
  torch.manual_seed(0)
  model = retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=NUM_CLASSES + 1,
                                 min_size=size, max_size=size, image_mean=[0.0] * 3, image_std=[1.0] * 3)
  with torch.no_grad():
    head = model.head
    for conv in list(head.classification_head.conv) + list(head.regression_head.conv):
      conv[0].weight.mul_(3.0)
    head.classification_head.cls_logits.weight.mul_(2.5)
  return model.eval()


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  images = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)

  reference = torch_model(args.size)
  module, variables = from_torch_state_dict("retinanet_resnet50_fpn", reference.state_dict(),
                                            num_classes=NUM_CLASSES)
  apply = jax.jit(functools.partial(module.apply, train=False))
  jax_images = jnp.asarray(images)
  pixel_mask = jnp.ones(images.shape[:3], bool)
  torch_images = [torch.from_numpy(i.transpose(2, 0, 1).copy()) for i in images]
  counts = {}

  def cvjax_infer():
    outputs = jax.block_until_ready(apply(variables, jax_images, pixel_mask=pixel_mask))
    counts["cvjax"] = int(np.asarray(outputs["valid"]).sum())

  def torch_infer():
    with torch.no_grad():
      detections = reference(torch_images)
    counts["torchvision"] = sum(len(d["boxes"]) for d in detections)

  start = time.perf_counter()
  cvjax_infer()
  print(f"cvjax compile + first call: {time.perf_counter() - start:.1f} s")
  times = median_seconds({"cvjax": cvjax_infer, "torchvision": torch_infer}, args.steps, warmup=1)
  print(f"retinanet_resnet50_fpn inference, batch {args.batch} at {args.size}x{args.size}, {args.threads} torch "
        f"threads; detections returned: cvjax {counts['cvjax']}, torchvision {counts['torchvision']}")
  print(f"  cvjax {times['cvjax'] * 1e3:8.0f} ms  torchvision {times['torchvision'] * 1e3:8.0f} ms  "
        f"throughput ratio cvjax/torchvision {times['torchvision'] / times['cvjax']:.2f}x")


if __name__ == "__main__":
  main()
