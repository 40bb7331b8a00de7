"""Initialising a run from another run's weights: the subtree graft and its errors, and config loading."""

import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.train.initialization import graft, load_config_file


def _variables():
  return {"params": {"backbone": {"conv": {"kernel": jnp.zeros((3, 3, 3, 4))}, "bn": {"scale": jnp.ones(4)}},
                     "head": {"kernel": jnp.zeros((4, 2))}},
          "batch_stats": {"backbone": {"bn": {"mean": jnp.zeros(4)}}}}


def _classifier():
  rng = np.random.default_rng(0)
  return {"params": {"conv": {"kernel": rng.normal(size=(3, 3, 3, 4)).astype(np.float32)},
                     "bn": {"scale": rng.normal(size=4).astype(np.float32)},
                     "fc": {"kernel": rng.normal(size=(4, 10)).astype(np.float32)}},
          "batch_stats": {"bn": {"mean": rng.normal(size=4).astype(np.float32)}}}


def test_graft_replaces_only_the_destination_subtree():
  variables, pretrained = _variables(), _classifier()
  out = graft(variables, pretrained, (("backbone", ""),))
  np.testing.assert_array_equal(out["params"]["backbone"]["conv"]["kernel"], pretrained["params"]["conv"]["kernel"])
  np.testing.assert_array_equal(out["params"]["backbone"]["bn"]["scale"], pretrained["params"]["bn"]["scale"])
  np.testing.assert_array_equal(out["batch_stats"]["backbone"]["bn"]["mean"],
                                pretrained["batch_stats"]["bn"]["mean"])
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], 0.0)   # untouched; the source head is ignored


def test_graft_errors_name_the_leaf():
  variables, pretrained = _variables(), _classifier()
  del pretrained["params"]["bn"]
  with pytest.raises(ValueError, match="no 'bn/scale' for 'backbone/bn/scale'"):
    graft(variables, pretrained, (("backbone", ""),))
  pretrained = _classifier()
  pretrained["params"]["conv"]["kernel"] = np.zeros((3, 3, 3, 8), np.float32)
  with pytest.raises(ValueError, match=r"shape \(3, 3, 3, 8\).*needs \(3, 3, 3, 4\)"):
    graft(variables, pretrained, (("backbone", ""),))
  with pytest.raises(ValueError, match="mapping is empty"):
    graft(variables, pretrained, ())


def test_load_config_file_with_preset():
  config = load_config_file("configs/resnet.py:plain")
  assert config.preset == "plain" and config.model.name == "plain18"
  assert load_config_file("configs/resnet.py").preset == "default"
  with pytest.raises(FileNotFoundError, match="nope.py"):
    load_config_file("configs/nope.py")


def _torchvision_state_dict(variables):
  """cvjax ResNet variables -> the torchvision state_dict they stand for (the converter's layout, inverted)."""
  import torch
  from flax import traverse_util

  from cvjax.convert.common import TORCH_LEAF_NAMES
  from cvjax.convert.torchvision import torchvision_module_name

  state_dict = {}
  for collection in ("params", "batch_stats"):
    for (*modules, leaf), value in traverse_util.flatten_dict(variables[collection]).items():
      value = np.asarray(value)
      value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
      key = f"{torchvision_module_name(tuple(modules))}.{TORCH_LEAF_NAMES[leaf]}"
      state_dict[key] = torch.from_numpy(np.array(value))  # a writable copy
  return state_dict


def test_torch_checkpoint_initialises_the_detr_backbone(tmp_path):
  """A torchvision-layout ResNet .pth (wrapped as training scripts save it) grafted into DETR's backbone."""
  import jax
  import ml_collections
  import torch
  from flax import traverse_util

  from cvjax.models import create_model
  from cvjax.train.trainer import pretrained_variables

  resnet = create_model("resnet18", num_classes=10, width=4, stem="cifar")
  images = jnp.zeros((1, 32, 32, 3))
  resnet_variables = jax.tree.map(  # random statistics too, so a swapped mean/var would show
      lambda x: x + np.random.default_rng(x.size).normal(size=x.shape).astype(np.float32),
      resnet.init(jax.random.key(0), images, train=False))
  path = str(tmp_path / "resnet18.pth")
  torch.save({"state_dict": _torchvision_state_dict(resnet_variables), "epoch": 3}, path)

  config = ml_collections.ConfigDict({"init": {
      "pretrain_config": "", "checkpoint_dir": "", "torch_checkpoint": path, "torch_model": "resnet18",
      "torch_model_kwargs": (("width", 4), ("stem", "cifar"), ("num_classes", 10)),
      "mapping": (("backbone", ""),)}})
  pretrained, source = pretrained_variables(config, str(tmp_path))
  assert source == path
  detr = create_model("detr_resnet18", num_classes=3, backbone_width=4, backbone_stem="cifar",
                      backbone_frozen_bn=False, d_model=16, num_heads=2, ffn_dim=32, num_encoder_layers=1,
                      num_decoder_layers=1, num_queries=4)
  variables = detr.init(jax.random.key(1), images, pixel_mask=jnp.ones((1, 32, 32), bool), train=False)
  grafted = graft(dict(variables), pretrained, config.init.mapping)
  for collection in ("params", "batch_stats"):
    expected = traverse_util.flatten_dict(resnet_variables[collection], sep="/")
    got = traverse_util.flatten_dict(grafted[collection], sep="/")
    backbone = {k[len("backbone/"):]: v for k, v in got.items() if k.startswith("backbone/")}
    assert backbone and set(backbone) == set(expected) - {"fc/kernel", "fc/bias"}
    for key, value in backbone.items():
      np.testing.assert_array_equal(value, expected[key], err_msg=key)
  # The transformer keeps its own initialisation.
  np.testing.assert_array_equal(grafted["params"]["query_position_embeddings"]["embedding"],
                                variables["params"]["query_position_embeddings"]["embedding"])

  config.init.torch_model = ""
  with pytest.raises(ValueError, match="needs config.init.torch_model"):
    pretrained_variables(config, str(tmp_path))
  config.init.torch_model, config.init.torch_checkpoint = "resnet18", str(tmp_path / "missing.pth")
  with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
    pretrained_variables(config, str(tmp_path))
