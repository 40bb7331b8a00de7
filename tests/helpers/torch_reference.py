"""Shared by the PyTorch-reference tests (on the test path through pytest.ini's ``pythonpath``)."""

import re

import jax
import numpy as np
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


def rename_keys(state_dict, rules, first_match_only: bool = False) -> dict:
  """``state_dict`` with every key rewritten by the ``(regex, replacement)`` ``rules`` in order (all of them,
  or only the first that matches): how the tests build an older transformers release's key layout."""
  renamed = {}
  for key, value in state_dict.items():
    for pattern, replacement in rules:
      if first_match_only and not re.match(pattern, key):
        continue
      key = re.sub(pattern, replacement, key)
      if first_match_only:
        break
    renamed[key] = value
  return renamed


def assert_same_variables(got, expected) -> None:
  """Two flax variable trees with the same structure and bit-identical leaves."""
  assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(expected)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, got, expected))
