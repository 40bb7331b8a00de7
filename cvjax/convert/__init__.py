"""PyTorch checkpoints -> cvjax flax variables.

``from_torch_state_dict('resnet50', torchvision_state_dict)`` for torchvision-layout ResNet / VGG / AlexNet
checkpoints; ``from_transformers(hf_model)`` for HF ``transformers`` models (dispatch on the class name).
Both return ``(module, variables)``.
"""

from cvjax.convert.huggingface import HF_CONVERTERS, from_transformers, register_hf_converter  # noqa: F401
from cvjax.convert.torchvision import from_torch_state_dict  # noqa: F401
from cvjax.convert import vit as _vit  # noqa: F401  (registers the HF ViT converter)
from cvjax.convert import detr as _detr  # noqa: F401  (registers the HF DETR converter)
from cvjax.convert import swin as _swin  # noqa: F401  (registers the HF Swin converter)
from cvjax.convert import maskformer as _maskformer  # noqa: F401  (registers the HF MaskFormer converter)
from cvjax.convert import mae as _mae  # noqa: F401  (registers the HF ViTMAE converter)
