"""Object detectors: DETR (with its transformer and sine position encoding), Faster / Mask R-CNN, RetinaNet,
YOLOv1, YOLACT; their shared backbone, FPN and one-stage anchor pyramid."""

from cvjax.models.detection import (backbone, detr, fpn, one_stage, position_encoding, rcnn,  # noqa: F401
                                    retinanet, transformer, yolact, yolo)

MODULES = ("backbone", "detr", "fpn", "one_stage", "position_encoding", "rcnn", "retinanet", "transformer",
           "yolact", "yolo")
