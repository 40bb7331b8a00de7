"""The one loading routine behind every converter: PyTorch tensors -> a flax variables tree, checked.

A converter names, for every leaf of the flax model, the PyTorch key it comes from. The expected tree is
taken from ``jax.eval_shape`` of the model's init (nothing is computed), so every leaf is accounted for: a
PyTorch key without a leaf, a leaf without a key, or a shape mismatch is an error that lists all of them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np

# Flax leaf name -> PyTorch parameter / buffer name (Conv, Dense, BatchNorm, FrozenBatchNorm).
TORCH_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                    "var": "running_var", "embedding": "weight"}
# Buffers PyTorch saves that have no flax counterpart.
IGNORED_SUFFIXES = ("num_batches_tracked",)

LeafPath = Tuple[str, ...]  # (collection, *module names, leaf name)


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any device, any float dtype) or array-like -> a NumPy array (torch not imported here)."""
  if hasattr(value, "detach"):
    value = value.detach().cpu()
    if value.is_floating_point():
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def torch_to_flax_layout(value: np.ndarray) -> np.ndarray:
  """Conv weight ``[O, I, KH, KW]`` -> ``[KH, KW, I, O]``; Linear weight ``[O, I]`` -> ``[I, O]``; else as is."""
  if value.ndim == 4:
    return value.transpose(2, 3, 1, 0)
  if value.ndim == 2:
    return value.T
  return value


def load_state_dict(module: Any, state_dict: Mapping[str, Any], *, input_shape: Sequence[int],
                    torch_module_name: Optional[Callable[[Tuple[str, ...]], str]] = None,
                    torch_key: Optional[Callable[[LeafPath], str]] = None,
                    leaf_transform: Optional[Callable[[LeafPath, np.ndarray, Tuple[int, ...]], np.ndarray]] = None,
                    source: str = "state_dict") -> Dict[str, Any]:
  """Builds ``module``'s variables from a PyTorch ``state_dict``.

  Args:
    module: a flax module called as ``module(x, train=False)``.
    state_dict: PyTorch names -> tensors (``model.state_dict()``).
    input_shape: an NHWC input shape the module accepts; only its abstract init is traced.
    torch_module_name: flax module path (``('layer1_0', 'conv1')``) -> PyTorch module name
      (``'layer1.0.conv1'``); the leaf name is appended through ``TORCH_LEAF_NAMES``.
    torch_key: instead of ``torch_module_name``, the whole PyTorch key of a flax leaf path (without the
      collection), for models with bare ``nn.Parameter`` tensors (ViT's ``cls_token``).
    leaf_transform: optional ``(path, value, target_shape) -> value`` applied after the generic layout change
      (e.g. to permute a Linear that follows an NCHW flatten).
    source: what ``state_dict`` is, for error messages.

  Returns:
    ``{'params': ..., 'batch_stats': ...}`` (collections as the module defines them) of float32 arrays.

  Raises:
    ValueError: listing unexpected keys, missing keys and shape mismatches.
  """
  abstract = jax.eval_shape(
      lambda: module.init(jax.random.PRNGKey(0), jnp.zeros(input_shape, jnp.float32), train=False))
  flat_abstract = flax.traverse_util.flatten_dict(abstract)
  keys = {}
  if (torch_module_name is None) == (torch_key is None):
    raise TypeError("load_state_dict takes exactly one of torch_module_name and torch_key")
  for path in flat_abstract:
    key = (torch_key(path[1:]) if torch_key is not None
           else f"{torch_module_name(path[1:-1])}.{TORCH_LEAF_NAMES[path[-1]]}")
    if key in keys.values():
      raise AssertionError(f"two flax leaves map to the PyTorch key {key!r}: a bug in the converter")
    keys[path] = key
  provided = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
  expected = set(keys.values())
  problems = []
  if provided - expected:
    problems.append(f"unexpected keys: {sorted(provided - expected)}")
  if expected - provided:
    problems.append(f"missing keys: {sorted(expected - provided)}")

  flat_variables = {}
  for path, key in keys.items():
    if key not in state_dict:
      continue
    target = flat_abstract[path]
    torch_value = to_numpy(state_dict[key])
    # nn.Embedding's [num, dim] table is already nn.Embed's layout; every other leaf is a Conv/Linear/norm.
    value = torch_value if path[-1] == "embedding" else torch_to_flax_layout(torch_value)
    if leaf_transform is not None:
      value = leaf_transform(path, value, tuple(target.shape))
    if value.shape != tuple(target.shape):
      problems.append(f"{key}: shape {torch_value.shape} ({value.shape} in flax layout), but the model's "
                      f"{'/'.join(path)} is {tuple(target.shape)}")
      continue
    flat_variables[path] = jnp.asarray(value, target.dtype)
  if problems:
    raise ValueError(f"{source} does not match {type(module).__name__}:\n  " + "\n  ".join(problems))
  return flax.traverse_util.unflatten_dict(flat_variables)
