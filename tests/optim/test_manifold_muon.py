"""ManifoldMuon: single-process behaviour, distributed equivalence, DCP save/load and resharding."""

import copy
import os
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torchtitan.models.llama3 import Transformer, TransformerModelArgs

from tests.distributed import run_distributed_test
from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import StepSettings
from titan_geonorm.optim.manifold_muon import ManifoldMuon

ARGS = TransformerModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128)
STEPS = 3
# fp32; FSDP/TP change reduction order (~1e-7 relative per step) which Newton-Schulz and the dual
# loop amplify mildly over 3 steps.
ATOL = 2e-5


def build_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ARGS)
    with torch.no_grad():
        model.init_weights()
    return model


def batch(step: int) -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(100 + step))


def loss_fn(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens)
    if hasattr(logits, "full_tensor"):
        logits = logits.full_tensor()
    return F.cross_entropy(logits.flatten(0, 1).float(), tokens.roll(-1, 1).flatten())


def train(model: torch.nn.Module, opt: ManifoldMuon, steps: int, start: int = 0, sched=None) -> list[float]:
    losses = []
    for step in range(start, start + steps):
        loss = loss_fn(model, batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        t = p.detach()
        out[name] = (t.full_tensor() if hasattr(t, "full_tensor") else t).clone()
    return out


def config(preset: str, **kw) -> ManifoldMuonConfig:
    return ManifoldMuonConfig(preset=preset, **kw)


# The dual-ascent solvers, which keep a warm-started dual in optimizer state.
DUAL = {"stiefel_solver": "dual_ascent", "dgram_solver": "dual_ascent"}


def reference(preset: str, **kw) -> dict[str, torch.Tensor]:
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config(preset, **kw), lr=1e-3)
    opt.project_()
    train(model, opt, STEPS)
    return full_weights(model)


# ----------------------------------------------------------------------------- single process


def test_step_settings_defaults_are_the_config_defaults():
    # scripts/bench_optimizer.py measures `StepSettings()`: it must be what a default config runs.
    model = build_model()
    assert ManifoldMuon(model.named_parameters(), config("hetero")).settings == StepSettings()
    inv = ManifoldMuon(model.named_parameters(), config("hetero_inv")).settings
    assert inv.dgram_solver == "stiefel_repair" != StepSettings().dgram_solver


README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_defaults(section: str) -> dict[str, str]:
    """`key -> default` from the README's configuration table rows of `section` (a defaults cell
    lists one value per key, any note in parentheses after it)."""
    defaults = {}
    for line in README.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or cells[0] != f"`{section}`":
            continue
        keys = [k.strip("` ") for k in cells[1].split(",")]
        values = [re.sub(r"\s*\(.*\)$", "", v).strip("` ") for v in re.split(r",\s+(?![^(]*\))", cells[2])]
        assert len(keys) == len(values), f"README row {cells[1]!r}: {len(keys)} keys, {len(values)} defaults"
        defaults.update(zip(keys, values))
    return defaults


def _as_readme(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def test_readme_states_the_manifold_muon_defaults():
    # The README's table is what users read; it once listed a DGram retraction that was no
    # longer the default.
    documented = _readme_defaults("[optimizer.manifold_muon]")
    resolved = ManifoldMuonConfig().resolved()
    assert len(documented) >= 20
    for key, text in documented.items():
        value = getattr(resolved, key)
        if isinstance(value, float):
            assert float(text) == value, key
        else:
            assert text == _as_readme(value), key


def test_every_param_in_one_group_and_manifolds_kept():
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero"))
    grouped = [p for g in opt.param_groups for p in g["params"]]
    assert len(grouped) == len(set(map(id, grouped))) == len(list(model.parameters()))
    opt.project_()
    train(model, opt, 2)
    eye = torch.eye(64)
    for i in range(ARGS.n_layers):
        wq = model.layers[str(i)].attention.wq.weight.detach()
        assert (wq.T @ wq - eye).abs().max() < 1e-5
        w1 = model.layers[str(i)].feed_forward.w1.weight.detach()
        gram = w1.T @ w1
        assert (gram - torch.diag(gram.diag())).abs().max() < 1e-5 * gram.diag().max()
    # The closed forms keep no dual.
    assert set(opt.state[model.layers["0"].attention.wq.weight]) == {"momentum_buffer"}
    assert opt.stats["dual_iterations"] == 0 and opt.stats["orth_time_s"] > 0
    assert opt.stats["tangent_violation"] < 1e-6


def test_tangent_violation_stat_is_skipped_when_not_measured():
    measured, skipped = build_model(), build_model()
    opts = [ManifoldMuon(m.named_parameters(), config("hetero")) for m in (measured, skipped)]
    opts[1].measure_violation(False)
    for model, opt in zip((measured, skipped), opts):
        opt.project_()
        train(model, opt, 2)
    assert "tangent_violation" in opts[0].stats and "tangent_violation" not in opts[1].stats
    # The stat only reads the direction: the weights come out bitwise the same.
    for p, q in zip(measured.parameters(), skipped.parameters()):
        assert torch.equal(p, q)
    opts[1].measure_violation(True)
    train(skipped, opts[1], 1, start=2)
    assert opts[1].stats["tangent_violation"] < 1e-6


def test_dual_ascent_keeps_its_warm_start():
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero", dual_steps=3, **DUAL))
    opt.project_()
    train(model, opt, 2)
    state = opt.state[model.layers["0"].attention.wq.weight]
    assert state["dual_step"].item() == 2 and state["dual"].shape == (64, 64)
    assert opt.stats["dual_iterations"] >= 1


def test_paper_preset_settings_and_training():
    cfg = config("paper").resolved()
    assert (cfg.stiefel_solver, cfg.dgram_solver, cfg.dual_tol, cfg.dual_msign_steps) == (
        "dual_ascent",
        "dual_ascent",
        1e-6,
        10,
    )
    assert (cfg.momentum_style, cfg.dual_iterate, cfg.normalize_g, cfg.warm_start, cfg.dgram_metric) == (
        "sum",
        "last",
        False,
        False,
        False,
    )
    assert (cfg.dgram_retraction, cfg.dgram_init, cfg.fused_qkv, cfg.stiefel_retraction) == (
        "svd_rank",
        "singular_values",
        True,
        "msign",
    )
    assert (cfg.muon_scale, cfg.muon_weight_decay, cfg.weight_decay_1d) == ("one", 0.1, False)
    # An explicit key wins over the preset's value.
    assert config("paper", warm_start=True, dual_tol=1e-3).resolved().warm_start is True
    default = config("hetero").resolved()
    assert (default.stiefel_solver, default.dgram_solver) == ("closed_form", "factorized")
    inverse = config("hetero_inv").resolved()
    assert (inverse.dgram_solver, inverse.dgram_retraction) == ("stiefel_repair", "column_quintic")
    assert config("hetero_inv", dgram_solver="factorized").resolved().dgram_solver == "factorized"

    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("paper", dual_steps=3), weight_decay=0.1)
    decay = {g["geometry"] + str(p.ndim): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert decay["adamw1"] == 0.0 and decay["adamw2"] == 0.1
    opt.project_()
    train(model, opt, 2)
    attn = model.layers["0"].attention
    qkv = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]).detach()
    assert (qkv.T @ qkv - torch.eye(64)).abs().max() < 1e-5
    assert "dual" not in opt.state[attn.wq.weight]  # cold start: nothing to keep


def test_sum_momentum_is_the_paper_form():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    opt = ManifoldMuon(
        [("layers.0.attention.wq.weight", w)], config("muon", momentum_style="sum", momentum=0.5, msign_steps=1)
    )
    grads = [torch.randn(8, 4) for _ in range(2)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    buf = 0.5 * grads[0] + grads[1]
    assert torch.allclose(opt.state[w]["momentum_buffer"], buf)


def test_loss_decreases_and_lr_scheduler_scales_groups():
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero"), lr=3e-3)
    opt.project_()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    assert {g["geometry"]: g["lr"] for g in opt.param_groups} == {"adamw": 1.5e-3, "stiefel": 0.01, "dgram": 0.01}
    tokens = batch(0)
    losses = []
    for _ in range(5):
        loss = loss_fn(model, tokens)
        loss.backward()
        opt.step()
        opt.zero_grad()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert opt.stats["retraction_fallbacks"] == 0


def test_fused_qkv_constrains_the_concatenation():
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("all_stiefel", fused_qkv=True, dual_steps=3, **DUAL))
    opt.project_()
    train(model, opt, 2)
    attn = model.layers["1"].attention
    qkv = torch.cat([attn.wq.weight, attn.wk.weight, attn.wv.weight]).detach()  # (128, 64): tall
    assert (qkv.T @ qkv - torch.eye(64)).abs().max() < 1e-5
    assert opt.state[attn.wq.weight]["dual"].shape == (64, 64)
    assert "dual" not in opt.state[attn.wk.weight]


def test_fused_qkv_refuses_split_geometries():
    model = build_model()
    with pytest.raises(ValueError, match=r"fused_qkv.*wv"):
        ManifoldMuon(model.named_parameters(), config("hetero", fused_qkv=True, rules=[r"wv\.weight$=muon"]))


def test_zero_lr_step_only_initializes_state():
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero", **DUAL))
    before = full_weights(model)
    get_optimizer_state_dict(model, opt, options=StateDictOptions(flatten_optimizer_state_dict=True))
    after = full_weights(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert opt.state[model.layers["0"].attention.wq.weight]["dual_step"].item() == 0


def test_muon_weight_decay_and_scale():
    model = build_model()
    w = model.layers["0"].feed_forward.w2.weight  # (64, 256): wide
    kw = dict(muon_weight_decay=0.5, momentum=0.0, nesterov=False, muon_scale="spectral", msign_steps=12)
    opt = ManifoldMuon(model.named_parameters(), config("muon", **kw))
    w0 = w.detach().clone()
    train(model, opt, 1)
    update = (w0 * (1 - 0.02 * 0.5) - w.detach()) / 0.02
    # spectral scale: msign maps the gradient's (rank <= 32 tokens) leading singular values to
    # sqrt(out/in) = 0.5; any weight-decay mistake would leave a component ~ w0 of rank 64.
    sv = torch.linalg.svdvals(update)
    assert torch.allclose(sv[:16], torch.full((16,), 0.5), atol=1e-3)
    assert sv[40:].max() < 1e-3


# ----------------------------------------------------------------------------- distributed


def _parallelize(model: Transformer, mode: str) -> Transformer:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    if mode == "replicated":
        return model
    world = int(os.environ["WORLD_SIZE"])
    tp = {"fsdp": 1, "tp": world, "fsdp_tp": 2}[mode]
    mesh = init_device_mesh("cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))
    if tp > 1:
        plan = {f"attention.{n}": ColwiseParallel() for n in ("wq", "wk", "wv")}
        plan |= {"attention.wo": RowwiseParallel(), "feed_forward.w2": RowwiseParallel()}
        plan |= {f"feed_forward.{n}": ColwiseParallel() for n in ("w1", "w3")}
        for block in model.layers.values():
            parallelize_module(block, mesh["tp"], plan)
    if world // tp > 1:
        for block in model.layers.values():
            fully_shard(block, mesh=mesh["dp"])
        fully_shard(model, mesh=mesh["dp"])
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
    return model


def _equivalence_worker(cases: list[tuple[str, str, dict, dict]]):
    from torch.distributed.tensor.placement_types import _StridedShard

    torch.set_num_threads(1)
    for mode, preset, kw, expected in cases:
        model = _parallelize(build_model(), mode)
        if mode == "fsdp_tp":  # the layout this test exists for
            assert any(isinstance(p, _StridedShard) for p in model.layers["0"].attention.wq.weight.placements)
        opt = ManifoldMuon(model.named_parameters(), config(preset, **kw), lr=1e-3)
        opt.project_()
        train(model, opt, STEPS)
        got = full_weights(model)
        worst = 0.0
        for name, ref in expected.items():
            err = (got[name] - ref).abs().max().item()
            worst = max(worst, err)
            assert err < ATOL, f"{mode} {preset} {kw} {name}: max abs diff {err:.2e}"
        print(f"rank {os.environ['RANK']} {mode} {preset}: max abs weight diff {worst:.2e}")


# Layouts differ from one process by ~1e-7 in the reduced gradients. The closed forms (the default
# solvers, compared at their real settings) are smooth in G. The dual loop is a subgradient method on
# a non-smooth dual (low-rank test gradients make G + 2 W Lambda near-singular), and it amplifies
# that: measured 1e-7 gradient noise -> ~3e-6 weight change at K=3, ~4e-3 at K=20 over 3 steps. So
# for it: K=3 and no early-exit threshold (a threshold can move by one iteration).
EXACT = DUAL | {"dual_tol": 0.0, "dual_steps": 3}
# One spawn per world size (process start-up dominates); every geometry on every layout.
# "replicated": plain tensors on every rank (as under DDP), work still split across ranks.
LAYOUTS = {
    2: [
        ("fsdp", "hetero", {}),
        ("fsdp", "hetero", EXACT),
        ("tp", "hetero_inv", {}),
        ("tp", "hetero_inv", EXACT),
        ("replicated", "muon", {}),
    ],
    4: [
        ("fsdp_tp", "hetero", {}),
        ("fsdp_tp", "hetero", EXACT),
        ("fsdp_tp", "muon", {}),
        ("fsdp_tp", "all_dgram", {"fused_qkv": True}),
        ("fsdp_tp", "all_dgram", EXACT | {"fused_qkv": True}),
    ],
}


@pytest.mark.distributed
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_distributed_equivalence(world):
    cases = [(mode, preset, kw, reference(preset, **kw)) for mode, preset, kw in LAYOUTS[world]]
    run_distributed_test(_equivalence_worker, world, cases)


# ----------------------------------------------------------------------------- checkpointing

FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _save_worker(path: str):
    import torch.distributed.checkpoint as dcp

    torch.set_num_threads(1)
    model = _parallelize(build_model(), "fsdp")
    opt = ManifoldMuon(model.named_parameters(), config("hetero", **DUAL), lr=1e-3)
    opt.project_()
    train(model, opt, 2)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt, options=FLAT)}
    dcp.save(state, checkpoint_id=path)


def _resume(path: str, model: torch.nn.Module) -> ManifoldMuon:
    import torch.distributed.checkpoint as dcp

    opt = ManifoldMuon(model.named_parameters(), config("hetero", **DUAL), lr=1e-3)
    state = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt, options=FLAT)}
    dcp.load(state, checkpoint_id=path)
    model.load_state_dict(state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=FLAT)
    return opt


def test_resume_keeps_lr_schedule_on_every_geometry():
    """`set_optimizer_state_dict` replaces the param-group dicts; the scheduler's later lrs must
    still reach every geometry (a unit holding the old dict kept stepping at the stale lr)."""
    decay = lambda step: 1.0 / (1 + step)  # noqa: E731  (lr changes every step)
    kw = dict(rules=[r"attention\.wo\.weight$=muon"])
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero", **kw), lr=1e-3)
    opt.project_()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, decay)
    assert {g["geometry"] for g in opt.param_groups} == {"adamw", "muon", "stiefel", "dgram"}
    uninterrupted = train(model, opt, 2, start=0, sched=sched)
    saved = copy.deepcopy(
        {
            "model": model.state_dict(),
            "optim": get_optimizer_state_dict(model, opt, options=FLAT),
            "sched": sched.state_dict(),
        }
    )
    uninterrupted += train(model, opt, 3, start=2, sched=sched)

    resumed_model = build_model(seed=1)
    resumed_opt = ManifoldMuon(resumed_model.named_parameters(), config("hetero", **kw), lr=1e-3)
    resumed_opt.project_()
    resumed_sched = torch.optim.lr_scheduler.LambdaLR(resumed_opt, decay)
    resumed_model.load_state_dict(saved["model"])
    set_optimizer_state_dict(resumed_model, resumed_opt, saved["optim"], options=FLAT)
    resumed_sched.load_state_dict(saved["sched"])
    resumed = train(resumed_model, resumed_opt, 3, start=2, sched=resumed_sched)
    assert resumed == pytest.approx(uninterrupted[2:], abs=1e-6)
    weights, expected = full_weights(resumed_model), full_weights(model)
    assert all(torch.allclose(weights[k], expected[k], atol=1e-6) for k in expected)


@pytest.mark.distributed
def test_dcp_resume_2_ranks_to_1_matches_uninterrupted(tmp_path):
    model = build_model()
    opt = ManifoldMuon(model.named_parameters(), config("hetero", **DUAL), lr=1e-3)
    opt.project_()
    uninterrupted = train(model, opt, 4)

    run_distributed_test(_save_worker, 2, str(tmp_path / "ckpt"))
    resumed_model = build_model(seed=1)  # different init: everything must come from the checkpoint
    resumed_opt = _resume(str(tmp_path / "ckpt"), resumed_model)
    w1 = resumed_model.layers["0"].feed_forward.w1.weight
    assert resumed_opt.state[w1]["dual_step"].item() == 2
    assert resumed_opt.state[w1]["dual"].abs().sum() > 0  # the warm start came back
    resumed = train(resumed_model, resumed_opt, 2, start=2)
    assert resumed == pytest.approx(uninterrupted[2:], abs=1e-5)
