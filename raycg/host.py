"""What machine a run ran on: recorded with its results, so a report can say what ran where.

    describe_host()      {"cpus": 16, "cpu_model": "...", "memory_gib": 125.8, "gpus": ["NVIDIA H100 80GB HBM3"],
                          "system": "Linux 6.8", "python": "3.12.3", "torch": "2.11.0", "ray": "2.60.0",
                          "numpy": "2.4.6", "pyarrow": "26.0.1"}
    host_line(d)         "16 cores (...), 126 GiB RAM, 1 GPU (NVIDIA H100 80GB HBM3); Linux 6.8; Python ..."
    device_name(device)  "NVIDIA H100 80GB HBM3" for a CUDA device, "cpu" for the CPU (a training worker's)

Only the local node is described: on a cluster the training workers' devices come from the
workers themselves (`device_name`, reported with each epoch's metrics).
"""
from __future__ import annotations

import os
import platform
import subprocess


def describe_host() -> dict:
    """This machine: cores, CPU model, memory, its GPUs (all of the host's, not only the ones a
    process sees), OS and library versions."""
    import numpy
    import pyarrow
    import ray
    import torch

    cpu_model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        memory_gib = None
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model,
            "memory_gib": round(memory_gib, 1) if memory_gib else None, "gpus": host_gpus(),
            "system": f"{platform.system()} {platform.release()}", "python": platform.python_version(),
            "torch": torch.__version__, "ray": ray.__version__,
            # numpy too: one seed's simulated events differed slightly between two machines (docs/simulator.md)
            "numpy": numpy.__version__, "pyarrow": pyarrow.__version__}


def host_gpus() -> list[str]:
    """The names of this host's GPUs. nvidia-smi first: asking torch would start CUDA in this
    process (a context on the GPU for the rest of its life, e.g. a report's driver)."""
    import torch

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0:
            return [line.strip() for line in out.stdout.splitlines() if line.strip()]
    except (OSError, subprocess.TimeoutExpired):
        pass
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return []


def host_line(d: dict) -> str:
    """One line for a document: `describe_host()`'s dict in words."""
    mem = f"{d['memory_gib']:.0f} GiB RAM" if d.get("memory_gib") else "memory unknown"
    gpus = d.get("gpus") or []
    if not gpus:
        gpu = "no GPU"
    elif len(set(gpus)) == 1:
        gpu = f"{len(gpus)} GPU{'s' if len(gpus) > 1 else ''} ({gpus[0]})"
    else:
        gpu = f"{len(gpus)} GPUs ({', '.join(gpus)})"
    return (f"{d['cpus']} cores ({d['cpu_model']}), {mem}, {gpu}; {d['system']}; Python {d['python']}, "
            f"torch {d['torch']}, Ray {d['ray']}")


def device_name(device) -> str:
    """A training device in words: the CUDA card's name, or "cpu"."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
