"""Faster R-CNN (Ren et al. 2015) with a ResNet-FPN backbone: Mask R-CNN's config without the mask branch.

Presets (as in configs/mask_rcnn.py, without masks in the data or the model):
  default      a small Faster R-CNN on the generated `shapes` detection set at 64x64, from scratch, on a CPU.
  coco_r50_1x  torchvision / detectron2's 1x recipe for fasterrcnn_resnet50_fpn (SGD 0.02 at batch 16, 90k
               iterations, lr / 10 at 60k and 80k, ImageNet backbone through --config.init.torch_checkpoint).
  tiny         a few steps of a very small model, for tests.
"""

from cvjax.train.config import config_module

_mask_rcnn = config_module("configs/mask_rcnn.py")
PRESETS = {name: _mask_rcnn.PRESETS[name] for name in ("default", "coco_r50_1x", "tiny")}


def get_config(arg=None):
  return _mask_rcnn.rcnn_config(arg, masks=False, presets=PRESETS)
