"""What machine a result was measured on: one dict to store beside results, one line to print.

Used by every command that writes measurements (bench, lra, distill).
"""

from __future__ import annotations

import datetime
import os
import platform

import torch

__all__ = [
    "ALLOCATOR_VARIABLES",
    "allocator_settings",
    "machine_info",
    "machine_label",
    "report_header",
]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


#: Environment variables that change how host memory is allocated, and with it CPU times:
#: glibc's ``MALLOC_*`` tunables, a preloaded allocator (tcmalloc, jemalloc and its
#: ``MALLOC_CONF``), tcmalloc's own and torch's transparent-huge-page switch.
ALLOCATOR_VARIABLES = ("LD_PRELOAD", "MALLOC_", "TCMALLOC_", "THP_MEM_ALLOC_ENABLE")


def allocator_settings(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The allocator variables (see :data:`ALLOCATOR_VARIABLES`) set in ``environ`` (default:
    this process's environment); empty under the C library's defaults."""
    environ = os.environ if environ is None else environ
    return {
        key: value
        for key, value in sorted(environ.items())
        if any(key == v or (v.endswith("_") and key.startswith(v)) for v in ALLOCATOR_VARIABLES)
    }


def machine_info(device: str = "cpu", threads: int | None = None) -> dict:
    """CPU model, cores, torch threads, torch version and device name, for labelling results;
    ``allocator`` holds the allocator variables when any is set."""
    info = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "threads": threads if threads is not None else torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": device,
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    if settings := allocator_settings():
        info["allocator"] = settings
    return info


def machine_label(info: dict) -> str:
    """One line: ``AMD EPYC (2 cores), 2 torch threads, torch 2.x, device cpu``, followed by
    ``, allocator K=V …`` when allocator variables were set (they change CPU times:
    docs/benchmarks.md, "Allocator")."""
    where = info["device"] if "gpu" not in info else f"{info['device']} ({info['gpu']})"
    label = (
        f"{info['cpu']} ({info['cpu_count']} cores), {info['threads']} torch threads, "
        f"torch {info['torch']}, device {where}"
    )
    if info.get("allocator"):
        label += ", allocator " + " ".join(f"{k}={v}" for k, v in info["allocator"].items())
    return label


def report_header(
    benchmark: str, command: str, device: str = "cpu", threads: int | None = None
) -> dict:
    """The fields a benchmark report starts with: which benchmark, the command that ran it,
    today's date, and the machine (:func:`machine_info` and its :func:`machine_label`)."""
    machine = machine_info(device, threads)
    return {
        "benchmark": benchmark,
        "command": command,
        "date": datetime.date.today().isoformat(),
        "machine": machine,
        "machine_label": machine_label(machine),
    }
