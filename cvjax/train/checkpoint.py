"""Checkpoints with orbax: the train state (sharded arrays) plus each process's data-iterator position.

Saves are asynchronous and written to a temporary directory that orbax renames only once complete, so a
process killed mid-save leaves the previous checkpoint as the latest restorable one. Restoring takes the
target shardings of the current run, so a checkpoint written on 8 devices restores on 1 and vice versa.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath


class DataStateHandler(ocp.CheckpointHandler):
  """Saves one JSON file per process: that process's input-iterator state (a JSON-serialisable dict)."""

  @staticmethod
  def _file(directory: epath.Path) -> epath.Path:
    return directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

  def save(self, directory: epath.Path, args: "DataStateSave") -> None:
    """Writes this process's iterator state into the checkpoint's ``data`` directory."""
    self._file(directory).write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: Optional["DataStateRestore"] = None) -> Optional[Dict]:
    """This process's saved iterator state, or None if the checkpoint was written by another process count."""
    path = self._file(directory)
    if not path.exists():
      # Written with a different process count: the model state still restores; the data order restarts.
      return None
    return json.loads(path.read_text())

  def metadata(self, directory: epath.Path) -> None:
    """No metadata beyond the JSON files themselves."""
    return None


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Dict[str, Any]


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


class Checkpointer:
  """A keep-N, async orbax CheckpointManager over ``workdir/checkpoints``."""

  def __init__(self, workdir: str, keep: int, async_save: bool = True):
    self.directory = epath.Path(os.path.abspath(workdir)) / "checkpoints"
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                           enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "data"))

  def latest_step(self) -> Optional[int]:
    """The newest complete checkpoint's step, or None if there is none (half-written saves do not count)."""
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_state: Dict[str, Any]) -> None:
    """Starts saving ``state`` (a pytree of arrays) and this process's ``data_state`` (JSON-serialisable) as
    checkpoint ``step``; returns before the write finishes (``wait`` blocks until it has)."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=DataStateSave(data_state)))

  def restore(self, step: int, abstract_state: Any):
    """Returns ``(state, data_state or None)`` restored onto the shardings in ``abstract_state``."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore()))
    return restored.state, restored.data

  def saved_state_fields(self, step: int) -> list:
    """The top-level keys of checkpoint ``step``'s saved state (the ``TrainState`` field names it has)."""
    metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / "state")
    return list(metadata.item_metadata.tree.keys())

  def wait(self) -> None:
    """Blocks until an in-flight asynchronous save has been committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self.manager.close()
