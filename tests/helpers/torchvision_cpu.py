"""``import_torchvision()``: torchvision as the tests' reference, also where its wheel expects CUDA.

The registry's ``torchvision==0.28.0`` wheel is linked against CUDA libraries, so next to the CPU build of
``torch==2.13.0`` a plain ``import torchvision`` fails ("libc10_cuda.so: cannot open shared object file" or
"operator torchvision::nms does not exist"), and so does every ``transformers`` model that imports it. When the
plain import fails, this module builds (once, with gcc and nm, cached in ``~/.cache/cvjax_tv_cpu``) a stub
``libc10_cuda.so`` whose CUDA symbols abort with their name if ever called and an empty ``libtorch_cuda.so``,
preloads them with torchvision's bundled ``libcudart``, and imports torchvision again: its CPU kernels
(``torchvision.ops``) and ``torchvision.models`` then work as usual. A normal torch + torchvision install is
imported as it is.

Only tests and benchmarks use this (``tests/conftest.py`` and ``benchmarks/_torch_imports.py`` call it before
anything imports ``transformers``); cvjax itself never imports torchvision.
"""

from __future__ import annotations

import ctypes
import glob
import importlib
import os
import subprocess
import sys
import sysconfig
from typing import Optional

_CUDA_SYMBOL_PREFIXES = ("_ZN3c104cuda", "_ZNK3c104cuda", "_ZN2at4cuda", "_ZNK2at4cuda")


def _forget_torchvision() -> None:
  for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
    del sys.modules[name]


def _build_stubs(package_dir: str, cache_dir: str) -> tuple[str, str]:
  """The two stub libraries for the CUDA symbols torchvision's extensions import; built once."""
  c10_cuda = os.path.join(cache_dir, "libc10_cuda.so")
  torch_cuda = os.path.join(cache_dir, "libtorch_cuda.so")
  if os.path.exists(c10_cuda) and os.path.exists(torch_cuda):
    return c10_cuda, torch_cuda
  os.makedirs(cache_dir, exist_ok=True)
  extensions = [p for p in (os.path.join(package_dir, "_C.so"), os.path.join(package_dir, "image.so"))
                if os.path.exists(p)]
  listing = subprocess.run(["nm", "-D", "--undefined-only", *extensions], capture_output=True, text=True,
                           check=True).stdout
  symbols = sorted({line.split()[-1] for line in listing.splitlines()
                    if line.strip().startswith("U ") and line.split()[-1].startswith(_CUDA_SYMBOL_PREFIXES)})
  source = ["#include <stdio.h>", "#include <stdlib.h>",
            'static void die(const char *s) { fprintf(stderr, "CUDA symbol %s called on a CPU build\\n", s); '
            "abort(); }"]
  for i, symbol in enumerate(symbols):
    if symbol.endswith("allocatorE"):  # a data symbol (the CUDA allocator pointer), not a function
      source.append(f'void *d{i} __asm__("{symbol}") = 0;')
    else:
      source.append(f'void f{i}(void) __asm__("{symbol}"); void f{i}(void) {{ die("{symbol}"); }}')
  c_file = os.path.join(cache_dir, "stubs.c")
  with open(c_file, "w") as f:
    f.write("\n".join(source) + "\n")
  subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libc10_cuda.so", "-o", c10_cuda, c_file], check=True)
  subprocess.run(["gcc", "-shared", "-fPIC", "-x", "c", "-Wl,-soname,libtorch_cuda.so", "-o", torch_cuda,
                  "/dev/null"], check=True)
  return c10_cuda, torch_cuda


def import_torchvision() -> Optional[object]:
  """torchvision, made importable on a CPU-only torch if needed; None when it is not installed or the stubs
  cannot be built (no gcc): the tests that need it are then skipped, and transformers stays importable."""
  try:
    return importlib.import_module("torchvision")
  except ModuleNotFoundError:
    return None
  except (OSError, RuntimeError, ImportError):
    _forget_torchvision()
  try:
    import torch  # noqa: F401  (loads libc10 / libtorch_cpu into the process first)
    purelib = sysconfig.get_paths()["purelib"]
    stubs = _build_stubs(os.path.join(purelib, "torchvision"),
                         os.path.join(os.path.expanduser("~"), ".cache", "cvjax_tv_cpu"))
    for library in glob.glob(os.path.join(purelib, "torchvision.libs", "libcudart*.so*")) + list(stubs):
      ctypes.CDLL(library, mode=ctypes.RTLD_GLOBAL)
    return importlib.import_module("torchvision")
  except (OSError, RuntimeError, ImportError, subprocess.CalledProcessError):
    _forget_torchvision()
    # transformers checks for the package, not whether it imports: hide it so its models still load.
    sys.modules["torchvision"] = None
    return None
