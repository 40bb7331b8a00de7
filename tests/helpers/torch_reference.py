"""Shared by the PyTorch-reference tests (on the test path through pytest.ini's ``pythonpath``)."""

import torch


def randomise_batch_norms(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
  """Puts ``model`` in eval mode with non-trivial BatchNorm running statistics and affine parameters, so that a
  misplaced or mis-converted BN shows in the output (PyTorch's init leaves them at the identity)."""
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.BatchNorm2d):
        shape = module.running_mean.shape
        module.running_mean.copy_(0.2 * torch.randn(shape, generator=generator))
        module.running_var.copy_(torch.rand(shape, generator=generator) + 0.5)
        module.weight.copy_(torch.rand(shape, generator=generator) + 0.5)
        module.bias.copy_(0.2 * torch.randn(shape, generator=generator))
  return model.eval()
