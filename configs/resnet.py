"""ResNet (He et al. 2016) image classification.

Presets:
  default       ResNet-18 (CIFAR stem, width 16) on the generated `shapes` classification set, 32x32;
                a 2-core CPU reaches >= 90% validation top-1 in a few minutes.
  plain         the same network without shortcuts (the degradation experiment, paper Fig. 4).
  tiny          a few steps of a very small net, for tests.
  imagenet_r50  ResNet-50 on ImageNet with the paper's recipe (Sec. 3.4): SGD momentum 0.9, lr 0.1 x batch/256,
                weight decay 1e-4, batch 256, 90 epochs, lr / 10 at epochs 30 and 60.
"""

from cvjax.train.config import base_config, select_preset, shapes_classification, tiny_run


def _shapes(c, steps: int):
  shapes_classification(c, image_size=32)
  c.model.name = "resnet18"
  c.model.stem = "cifar"
  c.model.width = 16
  c.batch_size = 128
  c.total_steps = steps
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.1
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 50
  c.optimizer.schedule = "cosine"
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500


def default(c):
  _shapes(c, steps=1000)


def plain(c):
  _shapes(c, steps=1000)
  c.model.name = "plain18"


def tiny(c):
  _shapes(c, steps=2)
  tiny_run(c)
  c.model.width = 4


def imagenet_r50(c):
  steps_per_epoch = 1281167 // 256
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.model.name = "resnet50"
  c.model.num_classes = 1000
  c.batch_size = 256
  c.total_steps = 90 * steps_per_epoch
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.1 * c.batch_size / 256
  c.optimizer.weight_decay = 1e-4
  c.optimizer.schedule = "step"
  c.optimizer.boundaries = (30 * steps_per_epoch, 60 * steps_per_epoch)
  c.optimizer.decay_factor = 0.1
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.checkpoint_every = steps_per_epoch


PRESETS = dict(default=default, plain=plain, tiny=tiny, imagenet_r50=imagenet_r50)


def get_config(arg=None):
  c = base_config()
  c.name = "resnet"
  c.task.label_smoothing = 0.0
  c.dataset.config_name = ""
  c.dataset.image_size = 32
  c.model.stem = "imagenet"
  c.model.width = 64
  c.model.num_classes = 0           # 0: taken from the dataset
  return select_preset(PRESETS, arg, c)
