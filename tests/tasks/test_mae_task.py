"""The masked-image-modelling task: its loss is MAE's, padding and empty batches count nothing, the evaluator
averages over the removed patches of the split and draws reconstructions."""

import os

import jax
import ml_collections
import numpy as np
import pytest

from cvjax.models.ssl.mae import mae_loss
from cvjax.tasks import create_task

B, L, P = 4, 16, 4   # 4 images of 16x16 pixels: 16 patches of 4x4


def _task(norm_pix_loss=True):
  config = ml_collections.ConfigDict({"task": {"name": "masked_image_modeling", "norm_pix_loss": norm_pix_loss,
                                               "num_visualizations": 2}})
  return create_task(config, 6, [str(i) for i in range(6)])


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(B, 16, 16, 3)).astype(np.float32)
  logits = rng.normal(size=(B, L, P * P * 3)).astype(np.float32)
  mask = np.zeros((B, L), np.float32)
  for b in range(B):
    mask[b, rng.permutation(L)[:12]] = 1.0
  return images, {"logits": logits, "mask": mask}


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_loss_is_mae_loss_and_padding_rows_count_nothing(norm_pix_loss):
  task = _task(norm_pix_loss)
  images, outputs = _inputs()
  batch = {"image": images, "mask": np.ones(B, bool)}
  loss, metrics = task.loss(outputs, batch)
  np.testing.assert_allclose(loss, mae_loss(images, outputs["logits"], outputs["mask"], P, norm_pix_loss),
                             rtol=1e-6)
  total, count = metrics["loss"]
  assert float(count) == 12 * B and float(total) / float(count) == pytest.approx(float(loss), rel=1e-6)
  # A padding row (mask False) changes nothing, whatever it holds.
  padded = {"image": np.concatenate([images, 100 * images[:1]]), "mask": np.array([True] * B + [False])}
  padded_outputs = jax.tree.map(lambda x: np.concatenate([x, x[:1]]), outputs)
  np.testing.assert_allclose(task.loss(padded_outputs, padded)[0], loss, rtol=1e-6)


def test_an_all_padding_batch_gives_zero_not_nan():
  images, outputs = _inputs()
  loss, _ = _task().loss(outputs, {"image": images, "mask": np.zeros(B, bool)})
  assert float(loss) == 0.0


def test_evaluator_averages_over_removed_patches_and_draws(tmp_path):
  task = _task()
  evaluator = task.evaluator()
  expected_total, expected_count = 0.0, 0.0
  for seed in range(2):
    images, outputs = _inputs(seed)
    batch = {"image": images, "mask": np.array([True, True, True, False])}
    evaluated = jax.device_get(task.eval_outputs(outputs, batch))
    assert evaluated["preview_logits"].shape == (2, L, P * P * 3)
    evaluator.update(evaluated, inputs=batch)
    total, count = task.loss(outputs, batch)[1]["loss"]
    expected_total, expected_count = expected_total + float(total), expected_count + float(count)
  scalars, _ = evaluator.result()
  assert scalars["num_examples"] == 6
  assert scalars["loss"] == pytest.approx(expected_total / expected_count, rel=1e-5)
  (path,) = evaluator.write_files(str(tmp_path), step=3)
  assert path.endswith("reconstruction_step_3.png") and os.path.getsize(path) > 0
