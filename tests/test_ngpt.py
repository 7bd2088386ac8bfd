"""nGPT (`titan_geonorm.ngpt`, train spec `llama3_ngpt`): its update and block written out from the
paper's equations, the unit-sphere invariants after optimizer steps of either container, FSDP2 and
TP training like one process, resume like an uninterrupted run."""

import ast
import copy
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor
from torchtitan.config import ConfigManager
from torchtitan.models.llama3.model.model import apply_rotary_emb

from tests.distributed import next_token_loss, parallel_dims, run_distributed_test
from tests.launch import TINY_CONFIG, losses, steps, train
from tests.models.test_model import SHAPE, build, perturb_gains, tokens
from titan_geonorm import ngpt
from titan_geonorm.ngpt import ngpt_update
from titan_geonorm.titan.optimizers import build_optimizers
from titan_geonorm.titan.parallelize import parallelize_variant

D, HEAD_DIM = SHAPE["dim"], SHAPE["dim"] // SHAPE["n_heads"]


def unit(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    return x / x.norm(dim=dim, keepdim=True)


def test_update_formula_and_limits():
    g = torch.Generator().manual_seed(0)
    h, u = unit(torch.randn(3, 5, 16, generator=g)), 4 * torch.randn(3, 5, 16, generator=g)
    alpha = torch.rand(16, generator=g)
    torch.testing.assert_close(ngpt_update(h, u, alpha), unit(h + alpha * (unit(u) - h)))
    torch.testing.assert_close(ngpt_update(h, u, torch.zeros(16)), h)
    torch.testing.assert_close(ngpt_update(h, u, torch.ones(16)), unit(u))
    out = ngpt_update(h.bfloat16(), u.bfloat16(), alpha)
    assert out.dtype == torch.bfloat16 and (out.float().norm(dim=-1) - 1).abs().max() < 1e-2


def test_maths_module_imports_torch_only():
    tree = ast.parse(Path(ngpt.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"math", "torch"}


def direct_block(block, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """The paper's block with the reparametrized scales restored by hand (s = p * s_init/s_scale)."""
    att, ffn = block.attention, block.feed_forward
    bs, seq = x.shape[:2]

    def heads(t):
        return t.view(bs, seq, -1, HEAD_DIM)

    q, k = apply_rotary_emb(heads(x @ att.wq.weight.T), heads(x @ att.wk.weight.T), freqs_cis)
    q = unit(q) * (att.wq.scale * math.sqrt(D)).view(-1, HEAD_DIM)  # s_qk: init 1, scale 1/sqrt(d)
    k = unit(k) * (att.wk.scale * math.sqrt(D)).view(-1, HEAD_DIM)
    v = heads(x @ att.wv.weight.T)
    rep = q.shape[2] // k.shape[2]
    q, k, v = (t.repeat_interleave(n, 2).transpose(1, 2) for t, n in ((q, 1), (k, rep), (v, rep)))
    logits = (q @ k.transpose(-1, -2)) * math.sqrt(HEAD_DIM)
    logits = logits.masked_fill(torch.ones(seq, seq, dtype=torch.bool).triu(1), float("-inf"))
    attn = (logits.softmax(-1) @ v).transpose(1, 2).reshape(bs, seq, -1) @ att.wo.weight.T

    def update(h, out, alpha):  # alpha: init 0.05, scale 1/sqrt(d)
        return unit(h + alpha * 0.05 * math.sqrt(D) * (unit(out) - h))

    h = update(x, attn, block.attention_update.alpha)
    gate = (h @ ffn.w1.weight.T) * ffn.w1.scale * math.sqrt(D)  # s_v sqrt(d); s_v: init 1, scale 1
    up = (h @ ffn.w3.weight.T) * ffn.w3.scale
    return update(h, (F.silu(gate) * up) @ ffn.w2.weight.T, block.ffn_update.alpha)


def test_block_and_logits_follow_the_paper():
    model = build("ngpt")
    perturb_gains(model)
    block, x = model.layers["1"], unit(torch.randn(2, 16, D))
    torch.testing.assert_close(block(x, model.freqs_cis, None), direct_block(block, x, model.freqs_cis))
    last = []
    model.layers["2"].register_forward_hook(lambda m, args, out: last.append(out))
    logits = model(tokens())
    s_z = model.norm.scale * math.sqrt(D)  # s_z: init 1, scale 1/sqrt(d); no final norm
    torch.testing.assert_close(logits, s_z * last[0] @ model.output.weight.T)


def _embedding_dim_norms(model) -> dict[str, torch.Tensor]:
    """Norms of every weight matrix's slices along the model dim (full tensors)."""
    out = {}
    for name, p in model.named_parameters():
        if p.ndim == 2:
            w = p.full_tensor() if isinstance(p, DTensor) else p
            out[name] = w.norm(dim=0 if name.endswith(("wo.weight", "w2.weight")) else 1)
    return out


def _assert_unit(norms: dict[str, torch.Tensor]) -> None:
    for name, n in norms.items():
        assert (n - 1).abs().max() < 1e-5, (name, (n - 1).abs().max().item())


@pytest.mark.parametrize("optimizer", ["AdamW", "ManifoldMuon"])
def test_states_and_weights_stay_on_the_unit_sphere(optimizer):
    """Optimizer steps of the plugin's container (the hook re-normalizes), then a forward:
    every block's input and output, and every weight matrix along the model dim, are unit."""
    from titan_geonorm.titan.launcher import parse_config

    job_config = parse_config(
        [
            "--job.config_file",
            str(TINY_CONFIG),
            "--model.name",
            "llama3_ngpt",
            "--optimizer.name",
            optimizer,
            "--optimizer.lr",
            "1e-2",
        ]
    )
    model = build("ngpt")
    container = build_optimizers([model], job_config.optimizer, parallel_dims=None)
    x = tokens(seed=3, length=17)
    before = model.layers["0"].attention.wq.weight.detach().clone()
    for _ in range(3):
        F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
        container.step()
        container.zero_grad()
    assert (model.layers["0"].attention.wq.weight - before).abs().max() > 1e-3
    _assert_unit(_embedding_dim_norms(model))
    states = []
    for layer in model.layers.values():
        layer.register_forward_hook(lambda m, args, out: states.extend([args[0], out]))
    with torch.no_grad():
        model(x[:, :-1])
    for h in states:
        assert (h.norm(dim=-1) - 1).abs().max() < 1e-5


def _train_like_one_process():
    """4 AdamW steps through torchtitan's container under FSDP2 (2 ranks), then TP (2 ranks): each
    step's loss and the final parameters must be the one-process run's, on the unit sphere.

    AdamW's eps is 1e-6 here: with the default 1e-8 its first step is about lr * sign(g), so an
    entry whose gradient is near 1e-8 turns reduction-order noise of 1e-11 into a parameter
    difference of 1e-5 (measured under TP; the losses agree to 1e-6 either way)."""
    job_config = ConfigManager().parse_args(
        [
            "--job.custom_config_module",
            "titan_geonorm.config",
            "--training.seq_len",
            "16",
            "--parallelism.disable_loss_parallel",
            "--training.mixed_precision_param",
            "float32",
            "--optimizer.lr",
            "1e-2",
            "--optimizer.eps",
            "1e-6",
            "--optimizer.implementation",
            "for-loop",
        ]
    )
    for dp_shard, tp in ((2, 1), (1, 2)):
        dims = parallel_dims(dp_shard, tp)
        ref = build("ngpt")
        perturb_gains(ref)
        model = parallelize_variant(copy.deepcopy(ref), dims, job_config)
        optimizers = [build_optimizers([m], job_config.optimizer, d) for m, d in ((ref, None), (model, dims))]
        dp_rank = dims.get_mesh("fsdp").get_local_rank() if dims.fsdp_enabled else 0
        for step in range(4):
            batch = tokens(seed=10 + step, length=17).repeat(2, 1)
            batch[1::2] = batch[1::2].roll(3, dims=1)
            num_tokens = batch[:, 1:].numel()
            ref_loss = next_token_loss(ref, batch, num_tokens)
            ref_loss.backward()
            loss = next_token_loss(model, batch.chunk(dp_shard)[dp_rank], num_tokens)
            loss.backward()
            total = loss.detach().clone()
            if dims.fsdp_enabled:
                dist.all_reduce(total, group=dims.get_mesh("fsdp").get_group())
            torch.testing.assert_close(
                total, ref_loss.detach(), atol=1e-5, rtol=0, msg=f"dp {dp_shard} tp {tp} loss at step {step}"
            )
            for container in optimizers:
                container.step()
                container.zero_grad()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            full = p.full_tensor() if isinstance(p, DTensor) else p
            p_ref = ref_params[name.replace("_checkpoint_wrapped_module.", "")]
            torch.testing.assert_close(full, p_ref, atol=1e-5, rtol=1e-4, msg=f"dp {dp_shard} tp {tp} {name}")
        _assert_unit(_embedding_dim_norms(model))


@pytest.mark.distributed
def test_fsdp2_and_tp2_training_match_one_process():
    run_distributed_test(_train_like_one_process, 2)


@pytest.mark.distributed
def test_trainer_resume_reproduces_uninterrupted_losses(tmp_path):
    """The real launcher and trainer (nGPT hook after each step) with ManifoldMuon (TP and FSDP2:
    the in-process test above): a run restarted from the step-3 checkpoint (weights, optimizer
    state, LR schedule, data position) gives steps 4-6 of the uninterrupted run."""
    one, resumed = tmp_path / "one", tmp_path / "resumed"
    args = ("--model.name", "llama3_ngpt", "--optimizer.name", "ManifoldMuon", "--training.steps", "6")
    train(one, *args, "--checkpoint.enable", "--checkpoint.interval", "3")
    tokenizer = ("--model.hf_assets_path", str(one / "tokenizer"))
    (resumed / "checkpoint").mkdir(parents=True)
    shutil.copytree(one / "checkpoint" / "step-3", resumed / "checkpoint" / "step-3")
    train(resumed, *args, *tokenizer, "--checkpoint.enable", "--checkpoint.interval", "3")
    assert steps(resumed) == [4, 5, 6]
    assert losses(resumed) == pytest.approx(losses(one)[3:], abs=1e-5)
