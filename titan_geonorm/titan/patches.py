"""Every runtime change the plugin makes to torchtitan 0.2.2 or torch, one named function each.

Each function's upstream-ready fix lives in `patches/` (listed in patches/README.md) and has a test
that shows the failure it prevents. Nothing here runs at import; callers apply them:

- CPU-only hosts (`apply_cpu_patches`, by the launcher before torchtitan's first import):
  `patch_device_type` (0001), `patch_cpu_memory_stats` (0002), `patch_gloo_barrier` (0003).
- Every run (`apply_run_patches`, by the launcher): `patch_purge_counts_complete_checkpoints` (0006),
  `patch_save_reports_disk_full` (0007), `patch_final_sleep_only_with_other_ranks` (0009).
- Per model, from the parallelize functions: `force_sum_reduction_on_gloo` (0004),
  `sum_gradients_under_ddp` (0005), `init_shards_like_one_process` (gloo only; no upstream patch:
  a CPU-development workaround).
- Per trainer, from `GeoNormTrainer.__init__` under pipeline parallelism:
  `normalize_pp_loss_before_backward` (0008).

`patch_device_type` must run before the first import of torchtitan: `torchtitan.tools.utils`
computes the device type at import time and other modules copy it by name.
"""

import errno
import logging
import os
import platform
import re
import shutil
import sys
import types

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from titan_geonorm.optim.routing import clean_name

logger = logging.getLogger(__name__)

_cpu_patches_applied = False


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
    barrier.__wrapped__ = original
    dist.barrier = barrier


def apply_cpu_patches() -> bool:
    """Apply every CPU patch if no accelerator is present; return whether they were applied."""
    global _cpu_patches_applied
    if _cpu_patches_applied:
        return True
    if torch.accelerator.is_available():
        return False
    if "torchtitan.tools.utils" in sys.modules:
        from torchtitan.tools import utils

        if utils.device_type != "cpu":
            raise RuntimeError(
                "torchtitan was imported before titan_geonorm could select the CPU device. "
                "On a machine without an accelerator launch with `python -m titan_geonorm.train` "
                "(or call titan_geonorm.titan.patches.apply_cpu_patches() before importing torchtitan)."
            )
    patch_device_type()
    patch_cpu_memory_stats()
    patch_gloo_barrier()
    _cpu_patches_applied = True
    logger.info("No accelerator found: applied titan_geonorm CPU patches (device type cpu, gloo).")
    return True


# Checkpoint retention (0006).
#
# torchtitan 0.2.2 loads the newest `step-N` folder that has its DCP `.metadata` (written last), so
# a save killed mid-write is skipped on restart. Its purge, though, counts every `step-N` folder: a
# partial folder left by the crash takes one of the `keep_latest_k` places, and after a resume with a
# different interval (or a second crash) fewer complete checkpoints survive than were asked for,
# while the partial folder itself stays forever once it is among the newest. Here, `keep_latest_k`
# keeps that many *complete* checkpoints; partial folders older than the newest complete one
# (unloadable leftovers) are deleted; newer ones (an async save still being written) are kept.

_PATCHED = "_titan_geonorm_complete_only"


def is_complete(path: str) -> bool:
    """The markers torchtitan's `_find_load_step` loads by: DCP metadata or an HF index."""
    return os.path.isfile(os.path.join(path, ".metadata")) or os.path.isfile(
        os.path.join(path, "model.safetensors.index.json")
    )


def checkpoint_folders(folder: str) -> list[tuple[int, str, bool]]:
    """(step, path, complete) of every `step-N` folder, by step, named as torchtitan matches them."""
    found = []
    for name in os.listdir(folder):
        match = re.search(r"step-(\d+)", name)
        if match:
            path = os.path.join(folder, name)
            found.append((int(match.group(1)), path, is_complete(path)))
    return sorted(found)


def stale_checkpoints(folder: str, keep_latest_k: int) -> list[str]:
    """`step-N` folders to delete so that the newest `keep_latest_k` complete ones remain."""
    found = checkpoint_folders(folder)
    complete = [step for step, _, done in found if done]
    if not complete:
        return []
    oldest_kept = complete[-min(keep_latest_k, len(complete))]
    return [path for step, path, done in found if step < (oldest_kept if done else complete[-1])]


def patch_purge_counts_complete_checkpoints() -> None:
    """Replace `CheckpointManager._purge_stale_checkpoints` by one built on `stale_checkpoints`
    (same guards: `keep_latest_k > 0`, rank 0, folder present, fault-tolerance participant 0)."""
    from torchtitan.components.checkpoint import CheckpointManager

    if getattr(CheckpointManager._purge_stale_checkpoints, _PATCHED, False):
        return

    def _purge_stale_checkpoints(self) -> None:
        if not (self.keep_latest_k > 0 and dist.get_rank() == 0 and os.path.isdir(self.folder)):
            return
        if self.enable_ft_dataloader_checkpoints and not (
            self.ft_manager and self.ft_manager.participating_rank() == 0
        ):
            return
        for path in stale_checkpoints(self.folder, self.keep_latest_k):
            self.purge_queue.put(path)

    setattr(_purge_stale_checkpoints, _PATCHED, True)
    CheckpointManager._purge_stale_checkpoints = _purge_stale_checkpoints


def checkpoint_damage(path: str) -> tuple[str, str] | None:
    """(file, what is wrong) for the first file of the DCP checkpoint `path` that cannot be read
    whole, or None: `.metadata` missing or unreadable, a shard missing or shorter than the byte
    ranges the metadata records for it. Reads the metadata and the shards' sizes, no tensor."""
    from torch.distributed.checkpoint import FileSystemReader

    if not os.path.isfile(os.path.join(path, ".metadata")):
        return ".metadata", "is missing (the save of this step did not finish)"
    try:
        metadata = FileSystemReader(path).read_metadata()
    except Exception as e:  # noqa: BLE001  (whatever unpickling raises, the file is damaged)
        return ".metadata", f"is truncated or unreadable ({type(e).__name__}: {e})"
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return name, "is missing"
        if os.path.getsize(file) < size:
            return name, (
                f"is truncated or unreadable ({os.path.getsize(file)} bytes, the metadata expects at least {size})"
            )
    return None


class CheckpointError(RuntimeError):
    """A checkpoint could not be written; the message names its folder and what to do."""


# Disk full during a save (0007).
#
# DCP writes tensors with `torch.save` into each shard: when the disk fills up, the zip writer
# fails with `[enforce fail at inline_container.cc] . unexpected pos N vs M` (an OSError ENOSPC
# when the write is a plain one), wrapped per rank in a `CheckpointException` that names neither
# the folder nor the cause. The earlier checkpoints are intact (DCP's `.metadata`, written last,
# never appears for the failed step), so the message says so and names the step to resume from.


def _failures(error: BaseException):
    """`error`, its causes and, for DCP's CheckpointException, every rank's failure."""
    from torch.distributed.checkpoint.api import CheckpointException

    seen = []
    pending = [error]
    while pending:
        e = pending.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        pending += [e.__cause__, e.__context__]
        if isinstance(e, CheckpointException):
            pending += [exc for exc, _ in e.failures.values()]
    return seen


def disk_full_cause(error: BaseException) -> BaseException | None:
    """The failure that says a save ran out of space (ENOSPC, or torch's zip writer's short
    write), or None."""
    for e in _failures(error):
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or (
            isinstance(e, RuntimeError) and "unexpected pos" in str(e)
        ):
            return e
    return None


def disk_full_message(checkpoint_id: str, cause: BaseException) -> str:
    folder = os.path.dirname(os.path.abspath(checkpoint_id))
    complete = [path for _, path, done in checkpoint_folders(folder) if done] if os.path.isdir(folder) else []
    kept = f"the newest complete one, {complete[-1]}, is intact" if complete else "no earlier checkpoint exists"
    try:
        free = f"{shutil.disk_usage(folder).free / 2**20:.0f} MiB free"
    except OSError:
        free = "free space unknown"
    return (
        f"checkpoint {checkpoint_id}: the disk is full ({free}; {type(cause).__name__}: "
        f"{str(cause).strip()}); this step was not saved and its partial folder can be deleted, "
        f"{kept}: free space on the disk of {folder} and relaunch to resume"
    )


_DISK_FULL = "_titan_geonorm_disk_full"


def patch_save_reports_disk_full() -> None:
    """Wrap `CheckpointManager.dcp_save` so that a save failing for lack of space raises
    `CheckpointError` naming the step folder (see `disk_full_message`); other errors pass.
    Covers synchronous saves: an async save's failure surfaces later, from its future."""
    from torch.distributed.checkpoint.api import CheckpointException
    from torchtitan.components.checkpoint import CheckpointManager

    original = CheckpointManager.dcp_save
    if getattr(original, _DISK_FULL, False):
        return

    def dcp_save(self, state_dict, checkpoint_id, *args, **kwargs):
        try:
            return original(self, state_dict, checkpoint_id, *args, **kwargs)
        except (Exception, CheckpointException) as e:
            cause = disk_full_cause(e)
            if cause is None:
                raise
            raise CheckpointError(disk_full_message(checkpoint_id, cause)) from e

    setattr(dcp_save, _DISK_FULL, True)
    dcp_save.__wrapped__ = original
    CheckpointManager.dcp_save = dcp_save


def force_sum_reduction_on_gloo(model: nn.Module) -> None:
    """Make FSDP2 reduce with SUM when the default process group is gloo."""
    if not dist.is_initialized() or dist.get_backend() != "gloo":
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_force_sum_reduction_for_comms(True)


def allreduce_sum_hook(process_group, bucket) -> torch.futures.Future[torch.Tensor]:
    work = dist.all_reduce(bucket.buffer(), group=process_group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def sum_gradients_under_ddp(model: nn.Module, parallel_dims) -> None:
    """Replace DDP's averaging gradient all-reduce by a sum (loss is already globally scaled)."""
    if parallel_dims.dp_replicate_enabled and not parallel_dims.fsdp_enabled:
        model.register_comm_hook(None, allreduce_sum_hook)


def init_shards_like_one_process(model: nn.Module, model_cls: type[nn.Module]) -> None:
    """On gloo, make `model.init_weights` give every rank its slice of one full initialization.

    DTensor's random ops only support CUDA-like devices: on CPU each rank fills its local shards
    from its own generator, and since every process starts from the same default seed, all
    ranks draw the same values (TP weights come out rank-deficient, FSDP shards repeat). Here
    every rank initializes a full unsharded copy from rank 0's generator state and keeps its own
    slice (`distribute_tensor(..., src_data_rank=None)` slices locally, no communication), so a
    multi-rank run starts from exactly the weights of a one-process run. Costs one full model
    per rank, which is only acceptable because gloo means a CPU development run.
    """
    if not dist.is_initialized() or dist.get_backend() != "gloo" or dist.get_world_size() == 1:
        return
    init_sharded = model.init_weights

    def init_weights(*args, **kwargs):
        # The generator state a one-process run would init from: taken before the sharded init
        # (which draws less), and rank 0's so that every rank builds the same full copy.
        rng = torch.get_rng_state()
        init_sharded(*args, **kwargs)
        dist.broadcast(rng, src=0)
        torch.set_rng_state(rng)
        with torch.device("meta"):  # as torchtitan builds it: no default-init draws
            full = model_cls(model.model_args)
        full.to_empty(device="cpu")
        full.init_weights()
        reference = full.state_dict()
        with torch.no_grad():
            for name, param in model.named_parameters():
                value = reference[clean_name(name)].to(param.dtype)
                if isinstance(param, DTensor):
                    value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None).to_local()
                    param = param.to_local()
                param.copy_(value)

    model.init_weights = init_weights


class TokenMeanLoss:
    """A summed loss divided by `tokens` while it is set (a training step); the sum otherwise."""

    def __init__(self, loss_fn):
        self.loss_fn = loss_fn
        self.tokens: torch.Tensor | None = None

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        loss = self.loss_fn(pred, labels)
        return loss if self.tokens is None else loss / self.tokens


def normalize_pp_loss_before_backward(trainer) -> None:
    """Give pipeline-parallel training the gradients of the token-mean loss, as without PP.

    torchtitan 0.2.2 backwards each micro-batch's *summed* loss inside the PP schedule
    (`scale_grads=False`) and divides by the step's global token count only afterwards, for the
    logged loss: PP gradients (and grad norm) are `global_valid_tokens` times the non-PP ones
    (pytorch/torchtitan#2972). Clipping then rescales every PP step to `max_norm` while the
    same run without PP clips only some steps, so Adam's moments and the weights drift apart
    after step 1. Here the schedule's loss is divided by the token count during the training
    step (validation, which runs the same schedule, still gets sums), and the returned loss,
    which torchtitan divides once more, is multiplied back.
    """
    loss_fn = TokenMeanLoss(trainer.pp_schedule._loss_fn)
    trainer.pp_schedule._loss_fn = loss_fn
    forward_backward_step = trainer.forward_backward_step

    def normalized_forward_backward_step(*, input_dict, labels, global_valid_tokens):
        loss_fn.tokens = global_valid_tokens
        try:
            loss = forward_backward_step(input_dict=input_dict, labels=labels, global_valid_tokens=global_valid_tokens)
        finally:
            loss_fn.tokens = None
        return loss * global_valid_tokens if trainer.pp_has_last_stage else loss

    trainer.forward_backward_step = normalized_forward_backward_step


class _SleepOnlyWithOtherRanks(types.ModuleType):
    """`time` for torchtitan.train, whose only `time.sleep` is the wait at the end of training."""

    def __init__(self, time_module: types.ModuleType):
        super().__init__(time_module.__name__)
        self.__dict__.update({k: v for k, v in vars(time_module).items() if k != "sleep"})
        self.__wrapped__ = time_module

    def sleep(self, seconds: float) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.__wrapped__.sleep(seconds)


def patch_final_sleep_only_with_other_ranks() -> None:
    """`Trainer.train` ends with rank 0 sleeping 2 s "for other ranks to complete"; in a world of
    one there is no other rank, so the sleep is skipped there (every multi-rank run keeps it)."""
    import torchtitan.train as train_module

    if not isinstance(train_module.time, _SleepOnlyWithOtherRanks):
        train_module.time = _SleepOnlyWithOtherRanks(train_module.time)


def apply_run_patches() -> None:
    """Patches every run needs, accelerator or not (the launcher calls this once)."""
    patch_purge_counts_complete_checkpoints()
    patch_save_reports_disk_full()
    patch_final_sleep_only_with_other_ranks()
