"""Runtime patches that let torchtitan 0.2.2 train on a machine without an accelerator.

torchtitan assumes a CUDA-like device in three places. Each patch is a small named function whose
upstream-ready fix lives in `patches/` (see patches/README.md). `apply_cpu_patches()` applies them
only when torch sees no accelerator; a GPU run goes through none of them.

`patch_device_type` must run before the first import of torchtitan: `torchtitan.tools.utils`
computes the device type at import time and other modules copy it by name.
"""

import logging
import os
import platform
import sys
import types

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

_applied = False


def patch_device_type() -> None:
    """Make torchtitan pick device type "cpu" instead of its fallback "cuda".

    torchtitan's `get_device_info()` is `_get_available_device_type() or "cuda"`; torch returns
    None on a CPU-only machine, so meshes and tensors would be created on "cuda" and fail.
    """
    import torch._utils

    torch._utils._get_available_device_type = lambda: "cpu"


def patch_cpu_memory_stats() -> None:
    """Give `torch.cpu` the CUDA memory-stat functions torchtitan's DeviceMemoryMonitor calls.

    The CPU allocator keeps no statistics; the process's peak resident set size stands in for
    both peak active and peak reserved memory (it cannot be reset), and capacity is the
    machine's physical memory.
    """
    import resource

    def memory_stats(device=None) -> dict:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
        return {"active_bytes.all.peak": peak, "reserved_bytes.all.peak": peak}

    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    props = types.SimpleNamespace(total_memory=total, name=platform.processor() or "cpu")
    defaults = {
        "get_device_name": lambda device=None: props.name,
        "get_device_properties": lambda device=None: props,
        "memory_stats": memory_stats,
        "reset_peak_memory_stats": lambda device=None: None,
        "empty_cache": lambda: None,
    }
    for name, fn in defaults.items():
        if not hasattr(torch.cpu, name):
            setattr(torch.cpu, name, fn)


def patch_gloo_barrier() -> None:
    """Drop `device_ids` from `dist.barrier` when the group's backend is gloo.

    torchtitan calls `barrier(device_ids=[device_module.current_device()])` after step 1 (before
    shortening the process-group timeouts). `torch.cpu.current_device()` is the string "cpu",
    which BarrierOptions rejects with a TypeError; gloo (and the fake backend of dry runs)
    ignores device ids anyway.
    """
    original = dist.barrier
    if getattr(original, "_titan_geonorm_patched", False):
        return

    def barrier(group=None, async_op=False, device_ids=None):
        if device_ids is not None and dist.get_backend(group) in ("gloo", "fake"):
            device_ids = None
        return original(group=group, async_op=async_op, device_ids=device_ids)

    barrier._titan_geonorm_patched = True
    dist.barrier = barrier


def apply_cpu_patches() -> bool:
    """Apply every CPU patch if no accelerator is present; return whether they were applied."""
    global _applied
    if _applied:
        return True
    if torch.accelerator.is_available():
        return False
    if "torchtitan.tools.utils" in sys.modules:
        from torchtitan.tools import utils

        if utils.device_type != "cpu":
            raise RuntimeError(
                "torchtitan was imported before titan_geonorm could select the CPU device. "
                "On a machine without an accelerator launch with `python -m titan_geonorm.train` "
                "(or import titan_geonorm before torchtitan)."
            )
    patch_device_type()
    patch_cpu_memory_stats()
    patch_gloo_barrier()
    _applied = True
    logger.info("No accelerator found: applied titan_geonorm CPU patches (device type cpu, gloo).")
    return True
