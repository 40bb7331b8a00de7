"""Times Mask R-CNN (ResNet-50-FPN): one train step and one inference, cvjax against torchvision on this CPU.

Both are ``maskrcnn_resnet50_fpn`` with the same random weights (torchvision's model built with frozen batch
norm and ``trainable_backbone_layers=3``, converted with ``cvjax.convert.from_torch_state_dict``), batch 2 at
512 x 512 with 10 GT objects (boxes and masks) per image, torchvision's defaults elsewhere (2000 / 1000
proposals, 512 sampled RoIs, 100 detections). torchvision's transform is made the identity at 512 (min/max
size 512), so both see the same tensors. The train step is forward + losses + backward + SGD (momentum 0.9, lr
0.02, weight decay 1e-4); cvjax runs the launcher's own jitted step (``Experiment.train_step`` built from
``configs/mask_rcnn.py:coco_r50_1x``). After warm-up the two take turns, ``--steps`` rounds; medians printed.

  python benchmarks/mask_rcnn_step.py --steps=3

``--mask_target_grid=N`` adds a second cvjax train step whose 28x28 mask targets use at most N x N RoIAlign
samples per bin (``model.mask_target_max_sampling_grid``). torchvision's adaptive grid is ceil(RoI side / 28)
per axis, so N = 16 is exact for every RoI up to 448 pixels -- every positive RoI here (GT sides 30..200 px,
proposals with IoU >= 0.5 with them) -- while the default bound (the map size, exact for any RoI) is what a
COCO run uses. The row shows how much of the step the mask targets' static sampling bound costs.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable on CPU-only machines)
from _torch_imports import TORCHVISION as torchvision  # noqa: E402

from cvjax.convert import from_torch_state_dict  # noqa: E402
from cvjax.train.config import load_config_file  # noqa: E402
from cvjax.train.trainer import DataSpec, Experiment  # noqa: E402
from train_step import median_seconds  # noqa: E402

NUM_CLASSES = 80


def torch_model():
  from torchvision.models.detection import MaskRCNN
  from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
  from torchvision.ops.misc import FrozenBatchNorm2d
  torch.manual_seed(0)
  backbone = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d,
                                 trainable_layers=3)
  return MaskRCNN(backbone, num_classes=NUM_CLASSES + 1, min_size=512, max_size=512)


def targets(rng, batch, size, count):
  boxes = np.zeros((batch, count, 4), np.float32)
  masks = np.zeros((batch, count, size, size), np.uint8)
  for b in range(batch):
    for n in range(count):
      w, h = rng.uniform(30, 200, 2)
      x, y = rng.uniform(0, size - w), rng.uniform(0, size - h)
      boxes[b, n] = (x, y, x + w, y + h)
      masks[b, n, int(y):int(y + h), int(x):int(x + w)] = 1
  labels = rng.integers(0, NUM_CLASSES, (batch, count)).astype(np.int32)
  return boxes, labels, masks


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--objects", type=int, default=10)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--threads", type=int, default=os.cpu_count())
  parser.add_argument("--mask_target_grid", type=int, default=0,
                      help="also time a train step with this mask-target sampling bound (module docstring)")
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  images = rng.normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
  boxes, labels, masks = targets(rng, args.batch, args.size, args.objects)

  reference = torch_model()
  module, variables = from_torch_state_dict("maskrcnn_resnet50_fpn", reference.state_dict(),
                                            num_classes=NUM_CLASSES, return_pasted_masks=False)

  def experiment(mask_target_grid=None):
    config = load_config_file("configs/mask_rcnn.py:coco_r50_1x")
    config.unlock()
    config.batch_size = args.batch
    config.model.num_classes = NUM_CLASSES
    config.model.mask_target_max_sampling_grid = mask_target_grid
    config.init.mapping = ()
    config.lock()
    exp = Experiment(config, tempfile.mkdtemp(prefix="cvjax_bench_"), data=data)
    state, _ = exp.initial_state()
    # Copies: the train step donates its state, and two experiments must not share (donated) buffers.
    copy = lambda tree: jax.tree.map(np.array, tree)
    state = state.replace(params=jax.device_put(copy(variables["params"]), exp.state_sharding.params),
                          batch_stats=jax.device_put(copy(variables["batch_stats"]), exp.state_sharding.batch_stats))
    state = state.replace(opt_state=jax.device_put(exp.tx.init(state.params), exp.state_sharding.opt_state))
    return exp, [state]

  size = np.full((args.batch, 2), args.size, np.int32)
  cxcywh = np.stack([(boxes[..., 0] + boxes[..., 2]) / 2, (boxes[..., 1] + boxes[..., 3]) / 2,
                     boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]], -1) / args.size
  batch = {"image": images, "pixel_mask": np.ones(images.shape[:3], bool), "boxes": cxcywh.astype(np.float32),
           "labels": labels, "valid": np.ones(labels.shape, bool), "masks": masks,
           "area": np.ones(labels.shape, np.float32), "image_id": np.arange(args.batch, dtype=np.int32),
           "orig_size": size, "mask": np.ones((args.batch,), bool)}
  data = DataSpec(num_classes=NUM_CLASSES, class_names=[str(i) for i in range(NUM_CLASSES)],
                  example_batch=jax.tree.map(lambda x: x[:1], batch))
  exp, holder = experiment()
  global_batch = exp.global_batch(batch)

  def train_of(exp, holder):
    def train():
      holder[0], metrics = exp.train_step(holder[0], global_batch)
      jax.block_until_ready(metrics)
    return train

  cvjax_train = train_of(exp, holder)
  train_steps = {"cvjax": cvjax_train}
  bounded = f"cvjax, mask-target grid <= {args.mask_target_grid}"
  if args.mask_target_grid:
    train_steps[bounded] = train_of(*experiment(args.mask_target_grid))

  def cvjax_infer():
    jax.block_until_ready(exp.eval_step(holder[0], global_batch))

  torch_images = [torch.from_numpy(i.transpose(2, 0, 1).copy()) for i in images]
  torch_targets = [{"boxes": torch.from_numpy(boxes[b]), "labels": torch.from_numpy(labels[b] + 1).long(),
                    "masks": torch.from_numpy(masks[b])} for b in range(args.batch)]
  optimizer = torch.optim.SGD([p for p in reference.parameters() if p.requires_grad], lr=0.02, momentum=0.9,
                              weight_decay=1e-4)

  def torch_train():
    reference.train()
    loss = sum(reference(torch_images, torch_targets).values())
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

  def torch_infer():
    reference.eval()
    with torch.no_grad():
      reference(torch_images)

  start = time.perf_counter()
  cvjax_train(), cvjax_infer()
  print(f"cvjax compile + first calls: {time.perf_counter() - start:.1f} s")
  train = median_seconds(dict(train_steps, torchvision=torch_train), args.steps, warmup=1)
  infer = median_seconds({"cvjax": cvjax_infer, "torchvision": torch_infer}, args.steps, warmup=1)
  print(f"maskrcnn_resnet50_fpn, batch {args.batch} at {args.size}x{args.size}, {args.objects} objects, "
        f"{args.threads} torch threads")
  for name, times in (("train step", train), ("inference", infer)):
    print(f"  {name:10s}  cvjax {times['cvjax'] * 1e3:8.0f} ms  torchvision {times['torchvision'] * 1e3:8.0f} ms  "
          f"throughput ratio cvjax/torchvision {times['torchvision'] / times['cvjax']:.2f}x")
  if bounded in train:
    print(f"  train step  {bounded} {train[bounded] * 1e3:8.0f} ms  "
          f"throughput ratio {train['torchvision'] / train[bounded]:.2f}x")


if __name__ == "__main__":
  main()
