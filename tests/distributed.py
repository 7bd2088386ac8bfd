"""`run_distributed_test`: run a function on N gloo ranks in separate processes (OLMo-core style).

The function must be importable (module level) and picklable arguments only. Each rank gets
RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* set and an initialized gloo process group; an exception on
any rank fails the test with that rank's traceback.

Ranks are forked from `preloaded()`: a fork server that has imported `titan_geonorm.train`'s
launcher once, so a rank starts in the state a fresh trainer process reaches after its imports
(CPU and run patches applied, train specs registered) without paying ~8 s of torch + torchtitan
imports per process. `fresh=True` spawns bare interpreters instead, for tests of the state before
those patches.
"""

import multiprocessing
import os
import socket
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

PRELOAD = ["titan_geonorm.titan.launcher"]


def preloaded() -> multiprocessing.context.BaseContext:
    """The multiprocessing context whose processes fork from the preloaded server."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, kwargs: dict):
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(*args, **kwargs)
        # A rank whose function made no collective could otherwise exit, closing its gloo pairs,
        # while a slower rank is still connecting in init_process_group ("Connection closed by
        # peer"), as seen on the 2-core CI box.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_distributed_test(fn: Callable, world_size: int = 2, *args: Any, fresh: bool = False, **kwargs: Any) -> None:
    if not fresh:
        preloaded()  # sets the preload of the one forkserver that `start_processes` also uses
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), fn, args, kwargs),
        nprocs=world_size,
        start_method="spawn" if fresh else "forkserver",
    )


def parallel_dims(dp_shard: int, tp: int):
    """torchtitan's ParallelDims of this process group for FSDP x TP, with its mesh built."""
    from torchtitan.distributed import ParallelDims

    dims = ParallelDims(
        dp_replicate=1, dp_shard=dp_shard, cp=1, tp=tp, pp=1, ep=1, etp=1, world_size=dist.get_world_size()
    )
    dims.build_mesh()
    return dims


def next_token_loss(model, batch: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Summed next-token loss over `batch` divided by the global token count (torchtitan's scaling)."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="sum") / num_tokens
