"""Devices and data layout: multi-host start-up, the Mesh, parameter and batch shardings."""

from __future__ import annotations

import os
from typing import Any, Callable, Dict, Optional

import jax
import ml_collections
import numpy as np
from absl import logging
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


def global_batch(mesh: Mesh, local_batch: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
  """Assembles this process's slice of the batch into global arrays sharded over 'data'.

  No collective runs here: every process's slice must already have the same shapes. The input pipelines
  guarantee it; detection batches, padded per batch to the smallest fitting bucket in a single process, are
  padded to one per-run shape (the largest bucket) when there are several (``cvjax.data.pipeline``).
  """
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), local_batch)


def jit_with_mesh(fn: Callable, mesh: Mesh, **jit_kwargs) -> Callable:
  """``jax.jit(fn, **jit_kwargs)`` whose tracing sees ``mesh`` as the context mesh
  (``jax.sharding.get_abstract_mesh()``), so that ops inside can place per-example host work by its axes."""

  def traced(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return jax.jit(traced, **jit_kwargs)
