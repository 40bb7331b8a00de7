"""FCN (Long, Shelhamer & Darrell 2015, "Fully Convolutional Networks for Semantic Segmentation").

Presets:
  default   FCN-8s on the generated `shapes` label maps at 64x64 (7 classes: background + 6 shapes): VGG-16 at
            width 16 with batch norm (the paper's VGG-16 has none, and starts from ImageNet weights; this one
            trains from scratch), fc6/fc7 256 wide, 'same' geometry (input_padding 0: no 100-pixel pad), batch
            16, AdamW 3e-3, cosine, 5,000 steps. Goal: validation mIoU >= 0.80 within 15 minutes on a 2-core
            CPU -- NOT met: 0.768. Measured 2026-12-04 (`python launch.py --config=configs/fcn.py`, data already
            generated; two short jobs shared the cores for ~2 minutes), mIoU / pixel accuracy against minutes:
              step  500: 0.318 / 0.832  (1.3)     step 3000: 0.744 / 0.945  (9.8)
              step 1000: 0.538 / 0.893  (3.5)     step 4000: 0.765 / 0.950  (12.3)
              step 2000: 0.707 / 0.937  (7.3)     step 5000: 0.768 / 0.951  (14.8; 15.1 in all, ~6 steps/s)
            AdamW 1e-3 (this preset before) gave 0.367 at step 1000 and 0.526 after 2,000 steps, 0.722 after
            5,000. Background is learnt first, the shapes' classes slowly: from scratch the net has to learn
            shape identity itself, where the paper starts from an ImageNet VGG. The stride-8 scores are not
            what limits it: free 8x8 logit maps fitted to each validation label map through the same bilinear
            x8 upsampling reach mIoU 0.90 (0.78 when they are the label maps' 8x8 average-pooled one-hots).
  fcn32s, fcn16s  the same with the coarser nets (configs/ablations/fcn_skips.py compares the three).
  voc_fcn8s the paper's FCN-8s recipe (Sec. 4.3 / Table 2): PASCAL VOC 2011 segmentation train (the paper adds
            SBD's 8,498 images: point `dataset.path` at a VOCdevkit-layout folder holding both), VGG-16 from
            ImageNet weights (`cvjax.convert.fcn.fcn_from_torchvision_vgg16` on torchvision's
            vgg16-397923af.pth: `--config.init.torch_checkpoint=<path>`), SGD momentum 0.99, lr 1e-14 on the
            unnormalised summed loss at batch 1 -- here the per-pixel mean, so lr 1e-4 (Caffe's 1e-14 x ~500x500
            pixels x the 255 pixel scale), weight decay 5e-4 (2x lr for biases is not reproduced), whole images
            (one per step, 500x500 letterboxed), 100 pixels of input padding with the crop offsets, dropout 0.5,
            about 175 epochs of the 11k images (the paper trains 16s and 8s from the coarser net). VOC val
            mean IU: 32s 59.4, 16s 62.4, 8s 62.7 (Table 2).
  tiny      a few steps of a very small FCN-8s, for tests.
"""

from cvjax.train.config import base_config, cpu_adamw_run, select_preset, shapes_segmentation, tiny_run


def _shapes(c, steps: int, model: str = "fcn8s"):
  shapes_segmentation(c, image_size=64)
  c.model.name = model
  c.model.width = 16
  c.model.fc_width = 256
  c.model.input_padding = 0
  c.model.batch_norm = True
  c.model.dropout_rate = 0.0
  cpu_adamw_run(c, steps, batch_size=16, learning_rate=3e-3)


def default(c):
  _shapes(c, steps=5000)


def fcn32s(c):
  _shapes(c, steps=5000, model="fcn32s")


def fcn16s(c):
  _shapes(c, steps=5000, model="fcn16s")


def voc_fcn8s(c):
  c.dataset.name = "voc_segmentation"
  c.dataset.task = "segmentation"
  c.dataset.config_name = ""
  c.dataset.image_size = 500
  c.dataset.augment = False     # the paper: no augmentation helped (Sec. 4.3, "Augmentation")
  c.dataset.crop_scale = (1.0, 1.0)
  c.dataset.crop_ratio = (1.0, 1.0)
  c.dataset.panoptic = False
  c.dataset.path = ""           # VOCdevkit/VOC2011 (with SBD's images and labels merged in)
  c.dataset.train_split = "train"
  c.dataset.eval_split = "val"
  c.task.name = "semantic_segmentation"
  c.model.name = "fcn8s"
  c.model.num_classes = 21
  c.model.input_padding = 100
  c.model.batch_norm = False
  c.model.dropout_rate = 0.5
  # The ImageNet VGG-16 (torchvision's vgg16-397923af.pth, given with --config.init.torch_checkpoint=<path>):
  # its convolutions into the backbone, its first two Linear layers as the 7x7 fc6 and 1x1 fc7.
  c.init.torch_model = "fcn8s"
  c.init.torch_model_kwargs = (("num_classes", 21),)
  c.init.mapping = (("backbone", "backbone"), ("fc6", "fc6"), ("fc7", "fc7"))
  c.batch_size = 1
  c.total_steps = 175 * 11_355
  c.optimizer.name = "momentum"
  c.optimizer.momentum = 0.99
  c.optimizer.learning_rate = 1e-4
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "constant"
  c.log_every = 100
  c.eval_every = 11_355
  c.checkpoint_every = 11_355


def tiny(c):
  _shapes(c, steps=2)
  tiny_run(c)
  c.dataset.config_name = "detection_32"
  c.dataset.image_size = 32
  c.model.width = 4
  c.model.fc_width = 16


PRESETS = dict(default=default, fcn32s=fcn32s, fcn16s=fcn16s, voc_fcn8s=voc_fcn8s, tiny=tiny)


def get_config(arg=None):
  c = base_config()
  c.name = "fcn"
  return select_preset(PRESETS, arg, c)
