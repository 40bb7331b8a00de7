"""Initialising a run from another run's weights (a pretrained backbone, as DETR starts from ImageNet).

Config keys (``config.init``, see ``cvjax.train.config.base_config``):
  pretrain_config: ``'configs/resnet.py:detr_backbone'`` -- a config (file[:preset]) that is trained first, in
    ``<workdir>/pretrain`` (resumable like any run; skipped once finished), whose final weights initialise
    this run. Its ``data_dir`` is this run's.
  checkpoint_dir: or an existing workdir whose latest checkpoint initialises this run.
  torch_checkpoint, torch_model, torch_model_kwargs: or a PyTorch checkpoint file (a state_dict, or a dict
    holding one under 'model' / 'state_dict'), converted by
    ``cvjax.convert.from_torch_state_dict(torch_model, state_dict, **dict(torch_model_kwargs))``: torchvision
    classifiers (an ImageNet ResNet-50 for DETR's backbone) or the official DETR checkpoints. Needs torch.
  mapping: ``((destination, source), ...)`` '/'-joined variable-path prefixes: each source subtree of the
    pretrained ``params`` and ``batch_stats`` replaces the destination subtree of this run's, e.g.
    ``(('backbone', ''),)`` puts a whole classifier's weights (its head dropped) into DETR's ``backbone``.
    Every destination leaf must exist in the source with the same shape; source leaves without a destination
    (a classifier's head) are ignored.

Only a fresh run is initialised this way: resuming from the run's own checkpoint never re-grafts. The train
loop (``cvjax.train.trainer``) trains or restores the source run; this module holds the pieces below it: which
run or file is the source, reading a PyTorch checkpoint, and the graft.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Tuple

import jax
import ml_collections
from absl import logging
from flax import traverse_util

from cvjax.train.checkpoint import Checkpointer
from cvjax.train.config import load_config_file


def pretrain_run(config: ml_collections.ConfigDict, workdir: str) -> Tuple[ml_collections.ConfigDict, str, bool]:
  """The run that ``config.init.pretrain_config`` names: ``(its config, its workdir <workdir>/pretrain,
  whether it still has to train)``. Its ``data_dir`` and ``progress_bar`` are this run's."""
  pre_config = load_config_file(config.init.pretrain_config)
  with pre_config.unlocked():
    pre_config.data_dir = config.data_dir
    pre_config.progress_bar = config.progress_bar
  pre_workdir = os.path.join(workdir, "pretrain")
  checkpointer = Checkpointer(pre_workdir, keep=1)
  done = checkpointer.latest_step()
  checkpointer.close()
  return pre_config, pre_workdir, done is None or done < pre_config.total_steps


def run_config(workdir: str, data_dir: str) -> ml_collections.ConfigDict:
  """The config an existing run saved in ``workdir/config.json`` (``config.init.checkpoint_dir``), with this
  run's ``data_dir``."""
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(f"config.init.checkpoint_dir={workdir!r} has no config.json: it must be the "
                            "workdir of a cvjax run")
  with open(config_path) as f:
    source_config = ml_collections.ConfigDict(json.load(f))
  with source_config.unlocked():
    source_config.data_dir = data_dir
  return source_config


def torch_checkpoint_variables(init: ml_collections.ConfigDict) -> Dict[str, Any]:
  """``init.torch_checkpoint`` read with torch and converted to ``{'params', 'batch_stats'}``."""
  from cvjax.convert import from_torch_state_dict  # deferred: the converters are not needed otherwise

  path = init.torch_checkpoint
  if not init.torch_model:
    raise ValueError(f"config.init.torch_checkpoint={path!r} needs config.init.torch_model: the cvjax model "
                     "its weights fit, e.g. 'resnet50' for torchvision's ResNet-50")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config.init.torch_checkpoint={path!r} does not exist; nothing is downloaded: "
                            "fetch the .pth file on a machine with network access and give its local path")
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ImportError("config.init.torch_checkpoint needs PyTorch to read the file: pip install torch==2.13.0 "
                      "(the CPU build is enough)") from None
  state_dict = torch.load(path, map_location="cpu", weights_only=True)
  for wrapper in ("model", "state_dict"):  # training scripts' checkpoints (DETR's: {'model': ..., ...})
    if isinstance(state_dict, dict) and isinstance(state_dict.get(wrapper), dict):
      state_dict = state_dict[wrapper]
  _, variables = from_torch_state_dict(init.torch_model, state_dict, **dict(init.torch_model_kwargs))
  return {"params": variables.get("params", {}), "batch_stats": variables.get("batch_stats", {})}


def graft(variables: Dict[str, Any], pretrained: Dict[str, Any], mapping) -> Dict[str, Any]:
  """Replaces subtrees of ``variables`` ({'params', 'batch_stats'}) by ``pretrained``'s per ``mapping``.

  Returns the new variables (same structure, shapes and shardings as ``variables``); raises ``ValueError``
  naming the first destination leaf that has no source or a different shape.
  """
  if not mapping:
    raise ValueError("config.init.mapping is empty: say which pretrained subtree goes where, e.g. "
                     "(('backbone', ''),)")
  result = {}
  for collection, tree in variables.items():
    flat = traverse_util.flatten_dict(tree, sep="/")
    source = traverse_util.flatten_dict(pretrained.get(collection, {}), sep="/")
    for destination, origin in mapping:
      dst = destination.strip("/")
      src = origin.strip("/")
      for path in [p for p in flat if p == dst or p.startswith(dst + "/") or not dst]:
        rest = path[len(dst):].lstrip("/")
        key = "/".join(part for part in (src, rest) if part)
        if key not in source:
          raise ValueError(f"config.init.mapping {(destination, origin)}: pretrained {collection} has no "
                           f"{key!r} for {path!r}")
        if source[key].shape != flat[path].shape:
          raise ValueError(f"config.init.mapping {(destination, origin)}: pretrained {collection} {key!r} has "
                           f"shape {source[key].shape}, {path!r} needs {flat[path].shape}")
        flat[path] = jax.device_put(source[key].astype(flat[path].dtype), flat[path].sharding)
    result[collection] = traverse_util.unflatten_dict(flat, sep="/")
  logging.info("initialised %s from pretrained weights", [m[0] for m in mapping])
  return result
