"""YOLOv1 (Redmon et al. 2016): one network regresses a 7x7 grid of boxes, confidences and class scores.

Presets:
  default  a small YOLOv1 on the generated `shapes` detection set at 64x64 (B = 2 boxes per cell, the paper's
           targets and sum-squared loss), from scratch, AdamW 1e-3, cosine, batch 32, 4,000 steps: ResNet-18 at
           width 32 read at C3 (stride 8) by a convolutional head (two 3x3 convs of 128, leaky ReLU, a 1x1 conv
           to 5 B + C per cell) on an S = 8 grid. Goal: box AP50 >= 0.5 on shapes validation within 20 minutes
           on a 2-core CPU. Measured 2026-12-04 (2-core CPU, other jobs beside it part of the time; 10.2 min by
           summary.json, ~6.5 steps/s), validation box AP50 (AP; AP75; AR100):
             step 1000: 0.653 (0.332; 0.278; 0.515)
             step 2000: 0.811 (0.404; 0.338; 0.551)
             step 3000: 0.830 (0.427; 0.374; 0.566)
             step 4000: 0.846 (0.487; 0.484; 0.609)
           The same curve on a fresh clone with an empty data dir, 10.6 min for the whole command.
           The paper's head (two fully connected layers on the flattened map) is `model.head='fc'` (the `voc`
           preset). At this scale it did not learn the classes: on C5 (a 2x2 map, width 16, 512 hidden units,
           dropout 0.5) box AP50 0.006 at step 1000 of 3000 with the class term ~0.8 per object cell (uniform
           over 6 classes is 0.83); on C3 at width 16, 800 steps: 0.014 with dropout 0.5, 0.058 without; the
           conv head at width 16, 800 steps: 0.276 (hidden 128) / 0.248 (64); width 32 took it to the above.
  voc      the paper's recipe on PASCAL VOC 2007+2012 at 448x448 with the 24-conv Darknet network: 135 epochs
           of SGD (momentum 0.9, weight decay 5e-4, batch 64), lr warmed up linearly over the first epoch (the
           paper raises it from 1e-3 to 1e-2), then 1e-2 for 75 epochs, 1e-3 for 30 and 1e-4 for 30; dropout
           0.5. Deviation: the paper's random scaling / translation (20%) and HSV jitter are not implemented;
           the detection pipeline's crop and flip are used.
           The paper pretrains the first 20 convs on ImageNet: pass them with `--config.init.checkpoint`.
           VOC is read from a COCO-format folder (`--config.dataset.path=<root>`); nothing is downloaded.
  tiny     a few steps of a very small model, for tests.
"""

from ml_collections.config_dict import placeholder

from cvjax.train.config import base_config, select_preset, shapes_detection_run, detection_tiny_run


def _shapes(c, steps: int):
  shapes_detection_run(c, steps, batch_size=32)
  c.model.name = "yolov1_resnet18"
  c.model.backbone_width = 32
  c.model.backbone_frozen_bn = False
  # The conv head on C3 (stride 8: an 8x8 grid at 64x64, S = 8); the paper's fully connected head on C5 (a
  # 2x2 map here) did not learn the classes (module docstring).
  c.model.feature_level = 3
  c.model.grid_size = 8
  c.model.head = "conv"
  c.model.hidden_size = 128
  c.model.head_convs = 2
  c.model.dropout_rate = 0.0
  c.model.detections_per_img = 20


def default(c):
  _shapes(c, steps=4000)


def tiny(c):
  _shapes(c, steps=2)
  detection_tiny_run(c)
  c.model.grid_size = 4   # C3 of a 32x32 image
  c.model.hidden_size = 16
  c.model.detections_per_img = 8


def voc(c):
  c.dataset.name = "coco_folder"
  c.dataset.image_size = 448
  c.dataset.max_boxes = 50
  c.model.name = "yolov1_darknet24"
  c.model.num_classes = 20
  c.model.hidden_size = 4096
  c.model.batch_norm = False
  c.batch_size = 64
  # 16,551 VOC 07+12 trainval images / 64 = 259 iterations per epoch; 135 epochs.
  epoch = 259
  c.total_steps = 135 * epoch
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 1e-2
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = epoch  # "slowly raise the learning rate from 1e-3 to 1e-2" over the first epochs
  c.optimizer.schedule = "step"
  c.optimizer.boundaries = (75 * epoch, 105 * epoch)
  c.optimizer.decay_factor = 0.1
  c.log_every = 100
  c.eval_every = 10 * epoch
  c.checkpoint_every = 5 * epoch


PRESETS = dict(default=default, tiny=tiny, voc=voc)


def get_config(arg=None):
  c = base_config()
  c.name = "yolo"
  c.task.name = "yolo"
  c.task.lambda_coord = 5.0
  c.task.lambda_noobj = 0.5
  c.task.num_visualizations = 4
  c.dataset.task = "detection"
  c.dataset.config_name = ""
  c.dataset.masks = False
  c.dataset.image_size = 64
  c.dataset.max_boxes = 50
  c.dataset.path = placeholder(str)
  c.model.name = "yolov1_darknet24"
  c.model.num_classes = 0               # 0: taken from the dataset
  c.model.grid_size = 7
  c.model.boxes_per_cell = 2
  c.model.head = "fc"
  c.model.hidden_size = 4096
  c.model.head_convs = 2
  c.model.dropout_rate = 0.5
  c.model.batch_norm = True
  c.model.darknet_width = 1.0
  c.model.backbone_width = 64
  c.model.backbone_stem = "imagenet"
  c.model.backbone_frozen_bn = True
  c.model.feature_level = placeholder(int)   # the ResNet map the head reads (None: C5)
  c.model.detections_per_img = 100
  return select_preset(PRESETS, arg, c)
