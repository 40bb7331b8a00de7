"""YOLACT (Bolya et al. 2019): real-time instance segmentation from prototypes and per-anchor coefficients.

Presets:
  default         a small YOLACT (ResNet-18 at width 16, FPN 64 channels on P2..P4 with anchors 12..76 px at
                  three octave scales, as `configs/retinanet.py:default`; protonet 64 wide on P2, k = 16
                  prototypes at stride 2) on the generated `shapes` detection set at 64x64 with instance
                  masks, from scratch (trainable batch norm), AdamW 1e-3, cosine, batch 16. Goal: mask AP50
                  >= 0.6 on shapes validation within 20 minutes on a 2-core CPU. Measured 2026-12-04 (2-core
                  CPU, 12.5 min of training by summary.json, ~4.3 steps/s, the shapes data generated first in
                  ~20 s; a test file ran beside its first minutes), validation mask AP50 / box AP50 (mask AP, box AP; mask AP75):
                    step 1000: 0.445 / 0.472  (0.271, 0.289; 0.279)
                    step 2000: 0.666 / 0.700  (0.444, 0.470; 0.490)
                    step 3000: 0.697 / 0.728  (0.478, 0.499; 0.539)
                  `python launch.py --config=configs/yolact.py`; the same curve on a fresh clone with an
                  empty data dir, 12.0 min for the whole command.
  coco_r101_550   the paper's yolact_base recipe: ResNet-101 FPN at 550x550, anchors 24..384 on P3..P7 with
                  ratios (1, 1/2, 2), k = 32, SGD momentum 0.9, lr 1e-3 at batch 8, weight decay 5e-4, 800k
                  iterations with lr / 10 at 280k, 600k, 700k and 750k, 500-iteration warm-up, ImageNet
                  backbone through `--config.init.torch_checkpoint=<resnet101-63fe2227.pth>` with frozen batch
                  norm. The paper's SSD augmentation (photometric distortion, expand, random crop) is replaced
                  by cvjax's detection augmentation (flip, scale crop).
  tiny            a few steps of a very small model, for tests.

COCO reads a COCO-format folder with `segmentation` annotations (`--config.dataset.name=coco_folder
--config.dataset.path=<root>`); nothing is downloaded.
"""

from cvjax.train.config import base_config, detection_dataset, select_preset, shapes_detection_run, detection_tiny_run


def _shapes(c, steps: int):
  shapes_detection_run(c, steps, batch_size=16)
  c.model.name = "yolact_resnet18_fpn"
  c.model.backbone_width = 16
  c.model.backbone_frozen_bn = False
  c.model.fpn_channels = 64
  # Every shapes object (sides 12..36 px) matches an anchor of P2..P4 with IoU >= 0.5 (configs/retinanet.py).
  c.model.min_level = 2
  c.model.max_level = 4
  c.model.anchor_sizes = ((12, 15, 19), (24, 30, 38), (48, 60, 76))
  c.model.proto_level = 2
  c.model.proto_channels = 64
  c.model.num_prototypes = 16
  c.model.masks_to_train = 64
  c.model.top_k = 100
  c.model.detections_per_img = 20


def default(c):
  _shapes(c, steps=3000)


def tiny(c):
  _shapes(c, steps=2)
  detection_tiny_run(c)
  c.model.fpn_channels = 8
  c.model.anchor_sizes = ((6, 8, 10), (12, 15, 19), (24, 30, 38))
  c.model.proto_channels = 8
  c.model.proto_convs = 1
  c.model.num_prototypes = 4
  c.model.masks_to_train = 8
  c.model.top_k = 20
  c.model.detections_per_img = 8


def coco_r101_550(c):
  c.dataset.name = "coco_folder"
  c.dataset.max_boxes = 100
  c.dataset.image_size = 550
  c.batch_size = 8
  c.total_steps = 800_000
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 500
  c.optimizer.schedule = "step"
  c.optimizer.boundaries = (280_000, 600_000, 700_000, 750_000)
  c.optimizer.decay_factor = 0.1
  c.init.torch_model = "resnet101"
  c.init.torch_model_kwargs = (("frozen_bn", True),)
  c.init.mapping = (("backbone", ""),)
  c.log_every = 100
  c.eval_every = 20_000
  c.checkpoint_every = 10_000


PRESETS = dict(default=default, tiny=tiny, coco_r101_550=coco_r101_550)


def get_config(arg=None):
  c = base_config()
  c.name = "yolact"
  c.task.name = "yolact"
  c.task.negpos_ratio = 3.0
  c.task.box_weight = 1.5
  c.task.mask_weight = 6.125
  c.task.semantic_weight = 1.0
  c.task.num_visualizations = 4
  detection_dataset(c, masks=True)   # letterboxed to 64 on shapes; COCO presets set scales
  c.model.name = "yolact_resnet101_fpn"
  c.model.num_classes = 0               # 0: taken from the dataset
  c.model.backbone_width = 64
  c.model.backbone_frozen_bn = True
  c.model.fpn_channels = 256
  c.model.min_level = 3
  c.model.max_level = 7
  c.model.anchor_sizes = ((24,), (48,), (96,), (192,), (384,))
  c.model.aspect_ratios = (1.0, 0.5, 2.0)
  c.model.proto_level = 3
  c.model.proto_channels = 256
  c.model.proto_convs = 3
  c.model.num_prototypes = 32
  c.model.masks_to_train = 100
  c.model.top_k = 200
  c.model.detections_per_img = 100
  return select_preset(PRESETS, arg, c)
