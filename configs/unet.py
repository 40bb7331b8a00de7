"""U-Net (Ronneberger et al. 2015, "U-Net: Convolutional Networks for Biomedical Image Segmentation").

Presets:
  default   a small U-Net (width 16, depth 3, 'same' padding, batch norm, transposed-conv upsampling, skips) on
            the generated `shapes` label maps at 64x64 (7 classes: background + 6 shapes), batch 16, AdamW 1e-3,
            cosine, 2,000 steps. Goal: validation mIoU >= 0.85 within 15 minutes on a 2-core CPU -- NOT met yet.
            Measured 2026-12-04 on a loaded 2-core machine (load average ~6): mIoU 0.251 at step 500, 0.368 at
            step 1000 (17.6 min under that load; stopped there); like FCN it learns the background first and the
            shapes' classes slowly from scratch.
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
  cpu_adamw_run(c, steps, batch_size=16)


def default(c):
  _shapes(c, steps=2000)


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
