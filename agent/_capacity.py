"""What the agent may hand out: cores, memory and GPUs, from the machine narrowed by the config.

GPUs are discovered through NVML when no list is configured; no driver means no
GPUs, logged once, never a crash. A declared list is taken as is, which is also
how GPU-less machines and tests exercise GPU scheduling.
"""

from __future__ import annotations

import os

import structlog

from ._config import ResourceConfig
from ._scheduler import Capacity

log = structlog.get_logger("labrun.capacity")


def machine_memory() -> int | None:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def discover_gpus() -> list[str]:
    if not os.path.exists("/proc/driver/nvidia"):
        # No NVIDIA kernel driver: skip loading NVML (and ctypes) altogether.
        log.info("gpus.discovery.skipped", reason="no NVIDIA driver is loaded")
        return []
    try:
        import pynvml
    except ImportError:
        log.info("gpus.discovery.skipped", reason="nvidia-ml-py is not installed")
        return []
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError subclasses differ between driver versions
        log.info("gpus.discovery.skipped", reason=f"no NVIDIA driver: {exc}")
        return []
    try:
        return [str(i) for i in range(pynvml.nvmlDeviceGetCount())]
    finally:
        pynvml.nvmlShutdown()


def discover_capacity(resources: ResourceConfig) -> Capacity:
    cores = sorted(os.sched_getaffinity(0))
    if resources.cpus is not None:
        # More cores than the machine has cannot be pinned; hand them out unpinned.
        cores = cores[: resources.cpus] if resources.cpus <= len(cores) else []
    cpus = resources.cpus if resources.cpus is not None else len(cores)
    memory = resources.memory if resources.memory is not None else machine_memory()
    gpus = resources.gpus if resources.gpus is not None else discover_gpus()
    return Capacity(cpus=cpus, memory=memory, gpus=tuple(gpus), cores=tuple(cores),
                    max_runs=resources.max_concurrent_runs)
