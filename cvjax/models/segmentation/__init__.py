"""Dense prediction: FCN (VGG-16 32s / 16s / 8s and torchvision's dilated-ResNet FCN), U-Net.

Every segmentation model returns a dict with ``logits [B, H, W, K]`` at the input resolution (and
``aux_logits`` when an auxiliary head is on).
"""

from cvjax.models.segmentation import fcn, maskformer, unet  # noqa: F401

MODULES = ("fcn", "maskformer", "unet")
