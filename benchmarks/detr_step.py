"""Times one DETR train step: cvjax (jitted, state donated) against HF ``DetrForObjectDetection`` (PyTorch eager).

A step is forward + set criterion (Hungarian matching, cross-entropy with eos_coef 0.1, L1 x 5 and
(1 - GIoU) x 2, on the final and every auxiliary decoder output) + backward + grad-norm clip 0.1 + AdamW
(lr 1e-4, weight decay 1e-4), in training mode (dropout 0.1), on one batch. As in the original DETR, the
backbone's stem and first stage are frozen and layer2..layer4 train, on both sides: cvjax with the optimizer of
``configs/detr.py:coco_r50`` (its ``freeze`` patterns, backbone lr x0.1), dropping the frozen gradients as the
launcher's train step does; HF as ``torch_step`` explains (``--hf_as_is`` keeps HF's own setting, which
freezes the whole backbone and so skips its backward). HF computes its loss itself,
from ``labels`` (its own scipy matcher and ``auxiliary_loss=True``); cvjax's is
``cvjax.tasks.detection.detr_loss`` (``match_sets`` backend 'auto': scipy on CPU). Both models are the
same architecture with the same random weights (HF ResNet backbone with frozen batch norm, built from a
config, nothing downloaded; cvjax's copy through ``cvjax.convert.from_transformers``); parameters and
optimizer state carry over from step to step on both sides. After warm-up the two take turns, one step each,
``--steps`` rounds, so that they share whatever load the machine has; each one's median is printed.

  python benchmarks/detr_step.py --backbone=r50 --batch=2 --size=256

HF's ``auxiliary_loss=True`` also feeds each decoder layer's LayerNormed output to the next layer (the
original DETR, and cvjax, feed the un-normalised one): the two losses differ in value, not in work.
"""

from __future__ import annotations

import argparse
import functools
import os
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig

from cvjax.convert import from_transformers
from cvjax.tasks.detection import detr_loss
from cvjax.train.initialization import load_config_file
from cvjax.train.optim import create_optimizer, drop_frozen_gradients, frozen_mask
from train_step import median_seconds  # benchmarks/ is on sys.path when this file is run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM = 1e-4, 1e-4, 0.1
BACKBONES = {  # torchvision ResNet-18 / -50 as HF ResNet configs
    "r18": ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                        out_features=["stage4"]),
    "r50": ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                        layer_type="bottleneck", out_features=["stage4"]),
}


def random_targets(rng: np.random.Generator, batch: int, max_boxes: int, num_classes: int):
  """Between 1 and ``max_boxes`` boxes per image: ``boxes [B, M, 4]`` normalised cxcywh inside the image,
  ``labels [B, M]`` int32 and ``valid [B, M]`` bool (padded slots hold zeros)."""
  counts = rng.integers(1, max_boxes + 1, batch)
  valid = np.arange(max_boxes)[None, :] < counts[:, None]
  size = rng.uniform(0.05, 0.5, (batch, max_boxes, 2))
  center = size / 2 + rng.uniform(0, 1, (batch, max_boxes, 2)) * (1 - size)
  boxes = np.where(valid[..., None], np.concatenate([center, size], -1), 0).astype(np.float32)
  labels = np.where(valid, rng.integers(0, num_classes, (batch, max_boxes)), 0).astype(np.int32)
  return {"boxes": boxes, "labels": labels, "valid": valid}


def cvjax_step(module, variables, images: np.ndarray, targets) -> Callable[[], float]:
  """A closure running one jitted cvjax train step to completion (params and optimizer state donated); it
  returns the step's loss."""
  opt = load_config_file(os.path.join(REPO, "configs", "detr.py:coco_r50")).optimizer
  assert (opt.learning_rate, opt.weight_decay, opt.grad_clip_norm) == (LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM)
  tx, _ = create_optimizer(opt, total_steps=1000)
  frozen = frozen_mask(opt, variables["params"])
  assert any(jax.tree.leaves(frozen)), "configs/detr.py's freeze patterns match no parameter"
  batch_stats = variables["batch_stats"]  # the backbone's frozen batch norm: never updated

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def train_step(params, opt_state, rng, x, pixel_mask, batch):
    rng, dropout_rng = jax.random.split(rng)

    def loss_fn(p):
      outputs = module.apply({"params": p, "batch_stats": batch_stats}, x, pixel_mask=pixel_mask, train=True,
                             rngs={"dropout": dropout_rng})
      return detr_loss(outputs, batch)[0]

    loss, grads = jax.value_and_grad(loss_fn)(params)
    grads = drop_frozen_gradients(grads, frozen)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, rng, loss

  x = jnp.asarray(images.transpose(0, 2, 3, 1))
  pixel_mask = jnp.ones(x.shape[:3], bool)
  batch = jax.tree_util.tree_map(jnp.asarray, targets)
  state = [variables["params"], tx.init(variables["params"]), jax.random.PRNGKey(0)]

  def step():
    params, opt_state, rng, loss = jax.block_until_ready(train_step(*state, x, pixel_mask, batch))
    state[:] = [params, opt_state, rng]  # the donated buffers are gone: carry the new ones
    return float(loss)

  return step


def torch_step(model, images: np.ndarray, targets, as_is: bool = False) -> Callable[[], float]:
  """A closure running one eager HF train step (HF computes the loss from ``labels``); it returns the loss.
  ``as_is`` keeps HF's trainable set instead of the original DETR's."""
  model.train()
  # The original DETR trains the backbone's layer2..layer4. HF means to (it freezes names without "stage.1",
  # "stage.2" or "stage.3"), but its ResNet names them "stages.N", so it freezes the whole backbone and skips
  # its backward; train the same stages as the original, and as cvjax, so both sides do the same work.
  for name, parameter in model.named_parameters():
    if not as_is and any(f"encoder.stages.{i}." in name for i in (1, 2, 3)):
      parameter.requires_grad_(True)
  optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
  x = torch.from_numpy(images)
  labels = [{"class_labels": torch.from_numpy(targets["labels"][i][valid]).long(),
             "boxes": torch.from_numpy(targets["boxes"][i][valid])} for i, valid in enumerate(targets["valid"])]

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(x, pixel_mask=torch.ones(x.shape[0], *x.shape[2:], dtype=torch.long), labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
    optimizer.step()
    return loss.item()

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--backbone", default="r50", choices=sorted(BACKBONES))
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=256, help="square input side in pixels")
  parser.add_argument("--queries", type=int, default=100)
  parser.add_argument("--num_classes", type=int, default=91)
  parser.add_argument("--max_boxes", type=int, default=10, help="target slots per image (1..max real)")
  parser.add_argument("--steps", type=int, default=5, help="timed rounds (median per implementation)")
  parser.add_argument("--hf_as_is", action="store_true",
                      help="HF's own trainable set (whole backbone frozen) instead of the original DETR's")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
  targets = random_targets(rng, args.batch, args.max_boxes, args.num_classes)
  config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=BACKBONES[args.backbone],
                      num_queries=args.queries, num_labels=args.num_classes, auxiliary_loss=True)
  hf_model = DetrForObjectDetection(config)
  module, variables = from_transformers(hf_model)

  start = time.perf_counter()
  steps = {"cvjax (jit)": cvjax_step(module, variables, images, targets)}
  steps["cvjax (jit)"]()
  compile_seconds = time.perf_counter() - start
  steps["HF pytorch (eager)"] = torch_step(hf_model, images, targets, args.hf_as_is)

  print(f"DETR-{args.backbone.upper()}, batch {args.batch}, {args.size}x{args.size}, {args.queries} queries, "
        f"{int(targets['valid'].sum())} target boxes; {jax.default_backend()} ({jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cores, torch threads {args.threads}); median of {args.steps} round-robin steps after "
        f"warm-up (cvjax's first step, compilation included: {compile_seconds:.0f} s); load average before: "
        f"{os.getloadavg()[0]:.1f}")
  times = median_seconds(steps, args.steps)
  reference = times["HF pytorch (eager)"]
  for name, seconds in times.items():
    print(f"  {name:20s} {seconds * 1e3:9.1f} ms/step")
  print(f"  HF time / cvjax time: {reference / times['cvjax (jit)']:.2f} (above 1: cvjax is faster)")
  # Sanity, not parity: same magnitude, not the same value (dropout; HF's auxiliary_loss path differs).
  print("  loss of one more step: " + ", ".join(f"{name} {step():.3f}" for name, step in steps.items()))
  print(f"  load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  main()
