"""The package's shape: layers import only downward, old import paths still work, ops need no scipy."""

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Each layer may import itself and the layers listed (DESIGN: ops <- models <- tasks <- train <- launch.py;
# data, evaluation, viz and convert sit beside them). cvjax.registry is shared by every registry.
ALLOWED = {
    "ops": {"ops"},
    "models": {"ops", "models", "registry"},
    "viz": {"viz", "data"},
    "evaluation": {"evaluation", "viz", "ops"},   # ops is the bottom layer (the segm evaluator pastes masks)
    "data": {"data", "registry"},
    "convert": {"convert", "models", "ops"},
    # tasks sit above models (MaskFormer's evaluation runs the model family's semantic / panoptic inference)
    "tasks": {"tasks", "ops", "models", "evaluation", "registry"},
    "train": {"train", "data", "models", "tasks", "convert", "evaluation", "viz", "ops"},
}


def _cvjax_imports(path: Path):
  """Every ``cvjax.<layer>`` that ``path`` imports, at module level or deferred inside functions."""
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    for name in names:
      parts = name.split(".")
      if parts[0] == "cvjax" and len(parts) > 1:
        yield parts[1], name


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_downward(layer):
  offending = [f"{path.relative_to(REPO)} imports {name}" for path in (REPO / "cvjax" / layer).rglob("*.py")
               for target, name in _cvjax_imports(path) if target not in ALLOWED[layer] and target != "__init__"]
  assert not offending, offending


def test_initialization_sits_below_the_train_loop():
  imported = {name for _, name in _cvjax_imports(REPO / "cvjax" / "train" / "initialization.py")}
  assert not any(name.startswith("cvjax.train.trainer") for name in imported), imported


def test_importing_ops_and_viz_pulls_in_neither_scipy_nor_the_train_loop():
  code = ("import sys, cvjax.ops, cvjax.viz, cvjax.evaluation.detection; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'scipy'}), "
          "sorted(m for m in sys.modules if m.startswith('cvjax.train')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
  assert out.stdout.strip() == "[] []"


@pytest.mark.parametrize("old, new", [
    ("cvjax.models.alexnet", "cvjax.models.backbones.alexnet"), ("cvjax.models.vgg", "cvjax.models.backbones.vgg"),
    ("cvjax.models.resnet", "cvjax.models.backbones.resnet"), ("cvjax.models.vit", "cvjax.models.backbones.vit"),
    ("cvjax.models.swin", "cvjax.models.backbones.swin"), ("cvjax.models.detr", "cvjax.models.detection.detr"),
    ("cvjax.models.transformer", "cvjax.models.detection.transformer"),
    ("cvjax.models.position_encoding", "cvjax.models.detection.position_encoding"),
])
def test_paths_from_before_the_family_layout_are_the_same_modules(old, new):
  assert importlib.import_module(old) is importlib.import_module(new)


def test_detr_criterion_keeps_its_old_import_path():
  from cvjax.tasks import detr
  from cvjax.tasks.detection import detr_loss, hungarian_match  # noqa: F401  (the path before the split)
  assert detr_loss is detr.detr_loss


def test_op_modules_are_modules_and_their_ops():
  import cvjax.ops
  import cvjax.ops.nms as nms_module
  from cvjax.ops import nms, roi_align, roi_pool
  for module, function in ((nms, "nms"), (roi_align, "roi_align"), (roi_pool, "roi_pool")):
    assert isinstance(module, types.ModuleType) and callable(module)
    assert module.__name__ == f"cvjax.ops.{function}" and callable(getattr(module, function))
  assert nms_module is cvjax.ops.nms and nms_module.batched_nms is cvjax.ops.batched_nms
  assert roi_align.multiscale_roi_align is cvjax.ops.multiscale_roi_align
