"""The launcher's code path: every config's tiny preset, eval mode, and the errors a user meets first."""

import json
import math
import os
import re
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import launch
from cvjax.data import shapes_render
from cvjax.tasks import create_task
from cvjax.train import trainer
from cvjax.train.config import config_presets, load_config_file
from cvjax.train.optim import FROZEN, create_optimizer, parameter_labels
from cvjax.train.state import TrainState

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py")
                 if not p.name.startswith("_"))


def _jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _check_trained(config, workdir, summary, model_name=None):
  """The files a finished tiny run leaves in ``workdir``; returns its final eval record."""
  assert summary["step"] == config.total_steps == 2
  train_steps = [r["step"] for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r]
  assert train_steps == [1, 2]
  evals = [r for r in _jsonl(os.path.join(workdir, "metrics.jsonl")) if any(k.startswith("eval/") for k in r)]
  assert [r["step"] for r in evals] == [2]
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.load(f)["model"]["name"] == (model_name or config.model.name)
  with open(os.path.join(workdir, "summary.json")) as f:
    assert json.load(f)["step"] == 2
  assert os.listdir(os.path.join(workdir, "tensorboard"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  return evals[-1]


@pytest.mark.parametrize("config_path", CONFIGS)
def test_tiny_preset_trains_two_steps_evaluates_and_checkpoints(config_path, load_config, data_dir, tmp_path):
  config = load_config(config_path, "tiny", data_dir=data_dir)
  workdir = str(tmp_path / "run")
  summary = launch.run(config, workdir, "train")
  # An ablation config trains every variant as a run of its own in workdir/<variant>/, then compares them.
  variants = [name for name, _ in config.ablation]
  runs = ([(os.path.join(workdir, name), summary["variants"][name], overrides.get("model.name"))
           for name, overrides in config.ablation] if variants else [(workdir, summary, None)])
  final_evals = [_check_trained(config, run_dir, run_summary, model_name) for run_dir, run_summary, model_name in runs]
  if variants:
    table = (tmp_path / "run" / "ablation.md").read_text()
    assert all(f"| {name} |" in table for name in variants)
    assert os.path.getsize(os.path.join(workdir, "ablation.png")) > 0
  # --mode=eval on the same workdir evaluates that checkpoint and reproduces the final eval.
  result = launch.run(config, workdir, "eval")
  results = [result["variants"][name] for name in variants] if variants else [result]
  for result, final_eval in zip(results, final_evals):
    assert result["step"] == 2
    for k in [k for k in final_eval if k.startswith("eval/")]:
      assert result[k] == pytest.approx(final_eval[k], rel=1e-5, abs=1e-6), k


def test_eval_without_checkpoint_says_train_first(load_config, data_dir, tmp_path):
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir)
  with pytest.raises(FileNotFoundError, match="no checkpoint .* train first"):
    launch.run(config, str(tmp_path / "empty"), "eval")


def test_unknown_config_key_is_an_error(launch_cli, tmp_path):
  result = launch_cli(["--config=configs/resnet.py:tiny", "--config.optimizer.learnig_rate=0.1",
                       f"--workdir={tmp_path}"], timeout=120)
  assert result.returncode != 0
  assert "learnig_rate" in result.stdout + result.stderr


def test_unknown_preset_lists_the_valid_ones(load_config):
  with pytest.raises(ValueError, match=r"unknown preset 'imagenet_r51'.*imagenet_r50"):
    load_config("configs/resnet.py", "imagenet_r51")


def test_unknown_model_name_lists_the_valid_ones(load_config, data_dir):
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir, **{"model.name": "resnet17"})
  with pytest.raises(KeyError, match=r"unknown model 'resnet17'.*resnet18"):
    trainer.build_model(config, num_classes=6)


def test_unknown_dataset_name_lists_the_valid_ones(load_config, data_dir):
  from cvjax.data import create_pipeline
  config = load_config("configs/resnet.py", "tiny", data_dir=data_dir, **{"dataset.name": "shapez"})
  with pytest.raises(KeyError, match=r"unknown dataset 'shapez'.*shapes"):
    create_pipeline(config, "train", train=True)


def test_missing_real_dataset_says_how_to_prepare(load_config, tmp_path):
  from cvjax.data import create_pipeline
  config = load_config("configs/resnet.py", "imagenet_r50", data_dir=str(tmp_path))
  with pytest.raises(Exception, match=r"imagenet2012.*(prepare|build)") as info:
    create_pipeline(config, "validation", train=False)
  assert str(tmp_path) in str(info.value)


# Label counts of the datasets presets name, for presets whose model.num_classes is 0 ("from the data").
DATASET_CLASSES = {"imagenet2012": 1000, "coco": 80, "coco_folder": 80, "shapes": len(shapes_render.CLASS_NAMES)}


def _example_batch(config):
  """A zero batch of one image of the size the preset's data gives: the crop side (classification), the largest
  multi-scale side (DETR on COCO: 800 x 800) or the letterbox side (detection on shapes), with a pixel mask."""
  scales = config.dataset.get("scales")
  side = max(scales) if scales else config.dataset.image_size
  return {"image": np.zeros((1, side, side, 3), np.float32), "pixel_mask": np.ones((1, side, side), bool)}


@pytest.mark.parametrize("config_path", CONFIGS)
def test_every_preset_builds(config_path):
  """Presets that CI never trains (ImageNet, COCO) still build: a misspelt key in a locked config is an error,
  and the model, its parameters and the optimizer state must exist (abstractly: ``jax.eval_shape``, no data, no
  compilation), with every freeze / lr-multiplier regex selecting some parameter (one that selects none is a
  silent no-op)."""
  presets = config_presets(str(REPO / config_path))
  assert "default" in presets and "tiny" in presets
  for preset in presets:
    config = load_config_file(f"{REPO / config_path}:{preset}")
    assert config.preset == preset and config.total_steps > 0 and config.batch_size > 0, preset
    num_classes = config.model.get("num_classes") or DATASET_CLASSES[config.dataset.name]
    model = trainer.build_model(config, num_classes)
    task = create_task(config, num_classes, [f"class_{i}" for i in range(num_classes)])
    args, kwargs = task.model_inputs(_example_batch(config))
    tx, _ = create_optimizer(config.optimizer, config.total_steps)

    def init(rng):
      variables = model.init({"params": rng, "dropout": rng}, *args, train=False, **kwargs)
      params = variables["params"]
      return TrainState.create(params=params, batch_stats=variables.get("batch_stats", {}),
                               opt_state=tx.init(params), rng=rng)

    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    where = f"{config_path}:{preset}"
    names = {"/".join(path): leaf for path, leaf in flax.traverse_util.flatten_dict(state.params).items()}
    assert sum(math.prod(leaf.shape) for leaf in names.values()) > 0, where
    assert all(jnp.issubdtype(leaf.dtype, jnp.floating) and min(leaf.shape, default=1) > 0
               for leaf in names.values()), where
    assert state.step.shape == () and state.step.dtype == jnp.int32, where
    # The optimizer state fits the parameters: an update of parameter-shaped gradients gives parameter-shaped
    # updates and an optimizer state of the same structure.
    updates, opt_state = jax.eval_shape(tx.update, state.params, state.opt_state, state.params)
    assert jax.tree.structure(updates) == jax.tree.structure(state.params), where
    assert all(jax.tree.leaves(jax.tree.map(lambda u, p: (u.shape, u.dtype) == (p.shape, p.dtype), updates,
                                            state.params))), where
    assert jax.tree.structure(opt_state) == jax.tree.structure(state.opt_state), where
    # A freeze regex must name parameters, or else only batch_stats: a frozen batch norm (DETR's COCO presets'
    # 'backbone/bn1/.*', trainable in its shapes presets) has no parameters, so freezing it is moot, not a typo.
    buffers = ["/".join(path) for path in flax.traverse_util.flatten_dict(state.batch_stats)]
    for pattern in config.optimizer.freeze:
      assert any(re.fullmatch(pattern, name) for name in [*names, *buffers]), \
          f"{where}: freeze {pattern!r} matches no variable"
    multipliers = [(str(p), float(m)) for p, m in config.optimizer.lr_multipliers]
    labels = set(jax.tree.leaves(parameter_labels(state.params, multipliers, list(config.optimizer.freeze))))
    for pattern, _ in multipliers:  # first match wins and freezing comes first: a pattern can be shadowed
      assert pattern in labels, f"{where}: lr multiplier {pattern!r} applies to no (unfrozen) parameter"
    assert (FROZEN in labels) == bool(config.optimizer.freeze), where
