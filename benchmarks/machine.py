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


class GpuBusy:
    """GPU 0's utilisation (nvidia-smi's utilization.gpu: the share of each ~100 ms sample in
    which a kernel ran) sampled while the block runs, so that a throughput figure says whether
    the GPU or the host was the limit. `result` is None where nvidia-smi is missing (a CPU run)."""

    def __init__(self, interval_ms: int = 100) -> None:
        self.interval_ms = interval_ms
        self.samples: list[int] = []
        self.result: dict[str, Any] | None = None

    def __enter__(self) -> GpuBusy:
        import shutil
        import subprocess
        import threading

        self._process = None
        if shutil.which("nvidia-smi") is None:
            return self
        query = ["nvidia-smi", "--id=0", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits", f"-lms={self.interval_ms}"]
        self._process = subprocess.Popen(query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._process.stdout:
            if line.strip().isdigit():
                self.samples.append(int(line))

    def __exit__(self, *_: object) -> None:
        if self._process is None:
            return
        self._process.terminate()
        self._process.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.samples:
            self.result = {"mean_pct": round(sum(self.samples) / len(self.samples), 1), "samples": len(self.samples),
                           "below_90_pct_share": round(sum(s < 90 for s in self.samples) / len(self.samples), 3)}
