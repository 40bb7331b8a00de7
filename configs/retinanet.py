"""RetinaNet (Lin et al. 2017) with a ResNet-FPN: sigmoid focal loss over dense anchors, no proposals.

Presets:
  default      a small RetinaNet (ResNet-18 at width 16, FPN and subnets 64 channels with GroupNorm, levels
               P2..P4 with anchors 12..76 px at torchvision's three octave scales: every shapes object, sides
               12..36 px, is on P2..P4) on the generated `shapes` detection set at 64x64, from scratch
               (trainable batch norm), AdamW 1e-3, cosine, batch 16, 3,000 steps. Goal: box AP50 >= 0.75 on
               shapes validation within 20 minutes on a 2-core CPU. Measured 2026-12-03 (2-core CPU; box AP50,
               AP in parentheses; 3.1 steps/s alone: the goal is passed at step 2000, ~14 min in; the full
               3,000 steps took 30.5 min with the test suite running beside it, ~17 min estimated alone):
                 this recipe          step 1000: 0.572 (0.388)   step 2000: 0.851 (0.638)   step 3000: 0.877
                                                                                      (0.675; AP75 0.783)
                 v1 head (no norm),   step 1000: 0.196 (0.102)   step 2000: 0.426 (0.274)   step 3000: 0.508
                 P2..P6, anchors 8..203                                                      (0.338), 27 min
                 GroupNorm, P2..P6    step 1000: 0.343 (0.205)
               Again on a fresh clone on 2026-12-04 (empty data dir, 11.0 min for the whole command):
               step 1000 0.534 (0.358), step 2000 0.823 (0.616), step 3000 0.853 (0.649; AP75 0.750).
               torchvision's v1 head (no norm, N(0, 0.01) convs) is `model.head_norm='none'`, as in
               `coco_r50_1x`: at 64 channels its four convs shrink the features ~100x and it learned slowly.
  coco_r50_1x  torchvision's recipe for retinanet_resnet50_fpn: SGD momentum 0.9, lr 0.01 at batch 16, weight
               decay 1e-4, 90k iterations with lr / 10 at 60k and 80k, 500-iteration linear warm-up, shorter
               side 800 (max 1333), horizontal flip, ImageNet backbone through
               `--config.init.torch_checkpoint=<resnet50-0676ba61.pth>` with frozen batch norm, stem and layer1
               frozen (trainable_backbone_layers=3).
  tiny         a few steps of a very small model, for tests.

COCO reads TFDS `coco/2017` or a COCO-format folder (`--config.dataset.name=coco_folder
--config.dataset.path=<root>`) when prepared; nothing is downloaded.
"""

from cvjax.train.config import (FROZEN_STEM_AND_LAYER1, base_config, detection_dataset, detection_tiny_run,
                                select_preset, shapes_detection_run)


def _shapes(c, steps: int):
  shapes_detection_run(c, steps, batch_size=16)
  c.model.name = "retinanet_resnet18_fpn"
  c.model.backbone_width = 16
  c.model.backbone_frozen_bn = False
  c.model.fpn_channels = 64
  # Every shapes object (sides 12..36 px) matches an anchor of P2..P4 with IoU >= 0.5; P5/P6 held none.
  c.model.min_level = 2
  c.model.max_level = 4
  c.model.anchor_sizes = ((12, 15, 19), (24, 30, 38), (48, 60, 76))
  # GroupNorm in the subnets (torchvision's v2 head): with 64-wide subnets the v1 head's N(0, 0.01) convs
  # shrink the features ~100x by the last layer and from scratch it learned slowly (module docstring).
  c.model.head_norm = "group"
  c.model.topk_candidates = 200
  c.model.detections_per_img = 20


def default(c):
  _shapes(c, steps=3000)


def tiny(c):
  _shapes(c, steps=2)
  detection_tiny_run(c)
  c.model.fpn_channels = 8
  c.model.head_convs = 1
  c.model.anchor_sizes = ((6, 8, 10), (12, 15, 19), (24, 30, 38))
  c.model.topk_candidates = 20
  c.model.detections_per_img = 8


def coco_r50_1x(c):
  c.dataset.name = "coco_folder"
  c.dataset.max_boxes = 100
  c.dataset.scales = (800,)
  c.dataset.max_size = 1333
  c.dataset.eval_scale = 800
  c.dataset.crop_prob = 0.0
  c.batch_size = 16
  c.total_steps = 90_000
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "step"
  c.optimizer.boundaries = (60_000, 80_000)
  c.optimizer.decay_factor = 0.1
  c.optimizer.freeze = FROZEN_STEM_AND_LAYER1
  c.init.torch_model = "resnet50"
  c.init.torch_model_kwargs = (("frozen_bn", True),)
  c.init.mapping = (("backbone", ""),)
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000


PRESETS = dict(default=default, tiny=tiny, coco_r50_1x=coco_r50_1x)


def get_config(arg=None):
  c = base_config()
  c.name = "retinanet"
  c.task.name = "retinanet"
  c.task.focal_alpha = 0.25
  c.task.focal_gamma = 2.0
  c.task.box_loss = "l1"
  c.task.box_beta = 1.0
  c.task.num_visualizations = 4
  detection_dataset(c, masks=False)   # letterboxed to 64 on shapes; COCO presets set scales
  c.model.name = "retinanet_resnet50_fpn"
  c.model.num_classes = 0               # 0: taken from the dataset
  c.model.backbone_width = 64
  c.model.backbone_frozen_bn = True
  c.model.fpn_channels = 256
  c.model.min_level = 3
  c.model.max_level = 7
  c.model.anchor_sizes = ((32, 40, 50), (64, 80, 101), (128, 161, 203), (256, 322, 406), (512, 645, 812))
  c.model.head_convs = 4
  c.model.head_norm = "none"
  c.model.topk_candidates = 1000
  c.model.detections_per_img = 300
  return select_preset(PRESETS, arg, c)
