"""Vision Transformer (Dosovitskiy et al. 2021) image classification; explain with --mode=explain.

Presets:
  default           a 4-block, width-64 ViT with 4x4 patches on the generated `shapes` classification set at
                    32x32 (8x8 patches + a class token), 5,000 steps of 32; CPU scale. It learns slowly: 28.8%
                    validation top-1 (chance 16.7%; 31.8% at step 3,000) in 10 min on a shared 2-core CPU, where
                    ResNet-18 reaches 94.6%. Without a locality prior this ViT needs far more than these ~16
                    epochs (it fits one batch perfectly, so the gap is sample efficiency, not a bug).
  tiny              a few steps of a 1-block width-16 ViT, for tests.
  imagenet_vit_b16  ViT-B/16 (= DeiT-B without distillation) at 224x224 on ImageNet, DeiT recipe: Touvron et
                    al. 2021 ("Training data-efficient image transformers & distillation through attention",
                    ICML), Table 9 (DeiT-B reaches 81.8% top-1):
                    - AdamW (0.9, 0.999, eps 1e-8), lr 5e-4 x batch/512, batch 1024, weight decay 0.05, 300
                      epochs, cosine decay to 1e-5 (DeiT's code's min_lr), 5 linear warm-up epochs, label
                      smoothing 0.1, stochastic depth 0.1, dropout 0, no gradient clipping;
                    - random resized crop (area 0.08-1, aspect 3/4-4/3) + horizontal flip; evaluation on the
                      central 224/256 of the shorter side resized to 224 (DeiT: resize to 256, centre crop 224),
                      ImageNet mean/std normalisation as DeiT.
                    Not reproduced yet, so expect less than 81.8%. Missing from cvjax (deviations):
                    - RandAugment (timm's rand-m9-mstd0.5-inc1), mixup (alpha 0.8) and CutMix (alpha 1.0) (one
                      of the two per batch), random erasing (probability 0.25), and repeated augmentation (DeiT's
                      RASampler: 3 differently augmented copies of each sampled image per batch, on different
                      processes): none is in cvjax's pipeline;
                    - weight decay: DeiT exempts biases, norm parameters, the position embedding and the class
                      token; cvjax decays every parameter;
                    - EMA of the weights: DeiT's code keeps one (--model-ema; the paper ablates it, Table 8);
                      cvjax's train state has none;
                    - initialisation: DeiT (timm) draws Linear weights, the position embedding and the class
                      token from a truncated normal of std 0.02; cvjax's ViT keeps the original ViT init
                      (Xavier-uniform Linear layers, LeCun-normal patch embedding, N(0, 0.02^2) position
                      embedding, zero class token and head);
                    - bilinear resampling where DeiT's crops and resizes are bicubic; cvjax's lr schedule is per
                      step and warms up from 0 (DeiT's timm scheduler updates per epoch, from 1e-6).

`python launch.py --config=configs/vit.py --workdir=W --mode=explain` draws the last layer's per-head class-token
attention and the attention rollout of the first `explain.num_images` validation images into W/explain/step_N/.
"""

from cvjax.train.config import base_config, select_preset, shapes_classification, tiny_run


def _shapes(c, steps: int):
  shapes_classification(c, image_size=32)
  # Milder crops than the ResNet presets, and square ones: a stretched circle is an ellipse, a cut-off star
  # a polygon, and a ViT (no locality prior) learns shapes slowly enough without label noise.
  c.dataset.crop_scale = (0.7, 1.0)
  c.dataset.crop_ratio = (1.0, 1.0)
  # vit_ti16's constructor with every size overridden: 8x8 patches of 4x4 pixels.
  c.model.name = "vit_ti16"
  c.model.image_size = 32
  c.model.patch_size = 4
  c.model.hidden_size = 64
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.mlp_dim = 128
  # Small batches: on CPU a step of 32 costs about a quarter of a step of 128, and the ViT learned as much
  # per example at lr 3e-4 / batch 32 as at 1e-3 / 128 (1e-3 and 3e-3 at batch 32 stayed at chance longer).
  c.batch_size = 32
  c.total_steps = steps
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.05
  c.optimizer.warmup_steps = 200
  c.optimizer.schedule = "cosine"
  c.optimizer.grad_clip_norm = 1.0
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000


def default(c):
  _shapes(c, steps=5000)


def tiny(c):
  _shapes(c, steps=2)
  tiny_run(c)
  c.model.patch_size = 8
  c.model.hidden_size = 16
  c.model.depth = 1
  c.model.num_heads = 2
  c.model.mlp_dim = 32
  c.explain.num_images = 2


def imagenet_vit_b16(c):
  c.batch_size = 1024
  steps_per_epoch = 1281167 // c.batch_size
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.crop_scale = (0.08, 1.0)
  c.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.model.name = "vit_b16"
  c.model.image_size = 224
  c.model.patch_size = 16
  c.model.hidden_size = 768
  c.model.depth = 12
  c.model.num_heads = 12
  c.model.mlp_dim = 3072
  c.model.num_classes = 1000
  c.model.drop_path_rate = 0.1
  c.task.label_smoothing = 0.1
  c.total_steps = 300 * steps_per_epoch
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 5e-4 * c.batch_size / 512
  c.optimizer.weight_decay = 0.05
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 5 * steps_per_epoch
  c.optimizer.end_lr_fraction = 1e-5 / c.optimizer.learning_rate  # DeiT's min_lr 1e-5
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.checkpoint_every = steps_per_epoch


PRESETS = dict(default=default, tiny=tiny, imagenet_vit_b16=imagenet_vit_b16)


def get_config(arg=None):
  c = base_config()
  c.name = "vit"
  c.task.label_smoothing = 0.0
  c.dataset.config_name = ""
  c.dataset.image_size = 32
  c.dataset.crop_scale = (0.08, 1.0)
  c.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  # Every key is a ViT attribute (the trainer calls create_model(name, **config.model)).
  c.model.image_size = 224
  c.model.patch_size = 16
  c.model.hidden_size = 192
  c.model.depth = 12
  c.model.num_heads = 3
  c.model.mlp_dim = 768
  c.model.num_classes = 0           # 0: taken from the dataset
  c.model.dropout_rate = 0.0
  c.model.attention_dropout_rate = 0.0
  c.model.drop_path_rate = 0.0
  c.model.pool = "cls"
  return select_preset(PRESETS, arg, c)
