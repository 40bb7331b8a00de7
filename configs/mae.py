"""MAE (He et al. 2021, "Masked Autoencoders Are Scalable Vision Learners"): pre-training, then fine-tuning.

Presets:
  default           fine-tunes configs/vit.py's default ViT (8x8 patches of 4x4 pixels, width 64, 4 blocks; its
                    data, optimizer and schedule) from the encoder of the `pretrain` run, trained first in
                    <workdir>/pretrain; the position embeddings are MAE's fixed sin-cos table, as in MAE's
                    fine-tuning. Measured 2026-12-04 (`python launch.py --config=configs/mae.py`, data
                    already generated, other jobs sharing the 2 cores for part of it): pretraining 8.8 min,
                    then fine-tuning validation top-1 0.340 / 0.390 / 0.411 / 0.438 / 0.445 at steps 1k..5k
                    (6.7 min), where the same ViT from scratch (configs/vit.py, 5.4 min) gives 0.252 / 0.290 /
                    0.318 / 0.281 / 0.288: MAE's encoder starts it far higher at equal fine-tuning steps. Still
                    far from the 90% a ResNet reaches.
  pretrain          MAE pre-training of that encoder on the generated `shapes` classification images (labels
                    unused) at 32x32: mask ratio 0.75, normalised-pixel targets, a 2-block width-64 decoder,
                    random resized crops of area 0.2..1 as the paper, AdamW (0.9, 0.95), weight decay 0.05,
                    lr 1e-3 (the paper's 1.5e-4 x batch / 256 is for 800 ImageNet epochs), 50 warm-up steps,
                    cosine, batch 128, 2,000 steps. Evaluations write the masked-patch loss of the validation
                    split (the same patches at every evaluation) and reconstruction PNGs
                    (<workdir>/eval/reconstruction_step_N.png). Measured: 5 steps/s alone on 2 cores; train
                    loss 0.24 at step 500, 0.17 at 2,000; validation masked-patch loss 0.246 (step 1,000),
                    0.232 (2,000); the reconstructions recover each shape and its colour.
  imagenet_vit_b16  the paper's ViT-B/16 pre-training recipe (Sec. 4, Appendix A.1, Table 8): ImageNet-1k train
                    at 224, random resized crop (area 0.2..1) + flip, mask 0.75, normalised pixels, decoder 512
                    wide / 8 blocks, AdamW (0.9, 0.95), weight decay 0.05, base lr 1.5e-4 x batch / 256 at batch
                    4096, 40 warm-up epochs, cosine, 800 epochs. Deviation: MAE exempts biases and norm
                    parameters from weight decay; cvjax decays every parameter.
  finetune_vit_b16  the paper's end-to-end fine-tuning (Appendix A.1, Table 9) of that encoder in a ViT-B/16:
                    AdamW (0.9, 0.999), weight decay 0.05, base lr 5e-4 x batch / 256 at batch 1024, layer-wise
                    lr decay 0.65 (through `optimizer.lr_multipliers`: block i of 12 at 0.65^(12 - i), the patch
                    embedding and class token at 0.65^13, the head at 1), 5 warm-up epochs, cosine, 100
                    epochs, drop path 0.1, label smoothing 0.1. Deviations: RandAugment (9, 0.5), mixup 0.8,
                    cutmix 1.0 and random erasing 0.25 are not in cvjax's pipeline; weight decay as above; the
                    paper averages the class-token-free patch features (global pool) where this preset keeps
                    the class token.
  tiny              2 pre-training steps of a very small MAE and 2 fine-tuning steps, for tests.
"""

import ml_collections

from cvjax.train.config import config_module, select_preset, tiny_run

IMAGENET_TRAIN_IMAGES = 1_281_167


def _vit_config():
  """configs/vit.py's default (data, ViT, optimizer, schedule), unlocked."""
  c = config_module("configs/vit.py").get_config("default")
  c.unlock()
  c.name = "mae"
  c.model.position_embedding = "sincos"
  return c


def _mae_model(c, **sizes):
  c.model = ml_collections.ConfigDict(dict(name="mae_vit_tiny", dtype="float32", mask_ratio=0.75, **sizes))
  c.task.name = "masked_image_modeling"
  c.task.norm_pix_loss = True
  c.task.num_visualizations = 8


def _encoder_mapping(depth: int):
  """Graft the MAE encoder into the ViT: every ViT parameter but the head (and no position parameter)."""
  names = ("patch_embedding", "cls_token", "layernorm") + tuple(f"layers_{i}" for i in range(depth))
  return tuple((name, name) for name in names)


def pretrain(c):
  _mae_model(c, image_size=32, patch_size=4, hidden_size=64, depth=4, num_heads=4, mlp_dim=128,
             decoder_hidden_size=64, decoder_depth=2, decoder_num_heads=4, decoder_mlp_dim=128)
  c.dataset.crop_scale = (0.2, 1.0)
  c.batch_size = 128
  c.total_steps = 2000
  c.optimizer.update(name="adamw", learning_rate=1e-3, beta2=0.95, weight_decay=0.05, warmup_steps=50,
                     schedule="cosine", grad_clip_norm=0.0)
  c.log_every = 100
  c.eval_every = 1000
  c.checkpoint_every = 1000


def default(c):
  c.init.pretrain_config = "configs/mae.py:pretrain"
  c.init.mapping = _encoder_mapping(c.model.depth)


def tiny(c):
  # configs/vit.py:tiny's ViT (patch 8, width 16, 1 block), from a 2-step MAE of the same encoder.
  tiny_run(c)
  c.total_steps = 2
  c.model.update(patch_size=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32)
  c.init.pretrain_config = "configs/mae.py:tiny_pretrain"
  c.init.mapping = _encoder_mapping(1)


def tiny_pretrain(c):
  tiny_run(c)
  c.total_steps = 2
  _mae_model(c, image_size=32, patch_size=8, hidden_size=16, depth=1, num_heads=2, mlp_dim=32,
             decoder_hidden_size=16, decoder_depth=1, decoder_num_heads=2, decoder_mlp_dim=32)
  c.task.num_visualizations = 2


def imagenet_vit_b16(c):
  _mae_model(c)
  c.model.name = "mae_vit_base_patch16"
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.crop_scale = (0.2, 1.0)
  c.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.batch_size = 4096
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
  c.total_steps = 800 * steps_per_epoch
  c.optimizer.update(name="adamw", learning_rate=1.5e-4 * c.batch_size / 256, beta2=0.95, weight_decay=0.05,
                     warmup_steps=40 * steps_per_epoch, schedule="cosine", grad_clip_norm=0.0)
  c.log_every = 100
  c.eval_every = 20 * steps_per_epoch
  c.checkpoint_every = steps_per_epoch


def finetune_vit_b16(c):
  c.init.pretrain_config = "configs/mae.py:imagenet_vit_b16"
  c.init.mapping = _encoder_mapping(12)
  c.dataset.name = "imagenet2012"
  c.dataset.image_size = 224
  c.dataset.crop_scale = (0.08, 1.0)
  c.dataset.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)
  c.dataset.eval_crop_fraction = 0.875
  c.model.update(name="vit_b16", image_size=224, patch_size=16, hidden_size=768, depth=12, num_heads=12,
                 mlp_dim=3072, num_classes=1000, drop_path_rate=0.1)
  c.task.label_smoothing = 0.1
  c.batch_size = 1024
  steps_per_epoch = IMAGENET_TRAIN_IMAGES // c.batch_size
  c.total_steps = 100 * steps_per_epoch
  decay = 0.65
  c.optimizer.update(name="adamw", learning_rate=5e-4 * c.batch_size / 256, beta2=0.999, weight_decay=0.05,
                     warmup_steps=5 * steps_per_epoch, schedule="cosine", grad_clip_norm=0.0)
  c.optimizer.lr_multipliers = (tuple((f"layers_{i}/.*", decay ** (12 - i)) for i in range(12))
                                + (("patch_embedding/.*", decay ** 13), ("cls_token", decay ** 13)))
  c.log_every = 100
  c.eval_every = steps_per_epoch
  c.checkpoint_every = steps_per_epoch


PRESETS = dict(default=default, pretrain=pretrain, imagenet_vit_b16=imagenet_vit_b16,
               finetune_vit_b16=finetune_vit_b16, tiny=tiny, tiny_pretrain=tiny_pretrain)


def get_config(arg=None):
  return select_preset(PRESETS, arg, _vit_config())
