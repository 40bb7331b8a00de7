"""The semantic segmentation task: PyTorch's ignore-index cross-entropy, no NaN on an all-ignored batch, the
auxiliary head's weight, and the evaluator's split-level mIoU and drawings."""

import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from cvjax.evaluation.segmentation import mean_iou
from cvjax.tasks import create_task
from cvjax.tasks.segmentation import pixel_cross_entropy

K = 5


def _task(**task):
  config = ml_collections.ConfigDict(dict(task=dict(name="semantic_segmentation", **task)))
  return create_task(config, K, [f"c{k}" for k in range(K)])


def _batch(seed, b=3, size=8):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, K, (b, size, size)).astype(np.int32)
  labels[rng.random(labels.shape) < 0.2] = 255
  logits = rng.normal(0, 2, (b, size, size, K)).astype(np.float32)
  return logits, labels


def test_cross_entropy_is_pytorchs_with_ignore_index():
  logits, labels = _batch(0)
  total, count = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  reference = torch.nn.functional.cross_entropy(torch.from_numpy(logits).permute(0, 3, 1, 2),
                                                torch.from_numpy(labels).long(), ignore_index=255)
  assert int(count) == int((labels != 255).sum())
  np.testing.assert_allclose(float(total / count), float(reference), rtol=1e-5)


def test_loss_with_aux_head_and_all_ignored_batch():
  task = _task(aux_weight=0.4)
  logits, labels = _batch(1)
  aux = logits[..., ::-1].copy()
  batch = {"label_map": jnp.asarray(labels), "mask": jnp.ones((3,), bool)}
  loss, metrics = task.loss({"logits": jnp.asarray(logits), "aux_logits": jnp.asarray(aux)}, batch)
  main, count = pixel_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  side, _ = pixel_cross_entropy(jnp.asarray(aux), jnp.asarray(labels))
  np.testing.assert_allclose(float(loss), float((main + 0.4 * side) / count), rtol=1e-6)
  assert float(metrics["aux_loss"][0]) == float(side)
  # Every pixel ignored (e.g. a batch of padding rows): loss 0 and finite gradients, never NaN.
  empty = {"label_map": jnp.full_like(batch["label_map"], 255), "mask": jnp.zeros((3,), bool)}
  grad = jax.grad(lambda x: task.loss({"logits": x}, empty)[0])(jnp.asarray(logits))
  assert float(task.loss({"logits": jnp.asarray(logits)}, empty)[0]) == 0.0 and bool(jnp.isfinite(grad).all())


def test_evaluator_is_mean_iou_over_the_split(tmp_path):
  task = _task(num_visualizations=2)
  evaluator = task.evaluator()
  eval_outputs = jax.jit(task.eval_outputs)
  predictions, targets = [], []
  for seed in range(3):
    logits, labels = _batch(10 + seed)
    mask = np.array([True, True, seed < 2])           # the last batch ends with a padding row
    outputs = jax.device_get(eval_outputs({"logits": jnp.asarray(logits)},
                                          {"label_map": jnp.asarray(labels), "mask": jnp.asarray(mask)}))
    inputs = {"image": np.zeros((3, 8, 8, 3), np.float32), "label_map": labels}
    evaluator.update(outputs, inputs=inputs)
    predictions.append(logits.argmax(-1)[mask])
    targets.append(labels[mask])
  scalars, details = evaluator.result()
  expected = mean_iou(np.concatenate(predictions), np.concatenate(targets), K)
  assert scalars["num_examples"] == 8
  np.testing.assert_allclose(scalars["miou"], float(expected["miou"]), rtol=1e-6)
  np.testing.assert_allclose(scalars["pixel_accuracy"], float(expected["pixel_accuracy"]), rtol=1e-6)
  assert list(details["per_class_iou"]) == [f"c{k}" for k in range(K)]
  paths = evaluator.write_files(str(tmp_path), step=7)
  assert paths == [os.path.join(str(tmp_path), "segmentation_step_7.png")] and os.path.getsize(paths[0]) > 0
