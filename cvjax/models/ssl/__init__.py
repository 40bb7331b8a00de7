"""Self-supervised pre-training models: MAE (masked autoencoder ViT)."""

from cvjax.models.ssl import mae  # noqa: F401

MODULES = ("mae",)
