"""Object detectors: DETR (with its transformer and sine position encoding)."""

from cvjax.models.detection import detr, fpn, position_encoding, rcnn, transformer  # noqa: F401

MODULES = ("detr", "fpn", "position_encoding", "rcnn", "transformer")
