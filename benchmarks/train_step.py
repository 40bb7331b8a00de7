"""Times one ResNet train step on CPU: plain flax layers, cvjax's fast layers, and PyTorch, side by side.

A step is forward + backward + SGD-momentum update (lr 0.1, momentum 0.9, no weight decay) on one batch. The
cvjax rows run the launcher's own jitted train step -- ``cvjax.train.trainer.Experiment.train_step`` built
from ``configs/resnet.py`` (cross-entropy task, optimizer from the config, state donated, metrics on
device) -- fed the batch through ``Experiment.global_batch``; PyTorch runs an eager step. After warm-up the
implementations take turns, one step each, ``--steps`` rounds, so that they share whatever load the machine
has; each one's median is printed. The PyTorch model is HF's ``ResNetForImageClassification`` (torchvision's
ResNet, random weights, built from a config); cvjax gets the same weights through
``cvjax.convert.from_transformers``, so all three run the same network on the same batch.

  python benchmarks/train_step.py --model=resnet18 --batch=32 --size=64

The "plain flax" row is cvjax's ResNet with ``layer_impl='xla'``: every convolution and max-pool is the
``lax.conv_general_dilated`` / ``reduce_window`` that ``nn.Conv`` / ``nn.max_pool`` call. The "cvjax" row is
the default ``layer_impl='auto'`` (``cvjax.models.layers``: tiny-map and 1x1 convolutions as matmuls over
patches, max-pool over window views).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np
import torch

import _torch_imports  # noqa: F401  (torchvision importable before transformers; benchmarks/ is on sys.path)
from transformers import ResNetConfig, ResNetForImageClassification  # noqa: E402

from cvjax.convert import from_transformers
from cvjax.models.backbones import resnet
from cvjax.train.config import load_config_file
from cvjax.train.trainer import DataSpec, Experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LEARNING_RATE, MOMENTUM = 0.1, 0.9


def hf_config(model: str, num_classes: int) -> ResNetConfig:
  """The HF config of a registered cvjax ResNet (``resnet18`` ... ``resnet152``) at width 64."""
  block_type, stage_sizes, _ = resnet._ARCHITECTURES[model]  # pylint: disable=protected-access
  expansion = resnet.BLOCK_EXPANSION[block_type]
  return ResNetConfig(embedding_size=64, hidden_sizes=[64 * 2**i * expansion for i in range(4)],
                      depths=list(stage_sizes), layer_type=block_type, num_labels=num_classes)


def resnet_config(model: str, num_classes: int, layer_impl: str):
  """``configs/resnet.py`` turned into the benchmark's run: the HF model's architecture and PyTorch's SGD."""
  config = load_config_file(os.path.join(REPO, "configs", "resnet.py"))
  with config.unlocked():
    config.model.update(name=model, num_classes=num_classes, stem="imagenet", width=64, layer_impl=layer_impl)
    config.optimizer.update(name="momentum", learning_rate=LEARNING_RATE, momentum=MOMENTUM, weight_decay=0.0,
                            schedule="constant", warmup_steps=0)
    config.progress_bar = False
  return config


def launcher_step(config, variables, batch: Dict[str, np.ndarray]) -> Callable[[], float]:
  """A closure running the launcher's jitted train step (``Experiment.train_step``) to completion on ``batch``
  (this process's host batch, as the input pipeline would give it), starting from ``variables``; the state it
  donates is carried from step to step. The closure returns the step's loss."""
  num_classes = config.model.num_classes
  data = DataSpec(num_classes=num_classes, class_names=[str(i) for i in range(num_classes)],
                  example_batch=jax.tree.map(lambda x: x[:1], batch))
  exp = Experiment(config, tempfile.mkdtemp(prefix="cvjax_bench_"), data=data)
  state, _ = exp.initial_state()
  # Copies: the step donates its state, and each implementation starts from the same converted weights.
  weights = jax.tree.map(lambda x: jnp.array(x, copy=True),
                         {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})})
  state = state.replace(**jax.device_put(weights, {"params": exp.state_sharding.params,
                                                   "batch_stats": exp.state_sharding.batch_stats}))
  state = state.replace(opt_state=jax.device_put(exp.tx.init(state.params), exp.state_sharding.opt_state))
  global_batch = exp.global_batch(batch)
  holder = [state]

  def step() -> float:
    holder[0], metrics = exp.train_step(holder[0], global_batch)
    total, count = jax.device_get(metrics["loss"])
    return float(total) / max(float(count), 1e-12)

  return step


def torch_step(model, images: np.ndarray, labels: np.ndarray):
  """A closure running one eager PyTorch train step."""
  model.train()
  optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=MOMENTUM)
  x, y = torch.from_numpy(images), torch.from_numpy(labels).long()

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x).logits, y)
    loss.backward()
    optimizer.step()

  return step


def median_seconds(steps: Dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> Dict[str, float]:
  """Median wall time of each step function, measured round-robin so that all share the same CPU load."""
  for step in steps.values():
    for _ in range(warmup):
      step()
  times = {name: [] for name in steps}
  for _ in range(repeats):
    for name, step in steps.items():
      start = time.perf_counter()
      step()
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def print_side_by_side(steps: Dict[str, Callable[[], float]], repeats: int, reference: str,
                       why_losses_differ: str, ours: str = "cvjax (jit)") -> None:
  """Times ``steps`` round-robin (``median_seconds``) and prints each median, the reference time over ours
  (above 1: cvjax faster), one more step's loss of each side -- a sanity check of magnitude, not parity, for
  the reason ``why_losses_differ`` -- and the load average after."""
  times = median_seconds(steps, repeats)
  for name, seconds in times.items():
    print(f"  {name:20s} {seconds * 1e3:9.1f} ms/step")
  print(f"  {reference.split()[0]} time / cvjax time: {times[reference] / times[ours]:.2f} (above 1: cvjax is faster)")
  print(f"  loss of one more step ({why_losses_differ}): "
        + ", ".join(f"{name} {step():.3f}" for name, step in steps.items()))
  print(f"  load average after: {os.getloadavg()[0]:.1f}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default="resnet18", choices=["resnet18", "resnet34", "resnet50", "resnet101",
                                                              "resnet152"])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--size", type=int, default=64, help="square input side in pixels")
  parser.add_argument("--num_classes", type=int, default=10)
  parser.add_argument("--steps", type=int, default=5, help="timed rounds (median per implementation)")
  parser.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch intra-op threads")
  parser.add_argument("--skip_plain", action="store_true", help="skip the slow plain-convolution flax run")
  args = parser.parse_args()

  torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  rng = np.random.default_rng(0)
  images = rng.standard_normal((args.batch, 3, args.size, args.size), dtype=np.float32)
  labels = rng.integers(0, args.num_classes, args.batch).astype(np.int64)
  torch_model = ResNetForImageClassification(hf_config(args.model, args.num_classes))
  module, variables = from_transformers(torch_model)

  del module  # the launcher builds its own from the config; the converted weights fit it leaf for leaf
  batch = {"image": images.transpose(0, 2, 3, 1), "label": labels.astype(np.int32),
           "mask": np.ones(len(labels), bool)}
  steps = {}
  if not args.skip_plain:
    steps["flax, plain layers"] = launcher_step(resnet_config(args.model, args.num_classes, "xla"), variables,
                                                batch)
  steps["cvjax, fast layers"] = launcher_step(resnet_config(args.model, args.num_classes, "auto"), variables,
                                              batch)
  steps["pytorch (eager)"] = torch_step(torch_model, images, labels)

  print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {jax.default_backend()} "
        f"({os.cpu_count()} cores, torch threads {args.threads}); median of {args.steps} round-robin steps "
        f"after warm-up; load average before: {os.getloadavg()[0]:.1f}")
  times = median_seconds(steps, args.steps)
  reference = times["pytorch (eager)"]
  for name, seconds in times.items():
    print(f"  {name:24s} {seconds * 1e3:9.1f} ms/step   {seconds / reference:6.2f}x pytorch")
  if "flax, plain layers" in times:
    print(f"  speed-up of the fast layers over plain ones: "
          f"{times['flax, plain layers'] / times['cvjax, fast layers']:.1f}x")
  print(f"  load average after: {os.getloadavg()[0]:.1f} (other processes on these cores slow PyTorch's "
        f"OpenMP threads far more than XLA's: compare quiet runs)")


if __name__ == "__main__":
  main()
