"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

Presets:
  default   a small U-Net (width 16, depth 3, 'same' padding, batch norm, transposed-conv upsampling, skips) on
            the generated `shapes` label maps at 64x64 (7 classes: background + 6 shapes), batch 16, AdamW 3e-3,
            cosine, 3,000 steps. Goal: validation mIoU >= 0.85 within 15 minutes on a 2-core CPU -- met.
            Measured 2026-12-04 (`python launch.py --config=configs/unet.py`, data already generated; another
            training shared the 2 cores for the first ~3 minutes), mIoU / pixel accuracy against minutes:
              step  500: 0.326 / 0.848  (2.8)     step 2000: 0.830 / 0.971  (8.5)
              step 1000: 0.575 / 0.915  (4.7)     step 2500: 0.851 / 0.975  (10.4)
              step 1500: 0.772 / 0.959  (6.6)     step 3000: 0.853 / 0.975  (12.3; 12.8 in all, 4.3 steps/s)
            The background is learnt first, the shapes' classes from step ~1,000. AdamW 1e-3 (this preset
            before) reached only 0.251 / 0.368 at steps 500 / 1000; 3e-3 for 2,000 steps ended at 0.794.
  paper     the paper's network (width 64, depth 4, valid convolutions with mirrored input tiles, no batch
            norm, dropout 0.5 at the end of the contracting path), SGD momentum 0.99 at batch 1 as in the paper
            (Sec. 3: "a high momentum (0.99)", one large tile per step); lr 0.01 is this preset's choice (the
            paper gives none). On shapes at 64x64 it shows the architecture, not the paper's ISBI numbers.
  tiny      a few steps of a very small U-Net, for tests.

`--config.model.upsample=bilinear`, `--config.model.skips=False` and `--config.model.padding=valid` are the
options configs/ablations/unet.py compares.
"""

from cvjax.train.config import base_config, cpu_adamw_run, select_preset, shapes_segmentation, tiny_run


def _shapes(c, steps: int):
  shapes_segmentation(c, image_size=64)
  c.model.name = "unet"
  c.model.width = 16
  c.model.depth = 3
  c.model.padding = "same"
  c.model.upsample = "transpose"
  c.model.skips = True
  c.model.batch_norm = True
  c.model.dropout_rate = 0.0
  cpu_adamw_run(c, steps, batch_size=16, learning_rate=3e-3)


def default(c):
  _shapes(c, steps=3000)


def paper(c):
  _shapes(c, steps=20000)
  c.model.width = 64
  c.model.depth = 4
  c.model.padding = "valid"
  c.model.batch_norm = False
  c.model.dropout_rate = 0.5
  c.batch_size = 1
  c.optimizer.name = "momentum"
  c.optimizer.momentum = 0.99
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "constant"


def tiny(c):
  _shapes(c, steps=2)
  tiny_run(c)
  c.dataset.config_name = "detection_32"
  c.dataset.image_size = 32
  c.model.width = 4
  c.model.depth = 2


PRESETS = dict(default=default, paper=paper, tiny=tiny)


def get_config(arg=None):
  c = base_config()
  c.name = "unet"
  return select_preset(PRESETS, arg, c)
