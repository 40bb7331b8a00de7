"""Classification objective against PyTorch's cross-entropy, masking, and the eval outputs."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.tasks.classification import ClassificationTask, smoothed_cross_entropy
from cvjax.train.config import base_config


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
def test_cross_entropy_matches_torch_label_smoothing(smoothing):
  rng = np.random.RandomState(0)
  logits = rng.randn(16, 7).astype(np.float32) * 3
  labels = rng.randint(0, 7, 16)
  ours = smoothed_cross_entropy(jnp.asarray(logits), jnp.asarray(labels), smoothing)
  ref = torch.nn.functional.cross_entropy(torch.tensor(logits), torch.tensor(labels), reduction="none",
                                          label_smoothing=smoothing)
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-5, atol=1e-6)


def test_loss_ignores_masked_rows_and_counts_correct_predictions():
  config = base_config()
  config.task.label_smoothing = 0.0
  task = ClassificationTask(config, 3, ["a", "b", "c"])
  logits = jnp.array([[5.0, 0, 0], [0, 5.0, 0], [0, 0, 5.0], [100.0, -100, 0]])
  batch = {"label": jnp.array([0, 2, 2, 1]), "mask": jnp.array([True, True, True, False])}
  loss, metrics = task.loss(logits, batch)
  ce = smoothed_cross_entropy(logits[:3], batch["label"][:3], 0.0)
  np.testing.assert_allclose(loss, ce.mean(), rtol=1e-6)
  assert float(metrics["accuracy"][0]) == 2 and float(metrics["accuracy"][1]) == 3
  out = task.eval_outputs(logits, batch)
  assert out["top_k"].shape == (4, 3) and list(out["top_k"][:, 0]) == [0, 1, 2, 0]
