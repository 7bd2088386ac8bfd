"""The native CPU kernel of the geodesic step: routing, fp32 agreement, threads, fallback, errors.

Its float64 agreement with the autograd ops over every option is
`tests/test_geonorm.py::test_fused_backward_matches_autograd[...-native]`.
"""

import logging
import math
import os
import pathlib
import time
import tomllib

import pytest
import torch

from titan_geonorm import geodesic_kernel, geonorm
from titan_geonorm.geonorm import GeodesicStep, geodesic_step

DEFAULTS = dict(theta_max=math.pi / 4, update_map="exp", theta_base_max=math.pi / 4, radius="prenorm")


def _rows(shape=(3, 40, 48), seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(*shape, generator=gen) * 2
    u = torch.randn(*shape, generator=gen) * torch.logspace(-3, 1, shape[-2]).unsqueeze(-1)
    return h, u, torch.randn(*shape, generator=gen)


def _native(h, u, a, b):
    return geodesic_kernel.NativeStep.apply(h, u, a, b, 0.5, DEFAULTS)


def _autograd(h, u, a, b):
    return geonorm._autograd_step(h, u, a * 0.5, b * 0.5, DEFAULTS)


def _step_and_grads(step_fn, h, u, g, a, b):
    """`step_fn` with decay 0.5 on (h, u, a, b), and the gradients of all four."""
    leaves = [x.clone().requires_grad_() for x in (h, u, a, b)]
    out = step_fn(*leaves)
    return out, torch.autograd.grad((out * g).sum(), leaves)


def test_the_kernel_builds_here():
    """CI builds it (a C++ compiler and ninja are part of the set-up), so every eager CPU test of
    GeoNorm below and elsewhere runs the kernel."""
    assert geodesic_kernel.available()


def test_fp32_matches_the_autograd_ops_on_batched_non_contiguous_rows():
    h, u, g = _rows()
    h = h.transpose(0, 1).contiguous().transpose(0, 1)  # same values, not contiguous
    a, b = torch.tensor([0.9]), torch.tensor([0.03])
    out_n, grads_n = _step_and_grads(_native, h, u, g, a, b)
    out_64, grads_64 = _step_and_grads(_autograd, *(x.double() for x in (h, u, g)), a.double(), b.double())
    assert out_n.dtype == torch.float32 and out_n.shape == h.shape
    torch.testing.assert_close(out_n, out_64.float(), rtol=1e-5, atol=1e-5)
    for gn, g64 in zip(grads_n, grads_64):
        # The kernel sums in double: as close to float64 as fp32 storage allows.
        torch.testing.assert_close(gn.double(), g64, rtol=1e-4, atol=1e-4)


def test_step_sums_do_not_depend_on_the_thread_count():
    h, u, g = _rows(shape=(8, 512, 16))
    a, b = torch.tensor([0.9]), torch.tensor([0.03])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_step_and_grads(_native, h, u, g, a, b))
    finally:
        torch.set_num_threads(threads)
    (out1, grads1), (out2, grads2) = results
    assert torch.equal(out1, out2)
    assert all(torch.equal(x, y) for x, y in zip(grads1, grads2))


def test_eager_cpu_steps_take_the_kernel_unless_disabled(monkeypatch):
    h, u, _ = _rows()
    step = GeodesicStep(0.5, learnable_bias=True, radius="prenorm", theta_base_max=math.pi / 4)
    assert step(h, u).grad_fn.name() == "NativeStepBackward"
    monkeypatch.setattr(geodesic_kernel, "enabled", False)
    assert step(h, u).grad_fn.name() == "_FusedStepBackward"


def test_a_0d_state_keeps_the_torch_ops():
    h, u, _ = _rows()
    out = geodesic_step(h[0, 0, 0].requires_grad_(), u[0, 0, 0], 0.7, **DEFAULTS)
    assert out.grad_fn.name() == "_FusedStepBackward"


def test_bf16_rows_run_the_kernel_in_fp32():
    h, u, _ = _rows()
    out = geodesic_step(h.bfloat16(), u.bfloat16(), 0.7, **DEFAULTS)
    assert out.dtype == torch.bfloat16
    expected = geonorm._autograd_step(h.bfloat16().float(), u.bfloat16().float(), 0.7, 0.0, DEFAULTS)
    torch.testing.assert_close(out, expected.bfloat16())


@pytest.fixture
def fresh_load(monkeypatch):
    """Afterwards the test's patches are undone and the real kernel loads again (a test clears
    `available`'s cache itself once its patches are in place)."""
    yield
    monkeypatch.undo()
    geodesic_kernel.available.cache_clear()
    assert geodesic_kernel.available()


def test_a_failed_build_falls_back_to_torch_ops_with_one_warning(monkeypatch, caplog, fresh_load):
    """No compiler (or ninja): one warning naming the cause, then the same numbers from `_FusedStep`."""
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Ninja is required to load C++ extensions")

    h, u, _ = _rows()
    expected = geodesic_step(h, u, 0.7, **DEFAULTS)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    geodesic_kernel.available.cache_clear()
    with caplog.at_level(logging.WARNING, logger=geodesic_kernel.__name__):
        out = geodesic_step(h.requires_grad_(), u, 0.7, **DEFAULTS)
        geodesic_step(h, u, 0.7, **DEFAULTS)
    assert out.grad_fn.name() == "_FusedStepBackward"
    torch.testing.assert_close(out, expected)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "Ninja is required" in warnings[0]


def test_the_build_goes_under_torch_extensions_dir(monkeypatch, tmp_path, fresh_load):
    """As torch's own JIT extensions do (`load` is stubbed: where it would build is the question)."""
    from torch.utils import cpp_extension

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folders = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, build_directory, **k: folders.append(build_directory))
    geodesic_kernel.available.cache_clear()
    assert geodesic_kernel.available()
    assert folders == [str(geodesic_kernel.build_directory(str(tmp_path)))]


def test_mismatched_rows_are_refused_by_name():
    h, u, g = _rows()
    args = (0.5, 0.0, 1.0, 1.0, math.inf, False, True)
    with pytest.raises(RuntimeError, match="u has shape"):
        torch.ops.titan_geonorm.geodesic_step_forward(h, u[:, :-1], *args)
    with pytest.raises(RuntimeError, match="u and h differ in dtype"):
        torch.ops.titan_geonorm.geodesic_step_forward(h, u.double(), *args)
    with pytest.raises(RuntimeError, match="must have a row dimension"):
        torch.ops.titan_geonorm.geodesic_step_forward(h[0, 0, 0], u[0, 0, 0], *args)
    with pytest.raises(RuntimeError, match="bad saved rows"):
        torch.ops.titan_geonorm.geodesic_step_backward(g, h, u, torch.zeros(3, dtype=torch.float64), *args)
    _, saved = torch.ops.titan_geonorm.geodesic_step_forward(h, u, *args)
    with pytest.raises(RuntimeError, match="bad saved rows"):  # another step's rows
        torch.ops.titan_geonorm.geodesic_step_backward(g[:, :-1], h[:, :-1], u[:, :-1], saved, *args)


def test_the_kernel_source_ships_with_the_package():
    """A wheel carries only what `package-data` names: without the .cpp an installed package could
    never build its kernel."""
    root = pathlib.Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    relative = geodesic_kernel.SOURCE.relative_to(root / "titan_geonorm")
    assert any(relative.match(p) for p in patterns["titan_geonorm"])


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, caplog):
    """torch waits forever on its build lock; a lock older than any build is a killed build's."""
    directory = geodesic_kernel.build_directory(str(tmp_path))
    assert directory.parent == tmp_path and torch.__version__.replace("+", "_") in directory.name
    lock = directory / "lock"
    lock.touch()
    geodesic_kernel.clear_stale_lock(directory)
    assert lock.exists()
    old = time.time() - geodesic_kernel.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with caplog.at_level(logging.WARNING, logger=geodesic_kernel.__name__):
        geodesic_kernel.clear_stale_lock(directory)
    assert not lock.exists() and "did not finish" in caplog.text
    geodesic_kernel.clear_stale_lock(directory)  # no lock: nothing to do
