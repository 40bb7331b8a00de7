"""Classification backbones: AlexNet, VGG, ResNet, ViT, Swin (classifiers, and feature maps for detectors)."""

from cvjax.models.backbones import alexnet, resnet, swin, vgg, vit  # noqa: F401

MODULES = ("alexnet", "resnet", "swin", "vgg", "vit")
