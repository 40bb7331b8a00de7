"""Object detectors: DETR (with its transformer and sine position encoding)."""

from cvjax.models.detection import detr, position_encoding, transformer  # noqa: F401

MODULES = ("detr", "position_encoding", "transformer")
