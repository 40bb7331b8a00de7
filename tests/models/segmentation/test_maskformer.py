"""MaskFormer without a reference: output shapes and conventions, options, errors, and its inference functions
on hand-built predictions (HF parity of both is in tests/convert/test_maskformer_parity.py)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cvjax.models import create_model
from cvjax.models.segmentation import maskformer_inference
from cvjax.models.segmentation.maskformer import MaskFormer

# The CPU variant, smaller still: 2 decoder layers, 7 queries, 3 classes.
TINY = dict(num_classes=3, num_queries=7, num_decoder_layers=2, backbone_stage_sizes=(1, 1, 1, 1), backbone_width=8,
            d_model=32, num_heads=2, ffn_dim=32, fpn_feature_size=32, mask_feature_size=16)


def _abstract_init(model, shape):
  """The variables' shapes (nothing computed)."""
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


@pytest.fixture(scope="module")
def tiny():
  model = create_model("maskformer_resnet18", **TINY)
  images = jax.random.normal(jax.random.PRNGKey(0), (2, 64, 48, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), images)
  return model, variables, images


def test_outputs_shapes_and_auxiliary_entries(tiny):
  model, variables, images = tiny

  @jax.jit
  def both(variables):
    return (model.apply(variables, images, train=False),
            model.clone(aux_semantics="hf").apply(variables, images, train=False))

  paper, hf = both(variables)
  assert paper["pred_logits"].shape == (2, 7, 4) and paper["pred_masks"].shape == (2, 7, 16, 12)
  assert paper["pred_logits"].dtype == paper["pred_masks"].dtype == jnp.float32
  # The final predictions do not depend on the auxiliary semantics; their number does.
  np.testing.assert_array_equal(paper["pred_masks"], hf["pred_masks"])
  assert len(paper["aux_outputs"]) == 1 and len(hf["aux_outputs"]) == 2
  for aux in paper["aux_outputs"] + hf["aux_outputs"]:
    assert {key: value.shape for key, value in aux.items()} == {"pred_logits": (2, 7, 4), "pred_masks": (2, 7, 16, 12)}
  # HF's first auxiliary entry is the heads on the zero decoder input: the same for every query and image.
  first = hf["aux_outputs"][0]["pred_logits"]
  np.testing.assert_allclose(first, np.broadcast_to(first[0, 0], first.shape), atol=1e-6)
  assert "aux_outputs" not in model.clone(aux_outputs=False).apply(variables, images, train=False)


def test_parameter_tree_and_optional_input_projection(tiny):
  model, variables, _ = tiny
  params = variables["params"]
  assert set(params) == {"backbone", "pixel_decoder", "input_projection", "queries_embedder", "decoder",
                         "class_predictor", "mask_embedder"}
  assert set(params["pixel_decoder"]) == {"stem", "layers_0", "layers_1", "layers_2", "mask_projection"}
  assert set(params["pixel_decoder"]["layers_0"]) == {"proj", "block"}
  assert "bias" not in params["pixel_decoder"]["stem"]["conv"] and "bias" in params["pixel_decoder"]["mask_projection"]
  # Frozen batch norm by default (the reference's R50): nothing of it in params.
  assert "bn1" not in params["backbone"] and "bn1" in variables["batch_stats"]["backbone"]
  # C5 already at d_model channels: no projection, as HF and the reference.
  same_width = model.clone(backbone_stage_widths=(8, 16, 16, 32), backbone_stem_width=8)
  assert "input_projection" not in _abstract_init(same_width, (1, 64, 64, 3))["params"]


def test_train_mode_uses_dropout_and_swin_backbone_pads_small_maps():
  # 40 x 56 px: Swin stages of 10x14 and 5x7, the second smaller than the window of 6 (padded to 6x12, shifted).
  model = MaskFormer(**{**TINY, "backbone": "swin", "swin_embed_dim": 16, "swin_depths": (2, 2),
                        "swin_num_heads": (2, 2), "swin_window_size": 6, "dropout_rate": 0.5})
  images = jax.random.normal(jax.random.PRNGKey(0), (1, 40, 56, 3))
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.PRNGKey(1), images)
  assert {"backbone_norm0", "backbone_norm1"} <= set(variables["params"])

  @jax.jit
  def run(variables):
    rngs = {"dropout": jax.random.PRNGKey(2)}
    return (model.apply(variables, images, train=False), model.apply(variables, images, train=True, rngs=rngs))

  evaluation, training = run(variables)
  assert evaluation["pred_masks"].shape == (1, 7, 10, 14)
  assert np.abs(evaluation["pred_logits"] - training["pred_logits"]).max() > 1e-3


def test_registered_paper_models_have_the_papers_sizes():
  # MaskFormer Table 1: 41M (R50) and 42M (Swin-T) parameters.
  for name, millions in (("maskformer_resnet50", 41), ("maskformer_swin_t", 42)):
    model = create_model(name)
    count = sum(leaf.size for leaf in jax.tree_util.tree_leaves(_abstract_init(model, (1, 64, 64, 3))["params"]))
    assert round(count / 1e6) == millions, name
    assert (model.num_classes, model.num_queries, model.d_model, model.num_decoder_layers) == (150, 100, 256, 6)


@pytest.mark.parametrize("overrides, message", [
    (dict(fpn_feature_size=48), r"multiple of the 32 GroupNorm groups, got 48"),
    (dict(aux_semantics="detr"), r"aux_semantics must be one of"),
    (dict(backbone="vit"), r"backbone must be one of"),
])
def test_bad_options_are_errors(overrides, message):
  with pytest.raises(ValueError, match=message):
    _abstract_init(MaskFormer(**{**TINY, **overrides}), (1, 32, 32, 3))


def test_non_nhwc_input_is_an_error():
  with pytest.raises(ValueError, match=r"NHWC images"):
    _abstract_init(MaskFormer(**TINY), (32, 32, 3))


@pytest.mark.parametrize("in_size, out_size", [(16, 64), (7, 13), (13, 7), (5, 5), (1, 4), (9, 3)])
def test_bilinear_resize_matrix_is_torch_interpolate(in_size, out_size):
  x = np.random.default_rng(0).standard_normal((2, 3, in_size, in_size + 2), dtype=np.float32)
  expected = torch.nn.functional.interpolate(torch.from_numpy(x), size=(out_size, out_size + 1), mode="bilinear",
                                             align_corners=False).numpy()
  got = maskformer_inference.resize_bilinear(jnp.asarray(x), (out_size, out_size + 1), axes=(2, 3))
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)  # float32 rounding of |x| ~ 3


def _one_hot_logits(labels, num_classes, confidence=8.0):
  return np.eye(num_classes + 1, dtype=np.float32)[labels] * confidence


def test_semantic_inference_by_hand():
  # Two queries, classes 0 and 1, each certain, owning the left / right half; a third says "no object".
  logits = _one_hot_logits(np.array([[0, 1, 2]]), 2)
  masks = np.full((1, 3, 2, 4), -10.0, np.float32)
  masks[0, 0, :, :2] = masks[0, 1, :, 2:] = 10.0
  masks[0, 2] = 10.0
  result = jax.jit(functools.partial(maskformer_inference.semantic_inference, output_size=(4, 8)))(logits, masks)
  assert result["scores"].shape == (1, 4, 8, 2) and result["labels"].dtype == jnp.int32
  np.testing.assert_array_equal(result["labels"][0], np.repeat([[0] * 4 + [1] * 4], 4, axis=0))


def test_panoptic_inference_by_hand():
  # Queries: 0 thing class 0 (left quarter), 1 stuff class 1 (second quarter), 2 stuff class 1 again (right
  # half: fused with query 1), 3 class 0 but unsure (dropped by the threshold), 4 "no object".
  logits = _one_hot_logits(np.array([[0, 1, 1, 0, 2]]), 2)
  logits[0, 3] = 0.0
  masks = np.full((1, 5, 2, 8), -10.0, np.float32)
  masks[0, 0, :, :2] = masks[0, 1, :, 2:4] = masks[0, 2, :, 4:] = masks[0, 3] = masks[0, 4] = 10.0
  run = jax.jit(functools.partial(maskformer_inference.panoptic_inference, label_ids_to_fuse=(1,)))
  result = run(logits, masks)
  expected_ids = np.repeat([[1, 1, 2, 2, 2, 2, 2, 2]], 2, axis=0)
  np.testing.assert_array_equal(result["panoptic"][0, ..., 1], expected_ids)
  np.testing.assert_array_equal(result["panoptic"][0, ..., 0], np.where(expected_ids == 1, 0, 1))
  np.testing.assert_array_equal(result["segment_ids"][0], [1, 2, 2, 0, 0])
  info = maskformer_inference.segments_info(result)[0]
  assert [(s["id"], s["label_id"], s["was_fused"]) for s in info] == [(1, 0, False), (2, 1, True), (2, 1, True)]
  # Without fusing, query 2 is a segment of its own; with nothing confident, there are none.
  np.testing.assert_array_equal(maskformer_inference.panoptic_inference(logits, masks)["segment_ids"][0],
                                [1, 2, 3, 0, 0])
  empty = maskformer_inference.panoptic_inference(logits, masks, threshold=0.9999)
  assert (np.asarray(empty["panoptic"][..., 1]) == 0).all() and (np.asarray(empty["panoptic"][..., 0]) == -1).all()


def test_inference_rejects_mismatched_predictions():
  with pytest.raises(ValueError, match=r"pred_logits must be \[B, Q, K \+ 1\]"):
    maskformer_inference.semantic_inference(np.zeros((1, 3, 4)), np.zeros((1, 2, 5, 5)))
  with pytest.raises(ValueError, match=r"label_ids_to_fuse"):
    maskformer_inference.panoptic_inference(np.zeros((1, 3, 4)), np.zeros((1, 3, 5, 5)), label_ids_to_fuse=(-1,))
