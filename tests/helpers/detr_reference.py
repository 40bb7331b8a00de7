"""Shared by the DETR conversion tests (on the test path through pytest.ini's ``pythonpath``): a small HF
``DetrForObjectDetection`` with every float tensor redrawn, and a padded batch."""

import numpy as np
import torch
from transformers import DetrForObjectDetection


def randomised_hf_detr(config, seed=0):
  """``DetrForObjectDetection(config)`` in eval mode with random weights and frozen-BN statistics.

  HF's init leaves biases at zero, BN statistics at identity and weights at std 0.02, under which a misplaced
  bias or norm could hide; every float tensor is redrawn at a scale that keeps activations O(1).
  """
  torch.manual_seed(seed)
  model = DetrForObjectDetection(config).eval()
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      noise = torch.randn(tensor.shape, generator=generator)
      if name.endswith("running_var"):
        tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
      elif tensor.ndim >= 2 and "embeddings" not in name:  # conv / linear weights: fan-in scaling
        tensor.copy_(noise / np.sqrt(tensor[0].numel()))
      elif name.endswith("weight") and "embeddings" not in name:  # norm scales
        tensor.copy_(1 + 0.2 * noise)
      else:  # biases, running means, query embeddings
        tensor.copy_(0.2 * noise if tensor.ndim == 1 else noise)
  return model


def padded_batch(seed=0):
  """Two NCHW 64x96 images and their int64 pixel mask: the second is real only on its top-left 30x50 (its C5
  mask at stride 32 is [[1, 1, 0], [0, 0, 0]])."""
  images = np.random.default_rng(seed).standard_normal((2, 3, 64, 96), dtype=np.float32)
  mask = np.ones((2, 64, 96), np.int64)
  mask[1, 30:] = 0
  mask[1, :, 50:] = 0
  return images, mask
