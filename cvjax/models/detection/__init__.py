"""Object detectors: DETR (with its transformer and sine position encoding), Faster / Mask R-CNN, RetinaNet, YOLOv1;
their shared backbone and FPN."""

from cvjax.models.detection import (backbone, detr, fpn, position_encoding, rcnn, retinanet,  # noqa: F401
                                    transformer, yolo)

MODULES = ("backbone", "detr", "fpn", "position_encoding", "rcnn", "retinanet", "transformer", "yolo")
