"""The config keys every experiment has, and the preset selection used by every file in configs/.

A config file is ``get_config(arg) -> ml_collections.ConfigDict``: it starts from ``base_config()``, fills the
dataset/model/optimizer keys for its family, and applies a named preset (``configs/resnet.py:tiny``).
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, Dict, Optional

import ml_collections
from ml_collections.config_dict import placeholder

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def base_config() -> ml_collections.ConfigDict:
  """Keys shared by every preset. Families override values; they add keys only inside the sub-dicts."""
  c = ml_collections.ConfigDict()
  c.name = ""            # family, e.g. 'resnet' (used for the default workdir name)
  c.preset = ""          # preset name, e.g. 'default'
  c.seed = 0
  c.batch_size = 128     # global, over all processes and devices
  c.total_steps = 1000
  c.log_every = 50
  c.eval_every = 500     # 0 disables periodic eval (a final eval still runs)
  c.eval_steps = -1      # -1 = the whole eval split
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.data_dir = os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))
  c.progress_bar = True
  # Ablation variants ((name, {'dotted.key': value, ...}), ...): when non-empty, launch.py trains every variant
  # in workdir/<name>/ and writes a comparison table and plot (cvjax/train/ablation.py).
  c.ablation = ()
  c.ablation_metrics = ()                # eval scalars the ablation's table and plot compare (default: all)

  c.dataset = ml_collections.ConfigDict()
  c.dataset.name = "shapes"
  c.dataset.task = "classification"
  c.dataset.train_split = "train"
  c.dataset.eval_split = "validation"

  c.model = ml_collections.ConfigDict()
  c.model.name = ""
  c.model.dtype = "float32"   # compute dtype; 'bfloat16' keeps float32 params

  c.task = ml_collections.ConfigDict()
  c.task.name = "classification"

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "momentum"          # sgd | momentum | nesterov | adamw
  c.optimizer.learning_rate = 0.1        # peak learning rate
  c.optimizer.momentum = 0.9
  c.optimizer.beta1 = 0.9
  c.optimizer.beta2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.schedule = "cosine"        # cosine | step | constant | poly
  c.optimizer.warmup_steps = 0
  c.optimizer.boundaries = ()            # step schedule: steps at which lr *= decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.end_lr_fraction = 0.0      # cosine / poly floor, as a fraction of the peak
  c.optimizer.poly_power = 0.9           # poly schedule: peak * (1 - t / T) ** power
  c.optimizer.grad_clip_norm = 0.0       # 0 disables global-norm clipping
  # Per-parameter-group learning-rate multipliers: ((regex, multiplier), ...) matched against the
  # '/'-joined parameter path (first match wins), e.g. (('backbone/.*', 0.1),).
  c.optimizer.lr_multipliers = ()
  c.optimizer.freeze = ()                # regexes of parameter paths that are not updated at all

  # An exponential moving average of the weights in the train state (cvjax/train/ema.py).
  c.ema = ml_collections.ConfigDict()
  c.ema.momentum = 0.0                   # 0: no EMA; per-step m of ema <- m * ema + (1 - m) * weights
  c.ema.schedule = "constant"            # constant | cosine (m rises to end_momentum over the run, as DINO's)
  c.ema.end_momentum = 1.0               # cosine: the momentum at the last step
  c.ema.evaluate = False                 # evaluate and explain the EMA weights instead of the trained ones

  # --mode=explain (models that can return attention weights, e.g. ViT): attention maps of validation images.
  c.explain = ml_collections.ConfigDict()
  c.explain.num_images = 4               # the first N images of dataset.eval_split
  c.explain.head_fusion = "mean"         # attention rollout: heads fused per layer by mean | max | min
  c.explain.discard_ratio = 0.0          # attention rollout: fraction of each layer's weakest weights zeroed

  # Start a fresh run from pretrained weights (see cvjax/train/initialization.py): a config trained first in
  # <workdir>/pretrain, an existing workdir, or a PyTorch checkpoint file converted by
  # cvjax.convert.from_torch_state_dict(torch_model, ...); `mapping` = ((destination, source) prefixes, ...).
  c.init = ml_collections.ConfigDict()
  c.init.pretrain_config = ""
  c.init.checkpoint_dir = ""
  c.init.torch_checkpoint = ""           # e.g. torchvision's resnet50-0676ba61.pth, read locally
  c.init.torch_model = ""                # its cvjax model name, e.g. 'resnet50' ('detr_resnet50': official DETR)
  c.init.torch_model_kwargs = ()         # ((keyword, value), ...) for the converter, e.g. (('frozen_bn', True),)
  c.init.mapping = ()

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                       # -1: all devices not used by the other axes
  c.mesh.model = 1                       # > 1 shards large kernels' output dim over a 'model' axis
  return c


def shapes_classification(c: ml_collections.ConfigDict, image_size: int = 32) -> None:
  """The generated single-object `shapes` classification set at ``image_size`` (CPU presets)."""
  c.dataset.name = "shapes"
  c.dataset.task = "classification"
  c.dataset.config_name = f"classification_{image_size}"
  c.dataset.image_size = image_size
  c.dataset.augment = True
  c.dataset.crop_scale = (0.35, 1.0)   # random-resized-crop area range
  # Square crops: a stretched circle is an ellipse, another class (the crops' default ratio is 3/4..4/3).
  c.dataset.crop_ratio = (1.0, 1.0)


def scale_augmentation_keys(c: ml_collections.ConfigDict) -> None:
  """Declares the ResNet / VGG papers' ImageNet augmentation keys (``cvjax.data.preprocessing``), unset = off.

  Typed placeholders rather than None, so that the command line can set them (ml_collections cannot override
  a None field).
  """
  c.dataset.scale_range = placeholder(tuple)   # (low, high): shorter side jittered, then a random crop
  c.dataset.eval_resize = placeholder(int)     # shorter side before the central crop at evaluation
  c.dataset.pca_lighting = placeholder(float)  # AlexNet PCA lighting noise std


def tiny_run(c: ml_collections.ConfigDict) -> None:
  """The run shape of every family's `tiny` preset: 2 steps, batch 8, a 1-batch eval, a checkpoint at the end.

  Families shrink their model themselves; this only fixes the schedule so tests exercise the whole loop. The
  generated `shapes` data is a small variant of the family's dataset (256 training and 64 evaluation images,
  prepared under its own name), since a 2-step run reads a few batches: generating the full splits would
  dominate a tiny run.
  """
  c.dataset.num_examples = {"train": 256, "validation": 64, "test": 64}
  c.total_steps = 2
  c.batch_size = 8
  c.optimizer.warmup_steps = 0
  c.log_every = 1
  c.eval_every = 0
  c.eval_steps = 1
  c.checkpoint_every = 2
  c.progress_bar = False


def detection_dataset(c: ml_collections.ConfigDict, masks: bool) -> None:
  """The dataset keys of the anchor detectors' configs (R-CNN, RetinaNet, YOLACT): detection with or without
  instance ``masks``, letterboxed to ``image_size`` 64 with up to 100 boxes. ``scales`` / ``max_size`` /
  ``eval_scale`` / ``crop_prob`` (COCO's shorter-side resizing) and ``path`` (a COCO folder) are unset: typed
  placeholders, since ml_collections cannot override a None field from the command line."""
  c.dataset.task = "detection"
  c.dataset.config_name = ""
  c.dataset.masks = masks
  c.dataset.image_size = 64
  c.dataset.max_boxes = 100
  c.dataset.scales = placeholder(tuple)
  c.dataset.max_size = placeholder(int)
  c.dataset.eval_scale = placeholder(int)
  c.dataset.crop_prob = placeholder(float)
  c.dataset.path = placeholder(str)


def detection_tiny_run(c: ml_collections.ConfigDict) -> None:
  """``tiny_run`` with the detectors' tiny data and backbone: generated `shapes` detection at 32x32 with up to
  4 boxes, backbone width 4. Families shrink the rest of their model themselves."""
  tiny_run(c)
  c.dataset.config_name = "detection_32"
  c.dataset.image_size = 32
  c.dataset.max_boxes = 4
  c.model.backbone_width = 4


def cpu_adamw_run(c: ml_collections.ConfigDict, steps: int, batch_size: int, grad_clip_norm: float = 0.0,
                  eval_every: int = 500, learning_rate: float = 1e-3) -> None:
  """The schedule of the dense-prediction CPU `default` presets: AdamW (``learning_rate``, weight decay 1e-4,
  100 warm-up steps, cosine) for ``steps`` of ``batch_size``, logged every 50 steps, checkpointed every 500."""
  c.batch_size = batch_size
  c.total_steps = steps
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = learning_rate
  c.optimizer.weight_decay = 1e-4
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip_norm = grad_clip_norm
  c.log_every = 50
  c.eval_every = eval_every
  c.checkpoint_every = 500


# DETR and MaskFormer keep the stem and first stage of their ImageNet backbone as they are.
FROZEN_STEM_AND_LAYER1 = ("backbone/conv1/.*", "backbone/bn1/.*", "backbone/layer1_.*")


def shapes_pretrained_backbone(c: ml_collections.ConfigDict) -> None:
  """A ResNet-18 backbone (width 16, CIFAR stem) that starts as the query-based detectors' ImageNet backbone
  would: trained first on shapes classification (configs/resnet.py's default run, in <workdir>/pretrain), its
  lr 0.1x, its stem and layer1 frozen -- parameters and batch-norm statistics -- while layer2..4's batch norm
  keeps training (the backbone saw only shapes)."""
  c.model.backbone_width = 16
  c.model.backbone_stem = "cifar"
  c.model.backbone_frozen_bn = False
  c.model.backbone_frozen_stages = 1
  c.init.pretrain_config = "configs/resnet.py"
  c.init.mapping = (("backbone", ""),)
  c.optimizer.lr_multipliers = (("backbone/.*", 0.1),)
  c.optimizer.freeze = FROZEN_STEM_AND_LAYER1


def shapes_detection_run(c: ml_collections.ConfigDict, steps: int, batch_size: int = 16) -> None:
  """The data and schedule of the detectors' CPU `default` presets: generated `shapes` detection at 64x64
  (up to 8 boxes), trained from scratch with `cpu_adamw_run` (gradients clipped at norm 10), evaluated every
  1,000 steps. Families set their model themselves."""
  c.dataset.name = "shapes"
  c.dataset.task = "detection"
  c.dataset.config_name = "detection_64"
  c.dataset.image_size = 64
  c.dataset.max_boxes = 8
  cpu_adamw_run(c, steps, batch_size, grad_clip_norm=10.0, eval_every=1000)


def shapes_segmentation(c: ml_collections.ConfigDict, image_size: int = 64) -> None:
  """The label maps of the generated `shapes` detection set as semantic segmentation (7 classes: background +
  the 6 shapes), at ``image_size`` with random square crops (area 0.5..1, resized to ``image_size``) and flips
  (CPU presets). The crops keep the aspect ratio: a stretched circle would be an ellipse, another class."""
  c.dataset.name = "shapes"
  c.dataset.task = "segmentation"
  c.dataset.config_name = f"detection_{image_size}"
  c.dataset.image_size = image_size
  c.dataset.augment = True
  c.dataset.crop_scale = (0.5, 1.0)
  c.dataset.crop_ratio = (1.0, 1.0)
  c.dataset.panoptic = False
  c.dataset.path = placeholder(str)      # segmentation_folder: the folder's root
  c.task.name = "semantic_segmentation"


def select_preset(presets: Dict[str, Callable[[ml_collections.ConfigDict], None]],
                  arg: Optional[str], config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Applies ``presets[arg or 'default']`` to ``config`` in place, names it and returns it locked."""
  name = arg or "default"
  if name not in presets:
    raise ValueError(f"unknown preset {name!r} for config {config.name!r}; valid presets: {sorted(presets)}")
  config.preset = name
  presets[name](config)
  config.lock()
  return config


def config_module(path: str):
  """The Python module of config file ``path`` (relative to the working directory, else to the repository
  root, so a pretrain config named in a preset resolves wherever the launcher runs)."""
  candidates = [path, os.path.join(REPO_ROOT, path)]
  found = next((p for p in candidates if os.path.isfile(p)), None)
  if found is None:
    raise FileNotFoundError(f"config file {path!r} not found; looked in {candidates}")
  module_spec = importlib.util.spec_from_file_location(f"_cvjax_config_{abs(hash(found))}", found)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """``'configs/resnet.py:preset'`` -> that file's ``get_config(preset)``, locked (no preset: 'default').

  Raises:
    FileNotFoundError: naming the places looked in.
  """
  path, _, preset = spec.partition(":")
  return config_module(path).get_config(preset or None)


def config_presets(path: str) -> list[str]:
  """The preset names of config file ``path`` (its ``PRESETS``), sorted."""
  return sorted(config_module(path).PRESETS)
