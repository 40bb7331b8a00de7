"""Pure jnp custom ops (no Flax, no state): boxes, matching, NMS (greedy and Fast NMS), RoIAlign/RoIPool, anchors, RPN proposals and
sampling, window attention, losses, and bucketed work on a data-dependent number of rows.

``cvjax.ops.nms``, ``cvjax.ops.roi_align`` and ``cvjax.ops.roi_pool`` are the ops (call them) and also the
modules that define them (``cvjax.ops.nms.batched_nms``). Importing ``cvjax.ops`` needs no scipy: the scipy
matcher backend imports it when it first runs.
"""

from cvjax.ops import nms, roi_align, roi_pool  # noqa: F401  (callable modules)
from cvjax.ops.anchors import base_anchors, grid_anchors, multilevel_anchors  # noqa: F401
from cvjax.ops.buckets import bucket_sizes, map_valid_rows  # noqa: F401
from cvjax.ops.boxes import (box_area, box_convert, box_iou, decode_boxes, elementwise_box_iou,  # noqa: F401
                             elementwise_generalized_box_iou, encode_boxes, generalized_box_iou)
from cvjax.ops.losses import (dice_loss, giou_loss, sigmoid_focal_loss, smooth_l1_loss,  # noqa: F401
                              weighted_softmax_cross_entropy)
from cvjax.ops.matching import linear_sum_assignment, match_sets  # noqa: F401
from cvjax.ops.nms import batched_nms, fast_nms, multiclass_fast_nms  # noqa: F401
from cvjax.ops.proposals import (BELOW_LOW_THRESHOLD, BETWEEN_THRESHOLDS, balanced_sample, match_boxes,  # noqa: F401
                                 sampled_indices, select_proposals)
from cvjax.ops.roi_align import fpn_level_assignment, multiscale_roi_align  # noqa: F401
from cvjax.ops.window_attention import (crop_window_padding, effective_window_and_shift,  # noqa: F401
                                        pad_to_window_multiple, relative_position_index, shifted_window_mask,
                                        window_attention, window_partition, window_reverse)
from cvjax.ops.masks import paste_masks_in_image  # noqa: F401
