"""VGG (Simonyan & Zisserman 2015) image classification.

Presets:
  default        VGG-11 with BatchNorm (width 16, CIFAR-style global-pool + one Linear head) on `shapes`
                 classification at 32x32; CPU scale. Without shortcuts it sits at chance for ~700 steps
                 before it finds the shape features, hence 3,000 steps (about 5 minutes on 2 cores).
  tiny           a few steps of a very small net, for tests.
  imagenet_vgg16 VGG-16 on ImageNet with the paper's recipe (Sec. 3.1): SGD momentum 0.9, batch 256, lr 0.01,
                 weight decay 5e-4, dropout 0.5 in the first two FC layers, lr / 10 when validation accuracy
                 stopped improving (here: at epochs 30, 50 and 65 of 74, matching the paper's three decreases).
"""

from cvjax.train.config import base_config, select_preset, shapes_classification, tiny_run


def _shapes(c, steps: int):
  shapes_classification(c, image_size=32)
  c.model.name = "vgg11_bn"
  c.model.width = 16
  c.model.small_input = True
  c.batch_size = 128
  c.total_steps = steps
  c.optimizer.name = "nesterov"
  c.optimizer.learning_rate = 0.05
  c.optimizer.weight_decay = 5e-4
  c.optimizer.warmup_steps = 50
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500


def default(c):
  _shapes(c, steps=3000)


def tiny(c):
  _shapes(c, steps=2)
  tiny_run(c)
  c.model.width = 4


def imagenet_vgg16(c):
  steps_per_epoch = 1281167 // 256
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.model.name = "vgg16"
  c.model.width = 64
  c.model.small_input = False
  c.model.num_classes = 1000
  c.batch_size = 256
  c.total_steps = 74 * steps_per_epoch
  c.optimizer.name = "momentum"
  c.optimizer.learning_rate = 0.01
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = "step"
  c.optimizer.boundaries = tuple(e * steps_per_epoch for e in (30, 50, 65))
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.checkpoint_every = steps_per_epoch


PRESETS = dict(default=default, tiny=tiny, imagenet_vgg16=imagenet_vgg16)


def get_config(arg=None):
  c = base_config()
  c.name = "vgg"
  c.task.label_smoothing = 0.0
  c.dataset.config_name = ""
  c.dataset.image_size = 32
  c.model.width = 64
  c.model.small_input = False
  c.model.dropout_rate = 0.5
  c.model.num_classes = 0           # 0: taken from the dataset
  return select_preset(PRESETS, arg, c)
