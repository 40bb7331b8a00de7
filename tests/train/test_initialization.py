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
