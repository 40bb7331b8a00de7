"""Devices and data layout: multi-host start-up, the Mesh, parameter and batch shardings."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# Environment variables that mean "this process is one of several": JAX's own cluster detection then fills in
# the coordinator, process count and id (TPU pods, SLURM, Open MPI, Kubernetes/GKE).
_CLUSTER_ENV = ("TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "OMPI_COMM_WORLD_SIZE", "JOBSET_NAME")


def initialize_distributed(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
                           process_id: Optional[int] = None) -> None:
  """Calls ``jax.distributed.initialize`` when this is a multi-process run.

  Explicit arguments win (e.g. several processes on one machine, or a GPU cluster without a scheduler);
  otherwise a known cluster environment triggers JAX's automatic detection. Single-process runs skip it.
  On CPU, cross-process collectives need gloo.
  """
  explicit = coordinator_address is not None
  detected = any(k in os.environ for k in _CLUSTER_ENV) and not (
      os.environ.get("SLURM_NTASKS", "2") == "1" or os.environ.get("OMPI_COMM_WORLD_SIZE", "2") == "1")
  if not (explicit or detected):
    return
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())


def create_mesh(mesh_config: ml_collections.ConfigDict) -> Mesh:
  """A ('data', 'model') Mesh over all devices; ``data=-1`` takes whatever the model axis leaves."""
  n = jax.device_count()
  model = int(mesh_config.model)
  data = int(mesh_config.data)
  if data == -1:
    if model < 1 or n % model:
      raise ValueError(f"config.mesh.model={model} must be >= 1 and divide the device count {n}")
    data = n // model
  if data * model != n:
    raise ValueError(f"config.mesh data={data} x model={model} must equal the device count {n}")
  return jax.make_mesh((data, model), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def parameter_sharding(mesh: Mesh, abstract_tree: Any, min_size: int = 2 ** 16) -> Any:
  """Replicates everything, except that with a 'model' axis > 1 large kernels have their last (output)
  dimension split over it when divisible; XLA's SPMD partitioner inserts the collectives."""
  model = mesh.shape["model"]

  def spec(leaf) -> NamedSharding:
    shape = getattr(leaf, "shape", ())
    if model > 1 and len(shape) >= 2 and np.prod(shape) >= min_size and shape[-1] % model == 0:
      return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), "model"))
    return NamedSharding(mesh, P())

  return jax.tree.map(spec, abstract_tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data', replicated over 'model'."""
  return NamedSharding(mesh, P("data"))


def pad_images(local_batch: Dict[str, np.ndarray], height: int, width: int) -> Dict[str, np.ndarray]:
  """Zero-pads (bottom/right) every array whose axes 1 and 2 are the ``pixel_mask``'s (H, W) to height x width.

  That is ``image [B, H, W, C]`` and ``pixel_mask [B, H, W]`` (False on the new pixels, so models see
  padding); other keys are untouched. ``height``/``width`` must be at least H/W.
  """
  h, w = local_batch["pixel_mask"].shape[1:3]
  if (h, w) == (height, width):
    return local_batch

  def pad(x):
    if x.ndim < 3 or x.shape[1:3] != (h, w):
      return x
    return np.pad(x, [(0, 0), (0, height - h), (0, width - w)] + [(0, 0)] * (x.ndim - 3))

  return {key: pad(value) for key, value in local_batch.items()}


def agree_on_image_size(local_batch: Dict[str, np.ndarray]) -> Dict[str, np.ndarray]:
  """Pads this process's images to the element-wise max (H, W) over processes (a tiny allgather).

  Detection batches are padded per process to the smallest bucket that fits them (cvjax.data.batching), so
  processes can differ, but one global array needs one shape. Bucket sets are closed under the element-wise
  max, so the agreed shape is again a bucket and no new shape (recompilation) appears.
  """
  local = np.asarray(local_batch["pixel_mask"].shape[1:3], np.int32)
  height, width = np.asarray(multihost_utils.process_allgather(local)).reshape(-1, 2).max(axis=0)
  return pad_images(local_batch, int(height), int(width))


def global_batch(mesh: Mesh, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays sharded over 'data'.

  With several processes, batches with a ``pixel_mask`` are first padded to one image size
  (``agree_on_image_size``); a single process uses its batch as it is.
  """
  if jax.process_count() > 1 and "pixel_mask" in local_batch:
    local_batch = agree_on_image_size(local_batch)
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)
