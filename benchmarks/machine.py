"""What a benchmark ran on, for its JSON: GPU, CPU model and count, Python and package versions."""

from __future__ import annotations

import importlib
import os
import platform
from pathlib import Path
from typing import Any

import torch


def describe(*packages: str) -> dict[str, Any]:
    """The machine, plus `__version__` of each named package (e.g. "ray", "pymatting")."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    info = {
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    info.update({name: importlib.import_module(name).__version__ for name in packages})
    return info
