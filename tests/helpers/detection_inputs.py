"""Inputs the detector tests share: padded ground truth, random images, a finiteness check, a jitted init."""

import functools

import jax
import jax.numpy as jnp
import numpy as np


def padded_targets(boxes_per_image, max_boxes: int, num_classes: int):
  """``gt_boxes [B, M, 4]`` xyxy, ``gt_labels [B, M]`` (object m has class m % num_classes) and ``gt_valid``
  for a batch given as one list of boxes per image, padded to ``max_boxes``."""
  boxes = np.zeros((len(boxes_per_image), max_boxes, 4), np.float32)
  labels = np.zeros(boxes.shape[:2], np.int32)
  valid = np.zeros(boxes.shape[:2], bool)
  for b, image_boxes in enumerate(boxes_per_image):
    for m, box in enumerate(image_boxes):
      boxes[b, m], labels[b, m], valid[b, m] = box, m % num_classes, True
  return dict(gt_boxes=jnp.asarray(boxes), gt_labels=jnp.asarray(labels), gt_valid=jnp.asarray(valid))


def random_images(size: int, batch: int = 2, seed: int = 0):
  """``[batch, size, size, 3]`` float32 standard-normal images."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, size, size, 3)).astype(np.float32))


def all_finite(tree) -> bool:
  return all(bool(jnp.isfinite(x).all()) for x in jax.tree_util.tree_leaves(tree))


def init_detector(name: str, size: int, batch: int = 2, **kwargs):
  """``(model, variables)``: ``create_model(name, **kwargs)`` initialised (jitted, eval mode, seed 0) on
  ``[batch, size, size, 3]`` zeros."""
  from cvjax.models import create_model  # pylint: disable=import-outside-toplevel
  model = create_model(name, **kwargs)
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(0),
                                                                  jnp.zeros((batch, size, size, 3)))
  return model, variables
