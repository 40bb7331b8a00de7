"""Times one DETR train step: the launcher's (jitted, state donated) against HF ``DetrForObjectDetection``
(PyTorch eager).

A step is forward + set criterion (Hungarian matching, cross-entropy with eos_coef 0.1, L1 x 5 and
(1 - GIoU) x 2, on the final and every auxiliary decoder output) + backward + grad-norm clip 0.1 + AdamW
(lr 1e-4, weight decay 1e-4), in training mode (dropout 0.1), on one batch. As in the original DETR, the
backbone's stem and first stage are frozen and layer2..layer4 train, on both sides. cvjax runs the launcher's
own train step, ``cvjax.train.trainer.Experiment.train_step`` built from ``configs/detr.py:coco_r50`` (its
DETR task and criterion, ``match_sets`` backend 'auto' = scipy on CPU, its optimizer with the ``freeze``
patterns and backbone lr x0.1, frozen gradients dropped, metrics on device), fed through
``Experiment.global_batch``; HF as ``torch_step`` explains (``--hf_as_is`` keeps HF's own setting, which
freezes the whole backbone and so skips its backward), computing its loss itself from ``labels`` (its own
scipy matcher and ``auxiliary_loss=True``). Both models are the same architecture with the same random
weights (HF ResNet backbone with frozen batch norm, built from a config, nothing downloaded; cvjax's copy
through ``cvjax.convert.from_transformers``); parameters and optimizer state carry over from step to step on
both sides. After warm-up the two take turns, one step each, ``--steps`` rounds, so that they share whatever
load the machine has; each one's median is printed.

  python benchmarks/detr_step.py --backbone=r50 --batch=2 --size=256

HF's ``auxiliary_loss=True`` also feeds each decoder layer's LayerNormed output to the next layer (the
original DETR, and cvjax, feed the un-normalised one): the two losses differ in value, not in work.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict

import jax
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable before transformers; benchmarks/ is on sys.path)
from transformers import DetrConfig, DetrForObjectDetection, ResNetConfig  # noqa: E402

from cvjax.convert import from_transformers  # noqa: E402
from cvjax.train.config import load_config_file  # noqa: E402
from train_step import launcher_step, print_side_by_side  # noqa: E402

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


def detr_config(backbone: str, num_queries: int, num_classes: int):
  """``configs/detr.py:coco_r50`` -- the paper's optimizer (AdamW 1e-4, backbone 1e-5, weight decay 1e-4, clip
  0.1, frozen stem and layer1) and model -- with the benchmark's query and class counts."""
  config = load_config_file(os.path.join(REPO, "configs", "detr.py:coco_r50"))
  opt = config.optimizer
  assert (opt.learning_rate, opt.weight_decay, opt.grad_clip_norm) == (LEARNING_RATE, WEIGHT_DECAY, CLIP_NORM)
  with config.unlocked():
    config.model.update(name=f"detr_resnet{backbone[1:]}", num_queries=num_queries, num_classes=num_classes)
    config.init.mapping = ()
    config.progress_bar = False
  return config


def detection_batch(images: np.ndarray, targets) -> Dict[str, np.ndarray]:
  """A host batch as the detection pipeline gives it (NHWC images, all pixels real)."""
  batch_size, _, height, width = images.shape
  boxes = targets["boxes"]
  return {"image": images.transpose(0, 2, 3, 1), "pixel_mask": np.ones((batch_size, height, width), bool),
          "boxes": boxes, "labels": targets["labels"], "valid": targets["valid"],
          "area": boxes[..., 2] * boxes[..., 3] * height * width, "image_id": np.arange(batch_size, dtype=np.int32),
          "orig_size": np.tile(np.array([height, width], np.int32), (batch_size, 1)),
          "mask": np.ones(batch_size, bool)}


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
  # Dropout 0.1 everywhere, as the original DETR and configs/detr.py (HF defaults to 0 in attention and FFN).
  config = DetrConfig(use_timm_backbone=False, use_pretrained_backbone=False, backbone_config=BACKBONES[args.backbone],
                      num_queries=args.queries, num_labels=args.num_classes, auxiliary_loss=True,
                      attention_dropout=0.1, activation_dropout=0.1)
  hf_model = DetrForObjectDetection(config)
  module, variables = from_transformers(hf_model)

  del module  # the launcher builds its own from the config; the converted weights fit it leaf for leaf
  start = time.perf_counter()
  steps = {"cvjax (jit)": launcher_step(detr_config(args.backbone, args.queries, args.num_classes), variables,
                                        detection_batch(images, targets))}
  steps["cvjax (jit)"]()
  compile_seconds = time.perf_counter() - start
  steps["HF pytorch (eager)"] = torch_step(hf_model, images, targets, args.hf_as_is)

  print(f"DETR-{args.backbone.upper()}, batch {args.batch}, {args.size}x{args.size}, {args.queries} queries, "
        f"{int(targets['valid'].sum())} target boxes; {jax.default_backend()} ({jax.devices()[0].device_kind}, "
        f"{os.cpu_count()} cores, torch threads {args.threads}); median of {args.steps} round-robin steps after "
        f"warm-up (cvjax's first step, compilation included: {compile_seconds:.0f} s); load average before: "
        f"{os.getloadavg()[0]:.1f}")
  print_side_by_side(steps, args.steps, "HF pytorch (eager)", "dropout; HF's auxiliary_loss path differs")


if __name__ == "__main__":
  main()
