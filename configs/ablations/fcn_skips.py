"""Ablation: FCN's skip connections (Long et al. 2015, Table 2): FCN-32s vs 16s vs 8s.

Three variants train the `configs/fcn.py` model with the same data, schedule and seed, and differ only in the
skips fused into the scores: none (32s), pool4 (16s), pool4 and pool3 (8s). `python launch.py
--config=configs/ablations/fcn_skips.py --workdir=W` trains them one after the other and writes W/ablation.md
(final mIoU and pixel accuracy per variant, losses, wall time) and W/ablation.png. The paper (VOC 2011 val mean
IU): 32s 59.4 < 16s 62.4 < 8s 62.7 -- finer skips recover boundaries the stride-32 scores blur. Unlike the
paper, which trains 16s from 32s and 8s from 16s, each variant here trains from scratch for the same budget.

Presets:
  default  the `configs/fcn.py:default` model, data and schedule shape at 1,000 steps per variant, evaluated at
           the end. Measured 2026-12-04 (2-core CPU shared with another training, so the wall times are upper
           bounds), validation mIoU / pixel accuracy: fcn32s 0.154 / 0.759, fcn16s 0.439 / 0.850, fcn8s 0.508 /
           0.888 -- the paper's ordering, with much wider gaps at 64x64, where a stride-32 map is 2x2.
  tiny     2 steps of `configs/fcn.py:tiny` for two of the variants, for tests.
"""

from cvjax.train.config import config_module, select_preset

VARIANTS = (("fcn32s", {"model.name": "fcn32s"}),
            ("fcn16s", {"model.name": "fcn16s"}),
            ("fcn8s", {"model.name": "fcn8s"}))


def default(c):
  c.total_steps = 1000
  c.eval_every = 1000


def tiny(c):
  c.ablation = tuple(v for v in VARIANTS if v[0] in ("fcn32s", "fcn8s"))


PRESETS = dict(default=default, tiny=tiny)


def get_config(arg=None):
  c = config_module("configs/fcn.py").get_config("tiny" if arg == "tiny" else "default")
  c.name = "fcn_skips"
  c.ablation = VARIANTS
  c.ablation_metrics = ("eval/miou", "eval/pixel_accuracy")
  return select_preset(PRESETS, arg, c)
