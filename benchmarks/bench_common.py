"""What every benchmark script records about the machine it ran on, and how it writes its JSON."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

import torch
import transformers

import blip2_hf


def environment(device: torch.device | str = "cpu", **extra: Any) -> dict[str, Any]:
    """Versions, threads, machine, the device's name and the 1-min load average before the run (other processes on
    the CPU make every number noisy), plus `extra` fields; printed as one line and returned."""
    device = torch.device(device)
    found = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "blip2_hf": blip2_hf.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        **extra,
        "load_average_1min_before": os.getloadavg()[0],
    }
    print("environment: " + ", ".join(f"{key} {value}" for key, value in found.items()), flush=True)
    return found


def write_json(path: Path, report: dict[str, Any]) -> None:
    """`report` as indented JSON at `path` (folders made), and say where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
