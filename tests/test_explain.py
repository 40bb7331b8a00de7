"""``--mode=explain``: attention PNGs of the latest checkpoint, and the errors met before there is one."""

import json
import os

import pytest
from PIL import Image

import launch


def test_explain_writes_head_and_rollout_pngs_of_the_latest_checkpoint(load_config, data_dir, tmp_path):
  config = load_config("configs/vit.py", "tiny", data_dir=data_dir)
  workdir = str(tmp_path / "run")
  launch.run(config, workdir, "train")
  result = launch.run(config, workdir, "explain")

  directory = os.path.join(workdir, "explain", "step_2")
  assert result["step"] == 2 and result["directory"] == directory
  names = [os.path.relpath(f, directory) for f in result["files"]]
  assert names == ["image_0_heads.png", "image_0_rollout.png", "image_1_heads.png", "image_1_rollout.png",
                   "index.json"] == sorted(os.listdir(directory))
  heads = config.model.num_heads
  for name, panels in (("image_0_heads.png", heads + 1), ("image_1_rollout.png", 2)):
    with Image.open(os.path.join(directory, name)) as png:
      assert png.format == "PNG" and png.size == (panels * 160, 160 + 24)  # panels + caption (see viz)
  with open(os.path.join(directory, "index.json")) as f:
    index = json.load(f)
  assert index["step"] == 2 and [image["image"] for image in index["images"]] == [0, 1]
  assert {"label", "prediction", "probability"} <= set(index["images"][0])


def test_explain_without_checkpoint_says_train_first(load_config, data_dir, tmp_path):
  config = load_config("configs/vit.py", "tiny", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="no checkpoint .* train first"):
    launch.run(config, str(tmp_path / "empty"), "explain")


def test_explain_needs_a_model_that_returns_attention(load_config, data_dir, tmp_path):
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir)
  with pytest.raises(ValueError, match=r"needs a model with `return_attention`.*'resnet18' \(ResNet\)"):
    launch.run(config, str(tmp_path / "run"), "explain")
