"""GeoNorm's geodesic step as a native CPU kernel (`csrc/geodesic_step.cpp`), built on first use.

Eager GeoNorm on CPU spent most of a step dispatching ~170 small tensor ops per geodesic step
(docs/benchmarks.md, session 15); the kernel computes what `geonorm._FusedStep` computes, row
statistics, per-row coefficients and both directions' passes over the rows, in one C++ call each
way. It is built with `torch.utils.cpp_extension` (a C++ compiler and ninja; ~15 s once per
machine, cached under `TORCH_EXTENSIONS_DIR`). Where it cannot be built, `geodesic_step` keeps
`_FusedStep` and says so once. CUDA tensors, DTensors and torch.compile never take this path.
"""

import functools
import logging
import os
import pathlib
import sys
import time

import torch

logger = logging.getLogger(__name__)

SOURCE = pathlib.Path(__file__).parent / "csrc" / "geodesic_step.cpp"
_NAME = "titan_geonorm_geodesic_step"

# torch's build lock has no timeout: a process killed mid-build (~15 s) would leave every later
# build waiting forever. One older than this is stale.
STALE_LOCK_S = 600

# `TITAN_GEONORM_CPU_KERNEL=0` keeps the torch ops (`_FusedStep`) on CPU too, e.g. to compare them.
enabled = os.environ.get("TITAN_GEONORM_CPU_KERNEL", "1") != "0"


@functools.cache
def available() -> bool:
    """Build (the first time on a machine) and load the kernel; False, with one warning, if it can't."""
    logger.info("loading GeoNorm's CPU kernel %s (built once per machine, ~15 s)", SOURCE.name)
    from torch.utils import cpp_extension  # imports setuptools: only when a CPU step needs it

    try:
        directory = build_directory(os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root())
        clear_stale_lock(directory)
        cpp_extension.load(
            _NAME,
            sources=[str(SOURCE)],
            build_directory=str(directory),
            extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (RuntimeError, OSError, ImportError) as err:
        logger.warning("GeoNorm's CPU kernel is unavailable (%s); eager CPU steps use torch ops (slower)", err)
        return False
    return True


def build_directory(root: str) -> pathlib.Path:
    """One build per torch and Python version: the library links against both, and torch's own
    default folder would reuse it across a torch upgrade in the same environment."""
    tag = f"torch{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}".replace("+", "_")
    directory = pathlib.Path(root) / f"{_NAME}-{tag}"
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def clear_stale_lock(directory: pathlib.Path) -> None:
    lock = directory / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        logger.warning("removing %s, left %.0f s ago by a build that did not finish", lock, age)
        lock.unlink(missing_ok=True)


def takes(h: torch.Tensor, step, bias) -> bool:
    """Whether `NativeStep` applies: enabled, plain fp32/fp64 CPU rows (at least 1-d), one-element
    step scalars."""
    rows_ok = h.device.type == "cpu" and h.dtype in (torch.float32, torch.float64) and h.dim() >= 1
    scalars_ok = all(not isinstance(x, torch.Tensor) or x.numel() == 1 for x in (step, bias))
    return enabled and rows_ok and scalars_ok and available()


class NativeStep(torch.autograd.Function):
    """`geonorm._FusedStep` in C++, with the decay applied inside: `step` and `bias` are a_k and
    b_k themselves (no tensor op multiplies them by s(k) first). Forward saves h, u and each row's
    statistics and coefficients; backward reads them instead of recomputing."""

    @staticmethod
    def forward(ctx, h, u, step, bias, decay, options):
        args = (
            *(float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (step, bias)),
            float(decay),
            float(options["theta_max"]),
            float(options["theta_base_max"]),
            options["update_map"] == "retraction",
            options["radius"] == "prenorm",
        )
        out, saved = torch.ops.titan_geonorm.geodesic_step_forward(h, u, *args)
        ctx.save_for_backward(h, u, saved)
        ctx.args = args
        ctx.scalars = [(x.shape, x.dtype) if isinstance(x, torch.Tensor) else None for x in (step, bias)]
        return out

    @staticmethod
    def backward(ctx, g):
        h, u, saved = ctx.saved_tensors
        grad_h, grad_u, *sums = torch.ops.titan_geonorm.geodesic_step_backward(g, h, u, saved, *ctx.args)
        scalar_grads = [
            _like(grad, meta) if meta is not None and needed else None
            for grad, meta, needed in zip(sums, ctx.scalars, ctx.needs_input_grad[2:4])
        ]
        return grad_h, grad_u, *scalar_grads, None, None


def _like(grad: torch.Tensor, meta: tuple[torch.Size, torch.dtype]) -> torch.Tensor:
    """The kernel's (1,)-shaped sum in its scalar's shape and dtype (no op when they agree)."""
    shape, dtype = meta
    return grad if grad.shape == shape and grad.dtype == dtype else grad.reshape(shape).to(dtype)
