"""MaskFormer's criterion against HF transformers' PyTorch ``MaskFormerLoss`` + ``MaskFormerHungarianMatcher``
(values, matchings, gradients), plus the edge cases a segment batch brings. Tests that compare with HF take the
``hf`` fixture (skipped without transformers); the others run regardless."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from cvjax.tasks.maskformer import (MaskFormerWeights, maskformer_loss, maskformer_match, resize_bilinear,
                                    resize_nearest)

NUM_CLASSES = 4
NUM_QUERIES = 5
TARGET_SIZE = (16, 20)
PRED_SIZE = (4, 5)  # 1/4 of the target resolution, as MaskFormer's mask features
BACKENDS = ("scipy", "jax")
LOSS_KEYS = ("loss_cross_entropy", "loss_mask", "loss_dice")


@pytest.fixture(scope="module")
def hf():
  pytest.importorskip("torch")
  return pytest.importorskip("transformers.models.maskformer.modeling_maskformer")


def _random_case(seed, counts=(3, 0), max_segments=4, num_aux=2):
  """Predictions for ``len(counts)`` images and their padded segments (random rectangles; padded entries hold
  junk that must be ignored). Predicted masks are noisy copies of the targets at 1/4 resolution for some
  queries, so that the matching is decided by the masks rather than by noise alone."""
  rng = np.random.default_rng(seed)
  batch_size = len(counts)
  height, width = TARGET_SIZE
  masks = rng.random((batch_size, max_segments, height, width)) < 0.3  # junk outside the valid entries
  for b, count in enumerate(counts):
    for m in range(count):
      top, left = rng.integers(0, height - 3), rng.integers(0, width - 3)
      bottom, right = rng.integers(top + 2, height + 1), rng.integers(left + 2, width + 1)
      masks[b, m] = False
      masks[b, m, top:bottom, left:right] = True
  valid = np.arange(max_segments)[None, :] < np.array(counts)[:, None]
  labels = np.where(valid, rng.integers(0, NUM_CLASSES, (batch_size, max_segments)), 7).astype(np.int32)
  coarse = masks[:, :, ::4, ::4].astype(np.float32)

  def layer():
    pred_masks = 2.0 * rng.normal(size=(batch_size, NUM_QUERIES) + PRED_SIZE)
    source = rng.integers(0, max_segments, (batch_size, NUM_QUERIES))
    pred_masks += 4.0 * (np.take_along_axis(coarse, source[:, :, None, None], axis=1) - 0.5)
    logits = 2.0 * rng.normal(size=(batch_size, NUM_QUERIES, NUM_CLASSES + 1))
    return {"pred_logits": logits.astype(np.float32), "pred_masks": pred_masks.astype(np.float32)}

  outputs = layer()
  outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
  return outputs, {"masks": masks.astype(np.uint8), "labels": labels, "valid": valid}


def _hf_inputs(layer):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.tensor(layer["pred_masks"]), torch.tensor(layer["pred_logits"])


def _hf_targets(targets):
  import torch  # pylint: disable=import-outside-toplevel
  mask_labels = [torch.tensor(m[v], dtype=torch.float32) for m, v in zip(targets["masks"], targets["valid"])]
  class_labels = [torch.tensor(l[v], dtype=torch.int64) for l, v in zip(targets["labels"], targets["valid"])]
  return mask_labels, class_labels


def _hf_matcher(hf, weights):
  return hf.MaskFormerHungarianMatcher(cost_class=weights.class_weight, cost_mask=weights.mask_weight,
                                       cost_dice=weights.dice_weight)


def _hf_criterion(hf, outputs, targets, weights=MaskFormerWeights(), requires_grad=False):
  """HF's total (weighted as ``MaskFormerForInstanceSegmentation.get_loss_dict``), its terms and, with
  ``requires_grad``, the gradients of the total with respect to the final layer's predictions."""
  weight_dict = {"loss_cross_entropy": weights.class_weight, "loss_mask": weights.mask_weight,
                 "loss_dice": weights.dice_weight}
  criterion = hf.MaskFormerLoss(NUM_CLASSES, _hf_matcher(hf, weights), weight_dict, weights.eos_coef)
  masks, logits = _hf_inputs(outputs)
  masks.requires_grad_(requires_grad)
  logits.requires_grad_(requires_grad)
  aux = [dict(zip(("masks_queries_logits", "class_queries_logits"), _hf_inputs(layer)))
         for layer in outputs["aux_outputs"]]
  terms = criterion(masks, logits, *_hf_targets(targets), aux or None)
  # Aux-layer keys carry a layer suffix: loss_mask_0, loss_dice_1, ...
  total = sum(value * weight_dict[key.rstrip("_0123456789")] for key, value in terms.items())
  grads = None
  if requires_grad:
    total.backward()
    grads = {"pred_masks": masks.grad.numpy(), "pred_logits": logits.grad.numpy()}
  return total.item(), {k: v.item() for k, v in terms.items()}, grads


def _assert_close(ours, theirs, rel=1e-5, abs_=1e-6):
  assert float(ours) == pytest.approx(theirs, rel=rel, abs=abs_)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed, counts", [(0, (3, 0)), (1, (2, 4))])
def test_loss_matches_hf_maskformer_loss_with_aux_outputs(seed, counts, backend, hf):
  outputs, targets = _random_case(seed, counts)
  total, terms = jax.jit(functools.partial(maskformer_loss, matcher_backend=backend))(outputs, targets)
  hf_total, hf_terms, _ = _hf_criterion(hf, outputs, targets)
  _assert_close(total, hf_total)
  for key in LOSS_KEYS:
    _assert_close(terms[key], hf_terms[key])
  assert float(terms["num_masks"]) == sum(counts)


def test_more_segments_than_queries_matches_hf(hf):
  """With Q < n_valid only Q segments are matched, yet all of them count in num_masks (as HF)."""
  outputs, targets = _random_case(2, counts=(6, 1), max_segments=7, num_aux=1)
  total, terms = jax.jit(functools.partial(maskformer_loss, matcher_backend="jax"))(outputs, targets)
  hf_total, hf_terms, _ = _hf_criterion(hf, outputs, targets)
  _assert_close(total, hf_total)
  for key in LOSS_KEYS:
    _assert_close(terms[key], hf_terms[key])


def test_loss_with_other_weights_matches_hf(hf):
  outputs, targets = _random_case(3, counts=(4, 2))
  weights = MaskFormerWeights(class_weight=2.0, mask_weight=5.0, dice_weight=3.0, eos_coef=0.5)
  loss = jax.jit(functools.partial(maskformer_loss, weights=weights, matcher_backend="scipy"))
  total, _ = loss(outputs, targets)
  _assert_close(total, _hf_criterion(hf, outputs, targets, weights)[0])


def test_gradients_match_hf(hf):
  outputs, targets = _random_case(4, counts=(3, 2), num_aux=0)
  grads = jax.jit(jax.grad(lambda o: maskformer_loss(o, targets)[0]))(outputs)
  _, _, hf_grads = _hf_criterion(hf, outputs, targets, requires_grad=True)
  for key in ("pred_masks", "pred_logits"):
    scale = np.abs(hf_grads[key]).max()
    np.testing.assert_allclose(grads[key], hf_grads[key], rtol=1e-4, atol=1e-5 * scale, err_msg=key)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matching_equals_hf_matcher(backend, hf):
  outputs, targets = _random_case(5, counts=(4, 3, 1, 0))
  matcher = jax.jit(functools.partial(maskformer_match, backend=backend))
  for layer in [outputs] + outputs["aux_outputs"]:
    match = np.asarray(matcher(layer["pred_logits"], layer["pred_masks"], targets["masks"], targets["labels"],
                               targets["valid"]))
    hf_match = _hf_matcher(hf, MaskFormerWeights())(*_hf_inputs(layer), *_hf_targets(targets))
    for b, (queries, target_index) in enumerate(hf_match):
      expected = np.full(NUM_QUERIES, -1)
      expected[queries.numpy()] = target_index.numpy()
      np.testing.assert_array_equal(match[b], expected)


def test_all_padding_batch_gives_finite_loss_and_gradients(hf):
  outputs, targets = _random_case(6, counts=(0, 0))
  (value, terms), grads = jax.jit(jax.value_and_grad(lambda o: maskformer_loss(o, targets), has_aux=True))(
      outputs)
  assert np.isfinite(float(value))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  # Every query is "no object": only the classification terms remain, and mask heads get no gradient.
  assert float(terms["loss_mask"]) == float(terms["loss_dice"]) == 0.0
  assert max(float(jnp.abs(layer["pred_masks"]).max()) for layer in [grads] + grads["aux_outputs"]) == 0.0
  assert float(terms["num_masks"]) == 1.0  # clamped, as HF
  _assert_close(value, _hf_criterion(hf, outputs, targets)[0])


def test_padding_examples_do_not_change_the_loss():
  outputs, targets = _random_case(7, counts=(2, 3, 1))
  keep = np.array([0, 2])
  masked = dict(targets, example_mask=np.isin(np.arange(3), keep))
  sub_outputs = jax.tree.map(lambda x: x[keep], outputs)
  sub_targets = {k: v[keep] for k, v in targets.items()}
  loss = jax.jit(lambda o, t: maskformer_loss(o, t)[0])
  np.testing.assert_allclose(loss(outputs, masked), loss(sub_outputs, sub_targets), rtol=1e-6)


def test_no_aux_outputs_key_and_bool_masks():
  outputs, targets = _random_case(8, counts=(1, 2))
  final = {k: v for k, v in outputs.items() if k != "aux_outputs"}
  criterion = jax.jit(maskformer_loss)
  loss, terms = criterion(final, dict(targets, masks=targets["masks"].astype(bool)))
  empty_aux, _ = criterion(dict(final, aux_outputs=[]), targets)
  weights = MaskFormerWeights()
  np.testing.assert_allclose(loss, terms["loss_cross_entropy"] + weights.mask_weight * terms["loss_mask"]
                             + terms["loss_dice"], rtol=1e-6)
  np.testing.assert_allclose(loss, empty_aux, rtol=1e-6)


def test_resizes_follow_torch_interpolate():
  torch = pytest.importorskip("torch")
  x = np.random.default_rng(9).normal(size=(2, 3, 13, 10)).astype(np.float32)
  for size in [(4, 3), (5, 5), (13, 10), (26, 20), (31, 17)]:
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=size, mode="nearest").numpy()
    np.testing.assert_array_equal(resize_nearest(jnp.asarray(x), size), expected)
    expected = torch.nn.functional.interpolate(torch.tensor(x), size=size, mode="bilinear",
                                               align_corners=False).numpy()
    np.testing.assert_allclose(resize_bilinear(jnp.asarray(x), size), expected, atol=1e-5)


def test_task_loss_reads_segment_keys_and_is_registered():
  from cvjax.tasks.base import create_task  # pylint: disable=import-outside-toplevel

  config = ml_collections.ConfigDict({"task": {"name": "mask_classification", "matcher_backend": "jax"}})
  task = create_task(config, NUM_CLASSES, [f"c{i}" for i in range(NUM_CLASSES)])
  outputs, targets = _random_case(10, counts=(2, 1))
  batch = {"image": np.zeros((2,) + TARGET_SIZE + (3,), np.float32), "segment_masks": targets["masks"],
           "segment_labels": targets["labels"], "segment_valid": targets["valid"], "mask": np.ones(2, bool)}
  loss, metrics = jax.jit(task.loss)(outputs, batch)
  np.testing.assert_allclose(loss, maskformer_loss(outputs, targets)[0], rtol=1e-6)
  assert {"loss", *LOSS_KEYS, "class_error", "num_masks"} <= set(metrics)
  assert all(np.shape(s) == np.shape(c) == () for s, c in metrics.values())
  # Evaluation: semantic inference's label maps at the input resolution, scored by the split's confusion matrix
  # (the default task config is panoptic, so a dataset without things makes every class stuff).
  batch["label_map"] = np.zeros((2,) + TARGET_SIZE, np.int32)
  eval_out = jax.device_get(jax.jit(task.eval_outputs)(outputs, batch))
  assert eval_out["prediction"].shape == (2,) + TARGET_SIZE and eval_out["panoptic"].shape == (2,) + TARGET_SIZE + (2,)
  np.testing.assert_array_equal(eval_out["confusion"].sum((1, 2)), [TARGET_SIZE[0] * TARGET_SIZE[1]] * 2)
  evaluator = task.evaluator()
  evaluator.update(eval_out, inputs={"image": batch["image"], "label_map": batch["label_map"],
                                     "panoptic": np.zeros((2,) + TARGET_SIZE + (2,), np.int32)})
  scalars, _ = evaluator.result()
  expected = float((eval_out["prediction"] == 0).mean())
  np.testing.assert_allclose(scalars["pixel_accuracy"], expected, rtol=1e-6)
  assert 0.0 <= scalars["pq"] <= 1.0


def test_bad_target_shapes_are_named():
  outputs, targets = _random_case(11)
  with pytest.raises(ValueError, match="masks must be"):
    maskformer_loss(outputs, dict(targets, masks=targets["masks"][:, 0]))
  with pytest.raises(ValueError, match="pred_masks"):
    maskformer_loss(dict(outputs, pred_masks=outputs["pred_masks"][:, :-1]), targets)
