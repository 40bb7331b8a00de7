"""cvjax launcher: ``python launch.py --config=configs/resnet.py[:preset] [--config.key=value ...]``.

Modes: ``train`` (train with periodic eval and checkpoints; resumes from --workdir when it has checkpoints),
``eval`` (evaluate the latest checkpoint in --workdir) and ``explain`` (attention maps of the latest
checkpoint's ViT on the first validation images, as PNGs in --workdir/explain). Multi-host: on TPU pods /
SLURM / Open MPI the cluster is detected; elsewhere pass --coordinator_address, --num_processes and
--process_id to every process.
"""

from __future__ import annotations

import json
import os
import time

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:preset].", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory; default runs/<config>-<preset>-<time>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "explain"], "What to run.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process).")

flags.mark_flags_as_required(["config"])


def default_workdir(config) -> str:
  stamp = time.strftime("%Y%m%d-%H%M%S")
  return os.path.join("runs", f"{config.name or 'experiment'}-{config.preset or 'default'}-{stamp}")


def run(config, workdir: str, mode: str):
  """The launcher's code path without flag parsing (tests call this)."""
  from cvjax.train import trainer  # deferred so that XLA flags set by the caller take effect

  trainer.write_config(config, workdir)
  if config.get("ablation"):
    from cvjax.train.ablation import run_ablation  # each variant in workdir/<variant>/, then table + plot

    return run_ablation(config, workdir, mode)
  if mode == "explain":
    from cvjax.train.explain import explain_latest  # attention PNGs of the latest checkpoint

    return explain_latest(config, workdir)
  if mode == "train":
    return trainer.train_and_evaluate(config, workdir)
  return trainer.evaluate_latest(config, workdir)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from cvjax.train.sharding import initialize_distributed

  initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax

  config = _CONFIG.value
  if _WORKDIR.value is None and jax.process_count() > 1:
    raise app.UsageError("--workdir is required with several processes: they must share one directory")
  workdir = _WORKDIR.value or default_workdir(config)
  if jax.process_index() == 0:
    print(f"config ({config.name}:{config.preset}):\n{config}", flush=True)
    print(f"workdir: {workdir}", flush=True)
  result = run(config, workdir, _MODE.value)
  if jax.process_index() == 0:
    print(json.dumps(result, indent=1, default=str), flush=True)


if __name__ == "__main__":
  logging.set_verbosity(logging.WARNING)
  app.run(main)
