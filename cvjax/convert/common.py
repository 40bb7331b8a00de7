"""The one loading routine behind every converter: PyTorch tensors -> a flax variables tree, checked.

A converter names, for every leaf of the flax model, the PyTorch key it comes from. The expected tree is
taken from ``jax.eval_shape`` of the model's init (nothing is computed), so every leaf is accounted for: a
PyTorch key without a leaf, a leaf without a key, or a shape mismatch is an error that lists all of them.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

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


# ---- HF configs ---------------------------------------------------------------------------------------------

def _gelu(x):
  return jax.nn.gelu(x, approximate=False)


def _gelu_tanh(x):
  return jax.nn.gelu(x, approximate=True)


def _gelu_10(x):
  return jnp.clip(_gelu(x), -10.0, 10.0)


def _quick_gelu(x):
  return x * jax.nn.sigmoid(1.702 * x)


def _relu_squared(x):
  return jnp.square(jax.nn.relu(x))


def _leaky_relu(x):
  return jax.nn.leaky_relu(x, 0.01)  # torch.nn.LeakyReLU's default slope


def _mish(x):
  return x * jnp.tanh(jax.nn.softplus(x))


def _identity(x):
  return x


# HF ``ACT2FN`` names -> the same function in JAX (module-level functions, so that modules stay hashable). The
# tanh GELUs (gelu_new, gelu_fast, gelu_accurate, gelu_pytorch_tanh) differ only in how they write the
# constant sqrt(2 / pi). Activations with parameters (prelu, xielu) and the rarely used laplace and
# sqrtsoftplus are not here.
HF_ACTIVATIONS: Dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": _gelu, "gelu_python": _gelu, "gelu_10": _gelu_10, "gelu_new": _gelu_tanh, "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu_python_tanh": _gelu_tanh,
    "quick_gelu": _quick_gelu, "relu": jax.nn.relu, "relu2": _relu_squared, "relu6": jax.nn.relu6,
    "leaky_relu": _leaky_relu, "silu": jax.nn.silu, "swish": jax.nn.silu, "hardswish": jax.nn.hard_swish,
    "mish": _mish, "sigmoid": jax.nn.sigmoid, "tanh": jnp.tanh, "linear": _identity,
}


def hf_activation(config: Any, field: str, problems: List[str]) -> Callable[[jnp.ndarray], jnp.ndarray]:
  """The JAX function for the activation named by ``config.<field>``; an unknown name is appended to
  ``problems`` (and relu returned, so that the caller can go on collecting problems)."""
  name = getattr(config, field)
  if name not in HF_ACTIVATIONS:
    problems.append(f"{field}={name!r} (cvjax has {', '.join(sorted(HF_ACTIVATIONS))})")
    return jax.nn.relu
  return HF_ACTIVATIONS[name]


# What the converters make of the fields every transformers config has (``PreTrainedConfig``; 4.x adds the
# generation, tokenizer and TF/Flax fields, read only by text models and generation). None of them shapes a
# vision model's forward pass, except ``pruned_heads`` (4.x), which changes attention widths and is refused.
# ``dtype`` / ``torch_dtype``: weights are converted to float32 and the cvjax module computes in float32 (pass
# ``dtype=`` to the module for bfloat16); ``id2label`` / ``label2id`` / ``num_labels``: the head's width.
def generic_config_fields() -> frozenset:
  """The field names of the installed transformers' base config class (``PreTrainedConfig().to_dict()``)."""
  import transformers  # only called with an HF model at hand, so transformers is installed

  base = getattr(transformers, "PreTrainedConfig", None) or transformers.PretrainedConfig
  return frozenset(base().to_dict())


def generic_config_problems(config: Any) -> List[str]:
  """Problems with the fields that every HF config has (see ``generic_config_fields``)."""
  pruned = getattr(config, "pruned_heads", None)
  return [f"pruned_heads={pruned!r} (pruned attention heads are not supported)"] if pruned else []


def raise_if_unsupported(what: str, problems: Iterable[str]) -> None:
  """Raises one ValueError listing every ``'field=value (why)'`` in ``problems``, if there are any."""
  problems = list(problems)
  if problems:
    raise ValueError(f"{what} not supported by cvjax.convert: " + "; ".join(problems))


def rename_keys(state_dict: Mapping[str, Any], rules: Sequence[Tuple[str, Optional[str]]]) -> Dict[str, Any]:
  """``state_dict`` with every key rewritten by the ``(pattern, replacement)`` regex rules, applied in order
  (``re.sub``); a rule whose replacement is None drops the keys it matches.

  Used to read older transformers layouts: the rules match only old key names, so a state_dict in the current
  layout passes unchanged.

  Raises:
    ValueError: when two keys end up with the same name.
  """
  renamed, origins = {}, {}
  for key, value in state_dict.items():
    new_key = key
    for pattern, replacement in rules:
      if replacement is not None:
        new_key = re.sub(pattern, replacement, new_key)
      elif re.search(pattern, new_key):
        new_key = None
        break
    if new_key is None:
      continue
    if new_key in renamed:
      raise ValueError(f"state_dict keys {origins[new_key]!r} and {key!r} both map to {new_key!r}")
    renamed[new_key], origins[new_key] = value, key
  return renamed
