"""DETR's criterion and post-processing against HF transformers' PyTorch implementation (ImageLoss,
HungarianMatcher, DetrImageProcessor), plus the edge cases a detection batch brings. Tests that compare with HF
take the ``hf_loss`` fixture (skipped without transformers); the others run regardless."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.tasks.detr import CriterionWeights, detr_loss, hungarian_match, postprocess

NUM_CLASSES = 4
BACKENDS = ("scipy", "jax")


@pytest.fixture(scope="module")
def hf_loss():
  pytest.importorskip("torch")
  return pytest.importorskip("transformers.loss.loss_for_object_detection")


def _random_case(seed, counts=(0, 2, 5, 3), num_queries=7, max_boxes=5, num_aux=2):
  rng = np.random.default_rng(seed)
  batch_size = len(counts)

  def random_boxes(shape):
    centre = rng.uniform(0.2, 0.8, shape + (2,))
    size = rng.uniform(0.05, 0.4, shape + (2,))
    return np.concatenate([centre, size], -1).astype(np.float32)

  def layer():
    return {"pred_logits": rng.normal(size=(batch_size, num_queries, NUM_CLASSES + 1)).astype(np.float32) * 2,
            "pred_boxes": random_boxes((batch_size, num_queries))}

  outputs = layer()
  outputs["aux_outputs"] = [layer() for _ in range(num_aux)]
  valid = np.arange(max_boxes)[None, :] < np.array(counts)[:, None]
  batch = {"boxes": np.where(valid[..., None], random_boxes((batch_size, max_boxes)), 0).astype(np.float32),
           "labels": np.where(valid, rng.integers(0, NUM_CLASSES, (batch_size, max_boxes)), 0).astype(np.int32),
           "valid": valid, "mask": np.ones((batch_size,), bool)}
  return outputs, batch


def _hf_criterion(hf_loss, outputs, batch, weights=CriterionWeights()):
  import torch  # pylint: disable=import-outside-toplevel

  matcher = hf_loss.HungarianMatcher(class_cost=weights.class_weight, bbox_cost=weights.bbox_weight,
                                     giou_cost=weights.giou_weight)
  criterion = hf_loss.ImageLoss(matcher=matcher, num_classes=NUM_CLASSES, eos_coef=weights.eos_coef,
                                losses=["labels", "boxes"])
  to_torch = lambda layer: {"logits": torch.tensor(layer["pred_logits"]),
                            "pred_boxes": torch.tensor(layer["pred_boxes"])}
  hf_outputs = to_torch(outputs)
  hf_outputs["auxiliary_outputs"] = [to_torch(layer) for layer in outputs["aux_outputs"]]
  targets = [{"class_labels": torch.tensor(labels[v]).long(), "boxes": torch.tensor(boxes[v])}
             for boxes, labels, v in zip(batch["boxes"], batch["labels"], batch["valid"])]
  terms = {k: float(v) for k, v in criterion(hf_outputs, targets).items()}
  layer_weights = {"loss_ce": weights.class_weight, "loss_bbox": weights.bbox_weight,
                   "loss_giou": weights.giou_weight}
  # Aux-layer keys carry a layer suffix: loss_ce_0, loss_bbox_1, ...
  total = sum(value * layer_weights[key.rstrip("_0123456789")]
              for key, value in terms.items() if key.rstrip("_0123456789") in layer_weights)
  return total, terms


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_hf_image_loss_with_aux_outputs(seed, backend, hf_loss):
  outputs, batch = _random_case(seed)
  total, terms = jax.jit(functools.partial(detr_loss, matcher_backend=backend))(outputs, batch)
  hf_total, hf_terms = _hf_criterion(hf_loss, outputs, batch)
  assert float(total) == pytest.approx(hf_total, rel=1e-5)
  for key in ("loss_ce", "loss_bbox", "loss_giou"):
    assert float(terms[key]) == pytest.approx(hf_terms[key], rel=1e-5), key
  assert float(terms["num_boxes"]) == batch["valid"].sum()


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_with_other_weights_matches_hf(backend, hf_loss):
  outputs, batch = _random_case(3)
  weights = CriterionWeights(class_weight=2.0, bbox_weight=1.0, giou_weight=3.0, eos_coef=0.5)
  total, _ = detr_loss(outputs, batch, weights, matcher_backend=backend)
  assert float(total) == pytest.approx(_hf_criterion(hf_loss, outputs, batch, weights)[0], rel=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matching_equals_hf_hungarian_matcher(backend, hf_loss):
  import torch  # pylint: disable=import-outside-toplevel

  outputs, batch = _random_case(4, counts=(3, 5, 1, 4))
  match = np.asarray(hungarian_match(outputs["pred_logits"], outputs["pred_boxes"], batch["boxes"],
                                     batch["labels"], batch["valid"], backend=backend))
  matcher = hf_loss.HungarianMatcher(class_cost=1, bbox_cost=5, giou_cost=2)
  targets = [{"class_labels": torch.tensor(l[v]).long(), "boxes": torch.tensor(b[v])}
             for b, l, v in zip(batch["boxes"], batch["labels"], batch["valid"])]
  hf = matcher({"logits": torch.tensor(outputs["pred_logits"]), "pred_boxes": torch.tensor(outputs["pred_boxes"])},
               targets)
  for b, (queries, target_index) in enumerate(hf):
    expected = np.full(match.shape[1], -1)
    expected[queries.numpy()] = target_index.numpy()
    np.testing.assert_array_equal(match[b], expected)


def test_padding_examples_do_not_change_the_loss():
  outputs, batch = _random_case(5, counts=(2, 3, 4, 1))
  masked = dict(batch, mask=np.array([True, True, False, True]))
  keep = np.array([0, 1, 3])
  sub_outputs = jax.tree.map(lambda x: x[keep], outputs)
  sub_batch = {k: v[keep] for k, v in batch.items()}
  np.testing.assert_allclose(detr_loss(outputs, masked)[0], detr_loss(sub_outputs, sub_batch)[0], rtol=1e-6)


def test_no_objects_anywhere_gives_finite_loss_and_gradients(hf_loss):
  outputs, batch = _random_case(6, counts=(0, 0))

  def loss(outputs):
    return detr_loss(outputs, batch)[0]

  value, grads = jax.value_and_grad(loss)(outputs)
  assert np.isfinite(float(value))
  # Every query is "no object": only the classification term remains, and box heads get no gradient.
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  assert float(jnp.abs(grads["pred_boxes"]).max()) == 0.0
  hf_total, _ = _hf_criterion(hf_loss, outputs, batch)
  assert float(value) == pytest.approx(hf_total, rel=1e-5)


def test_degenerate_predicted_and_target_boxes_stay_finite():
  outputs, batch = _random_case(7, counts=(2, 3))
  outputs["pred_boxes"][0, :, 2:] = 0.0            # zero-size predictions
  batch["boxes"][1, 0] = [0.5, 0.5, 0.0, 0.2]      # a zero-width target
  value, grads = jax.value_and_grad(lambda o: detr_loss(o, batch)[0])(outputs)
  assert np.isfinite(float(value))
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))


def test_bad_target_shapes_are_named():
  outputs, batch = _random_case(8)
  with pytest.raises(ValueError, match="boxes must be"):
    detr_loss(outputs, dict(batch, boxes=batch["boxes"][..., :3]))


def test_postprocess_matches_hf_image_processor():
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  outputs, _ = _random_case(9)
  sizes = np.array([[480, 640], [100, 60], [32, 32], [7, 300]], np.int32)
  ours = postprocess(outputs["pred_logits"], outputs["pred_boxes"], sizes)
  processor = transformers.DetrImageProcessor()

  class Out:
    logits = torch.tensor(outputs["pred_logits"])
    pred_boxes = torch.tensor(outputs["pred_boxes"])

  hf = processor.post_process_object_detection(Out, threshold=0.0, target_sizes=torch.tensor(sizes))
  for b, result in enumerate(hf):
    np.testing.assert_allclose(ours["scores"][b], result["scores"].numpy(), rtol=1e-6)
    np.testing.assert_array_equal(ours["labels"][b], result["labels"].numpy())
    np.testing.assert_allclose(ours["boxes"][b], result["boxes"].numpy(), rtol=1e-5, atol=1e-4)


def test_class_error_counts_no_object_predictions_of_matched_queries_as_wrong():
  """DETR logs class_error over all K + 1 logits of the matched queries: a matched query whose argmax is
  "no object" is an error even when its best real class is right."""
  num_queries = 3
  logits = np.full((1, num_queries, NUM_CLASSES + 1), -5.0, np.float32)
  logits[0, 0, 1] = 5.0                          # query 0: class 1, confidently
  logits[0, 1, 2], logits[0, 1, -1] = 2.0, 6.0   # query 1: best real class 2, but "no object" wins
  boxes = np.array([[[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2], [0.5, 0.5, 0.1, 0.1]]], np.float32)
  outputs = {"pred_logits": logits, "pred_boxes": boxes}
  batch = {"boxes": boxes[:, :2], "labels": np.array([[1, 2]], np.int32), "valid": np.ones((1, 2), bool)}
  _, terms = detr_loss(outputs, batch)
  assert float(terms["class_error"]) == pytest.approx(50.0)
