"""Mask R-CNN (He et al. 2017) with a ResNet-FPN (Lin et al. 2017) or Swin-T (Liu et al. 2021) backbone.

Presets:
  default         a small Mask R-CNN (ResNet-18 at width 16, FPN 64 channels, a 256-wide box head, a 16-wide
                  mask head, anchors 8..128 for P2..P6, every shapes object pooled from P2) on the generated
                  `shapes` detection set at 64x64 with instance masks, trained from scratch (trainable batch
                  norm), AdamW 1e-3, cosine, batch 16, 3,000 steps. Goal: box AP50 >= 0.8 and mask AP50 >= 0.75
                  on shapes validation within 20 minutes on a 2-core CPU. Measured 2026-12-02 on a 2-core CPU
                  from a fresh clone with an empty data_dir (15.1 min for the whole command, data generation
                  included; 3.5 steps/s), validation box AP50 / mask AP50 (box AP, mask AP; AP75 box / mask):
                    step 1000: 0.510 / 0.486  (0.314, 0.263; 0.334 / 0.255)
                    step 2000: 0.791 / 0.759  (0.559, 0.460; 0.657 / 0.490)
                    step 3000: 0.822 / 0.793  (0.596, 0.487; 0.700 / 0.532; box AR100 0.717)
                  The previous recipe (canonical scale 56, so larger objects pooled from P3; 32-wide mask head;
                  2,500 steps) ended at 0.773 / 0.749 in 17.6 min: per class, recall@0.5 was 0.92-0.96 but AP50
                  0.60-0.90 (shape confusions). SGD 0.02 (the COCO recipe) reached box AP50 0.58 at step 1,250
                  of 1,500 steps.
  coco_r50_1x     torchvision / detectron2's 1x recipe for maskrcnn_resnet50_fpn: SGD momentum 0.9, lr 0.02 at
                  batch 16, weight decay 1e-4, 90k iterations with lr / 10 at 60k and 80k, 1k-iteration linear
                  warm-up, shorter side 800 (max 1333), horizontal flip, ImageNet backbone through
                  `--config.init.torch_checkpoint=<resnet50-0676ba61.pth>` with frozen batch norm, stem and
                  layer1 frozen (torchvision's trainable_backbone_layers=3).
  coco_swin_t_1x  the Swin paper's Mask R-CNN Swin-T 1x (Table 2 / Sec. 4.2): AdamW lr 1e-4, weight decay 0.05,
                  batch 16, 12 epochs with lr / 10 at epochs 8 and 11, drop path 0.2.
  tiny            a few steps of a very small model, for tests.

COCO presets read a COCO-format folder with `segmentation` annotations (`--config.dataset.name=coco_folder
--config.dataset.path=<root>`); TFDS `coco/2017` has no instance masks. Nothing is downloaded.
"""

from ml_collections.config_dict import placeholder

from cvjax.train.config import (FROZEN_STEM_AND_LAYER1, base_config, detection_dataset, detection_tiny_run,
                                select_preset, shapes_detection_run)

COCO_TRAIN_IMAGES = 118_287
# torchvision's trainable_backbone_layers=3: the stem and layer1 keep their (ImageNet) weights
# (FROZEN_STEM_AND_LAYER1).


def _shapes(c, steps: int):
  # From scratch at this scale AdamW 1e-3 (shapes_detection_run) learns faster than the COCO recipe's SGD 0.02
  # (which reached box AP50 0.58 at step 1,250 of a 1,500-step cosine run).
  shapes_detection_run(c, steps, batch_size=16)
  c.model.name = c.model.name.replace("resnet50", "resnet18")
  c.model.backbone_width = 16
  c.model.backbone_frozen_bn = False
  c.model.fpn_channels = 64
  c.model.anchor_sizes = ((8,), (16,), (32,), (64,), (128,))
  # 224 scaled like the anchors (32 -> 8) would be 56; 112 sends every shapes object (sqrt area 12..31 px) to
  # P2, the finest level: telling a hexagon from a circle at stride 8 is where the classifier lost AP.
  c.model.canonical_scale = 112.0
  c.model.rpn_pre_nms_top_n_train = 1000
  c.model.rpn_post_nms_top_n_train = 200
  c.model.rpn_pre_nms_top_n_test = 1000
  c.model.rpn_post_nms_top_n_test = 100
  c.model.rpn_batch_size_per_image = 128
  # At most 8 positive RoIs per image (of 32 sampled) carry the mask loss, and the mask head is 16 wide: its
  # 3x3 convs at 14x14 were most of the step's FLOPs (300 ms a step at 32 wide, 223 ms at 16).
  c.model.box_batch_size_per_image = 32
  c.model.box_detections_per_img = 20
  c.model.representation_size = 256
  c.model.mask_head_channels = 16
  c.model.mask_target_max_sampling_grid = 2   # exact for RoIs up to 56 pixels: every shape at 64x64


def default(c):
  _shapes(c, steps=3000)


def tiny(c):
  _shapes(c, steps=2)
  detection_tiny_run(c)
  c.model.fpn_channels = 8
  c.model.anchor_sizes = ((4,), (8,), (16,), (32,), (64,))
  c.model.representation_size = 16
  c.model.mask_head_channels = 8
  c.model.rpn_pre_nms_top_n_train = 50
  c.model.rpn_post_nms_top_n_train = 20
  c.model.rpn_pre_nms_top_n_test = 50
  c.model.rpn_post_nms_top_n_test = 20
  c.model.rpn_batch_size_per_image = 32
  c.model.box_batch_size_per_image = 16
  c.model.box_detections_per_img = 8
  # One compiled size for the mask branch (the default's 4 buckets compile it 4 times); the buckets' outputs
  # equal it (tests/models/detection/test_rcnn.py).
  c.model.mask_roi_buckets = 1


def _coco(c, steps: int, boundaries):
  c.dataset.name = "coco_folder"
  c.dataset.task = "detection"
  c.dataset.max_boxes = 100
  c.dataset.scales = (800,)
  c.dataset.max_size = 1333
  c.dataset.eval_scale = 800
  c.dataset.crop_prob = 0.0
  c.model.num_classes = 0
  c.model.return_pasted_masks = False     # 100 x 1344 x 1344 floats per image: the evaluator pastes instead
  c.batch_size = 16
  c.total_steps = steps
  c.optimizer.boundaries = boundaries
  c.optimizer.schedule = "step"
  c.optimizer.decay_factor = 0.1
  c.log_every = 100
  c.eval_every = 10_000
  c.checkpoint_every = 5_000


def coco_r50_1x(c):
  _coco(c, 90_000, (60_000, 80_000))
  c.init.torch_model = "resnet50"
  c.init.torch_model_kwargs = (("frozen_bn", True),)
  c.init.mapping = (("backbone", ""),)
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.02
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 1000
  c.optimizer.freeze = FROZEN_STEM_AND_LAYER1


def coco_swin_t_1x(c):
  epoch = COCO_TRAIN_IMAGES // 16
  _coco(c, 12 * epoch, (8 * epoch, 11 * epoch))
  c.model.name = "maskrcnn_swin_t_fpn"
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 500


PRESETS = dict(default=default, tiny=tiny, coco_r50_1x=coco_r50_1x, coco_swin_t_1x=coco_swin_t_1x)


def rcnn_config(arg=None, masks: bool = True, presets=None):
  """The R-CNN family's config (``configs/faster_rcnn.py`` calls it with ``masks=False``)."""
  c = base_config()
  c.name = "mask_rcnn" if masks else "faster_rcnn"
  c.task.name = "rcnn"
  c.task.num_visualizations = 4
  detection_dataset(c, masks=masks)   # letterboxed to 64 on shapes; COCO presets set scales
  c.model.name = "maskrcnn_resnet50_fpn" if masks else "fasterrcnn_resnet50_fpn"
  c.model.num_classes = 0               # 0: taken from the dataset
  c.model.backbone_width = 64
  c.model.backbone_frozen_bn = True
  c.model.fpn_channels = 256
  c.model.anchor_sizes = ((32,), (64,), (128,), (256,), (512,))
  c.model.canonical_scale = 224.0
  c.model.rpn_pre_nms_top_n_train = 2000
  c.model.rpn_post_nms_top_n_train = 2000
  c.model.rpn_pre_nms_top_n_test = 1000
  c.model.rpn_post_nms_top_n_test = 1000
  c.model.rpn_batch_size_per_image = 256
  c.model.box_batch_size_per_image = 512
  c.model.box_detections_per_img = 100
  c.model.representation_size = 1024
  c.model.roi_op = "align"
  c.model.aligned = False
  c.model.mask_head_channels = 256
  c.model.return_pasted_masks = masks
  c.model.mask_target_max_sampling_grid = placeholder(int)
  return select_preset(presets or PRESETS, arg, c)


def get_config(arg=None):
  return rcnn_config(arg, masks=True)
