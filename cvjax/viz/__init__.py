"""cvjax.viz: drawing to PNG (NumPy + matplotlib, no JAX): attention heatmaps, detections.

It imports nothing of the train loop; ``--mode=explain`` (``cvjax.train.explain``) draws with it.
"""

from cvjax.viz.attention import attention_rollout, cls_attention_maps, save_attention_pngs
from cvjax.viz.detection import draw_detections
from cvjax.viz.image import unnormalize_image

__all__ = ["attention_rollout", "cls_attention_maps", "draw_detections", "save_attention_pngs",
           "unnormalize_image"]
