"""Benchmarks: kernels (``bench.kernels``) and whole training steps (``bench.memory``).

Every figure is a median, and every ratio is taken against a baseline measured in the same run.
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def time_ms(fn: Callable[[], object], repeats: int = 10, warmup: int = 2) -> float:
    """Median wall time of fn in milliseconds (CUDA synchronised around each call)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_name(device: str | torch.device) -> str:
    """The GPU's name, or the CPU's architecture and thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def save_results(out_dir: Path, stem: str, md: str, payload: dict) -> None:
    """A benchmark's results: ``stem.md`` (the table as printed) and ``stem.json`` (payload)
    in ``out_dir``, created if needed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{stem}.md").write_text(md)
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
