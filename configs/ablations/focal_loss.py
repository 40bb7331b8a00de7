"""Ablation: the focal loss's gamma for RetinaNet (Lin et al. 2017, Table 1b).

Four variants train the `configs/retinanet.py` model with the same data, schedule and seed, and differ only in
the classification loss: gamma in {0, 1, 2, 5} with the alpha the paper found best for each (gamma 0 is
alpha-balanced cross-entropy, alpha 0.75; gamma 1, 2 and 5 take alpha 0.25). `python launch.py
--config=configs/ablations/focal_loss.py --workdir=W` trains them one after the other and writes W/ablation.md
(final box AP, AP50, AP75 per variant, losses, wall time) and W/ablation.png. The paper (ResNet-50, COCO
minival): CE 31.1 AP, gamma 1 33.7, gamma 2 34.0, gamma 5 32.2.

Measured 2026-12-04 on a 2-core CPU, `default` (1,500 steps per variant; shapes validation, final values;
`python launch.py --config=configs/ablations/focal_loss.py --workdir=W`, 20 min for the four runs):

  | variant          | box AP | AP50  | AP75  | final train loss | wall time |
  | ce_alpha0.75     | 0.457  | 0.658 | 0.524 | 1.174            | 287 s     |
  | gamma1_alpha0.25 | 0.501  | 0.704 | 0.584 | 0.522            | 285 s     |
  | gamma2_alpha0.25 | 0.412  | 0.587 | 0.474 | 0.415            | 322 s     |
  | gamma5_alpha0.25 | 0.248  | 0.371 | 0.281 | 0.245            | 302 s     |

The paper's ranking is not reproduced at this budget: gamma 1 is best (+4.4 AP over CE, the paper's +2.6),
but gamma 2 is below CE and gamma 5 far below. A larger gamma shrinks the loss of every anchor that is already
fairly well classified, positives included, and so the early learning signal: from scratch in 1,500 steps the
ranking follows how fast each variant learns, where the paper compares converged ImageNet-initialised models
(90k iterations). The RetinaNet default (gamma 2) reaches box AP 0.675 at 3,000 steps (configs/retinanet.py).

Presets:
  default  the `configs/retinanet.py:default` model, data and schedule shape at 1,500 steps per variant (half
           the goal run's budget), evaluated at the end.
  tiny     2 steps of `configs/retinanet.py:tiny` for two of the variants (CE and gamma 2), for tests.
"""

from cvjax.train.config import config_module, select_preset

VARIANTS = (("ce_alpha0.75", {"task.focal_gamma": 0.0, "task.focal_alpha": 0.75}),
            ("gamma1_alpha0.25", {"task.focal_gamma": 1.0, "task.focal_alpha": 0.25}),
            ("gamma2_alpha0.25", {"task.focal_gamma": 2.0, "task.focal_alpha": 0.25}),
            ("gamma5_alpha0.25", {"task.focal_gamma": 5.0, "task.focal_alpha": 0.25}))


def default(c):
  c.total_steps = 1500
  c.eval_every = 1500


def tiny(c):
  # configs/retinanet.py:tiny; two of the variants are enough to exercise the ablation (each compiles anew).
  c.ablation = tuple(v for v in VARIANTS if v[0] in ("ce_alpha0.75", "gamma2_alpha0.25"))


PRESETS = dict(default=default, tiny=tiny)


def get_config(arg=None):
  c = config_module("configs/retinanet.py").get_config("tiny" if arg == "tiny" else "default")
  c.name = "focal_loss"
  c.ablation = VARIANTS
  c.ablation_metrics = ("eval/AP", "eval/AP50", "eval/AP75")
  return select_preset(PRESETS, arg, c)
