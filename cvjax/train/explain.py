"""``--mode=explain``: where the latest checkpoint's ViT looks, drawn for the first validation images.

For each of the first ``config.explain.num_images`` examples of ``config.dataset.eval_split`` this writes into
``workdir/explain/step_N/``:
  ``image_K_heads.png``    the image, then the last layer's class-token attention of every head;
  ``image_K_rollout.png``  the image, then the attention rollout over all layers (``config.explain.head_fusion``,
                           ``config.explain.discard_ratio``);
and ``index.json`` with each image's label, prediction and files. It needs a model whose ``__call__`` takes
``return_attention`` (``cvjax.models.backbones.vit.ViT``).

This is a mode of the train loop (it builds the trainer's ``Experiment``), so it lives in ``cvjax.train``; the
attention maps and drawings it uses come from ``cvjax.viz``, which imports nothing of the loop.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from cvjax.train import sharding as sharding_lib
from cvjax.train import trainer
from cvjax.viz.attention import attention_rollout, cls_attention_maps, save_attention_pngs
from cvjax.viz.image import unnormalize_image


def returns_attention(model) -> bool:
  """Whether ``model.__call__`` takes ``return_attention`` (and so can hand back its attention weights)."""
  return "return_attention" in inspect.signature(type(model).__call__).parameters


def _explain_step(model, task, use_ema: bool, state, batch: Dict[str, jax.Array]) -> Dict[str, jax.Array]:
  """The eval-mode forward pass of the train loop with ``return_attention=True`` (of the EMA weights with
  ``use_ema``); attentions stacked to ``[B, L, heads, N, N]``. The batch's image, label and mask come back with
  them, gathered over processes."""
  args, kwargs = task.model_inputs(batch)
  outputs, attentions = model.apply(state.eval_variables(use_ema), *args, train=False, return_attention=True,
                                    **kwargs)
  keep = {k: batch[k] for k in ("image", "label", "mask") if k in batch}
  return dict(keep, outputs=outputs, attentions=jnp.stack(attentions, axis=1))


def _collect(exp: trainer.Experiment, state, num_images: int) -> Dict[str, np.ndarray]:
  """Runs the explain step over the first batches of the eval split until ``num_images`` real examples (or
  the split) are covered; host arrays with the padding rows removed, cut to ``num_images``."""
  pipeline = exp.eval_pipeline
  devices = jax.local_device_count()
  # Only as many rows per step as needed (rounded up to shard over the local devices): a ViT-B/16's
  # attentions are 22 MB per image, so a whole eval batch of them would not fit in memory.
  rows = min(pipeline.per_process_batch_size, -(-num_images // devices) * devices)
  steps = min(pipeline.num_batches, -(-num_images // (rows * jax.process_count())))
  step_fn = jax.jit(functools.partial(_explain_step, exp.model, exp.task, exp.evaluate_ema),
                    out_shardings=NamedSharding(exp.mesh, P()))
  iterator = iter(pipeline.iterator())
  pieces = []
  for _ in range(steps):
    local = jax.tree.map(lambda x: x[:rows], next(iterator))
    # Replicated outputs: every process holds the whole global batch, so device_get needs no gather.
    pieces.append(jax.device_get(step_fn(state, sharding_lib.global_batch(exp.mesh, local))))
  merged = jax.tree.map(lambda *xs: np.concatenate(xs), *pieces)
  real = np.flatnonzero(merged["mask"])[:num_images]
  return jax.tree.map(lambda x: x[real], merged)


def _caption(index: int, outputs: np.ndarray, labels, class_names: List[str]) -> Dict[str, Any]:
  """Label and (for classifier logits ``[B, K]``) the prediction of example ``index``, with a one-line text."""
  name = lambda k: class_names[k] if 0 <= k < len(class_names) else str(k)
  info: Dict[str, Any] = {}
  parts = []
  if labels is not None:
    info["label"] = name(int(labels[index]))
    parts.append(f"label {info['label']}")
  if isinstance(outputs, np.ndarray) and outputs.ndim == 2:
    probs = np.exp(outputs[index] - outputs[index].max())
    probs /= probs.sum()
    info["prediction"], info["probability"] = name(int(probs.argmax())), float(probs.max())
    parts.append(f"predicted {info['prediction']} ({info['probability']:.2f})")
  info["caption"] = ", ".join(parts)
  return info


def explain_latest(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """``--mode=explain``: attention PNGs of the latest checkpoint of ``workdir`` (see the module docstring).

  Returns:
    ``{'step', 'directory', 'files'}``: the checkpoint step, ``workdir/explain/step_N`` and the written paths
    (PNGs then ``index.json``; written by process 0 only, listed on every process).

  Raises:
    ValueError: the model cannot return attention weights, or ``config.explain`` is out of range.
    FileNotFoundError: ``workdir`` has no checkpoint.
  """
  model = trainer.build_model(config, num_classes=1)  # the class decides; the head size does not matter
  if not returns_attention(model):
    raise ValueError(f"--mode=explain needs a model with `return_attention` (attention weights, e.g. a ViT "
                     f"from configs/vit.py); model {config.model.name!r} ({type(model).__name__}) has none")
  options = config.explain
  num_images = int(options.num_images)
  if num_images < 1:
    raise ValueError(f"config.explain.num_images must be >= 1, got {options.num_images}")

  exp = trainer.Experiment(config, workdir, train=False)
  try:
    step = exp.checkpointer.latest_step()
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {exp.checkpointer.directory}; train first with --mode=train "
                              f"and the same --workdir")
    state, _ = exp.initial_state()
    batch = _collect(exp, state, num_images)
  finally:
    exp.checkpointer.close()

  directory = os.path.join(workdir, "explain", f"step_{step}")
  attentions = batch["attentions"]                         # [n, L, heads, N, N]
  depth, heads = attentions.shape[1:3]
  prefix = 1 if getattr(exp.model, "pool", "cls") == "cls" else 0
  reader = "class-token" if prefix else "mean-token"  # pool='gap' reads the mean of all tokens
  files, index = [], []
  for i in range(len(attentions)):
    info = _caption(i, batch["outputs"], batch.get("label"), exp.task.class_names)
    image = unnormalize_image(batch["image"][i])
    head_maps = cls_attention_maps(attentions[i], num_prefix_tokens=prefix)          # [heads, gh, gw]
    rollout = attention_rollout(attentions[i], float(options.discard_ratio), str(options.head_fusion),
                                num_prefix_tokens=prefix)                           # [gh, gw]
    paths = [os.path.join(directory, f"image_{i}_heads.png"), os.path.join(directory, f"image_{i}_rollout.png")]
    if jax.process_index() == 0:
      save_attention_pngs(image, head_maps, paths[0], [f"head {h}" for h in range(heads)],
                          suptitle=f"{info['caption']}; {reader} attention, last layer ({depth})")
      save_attention_pngs(image, rollout, paths[1], [f"rollout ({options.head_fusion})"],
                          suptitle=info["caption"])
    files += paths
    index.append(dict(info, image=i, files=[os.path.basename(p) for p in paths]))
  index_path = os.path.join(directory, "index.json")
  if jax.process_index() == 0:
    with open(index_path, "w") as f:
      json.dump({"step": step, "images": index}, f, indent=1)
  return {"step": step, "directory": directory, "files": files + [index_path]}
