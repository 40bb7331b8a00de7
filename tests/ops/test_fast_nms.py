"""cvjax.ops.fast_nms / multiclass_fast_nms against their definition (Bolya et al. 2019, section 3.4), written
here as a float64 NumPy loop, and against greedy NMS, which they must never keep more than.

Definition: visit boxes by score, descending, ties lower index first (``nms``'s order); of the ``top_k``
first, the candidates are those with ``score > score_threshold``; candidate j is kept iff no candidate i before
it has ``float32(IoU(i, j)) > threshold`` -- whether i itself was kept or not.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvjax.ops import fast_nms, multiclass_fast_nms, nms
from nms_reference import integer_boxes, reference_nms  # tests/helpers


def _iou32(boxes, i):
  w = np.maximum(np.minimum(boxes[i, 2], boxes[:, 2]) - np.maximum(boxes[i, 0], boxes[:, 0]), 0)
  h = np.maximum(np.minimum(boxes[i, 3], boxes[:, 3]) - np.maximum(boxes[i, 1], boxes[:, 1]), 0)
  areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
  inter = w * h
  with np.errstate(invalid="ignore", divide="ignore"):
    return (inter / (areas[i] + areas - inter)).astype(np.float32).astype(np.float64)


def reference_fast_nms(boxes, scores, iou_threshold, score_threshold=-np.inf, top_k=None):
  """The definition above: kept indices in decreasing score order."""
  boxes = np.asarray(boxes, np.float64)
  order = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:top_k]
  candidates = [i for i in order if scores[i] > score_threshold]
  return np.array([j for rank, j in enumerate(candidates)
                   if not any(_iou32(boxes, i)[j] > iou_threshold for i in candidates[:rank])], np.int64)


def _kept(result):
  indices, num_valid = (np.asarray(x) for x in result)
  assert (indices[int(num_valid):] == -1).all()
  return indices[:int(num_valid)]


@pytest.mark.parametrize("iou_threshold", [0.0, 0.3, 0.5, 0.7])
@pytest.mark.parametrize("n", [1, 30, 200])
def test_equals_the_definition_and_keeps_a_subset_of_greedy(n, iou_threshold):
  rng = np.random.default_rng(n)
  boxes = integer_boxes(rng, n)
  scores = rng.integers(0, 20, n).astype(np.float32)  # many ties
  kept = _kept(fast_nms(boxes, scores, iou_threshold, n))
  np.testing.assert_array_equal(kept, reference_fast_nms(boxes, scores, iou_threshold))
  greedy = set(_kept(nms(boxes, scores, iou_threshold, n)).tolist())
  assert set(kept.tolist()) <= greedy
  if n == 200 and iou_threshold == 0.5:
    assert len(kept) < len(greedy)  # dense random boxes: some suppressed box suppresses another


def test_a_suppressed_box_still_suppresses_unlike_greedy():
  # A > B > C; IoU(A, B) = IoU(B, C) = 0.6, IoU(A, C) = 0.25: greedy keeps A and C, Fast NMS keeps A only.
  boxes = np.array([[0, 0, 8, 8], [2, 0, 10, 8], [4, 0, 12, 8]], np.float32)
  scores = np.array([0.9, 0.8, 0.7], np.float32)
  np.testing.assert_array_equal(_kept(nms(boxes, scores, 0.5, 3)), [0, 2])
  np.testing.assert_array_equal(_kept(fast_nms(boxes, scores, 0.5, 3)), [0])


@pytest.mark.parametrize("top_k", [5, 50])
def test_score_threshold_top_k_and_output_length(top_k):
  rng = np.random.default_rng(7)
  boxes = integer_boxes(rng, 80)
  scores = rng.random(80).astype(np.float32)
  scores[3] = np.nan  # never a candidate
  expected = reference_fast_nms(boxes, np.nan_to_num(scores, nan=-np.inf), 0.5, score_threshold=0.3,
                                top_k=top_k)
  for max_output_size in (3, 80):
    kept = _kept(fast_nms(boxes, scores, 0.5, max_output_size, score_threshold=0.3, top_k=top_k))
    np.testing.assert_array_equal(kept, expected[:max_output_size])


def test_jit_vmap_traced_threshold_and_empty_input():
  rng = np.random.default_rng(3)
  boxes = np.stack([integer_boxes(rng, 40) for _ in range(2)])
  scores = rng.random((2, 40)).astype(np.float32)
  fn = jax.jit(jax.vmap(lambda b, s, t: fast_nms(b, s, t, 40), in_axes=(0, 0, None)))
  indices, num_valid = fn(boxes, scores, jnp.float32(0.4))
  for b in range(2):
    # An array threshold is used in the boxes' dtype (as nms): float32(0.4), which an IoU of 2/5 does not exceed.
    np.testing.assert_array_equal(indices[b, :num_valid[b]],
                                  reference_fast_nms(boxes[b], scores[b], float(np.float32(0.4))))
  indices, num_valid = fast_nms(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32), 0.5, 4)
  assert indices.tolist() == [-1] * 4 and int(num_valid) == 0


def test_multiclass_is_per_class_fast_nms_then_the_best_over_classes():
  rng = np.random.default_rng(11)
  n, classes, top_k, max_output_size = 60, 3, 25, 30
  boxes = integer_boxes(rng, n)
  scores = rng.random((n, classes)).astype(np.float32)
  out = {k: np.asarray(v) for k, v in jax.jit(lambda b, s: multiclass_fast_nms(
      b, s, 0.5, top_k, max_output_size, score_threshold=0.2))(boxes, scores).items()}
  survivors = [(float(scores[i, c]), c, i) for c in range(classes)
               for i in reference_fast_nms(boxes, scores[:, c], 0.5, score_threshold=0.2, top_k=top_k)]
  survivors = sorted(survivors, key=lambda t: -t[0])[:max_output_size]
  valid = out["valid"]
  assert valid.sum() == len(survivors) and valid[:len(survivors)].all()
  np.testing.assert_array_equal(out["indices"][valid], [i for _, _, i in survivors])
  np.testing.assert_array_equal(out["labels"][valid], [c for _, c, _ in survivors])
  np.testing.assert_allclose(out["scores"][valid], [s for s, _, _ in survivors])
  assert (out["indices"][~valid] == -1).all() and (out["scores"][~valid] == 0).all()
  # Classes never suppress each other: the same box survives in every class when alone.
  single = multiclass_fast_nms(boxes[:1], np.full((1, classes), 0.9, np.float32), 0.5, top_k, 4)
  assert np.asarray(single["valid"]).sum() == classes


def test_greedy_reference_agrees_on_chain_free_inputs():
  # Boxes in a row, each overlapping only its neighbours at IoU 1/3: at 0.5 nothing is suppressed, so no chain
  # and both keep everything; at 0.2 the row is one chain: greedy keeps every other box, Fast NMS the first.
  boxes = np.array([[x, 0, x + 8, 8] for x in range(0, 40, 4)], np.float32)
  scores = np.linspace(1, 0.1, len(boxes)).astype(np.float32)
  np.testing.assert_array_equal(_kept(fast_nms(boxes, scores, 0.5, 10)), reference_nms(boxes, scores, 0.5))
  np.testing.assert_array_equal(reference_nms(boxes, scores, 0.2), np.arange(0, 10, 2))
  np.testing.assert_array_equal(_kept(fast_nms(boxes, scores, 0.2, 10)), [0])


def test_rejects_bad_inputs():
  boxes = np.zeros((4, 4), np.float32)
  with pytest.raises(ValueError, match="scores must have shape"):
    fast_nms(boxes, np.zeros(3, np.float32), 0.5, 4)
  with pytest.raises(ValueError, match="max_output_size"):
    fast_nms(boxes, np.zeros(4, np.float32), 0.5, -1)
  with pytest.raises(ValueError, match=r"scores \[N, C\]"):
    multiclass_fast_nms(boxes, np.zeros((3, 2), np.float32), 0.5, 10, 4)
  with pytest.raises(ValueError, match="top_k"):
    multiclass_fast_nms(boxes, np.zeros((4, 2), np.float32), 0.5, 0, 4)
