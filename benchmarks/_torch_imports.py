"""Imported by the benchmarks before ``transformers``: makes the CPU-only machine's torchvision importable
(``tests/helpers/torchvision_cpu.py``), since transformers imports torchvision whenever it is installed."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "helpers"))

import torchvision_cpu  # noqa: E402

TORCHVISION = torchvision_cpu.import_torchvision()
