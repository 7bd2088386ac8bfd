"""Each CPU patch: what breaks without it (in a fresh interpreter) and that it fixes it."""

import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

from tests.distributed import run_distributed_test

pytestmark = pytest.mark.skipif(
    torch.accelerator.is_available(), reason="CPU patches only apply without an accelerator"
)


def _python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_device_type_without_patch_is_cuda():
    assert _python("from torchtitan.tools import utils; print(utils.device_type)") == "cuda"


def test_device_type_with_patch_is_cpu():
    code = (
        "from titan_geonorm.titan.patches import patch_device_type; patch_device_type()\n"
        "from torchtitan.tools import utils; print(utils.device_type, utils.device_module.__name__)"
    )
    assert _python(code) == "cpu torch.cpu"


def test_memory_stats_without_patch_fail():
    code = (
        "import torch\n"
        "try:\n    torch.cpu.get_device_name(torch.device('cpu'))\n"
        "except AttributeError:\n    print('missing')"
    )
    assert _python(code) == "missing"


def test_memory_stats_with_patch_report_peak_rss():
    code = (
        "from titan_geonorm.titan.patches import apply_cpu_patches; apply_cpu_patches()\n"
        "from torchtitan.components.metrics import DeviceMemoryMonitor\n"
        "m = DeviceMemoryMonitor('cpu:0'); s = m.get_peak_stats()\n"
        "print(s.max_reserved_gib > 0, m.device_capacity_gib > 1)"
    )
    assert _python(code) == "True True"


def _barrier_with_cpu_device_id(patched: bool) -> None:
    # The test package applies every CPU patch in each rank; the stock barrier is the wrapped one.
    barrier = dist.barrier if patched else dist.barrier.__wrapped__
    if patched:
        barrier(device_ids=[torch.cpu.current_device()])
    else:
        with pytest.raises(TypeError):
            barrier(device_ids=[torch.cpu.current_device()])


def test_gloo_barrier_with_device_ids_raises_without_patch():
    run_distributed_test(_barrier_with_cpu_device_id, 2, False, fresh=True)


def test_gloo_barrier_with_patch():
    run_distributed_test(_barrier_with_cpu_device_id, 2, True, fresh=True)


def test_apply_is_idempotent_and_refuses_late_import():
    code = "import titan_geonorm.titan.patches as c\nprint(c.apply_cpu_patches(), c.apply_cpu_patches())"
    assert _python(code) == "True True"
    late = subprocess.run(
        [sys.executable, "-c", "import torchtitan.tools.utils; import titan_geonorm.train"],
        capture_output=True,
        text=True,
    )
    assert late.returncode != 0
    assert "python -m titan_geonorm.train" in late.stderr
