"""VGG (Simonyan & Zisserman 2015) image classification.

Presets:
  default        VGG-11 with BatchNorm (width 16, CIFAR-style global-pool + one Linear head) on `shapes`
                 classification at 32x32; CPU scale. Without shortcuts it sits at chance for ~700 steps
                 before it finds the shape features, hence 3,000 steps (about 5 minutes on 2 cores).
  tiny           a few steps of a very small net, for tests.
  imagenet_vgg16 VGG-16 (configuration D, Table 1) on ImageNet, Simonyan & Zisserman 2015 ("Very Deep
                 Convolutional Networks for Large-Scale Image Recognition", ICLR), Sec. 3.1 "Training":
                 - data: multi-scale training, their best setting: the shorter side S of every image rescaled
                   to a uniform random integer in [256, 512], a random 224x224 crop, a random horizontal flip
                   and the random RGB colour shift of Krizhevsky et al. 2012 (PCA lighting noise, std 0.1,
                   with fb.resnet.torch's ImageNet eigenvalues/eigenvectors: the paper gives none); the
                   paper's fixed scales S = 256 or 384 are `--config.dataset.scale_range='(S, S)'`, with
                   `--config.dataset.eval_resize=S` to evaluate as Table 3 does (Q = S);
                 - SGD momentum 0.9, batch 256, lr 0.01, weight decay 5e-4 (the L2 multiplier), dropout 0.5 in
                   the first two FC layers, no batch norm, 370K iterations (74 epochs).
                 Deviations from the paper:
                 - schedule: the paper divides the lr by 10 "when the validation set accuracy stopped
                   improving", three times; here at fixed epochs 30, 50 and 65 of 74;
                 - initialisation: the paper trains the shallow net A (VGG-11) from N(0, 10^-2 variance)
                   weights and initialises the deeper nets' first four conv and last three FC layers from it
                   (noting that Glorot init also works without it); here VGG-16 starts from scratch with
                   torchvision's init (He-normal fan-out convs, N(0, 0.01^2) FC weights, zero biases);
                 - multi-scale training: the paper fine-tunes a model pre-trained at fixed S = 384; here the
                   scale is jittered from scratch for all 74 epochs;
                 - normalisation: the paper subtracts the training set's mean RGB value only; cvjax's pipeline
                   normalises with the ImageNet per-channel mean and std;
                 - evaluation: one central 224x224 crop of the image resized to shorter side Q = 384 (Table 3's
                   single test scale for S in [256, 512]). The paper evaluates densely (the FC layers applied
                   as convolutions over the whole rescaled image, class scores averaged spatially and over the
                   horizontal flip), at several scales Q in {256, 384, 512} (Table 4) and with multi-crop
                   evaluation (Table 5); none of these is implemented: expect a higher error than the paper's.
"""

from cvjax.train.config import base_config, scale_augmentation_keys, select_preset, shapes_classification, tiny_run


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
  c.dataset.scale_range = (256, 512)
  c.dataset.pca_lighting = 0.1
  c.dataset.eval_resize = 384
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
  scale_augmentation_keys(c)
  c.model.width = 64
  c.model.small_input = False
  c.model.dropout_rate = 0.5
  c.model.num_classes = 0           # 0: taken from the dataset
  return select_preset(PRESETS, arg, c)
