"""Geometry diagnostics (`[diagnostics]`): what the residual stream, the norms, the attention and the
weights look like every `freq` steps, logged to TensorBoard / metrics.jsonl under `diagnostics/`.

Nothing is registered or computed unless `enable = true`, and then only on diagnostic steps
(step 1 and every multiple of `freq`): hooks are attached at the start of such a step, record the
first micro-batch once (activation-checkpoint recomputation is ignored) and are removed after it.

Quantities (`L{i}` = block i, `<m>` = module path such as `layers.3.attention_norm`):

- `residual_rms/L{i}`, `residual_max/L{i}`: `sqrt(mean h^2)` and `max |h|` of block i's output
  (`embed` = block 0's input); `residual_growth/L{i}` = rms_i / rms_{i-1}.
- `ones_angle_deg/<m>`, `ones_angle_abs_deg/<m>`: per token `c = mean(x)/RMS(x)` = cos of the angle
  between the vector entering norm `<m>` and the all-ones vector (arXiv 2409.12951);
  logged as `acos(mean c)` (signed) and `acos(mean |c|)` (absolute), in degrees. Random vectors
  give 90 deg and about 90 - 45.7/sqrt(d) deg.
- GeoNorm `theta_mean/<m>`, `theta_max/<m>` of each `GeodesicStep`: |theta| of its update as
  `geonorm.step_polar` computes it; `radius_growth/<m>`: mean R/||h|| (1 for radius `sphere`,
  ||h + u||/||h|| for `prenorm`); `step_scalar/<m>` = the learned `a_k`.
- Per block weight matrix `<m>`: `sv_max`, `sv_min` (exact: `torch.linalg.svdvals` in fp32 on
  the full matrix, each matrix on one rank), `stiefel_err` = RMS(W^T W - I) and `dgram_err` =
  RMS(Off(C)) with C the column-cosine matrix (tall orientation: both are zero exactly on the
  manifold of that name), `update_rms` = RMS(W_after - W_before) of the step's optimizer update.
- `attn_logit_max/L{i}`, `attn_entropy/L{i}`: max pre-softmax logit `q.k/sqrt(head_dim)` and mean
  softmax entropy (nats) of block i, from a side computation `wq(x), wk(x)` + RoPE on the first
  `attention_sequences` sequences x `attention_max_tokens` tokens of the local batch with a causal
  mask (document masks are ignored); the training attention path is untouched.
- `grad_norm/L{i}` (and `grad_norm/other`): L2 norm of the block's gradients after the last
  backward, before clipping.
- `optimizer/<k>`: the Manifold Muon container's `.stats`, when it has them.
- `time_s`: wall time spent in diagnostics on this step (hooks + reductions).

Across ranks (FSDP2, TP, DDP, HSDP), activations contribute `(sum, count)` pairs and maxima, so
shards, sequence-parallel slices and replicas all give the global value; per-rank sums of squares
of DTensor shards are divided by their replication factor; matrices are gathered with
`full_tensor()`. Everything ends in one SUM and one MAX all-reduce over the world.
Pipeline parallelism is not supported (stages hold different layers).
"""

import math
import re
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torchtitan.models.llama3.model.model import apply_rotary_emb
from torchtitan.tools.logging import logger

from titan_geonorm.diagnostics_config import DiagnosticsConfig
from titan_geonorm.geonorm import GeodesicStep
from titan_geonorm.optim.routing import clean_name

PREFIX = "diagnostics/"
_NORM_NAMES = ("attention_norm", "ffn_norm", "attention_out_norm", "ffn_out_norm", "norm", "emb_norm")
_BLOCK_MATRIX = re.compile(r"^layers\.(\d+)\.")


def _rows(x: torch.Tensor) -> torch.Tensor:
    """Local tensor whose last dim is complete (Partial / last-dim shards made Replicate)."""
    if not isinstance(x, DTensor):
        return x
    last = x.ndim - 1
    if any(isinstance(p, Partial) or (isinstance(p, Shard) and p.dim == last) for p in x.placements):
        fixed = [
            Replicate() if isinstance(p, Partial) or (isinstance(p, Shard) and p.dim == last) else p
            for p in x.placements
        ]
        x = x.redistribute(x.device_mesh, fixed)
    return x.to_local()


def _replication(t: torch.Tensor) -> int:
    """How many ranks hold a copy of each element of `t`'s local shard."""
    if isinstance(t, DTensor):
        return math.prod(t.device_mesh.size(d) for d, p in enumerate(t.placements) if isinstance(p, Replicate))
    # Plain parameters in a process group are replicas (DDP) or the whole model (1 process).
    return dist.get_world_size() if dist.is_initialized() else 1


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class _Reducer:
    """Named scalars summed or maxed over all ranks; every rank must add the same keys."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.maxes: dict[str, torch.Tensor] = {}

    def add(self, key: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float64)
        self.sums[key] = self.sums[key] + value if key in self.sums else value

    def max(self, key: str, value: torch.Tensor | float) -> None:
        value = torch.as_tensor(value, dtype=torch.float64)
        self.maxes[key] = torch.maximum(self.maxes[key], value) if key in self.maxes else value

    def reduce(self, device: torch.device) -> tuple[dict[str, float], dict[str, float]]:
        out = []
        for values, op in ((self.sums, dist.ReduceOp.SUM), (self.maxes, dist.ReduceOp.MAX)):
            keys = sorted(values)
            flat = torch.stack([values[k].to(device) for k in keys]) if keys else None
            if flat is not None and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flat, op=op)
            out.append(dict(zip(keys, flat.tolist())) if flat is not None else {})
        return out[0], out[1]


def _activation_stats(red: _Reducer, key: str, x: torch.Tensor) -> None:
    x = _rows(x.detach()).float()
    red.add(f"{key}:sq", x.square().sum())
    red.add(f"{key}:n", x.numel())
    red.max(f"{key}:max", x.abs().max())


def _ones_cosine_stats(red: _Reducer, key: str, x: torch.Tensor) -> None:
    """Per token c = mean(x)/RMS(x): sums of c and |c| and the token count."""
    x = _rows(x.detach()).float().flatten(0, -2)
    c = x.mean(-1) / x.square().mean(-1).sqrt().clamp_min(1e-30)
    red.add(f"{key}:c", c.sum())
    red.add(f"{key}:abs_c", c.abs().sum())
    red.add(f"{key}:n", c.numel())


def _theta_stats(red: _Reducer, key: str, module: GeodesicStep, h: torch.Tensor, u: torch.Tensor) -> None:
    """|theta| and R/||h|| of the module's update, from `GeodesicStep.polar` (fp64)."""
    theta, growth = module.polar(_rows(h.detach()).double(), _rows(u.detach()).double())
    theta = theta.abs()
    red.add(f"{key}:theta", theta.sum())
    red.add(f"{key}:growth", growth.sum())
    red.add(f"{key}:n", theta.numel())
    red.max(f"{key}:theta_max", theta.max())


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _attention_stats(
    red: _Reducer, key: str, attn: nn.Module, x: torch.Tensor, freqs_cis, positions, sequences: int, max_tokens: int
) -> None:
    """Max logit and mean softmax entropy of a causal side computation on a subsample of `x`."""
    with torch.no_grad():
        x = x[:sequences, :max_tokens]
        bs, seqlen = x.shape[:2]
        xq = _rows(attn.wq(x)).view(bs, seqlen, -1, attn.head_dim)
        xk = _rows(attn.wk(x)).view(bs, seqlen, -1, attn.head_dim)
        if positions is not None:
            positions = positions[:sequences, :max_tokens]
        xq, xk = apply_rotary_emb(xq, xk, freqs_cis=_full(freqs_cis), positions=positions)
        xq, xk = xq.transpose(1, 2).float(), xk.transpose(1, 2).float()
        xk = xk.repeat_interleave(xq.shape[1] // xk.shape[1], dim=1)
        logits = xq @ xk.transpose(-2, -1) / math.sqrt(attn.head_dim)
        causal = torch.ones(seqlen, seqlen, dtype=torch.bool, device=x.device).tril()
        logits = logits.masked_fill(~causal, float("-inf"))
        logp = F.log_softmax(logits, dim=-1)
        entropy = -(logp.exp() * logp.masked_fill(~causal, 0.0)).sum(-1)
        red.max(f"{key}:logit_max", logits.amax())
        red.add(f"{key}:entropy", entropy.sum())
        red.add(f"{key}:n", entropy.numel())


def _matrix_stats(w: torch.Tensor) -> tuple[float, float, float, float]:
    """(sv_max, sv_min, stiefel_err, dgram_err) of a full matrix, in the tall orientation."""
    w = w.float()
    w = w.mT if w.shape[0] < w.shape[1] else w
    sv = torch.linalg.svdvals(w)
    gram = w.mT @ w
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    stiefel = (gram - eye).square().mean().sqrt()
    norms = gram.diagonal().clamp_min(1e-30).sqrt()
    cosines = gram / norms[:, None] / norms[None, :]
    dgram = (cosines - torch.diag_embed(cosines.diagonal())).square().mean().sqrt()
    return sv[0], sv[-1], stiefel, dgram


class Diagnostics:
    """Collects the quantities of the module docstring on diagnostic steps.

    Call order on every step (from `GeoNormTrainer`): `begin(step)` before the forward,
    `after_backward()` after each micro-batch's backward, `end(step, optimizers)` after the
    optimizer step; `end` returns the step's metrics (empty off diagnostic steps).
    """

    def __init__(self, config: DiagnosticsConfig, model_parts: list[nn.Module], grad_accum_steps: int = 1):
        config.validate()
        if len(model_parts) != 1:
            raise ValueError(
                f"diagnostics.enable = true is not supported with pipeline parallelism "
                f"({len(model_parts)} model parts on this rank)"
            )
        self.config = config
        self.model = model_parts[0]
        self.grad_accum_steps = grad_accum_steps
        self._handles: list = []
        self._red: _Reducer | None = None
        self._micro = 0
        self._before: dict[str, torch.Tensor] = {}
        self._time = 0.0
        self.matrices = [
            (clean_name(n).removesuffix(".weight"), p)
            for n, p in self.model.named_parameters()
            if p.ndim == 2 and _BLOCK_MATRIX.match(clean_name(n))
        ]

    def due(self, step: int) -> bool:
        return step == 1 or step % self.config.freq == 0

    # ----------------------------------------------------------------- hooks

    def _timed(self, fn):
        def hook(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._time += time.perf_counter() - start
            return out

        return hook

    def _once(self, key: str) -> bool:
        """True the first time `key` is seen this step (AC recomputation and later micro-batches
        call the hooks again)."""
        seen = key in self._seen
        self._seen.add(key)
        return not seen

    def _attach(self) -> None:
        red, cfg = self._red, self.config
        layers = list(self.model.layers.items())

        def residual_in(module, args, kwargs):
            if self._once("embed"):
                _activation_stats(red, "resid/embed", args[0] if args else kwargs["x"])

        def residual_out(i):
            def hook(module, args, output):
                if self._once(f"resid/{i}"):
                    _activation_stats(red, f"resid/{i}", output)

            return hook

        def norm_in(name):
            def hook(module, args):
                if self._once(f"ones/{name}"):
                    _ones_cosine_stats(red, f"ones/{name}", args[0])

            return hook

        def geodesic(name):
            def hook(module, args):
                if self._once(f"theta/{name}"):
                    _theta_stats(red, f"theta/{name}", module, args[0], args[1])

            return hook

        def attention(i):
            def hook(module, args, kwargs):
                if not self._once(f"attn/{i}"):
                    return
                names = ("x", "freqs_cis", "attention_masks", "positions")
                values = dict(zip(names, args)) | kwargs
                _attention_stats(
                    red,
                    f"attn/{i}",
                    module,
                    values["x"].detach(),
                    values["freqs_cis"],
                    values.get("positions"),
                    cfg.attention_sequences,
                    cfg.attention_max_tokens,
                )

            return hook

        if layers:
            self._handles.append(layers[0][1].register_forward_pre_hook(self._timed(residual_in), with_kwargs=True))
        for i, block in layers:
            self._handles.append(block.register_forward_hook(self._timed(residual_out(i))))
            self._handles.append(block.attention.register_forward_pre_hook(self._timed(attention(i)), with_kwargs=True))
        for name, module in self.model.named_modules():
            name = clean_name(name)
            if isinstance(module, GeodesicStep):
                self._handles.append(module.register_forward_pre_hook(self._timed(geodesic(name))))
            elif name.rpartition(".")[2] in _NORM_NAMES and not isinstance(module, (nn.ModuleDict, nn.ModuleList)):
                self._handles.append(module.register_forward_pre_hook(self._timed(norm_in(name))))

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # ----------------------------------------------------------------- step calls

    def begin(self, step: int) -> None:
        """On a diagnostic step: attach hooks and remember each matrix's local shard."""
        if not self.due(step):
            return
        start = time.perf_counter()
        self._red, self._seen, self._micro, self._time = _Reducer(), set(), 0, 0.0
        self._before = {name: _local(p).detach().clone() for name, p in self.matrices}
        self._attach()
        self._time += time.perf_counter() - start

    def after_backward(self) -> None:
        """Per micro-batch; after the last one, record per-layer gradient norms (pre-clipping)."""
        if self._red is None:
            return
        self._micro += 1
        if self._micro != self.grad_accum_steps:
            return
        start = time.perf_counter()
        self._detach()
        for name, p in self.model.named_parameters():
            if p.grad is None:
                continue
            match = _BLOCK_MATRIX.match(clean_name(name))
            key = f"grad/L{match.group(1)}" if match else "grad/other"
            self._red.add(key, _local(p.grad).detach().double().square().sum() / _replication(p.grad))
        self._time += time.perf_counter() - start

    def end(self, step: int, optimizers=None) -> dict[str, float]:
        """After the optimizer step: matrix statistics, the reductions, the metrics dict."""
        if self._red is None:
            return {}
        start = time.perf_counter()
        self._detach()
        red, self._red = self._red, None
        rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        for j, (name, p) in enumerate(self.matrices):
            delta = _local(p).detach().double() - self._before[name].double()
            red.add(f"upd/{name}:sq", delta.square().sum() / _replication(p))
            red.add(f"upd/{name}:n", delta.numel() / _replication(p))
            if self.config.singular_values:
                full = _full(p.detach())
                stats = _matrix_stats(full) if j % world == rank else (0.0,) * 4
                for field, value in zip(("sv_max", "sv_min", "stiefel_err", "dgram_err"), stats):
                    red.add(f"mat/{name}:{field}", value)
        self._before = {}
        for name, module in self.model.named_modules():
            if isinstance(module, GeodesicStep) and module.step is not None:
                red.max(f"scalar/{clean_name(name)}", _full(module.step.detach()).reshape(()))
        device = _local(next(self.model.parameters())).device
        sums, maxes = red.reduce(device)
        metrics = _metrics(sums, maxes)
        stats = getattr(optimizers, "stats", None) or {}
        metrics.update({f"{PREFIX}optimizer/{k}": float(v) for k, v in stats.items()})
        self._time += time.perf_counter() - start
        metrics[f"{PREFIX}time_s"] = self._time
        if rank == 0:
            logger.info(_summary(step, metrics))
        return metrics


def _metrics(sums: dict[str, float], maxes: dict[str, float]) -> dict[str, float]:
    """Turn the reduced sums/maxima into `diagnostics/...` metrics."""
    out: dict[str, float] = {}
    layer_keys = sorted(
        (k.split(":")[0] for k in sums if k.startswith("resid/") and k.endswith(":sq")),
        key=lambda k: -1 if k == "resid/embed" else int(k.split("/")[1]),
    )
    prev = None
    for key in layer_keys:
        where = key.split("/")[1]
        tag = "embed" if where == "embed" else f"L{where}"
        rms = math.sqrt(sums[f"{key}:sq"] / sums[f"{key}:n"])
        out[f"{PREFIX}residual_rms/{tag}"] = rms
        out[f"{PREFIX}residual_max/{tag}"] = maxes[f"{key}:max"]
        if prev is not None:
            out[f"{PREFIX}residual_growth/{tag}"] = rms / prev if prev > 0 else float("inf")
        prev = rms
    for key in sums:
        base, _, field = key.partition(":")
        kind, _, where = base.partition("/")
        if kind == "ones" and field == "c":
            n = sums[f"{base}:n"]
            out[f"{PREFIX}ones_angle_deg/{where}"] = math.degrees(math.acos(max(-1.0, min(1.0, sums[key] / n))))
            out[f"{PREFIX}ones_angle_abs_deg/{where}"] = math.degrees(math.acos(min(1.0, sums[f"{base}:abs_c"] / n)))
        elif kind == "theta" and field == "theta":
            out[f"{PREFIX}theta_mean/{where}"] = sums[key] / sums[f"{base}:n"]
            out[f"{PREFIX}theta_max/{where}"] = maxes[f"{base}:theta_max"]
            out[f"{PREFIX}radius_growth/{where}"] = sums[f"{base}:growth"] / sums[f"{base}:n"]
        elif kind == "attn" and field == "entropy":
            out[f"{PREFIX}attn_entropy/L{where}"] = sums[key] / sums[f"{base}:n"]
            out[f"{PREFIX}attn_logit_max/L{where}"] = maxes[f"{base}:logit_max"]
        elif kind == "grad":
            out[f"{PREFIX}grad_norm/{where}"] = math.sqrt(sums[key])
        elif kind == "upd" and field == "sq":
            out[f"{PREFIX}update_rms/{where}"] = math.sqrt(sums[key] / sums[f"{base}:n"])
        elif kind == "mat":
            out[f"{PREFIX}{field}/{where}"] = sums[key]
    for key, value in maxes.items():
        if key.startswith("scalar/"):
            out[f"{PREFIX}step_scalar/{key.partition('/')[2]}"] = value
    return out


def _summary(step: int, metrics: dict[str, float]) -> str:
    """One console line: the extremes a user scans for."""

    def extreme(kind: str, fn) -> str:
        values = [v for k, v in metrics.items() if k.startswith(f"{PREFIX}{kind}/")]
        return f"{fn(values):.4g}" if values else "-"

    return (
        f"diagnostics step {step}: residual_rms max {extreme('residual_rms', max)}, "
        f"residual |x| max {extreme('residual_max', max)}, attn logit max {extreme('attn_logit_max', max)}, "
        f"attn entropy min {extreme('attn_entropy', min)}, sv_max max {extreme('sv_max', max)}, "
        f"theta mean max {extreme('theta_mean', max)}, time {metrics[f'{PREFIX}time_s']:.3f}s"
    )


def build_diagnostics(job_config, model_parts: list[nn.Module], grad_accum_steps: int) -> Diagnostics | None:
    """`Diagnostics` when `[diagnostics] enable = true`, else None (then nothing is hooked)."""
    config: Any = getattr(job_config, "diagnostics", None)
    if config is None or not config.enable:
        return None
    return Diagnostics(config, model_parts, grad_accum_steps)
