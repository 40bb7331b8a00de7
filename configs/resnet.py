"""ResNet (He et al. 2016) image classification.

Presets:
  default       ResNet-18 (CIFAR stem, width 16) on the generated `shapes` classification set, 32x32;
                a 2-core CPU reaches >= 90% validation top-1 in a few minutes.
  plain         the same network without shortcuts (the degradation experiment, paper Fig. 4).
  tiny          a few steps of a very small net, for tests.
  imagenet_r50  ResNet-50 on ImageNet, He et al. 2016 ("Deep Residual Learning for Image Recognition", CVPR),
                Sec. 3.4 "Implementation" (ResNet-50: Table 1, option B projection shortcuts, Sec. 4.1):
                - data: shorter side resized to a uniform random integer in [256, 480] ("scale augmentation"),
                  a random 224x224 crop, a random horizontal flip, and the "standard color augmentation" of
                  Krizhevsky et al. 2012 (PCA lighting noise, std 0.1, with fb.resnet.torch's ImageNet RGB
                  eigenvalues/eigenvectors: the paper gives none);
                - SGD momentum 0.9, batch 256, lr 0.1, weight decay 1e-4 (as an L2 term of the gradient), no
                  dropout, BN after every convolution, He initialisation, trained from scratch.
                Deviations from the paper:
                - schedule: the paper divides the lr by 10 "when the error plateaus" and trains "up to 60 x
                  10^4 iterations" (~120 epochs at batch 256); here a fixed 90 epochs with lr / 10 at epochs
                  30 and 60 (fb.resnet.torch's / torchvision's schedule);
                - architecture: cvjax's resnet50 is v1.5 (torchvision's: a downsampling bottleneck strides its
                  3x3); the Caffe ResNet-50 released with the paper strides the first 1x1 instead, which
                  `--config.model.stride_in_1x1=True` gives;
                - normalisation: the paper subtracts the per-pixel mean (of the training set); cvjax's pipeline
                  normalises with the ImageNet per-channel mean and std;
                - evaluation: one central 224x224 crop of the image resized to shorter side 256; the paper's
                  numbers are 10-crop testing (ResNet-50: 22.85% top-1 / 6.71% top-5 error, Table 3) and
                  fully-convolutional multi-scale testing ({224, 256, 384, 480, 640}, Table 4), neither of which
                  is implemented: expect a higher single-crop error.
"""

from cvjax.train.config import base_config, scale_augmentation_keys, select_preset, shapes_classification, tiny_run


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
  c.dataset.scale_range = (256, 480)
  c.dataset.pca_lighting = 0.1
  c.dataset.eval_resize = 256
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
  scale_augmentation_keys(c)
  c.model.stem = "imagenet"
  c.model.stride_in_1x1 = False     # True: the paper's original (v1) bottleneck
  c.model.width = 64
  c.model.num_classes = 0           # 0: taken from the dataset
  return select_preset(PRESETS, arg, c)
