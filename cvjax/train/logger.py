"""Where metrics go: ``workdir/metrics.jsonl``, TensorBoard event files and a tqdm progress bar.

Only process 0 writes; other processes get a logger whose methods do nothing, so the loop never branches.
"""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional

import jax
import numpy as np
import tqdm


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricsLogger:
  """``write(step, {'train/loss': ..})`` appends one JSON object per call and the matching TB scalars."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int, progress_bar: bool = True):
    """Appends to ``workdir/metrics.jsonl`` and ``workdir/tensorboard``; the bar counts from ``initial_step``
    (a resumed run) to ``total_steps``."""
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._bar = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    from tensorboardX import SummaryWriter  # deferred: only process 0 needs it
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
    if progress_bar:
      self._bar = tqdm.tqdm(total=total_steps, initial=initial_step, unit="step", dynamic_ncols=True,
                            smoothing=0.1)

  def write(self, step: int, metrics: Dict[str, float]) -> None:
    """One JSONL record ``{'step', 'time', **metrics}`` and a TensorBoard scalar per numeric metric."""
    if not self.enabled:
      return
    record = {"step": int(step), "time": time.time(), **{k: _scalar(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    for k, v in record.items():
      if k not in ("step", "time") and isinstance(v, (int, float)):
        self._tb.add_scalar(k, v, int(step))

  def progress(self, step: int, postfix: Optional[Dict[str, float]] = None) -> None:
    """Moves the progress bar to ``step`` and shows ``postfix`` (loss, steps/s) beside it."""
    if self._bar is None:
      return
    self._bar.update(step - self._bar.n)
    if postfix:
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in postfix.items()}, refresh=False)

  def close(self) -> None:
    """Closes the bar, the TensorBoard writer and the JSONL file."""
    if self._bar is not None:
      self._bar.close()
    if self._tb is not None:
      self._tb.close()
    if self._jsonl is not None:
      self._jsonl.close()
