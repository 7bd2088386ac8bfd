"""`ManifoldMuon`: one optimizer, one geometry per weight matrix, sharding-agnostic.

Param groups are per geometry (`muon`, `stiefel`, `dgram`, `adamw`). Per step:

1. AdamW group: torch's functional AdamW on the local shards (elementwise, no communication).
2. Matrix groups: Nesterov momentum on the local shards, `M <- beta M + (1-beta) G`,
   `U = (1-beta) G + beta M` — elementwise, so sharding does not matter.
3. Every matrix (a "unit": one weight, or cat([wq, wk, wv]) with `fused_qkv`) has ONE owner rank in
   its device mesh, chosen once by greedy cost balancing (largest first, to the least loaded rank).
   One all-to-all moves every rank's shards of `U` (and `W` and the dual `Lambda` for manifold
   geometries) to the owners; owners rebuild the full matrices, run the geometry batched over
   same-shape matrices, and a second all-to-all returns each rank its shards of the result (the
   muon update, or the new weights and `Lambda`).

Shards are located as blocks: sharding a 2-D tensor on one dim selects indices of that dim only,
so a local shard is `rows x cols` of the global matrix. Each rank finds its rows (and its cols) by
sharding `arange` of that one dim like the parameter (`distribute_tensor(..., src_data_rank=None)`,
no communication), which covers `Shard`, `_StridedShard` (FSDP x TP) and `Replicate` alike; a
contiguous range is kept as a `slice`, anything else as a list. Owners receive every rank's blocks
once, on the first exchange. Nothing of the parameters' size is materialized for the bookkeeping.

State, all savable with `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)` and
resharded by DCP: `momentum_buffer` has its parameter's placements; `dual` (the warm start
`Lambda - Lambda_0`, `(n, n)` in the tall orientation, only with `warm_start`) is a DTensor on its
parameter's mesh with `Shard(0)` on every mesh dim (a plain tensor for plain parameters), kept in
the state of the unit's first parameter together with `dual_step`, the number of steps that
produced it (0: cold start). AdamW state uses torch.optim.AdamW's names.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor import zeros as distributed_zeros
from torch.distributed.tensor.placement_types import _StridedShard
from torch.optim.adamw import adamw

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import (
    DualSettings,
    MsignSettings,
    dgram_step,
    muon_update,
    project_dgram,
    project_stiefel,
    stiefel_step,
)
from titan_geonorm.optim.routing import assign_geometries

__all__ = ["ManifoldMuon"]

_MANIFOLDS = ("stiefel", "dgram")
_QKV = ("wq", "wk", "wv")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class _Unit:
    """A whole matrix the geometry sees: one parameter, or several concatenated on dim 0."""

    params: list[torch.nn.Parameter]
    names: list[str]
    geometry: str
    # Index into `param_groups`, never the group dict itself: `Optimizer.load_state_dict` (DCP
    # resume) replaces the group dicts, and the LR scheduler then updates only the new ones.
    group_index: int
    owner: int = 0
    # key -> this rank's `_Block`; keys are ("param", i) and ("dual", 0).
    local_blocks: dict = field(default_factory=dict)
    # key -> [`_Block` of every rank of the mesh], only on the owner.
    all_blocks: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.params), self.params[0].shape[1]

    @property
    def dual_size(self) -> int:
        return min(self.shape)

    def cost(self, dual_steps: int) -> float:
        # Newton-Schulz cost ~ m n min(m, n) per msign; manifolds run up to K+1 of them.
        m, n = self.shape
        return m * n * min(m, n) * (1 if self.geometry == "muon" else dual_steps + 1)


@dataclass
class _MeshPlan:
    """Units sharing one device mesh (or all plain tensors) and the process group spanning it."""

    group: dist.ProcessGroup | None
    rank: int
    size: int
    units: list[_Unit]
    blocks_ready: bool = False


def _mesh_group(param: torch.Tensor) -> dist.ProcessGroup | None:
    if isinstance(param, DTensor):
        mesh = param.device_mesh
        if mesh.size() == 1:
            return None
        if mesh.ndim == 1:
            return mesh.get_group()
        if mesh.size() == dist.get_world_size():
            return dist.group.WORLD
        return mesh._flatten().get_group()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        # Replicated plain parameters (e.g. DDP): still split the work across ranks.
        return dist.group.WORLD
    return None


@dataclass(frozen=True)
class _Block:
    """The rows x cols of a 2-D global tensor that one rank holds, in its local (row-major) order;
    each a `slice` when contiguous, else a list of global indices."""

    rows: slice | list[int]
    cols: slice | list[int]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(len(x) if isinstance(x, list) else x.stop - x.start for x in (self.rows, self.cols))

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]

    def index(self, device: torch.device) -> tuple:
        """Index of the block into the global matrix: `full[block.index(device)]`."""
        rows, cols = (torch.tensor(x, device=device) if isinstance(x, list) else x for x in (self.rows, self.cols))
        if isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor):
            rows = rows[:, None]
        return rows, cols


def _compact(ids: torch.Tensor) -> slice | list[int]:
    if ids.numel() == 0:
        return slice(0, 0)
    first = int(ids[0])
    if bool((ids == torch.arange(first, first + ids.numel(), device=ids.device)).all()):
        return slice(first, first + ids.numel())
    return ids.tolist()


def _local_block(like: torch.Tensor, shape: tuple[int, int], placements=None) -> _Block:
    """The block held locally by a tensor of global `shape` laid out like `like`."""
    if not isinstance(like, DTensor):
        return _Block(slice(0, shape[0]), slice(0, shape[1]))
    placements = like.placements if placements is None else placements
    per_dim = []
    for dim in range(2):
        # Sharding on `dim` becomes the same sharding of a 1-D tensor; any other placement
        # leaves `dim` whole.
        layout = [
            _StridedShard(0, split_factor=p.split_factor) if isinstance(p, _StridedShard) and p.dim == dim
            else Shard(0) if isinstance(p, Shard) and p.dim == dim
            else Replicate()
            for p in placements
        ]
        ids = torch.arange(shape[dim], dtype=torch.int64, device=_local(like).device)
        per_dim.append(_compact(distribute_tensor(ids, like.device_mesh, layout, src_data_rank=None).to_local()))
    return _Block(*per_dim)


def _dual_placements(param: DTensor) -> list:
    return [Shard(0)] * param.device_mesh.ndim


class ManifoldMuon(torch.optim.Optimizer):
    """Per-module Manifold Muon (see module docstring).

    Args:
        named_params: `(name, parameter)` pairs, e.g. `model.named_parameters()`; names may carry
            wrapper prefixes. Frozen parameters are skipped.
        config: the `[optimizer.manifold_muon]` section.
        lr, betas, eps, weight_decay: the AdamW group's hyperparameters.
    """

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        config: ManifoldMuonConfig,
        lr: float = 8e-4,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 0.1,
    ) -> None:
        config.validate()
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.assignment = assign_geometries(named, config.preset, config.rules)
        self.config = config
        by_geometry: dict[str, list] = {}
        names = {}
        for (_, param), (name, geometry) in zip(named, self.assignment.items()):
            by_geometry.setdefault(geometry, []).append(param)
            names[param] = name
        lrs = {"muon": config.muon_lr, "stiefel": config.stiefel_lr, "dgram": config.dgram_lr, "adamw": lr}
        groups = []
        for geometry, params in by_geometry.items():
            group = {"params": params, "geometry": geometry, "lr": lrs[geometry]}
            if geometry == "adamw":
                group.update(betas=tuple(betas), eps=eps, weight_decay=weight_decay)
            else:
                group.update(
                    momentum=config.momentum,
                    nesterov=config.nesterov,
                    weight_decay=config.muon_weight_decay if geometry == "muon" else 0.0,
                )
            groups.append(group)
        super().__init__(groups, {})
        self._names = names
        self._plans = self._build_plans()
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[config.msign_dtype]
        self._orth = MsignSettings(config.msign_method, config.msign_steps, dtype)
        self._retraction = MsignSettings("polar_express", config.retraction_steps, dtype)
        self._dual = DualSettings(config.dual_steps, config.dual_alpha, config.dual_tol, config.normalize_g)
        self.stats: dict[str, float] = {}
        """Last step's owner-side numbers on this rank: `orth_time_s` (wall), `orth_cpu_s` (this
        thread's CPU time: the work itself when other processes share the cores),
        `dual_iterations` (max) and `tangent_violation` (max over its manifold matrices)."""

    # ----------------------------------------------------------------- planning

    def _units(self) -> list[_Unit]:
        units = []
        for index, group in enumerate(self.param_groups):
            if group["geometry"] == "adamw":
                continue
            fused: dict[str, dict[str, torch.nn.Parameter]] = {}
            for param in group["params"]:
                name = self._names[param]
                prefix, _, leaf = name.rpartition(".attention.")
                leaf = leaf.removesuffix(".weight")
                if self.config.fused_qkv and prefix and leaf in _QKV:
                    fused.setdefault(prefix, {})[leaf] = param
                else:
                    units.append(_Unit([param], [name], group["geometry"], index))
            for prefix, parts in fused.items():
                units.append(self._fused_unit(prefix, parts, group, index))
        return units

    def _fused_unit(self, prefix: str, parts: dict, group: dict, index: int) -> _Unit:
        missing = [leaf for leaf in _QKV if leaf not in parts]
        if missing:
            raise ValueError(
                f"optimizer.manifold_muon.fused_qkv: {prefix}.attention.{{{','.join(missing)}}}.weight must share "
                f"geometry {group['geometry']!r} with the rest of the QKV projection"
            )
        params = [parts[leaf] for leaf in _QKV]
        names = [self._names[p] for p in params]
        layouts = {
            (p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None for p in params
        }
        if len(layouts) != 1 or len({p.shape[1] for p in params}) != 1:
            raise ValueError(
                f"optimizer.manifold_muon.fused_qkv: {names} need the same device mesh, placements and "
                f"input dim to be fused; got {[(tuple(p.shape), getattr(p, 'placements', None)) for p in params]}"
            )
        return _Unit(params, names, group["geometry"], index)

    def _build_plans(self) -> list[_MeshPlan]:
        by_mesh: dict = {}
        for unit in self._units():
            param = unit.params[0]
            key = param.device_mesh if isinstance(param, DTensor) else None
            by_mesh.setdefault(key, []).append(unit)
        plans = []
        for units in by_mesh.values():
            group = _mesh_group(units[0].params[0])
            size = 1 if group is None else dist.get_world_size(group)
            rank = 0 if group is None else dist.get_rank(group)
            load = [0.0] * size
            order = sorted(range(len(units)), key=lambda i: -units[i].cost(self.config.dual_steps))
            for i in order:
                units[i].owner = min(range(size), key=lambda r: load[r])
                load[units[i].owner] += units[i].cost(self.config.dual_steps)
            for unit in units:
                for i, p in enumerate(unit.params):
                    unit.local_blocks[("param", i)] = _local_block(p, tuple(p.shape))
                n = unit.dual_size
                placements = _dual_placements(unit.params[0]) if isinstance(unit.params[0], DTensor) else None
                unit.local_blocks[("dual", 0)] = _local_block(unit.params[0], (n, n), placements)
            plans.append(_MeshPlan(group, rank, size, units))
        return plans

    # ----------------------------------------------------------------- communication

    @staticmethod
    def _all_to_all(plan: _MeshPlan, send: list[list[torch.Tensor]], recv_sizes: list[int], like: torch.Tensor) -> list[torch.Tensor]:
        """Send `cat(send[r])` to every rank r; return what each rank sent here (split by rank)."""
        chunks = [torch.cat(parts) if parts else like.new_empty(0) for parts in send]
        if plan.group is None:
            return chunks
        out = like.new_empty(sum(recv_sizes))
        dist.all_to_all_single(
            out, torch.cat(chunks), recv_sizes, [c.numel() for c in chunks], group=plan.group
        )
        return list(out.split(recv_sizes))

    def _gather_blocks(self, plan: _MeshPlan) -> None:
        """Once: every owner learns which block of each of its units every rank holds."""
        mine = [[unit.local_blocks[k] for k in sorted(unit.local_blocks)] for unit in plan.units]
        everyone = [mine]
        if plan.group is not None:
            everyone = [None] * plan.size
            dist.all_gather_object(everyone, mine, group=plan.group)
        for u, unit in enumerate(plan.units):
            if unit.owner == plan.rank:
                for j, key in enumerate(sorted(unit.local_blocks)):
                    unit.all_blocks[key] = [everyone[src][u][j] for src in range(plan.size)]
        plan.blocks_ready = True

    def _exchange(
        self,
        plan: _MeshPlan,
        units: list[_Unit],
        inputs: Callable[[_Unit], list[tuple[tuple, torch.Tensor]]],
        compute: Callable[[list[_Unit], list[dict]], list[dict]],
        outputs: Callable[[_Unit], list[tuple]],
    ) -> dict[int, dict]:
        """Owner-computes pattern over `units` (a subset of `plan.units`, same on every rank).

        `inputs(u)`: `[((name, kind, i), local shard)]`; `compute(owned, fulls)` runs on each
        owner with `fulls[j][(name, kind, i)]` the flat global tensors and returns full outputs
        keyed the same way; `outputs(u)` lists the output keys in travel order. Returns
        `{id(unit): {key: flat local shard}}` on every rank. Block key of `(name, kind, i)`:
        `(kind, i)`.
        """
        if not plan.blocks_ready:
            self._gather_blocks(plan)
        like = _local(plan.units[0].params[0]).new_empty(0, dtype=torch.float32)
        local_in = {id(u): inputs(u) for u in units}
        send = [[] for _ in range(plan.size)]
        for unit in units:
            send[unit.owner] += [t.reshape(-1).float() for _, t in local_in[id(unit)]]
        owned = [u for u in units if u.owner == plan.rank]
        recv_sizes = [
            sum(u.all_blocks[key[1:]][src].numel for u in owned for key, _ in local_in[id(u)])
            for src in range(plan.size)
        ]
        received = self._all_to_all(plan, send, recv_sizes, like)
        fulls = [{} for _ in owned]
        offsets = [0] * plan.size
        for j, unit in enumerate(owned):
            for key, _ in local_in[id(unit)]:
                shape = self._shape(unit, key[1:])
                # Zeros, not empty: with fake collectives (dry runs) the blocks need not cover it.
                full = like.new_zeros(shape)
                for src in range(plan.size):
                    block = unit.all_blocks[key[1:]][src]
                    full[block.index(full.device)] = received[src][offsets[src] : offsets[src] + block.numel].view(block.shape)
                    offsets[src] += block.numel
                fulls[j][key] = full.view(-1)
        results = compute(owned, fulls) if owned else []
        back = [[] for _ in range(plan.size)]
        for unit, result in zip(owned, results):
            for dst in range(plan.size):
                for key in outputs(unit):
                    block = unit.all_blocks[key[1:]][dst]
                    full = result[key].reshape(self._shape(unit, key[1:]))
                    back[dst].append(full[block.index(full.device)].reshape(-1))
        back_sizes = [
            sum(u.local_blocks[key[1:]].numel for u in units if u.owner == src for key in outputs(u))
            for src in range(plan.size)
        ]
        returned = self._all_to_all(plan, back, back_sizes, like)
        offsets = [0] * plan.size
        local_out = {}
        for unit in units:
            parts = {}
            for key in outputs(unit):
                count = unit.local_blocks[key[1:]].numel
                parts[key] = returned[unit.owner][offsets[unit.owner] : offsets[unit.owner] + count]
                offsets[unit.owner] += count
            local_out[id(unit)] = parts
        return local_out

    def _group(self, unit: _Unit) -> dict:
        """The unit's current param group (looked up each step; see `_Unit.group_index`)."""
        return self.param_groups[unit.group_index]

    @staticmethod
    def _shape(unit: _Unit, block_key: tuple) -> tuple[int, int]:
        kind, i = block_key
        return (unit.dual_size,) * 2 if kind == "dual" else tuple(unit.params[i].shape)

    # ----------------------------------------------------------------- owner-side math

    @staticmethod
    def _assemble(unit: _Unit, full: dict, name: str) -> torch.Tensor:
        """Full `(m, n)` matrix of `unit` from flat per-parameter tensors."""
        return torch.cat([full[(name, "param", i)].view(p.shape) for i, p in enumerate(unit.params)])

    @staticmethod
    def _split(unit: _Unit, matrix: torch.Tensor, name: str) -> dict:
        rows = [p.shape[0] for p in unit.params]
        return {(name, "param", i): part for i, part in enumerate(matrix.split(rows))}

    def _solve(self, owned: list[_Unit], fulls: list[dict], warm: bool) -> list[dict]:
        """Run every owned unit's geometry, batched over units of the same group and shape."""
        batches: dict = {}
        for j, unit in enumerate(owned):
            batches.setdefault((unit.group_index, unit.shape), []).append(j)
        results: list[dict] = [{} for _ in owned]
        iterations, violation = 0, 0.0
        for indices in batches.values():
            units = [owned[j] for j in indices]
            group = self._group(units[0])
            u = torch.stack([self._assemble(unit, fulls[j], "u") for unit, j in zip(units, indices)])
            if group["geometry"] == "muon":
                update = muon_update(u, self.config.muon_scale, self._orth)
                for unit, j, mat in zip(units, indices, update):
                    results[j] = self._split(unit, mat, "update")
                continue
            w = torch.stack([self._assemble(unit, fulls[j], "w") for unit, j in zip(units, indices)])
            n = units[0].dual_size
            dual = None
            if warm and units[0].params[0] in self.state and self.state[units[0].params[0]]["dual_step"] > 0:
                dual = torch.stack([fulls[j][("lam", "dual", 0)].view(n, n) for j in indices])
            step = stiefel_step if group["geometry"] == "stiefel" else dgram_step
            kwargs = {"retraction_method": self.config.dgram_retraction} if group["geometry"] == "dgram" else {}
            res = step(w, u, group["lr"], dual, self._dual, self._orth, self._retraction, **kwargs)
            iterations = max(iterations, res.iterations)
            violation = max(violation, res.violation.max().item())
            for unit, j, w_new, lam in zip(units, indices, res.weight, res.dual):
                results[j] = self._split(unit, w_new, "w") | {("lam", "dual", 0): lam}
        self.stats.update(dual_iterations=iterations, tangent_violation=violation)
        return results

    # ----------------------------------------------------------------- step

    def _momentum(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the momentum buffer; return the (Nesterov) direction `U` as a local fp32 shard."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, dtype=torch.float32)
        grad = _local(param.grad).float()
        buf = _local(state["momentum_buffer"])
        beta = group["momentum"]
        buf.lerp_(grad, 1 - beta)
        return grad.lerp(buf, beta) if group["nesterov"] else buf.clone()

    def _init_dual(self, unit: _Unit) -> None:
        state = self.state[unit.params[0]]
        if "dual" in state:
            return
        n, like = unit.dual_size, unit.params[0]
        if isinstance(like, DTensor):
            # Allocates the local shard only (n^2 is 256 MiB per 70B matrix).
            state["dual"] = distributed_zeros(
                n, n, dtype=torch.float32, device_mesh=like.device_mesh, placements=_dual_placements(like)
            )
        else:
            state["dual"] = torch.zeros(n, n, dtype=torch.float32, device=like.device)
        state["dual_step"] = torch.tensor(0.0)

    def _adamw(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
            weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
        )

    def _step_plan(self, plan: _MeshPlan) -> None:
        units = [u for u in plan.units if all(p.grad is not None for p in u.params)]
        if len(units) != len(plan.units):
            missing = [n for u in plan.units if u not in units for n in u.names]
            raise RuntimeError(f"ManifoldMuon: no gradient for {missing}; every rank must step every matrix")
        directions = {id(u): [self._momentum(p, self._group(u)) for p in u.params] for u in units}
        warm = self.config.warm_start
        for unit in units:
            if warm and unit.geometry in _MANIFOLDS:
                self._init_dual(unit)
        # lr == 0 (e.g. DCP's state initialization) leaves weights and dual untouched.
        active = [u for u in units if self._group(u)["lr"] != 0]
        if not active:
            return

        def inputs(unit: _Unit) -> list:
            pieces = [(("u", "param", i), d) for i, d in enumerate(directions[id(unit)])]
            if unit.geometry in _MANIFOLDS:
                pieces += [(("w", "param", i), _local(p)) for i, p in enumerate(unit.params)]
                if warm:
                    pieces.append((("lam", "dual", 0), _local(self.state[unit.params[0]]["dual"])))
            return pieces

        def outputs(unit: _Unit) -> list:
            if unit.geometry == "muon":
                return [("update", "param", i) for i in range(len(unit.params))]
            return [("w", "param", i) for i in range(len(unit.params))] + ([("lam", "dual", 0)] if warm else [])

        def compute(owned: list[_Unit], fulls: list[dict]) -> list[dict]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = self._solve(owned, fulls, warm)
            if owned and owned[0].params[0].is_cuda:
                torch.cuda.synchronize()
            self.stats["orth_time_s"] += time.perf_counter() - start
            self.stats["orth_cpu_s"] += time.thread_time() - start_cpu
            return out

        local = self._exchange(plan, active, inputs, compute, outputs)
        for unit in active:
            result = local[id(unit)]
            group = self._group(unit)
            for i, p in enumerate(unit.params):
                shard = _local(p)
                if unit.geometry == "muon":
                    shard.mul_(1 - group["lr"] * group["weight_decay"])
                    shard.add_(result[("update", "param", i)].view_as(shard).to(shard.dtype), alpha=-group["lr"])
                else:
                    shard.copy_(result[("w", "param", i)].view_as(shard))
            if warm and unit.geometry in _MANIFOLDS:
                state = self.state[unit.params[0]]
                dual = _local(state["dual"])
                dual.copy_(result[("lam", "dual", 0)].view_as(dual))
                state["dual_step"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.stats = {"orth_time_s": 0.0, "orth_cpu_s": 0.0, "dual_iterations": 0, "tangent_violation": 0.0}
        for group in self.param_groups:
            if group["geometry"] == "adamw":
                self._adamw(group)
        for plan in self._plans:
            self._step_plan(plan)
        return loss

    @torch.no_grad()
    def project_(self) -> None:
        """Project every Stiefel/DGram weight onto its manifold (collective; call on all ranks)."""
        projections = {"stiefel": project_stiefel, "dgram": project_dgram}
        for plan in self._plans:
            units = [u for u in plan.units if u.geometry in _MANIFOLDS]
            if not units:
                continue

            def inputs(unit: _Unit) -> list:
                return [(("w", "param", i), _local(p)) for i, p in enumerate(unit.params)]

            def outputs(unit: _Unit) -> list:
                return [("w", "param", i) for i in range(len(unit.params))]

            def compute(owned: list[_Unit], fulls: list[dict]) -> list[dict]:
                return [
                    self._split(u, projections[u.geometry](self._assemble(u, full, "w")), "w")
                    for u, full in zip(owned, fulls)
                ]

            local = self._exchange(plan, units, inputs, compute, outputs)
            for unit in units:
                for i, p in enumerate(unit.params):
                    shard = _local(p)
                    shard.copy_(local[id(unit)][("w", "param", i)].view_as(shard))
