"""Shared fixtures: the repository root, a session-wide TFDS data_dir, config loading, launcher calls."""

import importlib.util
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Where the generated datasets are prepared, once per session (or reused from CVJAX_TEST_DATA_DIR)."""
  return os.environ.get("CVJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tensorflow_datasets"))


def _load(path: Path, preset: str):
  spec = importlib.util.spec_from_file_location(f"cvjax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


@pytest.fixture(scope="session")
def load_config():
  """``load_config('configs/resnet.py', 'tiny', data_dir=..., **overrides)`` -> locked ConfigDict."""

  def load(relpath: str, preset: str, **overrides):
    config = _load(REPO / relpath, preset)
    for key, value in overrides.items():
      node = config
      *parents, leaf = key.split(".")
      for p in parents:
        node = node[p]
      node[leaf] = value
    return config

  return load


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(scope="session")
def launch_cli():
  """Runs ``python launch.py ARGS`` from the repo root in a fresh process (own XLA flags, own devices)."""

  def run(args, devices: int = 1, env=None, timeout: float = 300, wait: bool = True):
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", **(env or {}))
    cmd = [sys.executable, str(REPO / "launch.py"), *args]
    if not wait:
      return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)

  run.free_port = free_port
  return run
