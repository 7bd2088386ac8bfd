"""Geometry diagnostics: values under 2-rank FSDP2 equal direct computations on the gathered model;
off (or off-step) means no hooks."""

import copy
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torchtitan.models.llama3.model.model import apply_rotary_emb  # noqa: I001 (after the plugin)

from tests.distributed import run_distributed_test
from titan_geonorm.diagnostics import Diagnostics, DiagnosticsConfig, build_diagnostics
from titan_geonorm.models.args import VariantModelArgs
from titan_geonorm.models.config import GeoNormConfig
from titan_geonorm.models.model import VariantTransformer

D = "diagnostics/"


def _model(block: str = "pre") -> VariantTransformer:
    torch.manual_seed(0)
    args = VariantModelArgs(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, max_seq_len=16, block=block)
    model = VariantTransformer(args)
    with torch.no_grad():
        model.init_weights()
    return model


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _reference_attention(model, tokens: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per layer: max causal logit and mean softmax entropy (torch.distributions) on `tokens`."""
    inputs = {}
    handles = [
        block.attention.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0].detach()))
        for i, block in enumerate(model.layers.values())
    ]
    with torch.no_grad():
        model(tokens)
    for h in handles:
        h.remove()
    logit_max, entropy = [], []
    seqlen = tokens.shape[1]
    causal = torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    for i, block in enumerate(model.layers.values()):
        attn, x = block.attention, inputs[i]
        q = (x @ attn.wq.weight.T).unflatten(-1, (-1, attn.head_dim))
        k = (x @ attn.wk.weight.T).unflatten(-1, (-1, attn.head_dim))
        q, k = apply_rotary_emb(q, k, model.freqs_cis)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        logits = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
        logit_max.append(logits.masked_select(causal).max().item())
        dist_ = torch.distributions.Categorical(logits=logits.masked_fill(~causal, -torch.inf))
        entropy.append(dist_.entropy().mean().item())
    return logit_max, entropy


def _fsdp_check() -> None:
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _model()
    reference = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (world,))
    for block in model.layers.values():
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM

    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(rank))
    diag = Diagnostics(DiagnosticsConfig(enable=True, freq=3, attention_sequences=1, attention_max_tokens=12), [model])
    fsdp_hooks = _hook_count(model)
    diag.begin(2)
    assert _hook_count(model) == fsdp_hooks, "hooks on a non-diagnostic step"
    diag.begin(3)
    assert _hook_count(model) > fsdp_hooks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    F.cross_entropy(model(tokens).flatten(0, 1), tokens.roll(-1, 1).flatten()).backward()
    diag.after_backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    optimizer.step()
    metrics = diag.end(3)
    assert _hook_count(model) == fsdp_hooks, "hooks left after the diagnostic step"

    # Residual stream: the unsharded model on every rank's tokens.
    all_tokens = [torch.empty_like(tokens) for _ in range(world)]
    dist.all_gather(all_tokens, tokens)
    everything = torch.cat(all_tokens)
    with torch.no_grad():
        h = reference.embed(everything)
        expected = {"embed": h.square().mean().sqrt().item()}
        for i, block in reference.layers.items():
            h = block(h, reference.freqs_cis, attention_masks=None)
            expected[f"L{i}"] = h.square().mean().sqrt().item()
            assert metrics[f"{D}residual_max/L{i}"] == pytest.approx(h.abs().max().item(), rel=1e-5)
    for where, rms in expected.items():
        assert metrics[f"{D}residual_rms/{where}"] == pytest.approx(rms, rel=1e-5), where
    assert metrics[f"{D}residual_growth/L1"] == pytest.approx(expected["L1"] / expected["L0"], rel=1e-5)

    # Attention saturation: each rank's first sequence, first 12 tokens.
    logit_max, entropy = _reference_attention(reference, everything[::2, :12])
    for i in range(2):
        assert metrics[f"{D}attn_logit_max/L{i}"] == pytest.approx(logit_max[i], rel=1e-4)
        assert metrics[f"{D}attn_entropy/L{i}"] == pytest.approx(entropy[i], rel=1e-4)

    # Weights: gathered matrices after the step, their update and their gradients.
    for i in range(2):
        norm = sum(g.square().sum() for n, g in grads.items() if n.startswith(f"layers.{i}."))
        assert metrics[f"{D}grad_norm/L{i}"] == pytest.approx(norm.sqrt().item(), rel=1e-5)
    for name, p in model.named_parameters():
        if p.ndim != 2 or not name.startswith("layers."):
            continue
        key = name.removesuffix(".weight")
        full = p.full_tensor()
        sv = torch.linalg.svdvals(full.double())
        assert metrics[f"{D}sv_max/{key}"] == pytest.approx(sv[0].item(), rel=1e-4)
        assert metrics[f"{D}sv_min/{key}"] == pytest.approx(sv[-1].item(), rel=1e-3, abs=1e-6)
        update = (full - before[name]).square().mean().sqrt().item()
        assert update > 0
        assert metrics[f"{D}update_rms/{key}"] == pytest.approx(update, rel=1e-5)
        tall = full.double() if full.shape[0] >= full.shape[1] else full.double().T
        stiefel = (tall.T @ tall - torch.eye(tall.shape[1], dtype=torch.float64)).square().mean().sqrt()
        assert metrics[f"{D}stiefel_err/{key}"] == pytest.approx(stiefel.item(), rel=1e-4)
    if rank == 0:
        assert metrics[f"{D}time_s"] > 0


def test_fsdp_values_match_gathered_model():
    run_distributed_test(_fsdp_check, 2)


def test_geonorm_theta_and_ones_angle_single_process():
    """GeoNorm theta vs the step's own rotation angle; all-ones angle vs its definition."""
    model = _model("geonorm")
    with torch.no_grad():
        model.layers["0"].attention_step.step.fill_(0.7)
    diag = Diagnostics(DiagnosticsConfig(enable=True, freq=1), [model])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    captured = {}
    step_module = model.layers["0"].attention_step
    handle = step_module.register_forward_hook(lambda m, a, out: captured.update(h=a[0], out=out))
    norm_handle = model.layers["1"].ffn_norm.register_forward_pre_hook(lambda m, a: captured.update(x=a[0]))
    diag.begin(1)
    model(tokens).sum().backward()
    diag.after_backward()
    metrics = diag.end(1)
    handle.remove()
    norm_handle.remove()
    h, out = captured["h"].double(), captured["out"].double()
    # Angle actually rotated by the geodesic step, per token.
    cos = (h * out).sum(-1) / (h.norm(dim=-1) * out.norm(dim=-1))
    angle = cos.clamp(-1, 1).acos()
    assert metrics[f"{D}theta_mean/layers.0.attention_step"] == pytest.approx(angle.mean().item(), rel=1e-3)
    assert metrics[f"{D}theta_max/layers.0.attention_step"] == pytest.approx(angle.max().item(), rel=1e-3)
    assert metrics[f"{D}step_scalar/layers.0.attention_step"] == pytest.approx(0.7)
    x = captured["x"].double()
    c = x.mean(-1) / x.square().mean(-1).sqrt()
    assert metrics[f"{D}ones_angle_deg/layers.1.ffn_norm"] == pytest.approx(
        math.degrees(math.acos(c.mean().item())), rel=1e-6
    )
    assert metrics[f"{D}ones_angle_abs_deg/layers.1.ffn_norm"] == pytest.approx(
        math.degrees(math.acos(c.abs().mean().item())), rel=1e-6
    )


@pytest.mark.parametrize("radius", ["prenorm", "sphere"])
def test_geonorm_radius_growth_per_step(radius):
    """`radius_growth/<step>` is the mean per-token R/||h|| of each geodesic step: ||h + u||/||h||
    with the Pre-Norm radius (the norm a Pre-LN residual would reach), 1 on the sphere."""
    torch.manual_seed(0)
    args = VariantModelArgs(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        vocab_size=64,
        max_seq_len=16,
        block="geonorm",
        geonorm=GeoNormConfig(radius=radius),
    )
    model = VariantTransformer(args)
    with torch.no_grad():
        model.init_weights()
        for block in model.layers.values():  # updates comparable to the state, so R/||h|| is far from 1
            block.attention.wo.weight.mul_(30.0)
            block.feed_forward.w2.weight.mul_(30.0)
    captured = {}
    handles = [
        model.layers[i]
        .get_submodule(name)
        .register_forward_hook(lambda m, a, out, key=f"layers.{i}.{name}": captured.update({key: (a[0], a[1])}))
        for i in ("0", "1")
        for name in ("attention_step", "ffn_step")
    ]
    diag = Diagnostics(DiagnosticsConfig(enable=True, freq=1), [model])
    tokens = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    diag.begin(1)
    model(tokens).sum().backward()
    diag.after_backward()
    metrics = diag.end(1)
    for handle in handles:
        handle.remove()
    assert len(captured) == 4
    for key, (h, u) in captured.items():
        h, u = h.detach().double(), u.detach().double()
        expected = ((h + u).norm(dim=-1) / h.norm(dim=-1)).mean().item() if radius == "prenorm" else 1.0
        assert metrics[f"{D}radius_growth/{key}"] == pytest.approx(expected, rel=1e-9), key
        assert radius == "sphere" or abs(expected - 1) > 1e-4, (key, expected)


def test_off_registers_nothing():
    class Job:
        diagnostics = DiagnosticsConfig(enable=False)

    model = _model()
    assert build_diagnostics(Job(), [model], 1) is None
    assert build_diagnostics(object(), [model], 1) is None
    hooks = _hook_count(model)
    Job.diagnostics = DiagnosticsConfig(enable=True, freq=50)
    diag = build_diagnostics(Job(), [model], 1)
    for step in (2, 49, 51):
        diag.begin(step)
        assert _hook_count(model) == hooks
        model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
        diag.after_backward()
        assert diag.end(step) == {}


@pytest.mark.parametrize("key, value", [("freq", 0), ("attention_max_tokens", -1), ("enable", "yes")])
def test_bad_config_names_key(key, value):
    config = DiagnosticsConfig(**{key: value})
    with pytest.raises(ValueError, match=f"diagnostics.{key}"):
        config.validate()
