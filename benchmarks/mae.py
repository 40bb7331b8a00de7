"""Times one MAE ViT-B/16 pre-training step: the launcher's (jitted, state donated) against HF
``ViTMAEForPreTraining`` (PyTorch eager).

A step is forward with random masking (mask ratio 0.75: 49 of 196 patches through the encoder, all 196 plus the
class token through the 512-wide, 8-block decoder) + the normalised-pixel loss on the removed patches + backward
+ AdamW (lr 1.5e-4 x batch / 256, betas (0.9, 0.95), weight decay 0.05 on every parameter, no clipping), on one
batch of 224x224 images. cvjax runs the launcher's own train step, ``cvjax.train.trainer.Experiment.train_step``
built from ``configs/mae.py:imagenet_vit_b16`` (its ``masked_image_modeling`` task, masking noise from the
step's ``'mask'`` rng stream, its optimizer; metrics on device), fed through ``Experiment.global_batch``; HF
runs an eager step that computes its loss itself (``norm_pix_loss=True``, its own ``torch.rand`` noise). Both
models are HF's ``ViTMAEConfig()`` defaults (ViT-B/16, decoder 512 / 8 blocks / 16 heads, LayerNorm epsilon
1e-12, exact GELU) with the same random weights (nothing downloaded; cvjax's copy through
``cvjax.convert.from_transformers``, after HF's frozen position tables are set to its own sin-cos tables, which
transformers' random init leaves at zero); parameters and optimizer state carry over from step to step on both
sides. The learning rate is held constant (the preset's 40-epoch warm-up would make it 0 at these steps; the
work per step is the same). After warm-up the two take turns, one step each, ``--steps`` rounds, so that they
share whatever load the machine has; each one's median is printed.

  cd benchmarks && python mae.py --steps=3

The two losses of the sanity line are of the same magnitude, not equal: each side draws its own masks.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Callable, Dict

import jax
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable before transformers; benchmarks/ is on sys.path)
from transformers import ViTMAEConfig, ViTMAEForPreTraining  # noqa: E402
from transformers.models.vit_mae import modeling_vit_mae  # noqa: E402

from cvjax.convert import from_transformers  # noqa: E402
from cvjax.train.config import load_config_file  # noqa: E402
from cvjax.train.trainer import build_model  # noqa: E402
from train_step import launcher_step, print_side_by_side  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

BASE_LEARNING_RATE, BETAS, WEIGHT_DECAY = 1.5e-4, (0.9, 0.95), 0.05
# The MAE fields that fix the network; the launcher's model gets the converted HF model's values of them.
MODEL_FIELDS = ("image_size", "patch_size", "hidden_size", "depth", "num_heads", "mlp_dim", "decoder_hidden_size",
                "decoder_depth", "decoder_num_heads", "decoder_mlp_dim", "mask_ratio", "norm_pix_loss",
                "num_channels", "dropout_rate", "attention_dropout_rate", "layer_norm_eps", "qkv_bias")


def _hf_sincos(grid: int, dim: int) -> torch.Tensor:
  """HF's own sin-cos table (its builder, then its h/w half rotation to the released checkpoints' layout), as
  tests/convert/test_mae_parity.py."""
  table = modeling_vit_mae.build_2d_sinusoidal_position_embedding(grid, grid, dim, cls_token=True)
  return torch.cat([table[:, dim // 2:], table[:, :dim // 2]], dim=-1)[None]


def hf_mae(attn_implementation: str) -> ViTMAEForPreTraining:
  """HF's default ViT-B/16 MAE with normalised-pixel targets, random weights and the sin-cos position tables."""
  model = ViTMAEForPreTraining(ViTMAEConfig(norm_pix_loss=True, attn_implementation=attn_implementation))
  config = model.config
  grid = config.image_size // config.patch_size
  with torch.no_grad():
    model.vit.embeddings.position_embeddings.copy_(_hf_sincos(grid, config.hidden_size))
    model.decoder.decoder_pos_embed.copy_(_hf_sincos(grid, config.decoder_hidden_size))
  return model


def mae_config(module, batch_size: int):
  """``configs/mae.py:imagenet_vit_b16`` -- the paper's optimizer and model -- at the benchmark's batch, with
  the converted HF model's architecture and a constant learning rate."""
  config = load_config_file(os.path.join(REPO, "configs", "mae.py:imagenet_vit_b16"))
  opt = config.optimizer
  assert (opt.name, opt.beta1, opt.beta2, opt.weight_decay, opt.grad_clip_norm) == ("adamw", *BETAS, WEIGHT_DECAY,
                                                                                     0.0)
  with config.unlocked():
    config.batch_size = batch_size
    config.model.update({field: getattr(module, field) for field in MODEL_FIELDS})
    config.model.num_classes = 0  # launcher_step reads it; build_model drops it for a model without one
    config.optimizer.update(learning_rate=BASE_LEARNING_RATE * batch_size / 256, schedule="constant",
                            warmup_steps=0)
    config.init.pretrain_config = ""
    config.init.mapping = ()
    config.progress_bar = False
  built = build_model(config, 0)
  for field in MODEL_FIELDS:
    assert getattr(built, field) == getattr(module, field), field
  return config


def torch_step(model, images: np.ndarray, learning_rate: float) -> Callable[[], float]:
  """A closure running one eager HF pre-training step (HF masks and computes the loss); it returns the loss."""
  model.train()
  optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, betas=BETAS, weight_decay=WEIGHT_DECAY)
  x = torch.from_numpy(images)

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(pixel_values=x).loss
    loss.backward()
    optimizer.step()
    return loss.item()

  return step


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=5, help="timed rounds (median per implementation)")
  parser.add_argument("--attn", default=None, choices=["eager", "sdpa"],
                      help="HF attention implementation (default: transformers' own default)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  args = parser.parse_args()

  load_before = os.getloadavg()[0]
  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, 3, 224, 224), dtype=np.float32)
  hf_model = hf_mae(args.attn)
  module, variables = from_transformers(hf_model)
  config = mae_config(module, args.batch)

  del module  # the launcher builds its own from the config; the converted weights fit it leaf for leaf
  batch = {"image": images.transpose(0, 2, 3, 1), "label": np.zeros(args.batch, np.int32),
           "mask": np.ones(args.batch, bool)}
  start = time.perf_counter()
  steps: Dict[str, Callable[[], float]] = {"cvjax (jit)": launcher_step(config, variables, batch)}
  steps["cvjax (jit)"]()
  compile_seconds = time.perf_counter() - start
  steps["HF pytorch (eager)"] = torch_step(hf_model, images, config.optimizer.learning_rate)

  print(f"MAE ViT-B/16 pre-training step, batch {args.batch}, 224x224, mask {hf_model.config.mask_ratio}, "
        f"norm_pix_loss, decoder {hf_model.config.decoder_hidden_size}x{hf_model.config.decoder_num_hidden_layers}"
        f"; AdamW lr {config.optimizer.learning_rate:.3g}; {jax.default_backend()} "
        f"({jax.devices()[0].device_kind}, {os.cpu_count()} cores, torch {torch.__version__} threads "
        f"{args.threads}, HF attention {hf_model.config._attn_implementation!r}); median of {args.steps} "
        f"round-robin steps after warm-up (cvjax's first step, compilation included: {compile_seconds:.0f} s); "
        f"load average before: {load_before:.1f}")
  print_side_by_side(steps, args.steps, "HF pytorch (eager)", "each side draws its own masks")


if __name__ == "__main__":
  main()
