"""Shared fixtures: the repository root, a session-wide TFDS data_dir, config loading, launcher calls."""

import atexit
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Test speed only, set before jax creates its CPU backend: LLVM's optimisation of the XLA:CPU kernels is most of
# a small model's compile time (a tiny Mask R-CNN train step compiles in 24 s, 16 s at level 0), and the suite
# compiles hundreds of programs that each run a few times on tiny inputs. The kernels compute the same
# operations (agreeing to float rounding); the processes the tests launch get the flag too (``XLA_FLAGS``).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision_cpu import import_torchvision  # noqa: E402

# Before any test module imports transformers, which imports torchvision whenever it is installed.
TORCHVISION = import_torchvision()

# Test speed only: XLA:CPU compiles the default partitionable threefry random bits 2-10x slower (a tiny DETR's
# init: 10 s against 4.5 s), and every model init in the suite is compiled once. Both modes give values that
# do not depend on sharding; runs outside the tests keep JAX's default. Launched processes get the same setting.
os.environ["JAX_THREEFRY_PARTITIONABLE"] = "false"
jax.config.update("jax_threefry_partitionable", False)  # in case jax was imported before this file

# Test speed only: one persistent XLA compilation cache per session, shared by the tests and the processes they
# launch. Many tests compile the same program (a tiny preset's train step, run again to resume, on another
# device count, ...); its key is the program, the compile options and the devices, so a hit is that program.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="cvjax-test-xla-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
for _key, _value in (("jax_compilation_cache_dir", _COMPILATION_CACHE),
                     ("jax_persistent_cache_min_compile_time_secs", 0),
                     ("jax_persistent_cache_min_entry_size_bytes", 0)):
  os.environ[_key.upper()] = str(_value)
  jax.config.update(_key, _value)

from cvjax.train.config import load_config_file  # noqa: E402  (after torchvision: cvjax imports its converters)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def torchvision():
  """The torchvision module (the reference for ops and models); skips the test where it cannot be imported."""
  if TORCHVISION is None:
    pytest.skip("torchvision is not importable here: pip install torchvision==0.28.0 (the [test] extra)")
  return TORCHVISION


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
  """Where the generated datasets are prepared, once per session (or reused from CVJAX_TEST_DATA_DIR)."""
  return os.environ.get("CVJAX_TEST_DATA_DIR") or str(tmp_path_factory.mktemp("tensorflow_datasets"))


@pytest.fixture(scope="session")
def load_config():
  """``load_config('configs/resnet.py', 'tiny', data_dir=..., **overrides)`` -> locked ConfigDict."""

  def load(relpath: str, preset: str, **overrides):
    config = load_config_file(f"{REPO / relpath}:{preset}")
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

  def run(args, devices: int = 1, env=None, timeout: float = 300, wait: bool = True, program=None):
    """``program``: a script run instead of launch.py with the same arguments (a test harness around it)."""
    full_env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1",
                    XLA_FLAGS=f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
                    **(env or {}))
    cmd = [sys.executable, str(REPO / (program or "launch.py")), *args]
    if not wait:
      return subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)

  run.free_port = free_port
  return run


def _encode(array: np.ndarray, file_format: str) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format=file_format)
  return buffer.getvalue()


def _write_coco_folder(root, split: str, images: list, annotations: list, categories: list) -> str:
  """Writes `<root>/<split>/<file>` and `<root>/annotations/instances_<split>.json`; returns str(root).

  `images` holds (image_id, file_name, content): content is a uint8 [H, W, 3] array (saved as PNG or JPEG by
  the file"s extension, with its size in the json) or raw bytes (e.g. a corrupt file; no size in the json).
  `annotations` holds dicts with at least image_id, category_id and bbox; ids are filled in.
  """
  images_dir = os.path.join(root, split)
  os.makedirs(images_dir, exist_ok=True)
  os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
  entries = []
  for image_id, file_name, content in images:
    entry = {"id": image_id, "file_name": file_name}
    if isinstance(content, np.ndarray):
      entry.update(height=content.shape[0], width=content.shape[1])
      content = _encode(content, "JPEG" if file_name.endswith(".jpg") else "PNG")
    with open(os.path.join(images_dir, file_name), "wb") as f:
      f.write(content)
    entries.append(entry)
  instances = {"images": entries, "categories": categories,
               "annotations": [{"id": n + 1, **a} for n, a in enumerate(annotations)]}
  with open(os.path.join(root, "annotations", f"instances_{split}.json"), "w") as f:
    json.dump(instances, f)
  return str(root)


@pytest.fixture(scope="session")
def write_coco_folder():
  """`write_coco_folder(root, split, images, annotations, categories)`: a small COCO-format folder on disk."""
  return _write_coco_folder
