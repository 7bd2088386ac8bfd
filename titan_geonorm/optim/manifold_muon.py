"""`ManifoldMuon`: one optimizer, one geometry per weight matrix, sharding-agnostic.

Param groups are per geometry (`muon`, `stiefel`, `dgram`, `adamw`; plus `adamw` without weight
decay for 1-D parameters when `weight_decay_1d = false`). Per step:

1. AdamW groups: torch's functional AdamW on the local shards (elementwise, no communication).
2. Matrix groups: momentum on the local shards (elementwise, so sharding does not matter), giving
   the direction `U` (`momentum_style`).
3. Every matrix (a "unit": one weight, or cat([wq, wk, wv]) with `fused_qkv`) is computed on ONE
   owner rank of its device mesh (`owner_exchange.OwnerExchange`): owners receive the full `U` (and
   `W`, and the dual `Lambda` where the geometry keeps one), run the geometry's step
   (`geometries.GEOMETRIES`) batched over same-shape matrices, and every rank gets back its shards
   of the result (the muon update, or the new weights and `Lambda`).

State, all savable with `get_optimizer_state_dict(..., flatten_optimizer_state_dict=True)` and
resharded by DCP: `momentum_buffer` has its parameter's placements; `dual` (the warm start
`Lambda - Lambda_0`, `(n, n)` in the tall orientation, only for dual-ascent solvers with
`warm_start`) is a DTensor on its parameter's mesh with `Shard(0)` on every mesh dim (a plain
tensor for plain parameters), kept in the state of the unit's first parameter together with
`dual_step`, the number of steps that produced it (0: cold start). AdamW state uses
torch.optim.AdamW's names.
"""

import time
from dataclasses import dataclass, replace
from typing import Iterable

import torch
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor import zeros as distributed_zeros
from torch.optim.adamw import adamw

from titan_geonorm.optim.config import ManifoldMuonConfig
from titan_geonorm.optim.geometries import (
    GEOMETRIES,
    DualSettings,
    Geometry,
    MsignSettings,
    StepSettings,
)
from titan_geonorm.optim.owner_exchange import (
    ExchangeKey,
    OwnerExchange,
    RectKey,
    Routed,
    local_rect,
    mesh_group,
)
from titan_geonorm.optim.routing import assign_geometries

__all__ = ["ManifoldMuon"]

_QKV = ("wq", "wk", "wv")
_DUAL = RectKey("dual")
_LAMBDA = ExchangeKey("lambda", _DUAL)


def _param_rect(i: int) -> RectKey:
    return RectKey("param", i)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@dataclass
class _Unit:
    """A whole matrix the geometry sees: one parameter, or several concatenated on dim 0."""

    params: list[torch.nn.Parameter]
    names: list[str]
    geometry: Geometry
    # Index into `param_groups`, never the group dict itself: `Optimizer.load_state_dict` (DCP
    # resume) replaces the group dicts, and the LR scheduler then updates only the new ones.
    group_index: int
    keeps_dual: bool
    route: Routed | None = None

    @property
    def owner(self) -> int:
        return self.route.owner

    @property
    def shape(self) -> tuple[int, int]:
        return sum(p.shape[0] for p in self.params), self.params[0].shape[1]

    @property
    def dual_size(self) -> int:
        return min(self.shape)

    def cost(self, dual_steps: int) -> float:
        """Newton-Schulz flops, up to a constant: `m n min(m, n)` per msign of the matrix; the
        closed forms run one msign of a skew `k x k` matrix, `k = min(max(m, n), 2 min(m, n))`,
        plus about as much again; dual loops up to K+1 msigns of the matrix."""
        m, n = self.shape
        if not self.geometry.is_manifold:
            return m * n * min(m, n)
        if self.keeps_dual:
            return m * n * min(m, n) * (dual_steps + 1)
        return 2 * min(max(m, n), 2 * min(m, n)) ** 3


@dataclass
class _MeshPlan:
    """Units sharing one device mesh (or all plain tensors) and their exchange."""

    exchange: OwnerExchange
    units: list[_Unit]

    @property
    def rank(self) -> int:
        return self.exchange.rank

    @property
    def size(self) -> int:
        return self.exchange.size


def _dual_placements(param: DTensor) -> list:
    return [Shard(0)] * param.device_mesh.ndim


class ManifoldMuon(torch.optim.Optimizer):
    """Per-module Manifold Muon (see module docstring).

    Args:
        named_params: `(name, parameter)` pairs, e.g. `model.named_parameters()`; names may carry
            wrapper prefixes. Frozen parameters are skipped.
        config: the `[optimizer.manifold_muon]` section (unset keys take the preset's values).
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
        config = config.resolved()
        named = [(n, p) for n, p in named_params if p.requires_grad]
        self.assignment = assign_geometries(named, config.preset, config.rules)
        self.config = config
        by_group: dict[tuple, list] = {}
        names = {}
        for (_, param), (name, geometry) in zip(named, self.assignment.items()):
            # 1-D AdamW parameters get their own group when they are not to decay.
            vector = geometry == "adamw" and param.ndim < 2 and not config.weight_decay_1d
            by_group.setdefault((geometry, vector), []).append(param)
            names[param] = name
        groups = []
        for (geometry, vector), params in by_group.items():
            if geometry == "adamw":
                decay = 0.0 if vector else weight_decay
                groups.append(
                    dict(params=params, geometry=geometry, lr=lr, betas=tuple(betas), eps=eps, weight_decay=decay)
                )
            else:
                groups.append(
                    dict(
                        params=params,
                        geometry=geometry,
                        lr=getattr(config, f"{geometry}_lr"),
                        momentum=config.momentum,
                        nesterov=config.nesterov,
                        weight_decay=config.muon_weight_decay if geometry == "muon" else 0.0,
                    )
                )
        super().__init__(groups, {})
        self._names = names
        dtype = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16}[config.msign_dtype]
        self.settings = StepSettings(
            muon_scale=config.muon_scale,
            muon=MsignSettings(config.msign_method, config.msign_steps, dtype),
            closed_form=MsignSettings(
                "polar_express",
                config.closed_form_steps,
                dtype,
                config.closed_form_scale,
                config.closed_form_lower or None,
            ),
            dual=DualSettings(
                config.dual_steps,
                config.dual_alpha,
                config.dual_tol,
                config.normalize_g,
                config.dual_iterate,
                config.dgram_metric,
            ),
            dual_orth=MsignSettings(config.msign_method, config.dual_msign_steps, dtype),
            retraction=MsignSettings("polar_express", config.retraction_steps, dtype),
            stiefel_solver=config.stiefel_solver,
            stiefel_retraction=config.stiefel_retraction,
            dgram_solver=config.dgram_solver,
            dgram_retraction=config.dgram_retraction,
            dgram_init=config.dgram_init,
        )
        self._plans = self._build_plans()
        self.stats: dict[str, float] = {}
        """Last step's owner-side numbers on this rank: `orth_time_s` (wall), `orth_cpu_s` (this
        thread's CPU time: the work itself when other processes share the cores),
        `dual_iterations` (max; 0 for the closed forms), `tangent_violation` (max over its
        manifold matrices; absent when `measure_violation(False)` skipped it) and
        `retraction_fallbacks` (matrices that left the column quintic's basin and were retracted
        exactly; see `geometries.column_quintic_retract`)."""

    def measure_violation(self, on: bool) -> None:
        """Whether the following steps compute the closed forms' `tangent_violation` stat
        (`StepSettings.measure_violation`; on by default). The trainer turns it on only for
        steps whose diagnostics are logged."""
        self.settings = replace(self.settings, measure_violation=on)

    # ----------------------------------------------------------------- planning

    def _unit(self, params: list, index: int) -> _Unit:
        geometry = GEOMETRIES[self.param_groups[index]["geometry"]]
        keeps_dual = geometry.keeps_dual(self.settings)
        return _Unit(params, [self._names[p] for p in params], geometry, index, keeps_dual)

    def _units(self) -> list[_Unit]:
        units = []
        for index, group in enumerate(self.param_groups):
            if group["geometry"] == "adamw":
                continue
            fused: dict[str, dict[str, torch.nn.Parameter]] = {}
            for param in group["params"]:
                prefix, _, leaf = self._names[param].rpartition(".attention.")
                leaf = leaf.removesuffix(".weight")
                if self.config.fused_qkv and prefix and leaf in _QKV:
                    fused.setdefault(prefix, {})[leaf] = param
                else:
                    units.append(self._unit([param], index))
            for prefix, parts in fused.items():
                units.append(self._fused_unit(prefix, parts, group, index))
        return units

    def _fused_unit(self, prefix: str, parts: dict, group: dict, index: int) -> _Unit:
        missing = [leaf for leaf in _QKV if leaf not in parts]
        if missing:
            raise ValueError(
                f"optimizer.manifold_muon.fused_qkv: {prefix}.attention.{{{','.join(missing)}}}.weight must "
                f"share geometry {group['geometry']!r} with the rest of the QKV projection"
            )
        params = [parts[leaf] for leaf in _QKV]
        layouts = {(p.device_mesh, tuple(p.placements)) if isinstance(p, DTensor) else None for p in params}
        if len(layouts) != 1 or len({p.shape[1] for p in params}) != 1:
            got = [(tuple(p.shape), getattr(p, "placements", None)) for p in params]
            raise ValueError(
                f"optimizer.manifold_muon.fused_qkv: {[self._names[p] for p in params]} need the same "
                f"device mesh, placements and input dim to be fused; got {got}"
            )
        return self._unit(params, index)

    def _route(self, unit: _Unit) -> Routed:
        shapes, rects = {}, {}
        for i, p in enumerate(unit.params):
            shapes[_param_rect(i)] = tuple(p.shape)
            rects[_param_rect(i)] = local_rect(p, tuple(p.shape))
        if self._warm(unit):
            n, first = unit.dual_size, unit.params[0]
            placements = _dual_placements(first) if isinstance(first, DTensor) else None
            shapes[_DUAL] = (n, n)
            rects[_DUAL] = local_rect(first, (n, n), placements)
        return Routed(shapes, rects)

    def _build_plans(self) -> list[_MeshPlan]:
        by_mesh: dict = {}
        for unit in self._units():
            param = unit.params[0]
            by_mesh.setdefault(param.device_mesh if isinstance(param, DTensor) else None, []).append(unit)
        plans = []
        for units in by_mesh.values():
            exchange = OwnerExchange(mesh_group(units[0].params[0]))
            for unit in units:
                unit.route = self._route(unit)
            costs = [u.cost(self.config.dual_steps) for u in units]
            exchange.assign_owners([u.route for u in units], costs)
            plans.append(_MeshPlan(exchange, units))
        return plans

    def _exchange(self, plan: _MeshPlan, units: list[_Unit], inputs, compute, outputs) -> dict[int, dict]:
        """`OwnerExchange.exchange` in terms of units: callbacks and the result are per unit."""
        by_route = {id(u.route): u for u in plan.units}
        local = plan.exchange.exchange(
            [u.route for u in plan.units],
            [u.route for u in units],
            lambda route: inputs(by_route[id(route)]),
            lambda owned, fulls: compute([by_route[id(r)] for r in owned], fulls),
            lambda route: outputs(by_route[id(route)]),
            _local(plan.units[0].params[0]),
        )
        return {id(by_route[key]): value for key, value in local.items()}

    def _group(self, unit: _Unit) -> dict:
        """The unit's current param group (looked up each step; see `_Unit.group_index`)."""
        return self.param_groups[unit.group_index]

    # ----------------------------------------------------------------- owner-side math

    @staticmethod
    def _assemble(unit: _Unit, full: dict, name: str) -> torch.Tensor:
        """Full `(m, n)` matrix of `unit` from flat per-parameter tensors."""
        parts = [full[ExchangeKey(name, _param_rect(i))].view(p.shape) for i, p in enumerate(unit.params)]
        return torch.cat(parts)

    @staticmethod
    def _split(unit: _Unit, matrix: torch.Tensor, name: str) -> dict:
        rows = [p.shape[0] for p in unit.params]
        return {ExchangeKey(name, _param_rect(i)): part for i, part in enumerate(matrix.split(rows))}

    def _solve(self, owned: list[_Unit], fulls: list[dict]) -> list[dict]:
        """Run every owned unit's geometry, batched over units of the same group and shape."""
        batches: dict = {}
        for j, unit in enumerate(owned):
            batches.setdefault((unit.group_index, unit.shape), []).append(j)
        results: list[dict] = [{} for _ in owned]
        iterations, violations, fallbacks = 0, [], 0
        for indices in batches.values():
            units = [owned[j] for j in indices]
            first, geometry = units[0], units[0].geometry
            u = torch.stack([self._assemble(unit, fulls[j], "u") for unit, j in zip(units, indices)])
            w = dual = None
            if geometry.is_manifold:
                w = torch.stack([self._assemble(unit, fulls[j], "w") for unit, j in zip(units, indices)])
            if first.keeps_dual and self._warm(first) and self.state[first.params[0]]["dual_step"] > 0:
                n = first.dual_size
                dual = torch.stack([fulls[j][_LAMBDA].view(n, n) for j in indices])
            res = geometry.step(w, u, self._group(first)["lr"], dual, self.settings)
            iterations = max(iterations, res.iterations)
            fallbacks += res.fallbacks
            if res.violation is not None:
                violations.append(res.violation.max())
            for k, (unit, j) in enumerate(zip(units, indices)):
                if res.update is not None:
                    results[j] = self._split(unit, res.update[k], "update")
                    continue
                results[j] = self._split(unit, res.weight[k], "w")
                if self._warm(unit):
                    results[j][_LAMBDA] = res.dual[k]
        self.stats["dual_iterations"] = max(self.stats["dual_iterations"], iterations)
        self.stats["retraction_fallbacks"] += fallbacks
        if violations:
            # One host sync for the whole solve, not one per batch, so a GPU queues every batch's work.
            violation = torch.stack(violations).max().item()
            self.stats["tangent_violation"] = max(self.stats.get("tangent_violation", 0.0), violation)
        return results

    # ----------------------------------------------------------------- step

    def _warm(self, unit: _Unit) -> bool:
        return unit.keeps_dual and self.config.warm_start

    def _momentum(self, param: torch.Tensor, group: dict) -> torch.Tensor:
        """Update the momentum buffer; return the direction `U` as a local fp32 shard."""
        state = self.state[param]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(param, dtype=torch.float32)
        grad = _local(param.grad).float()
        buf = _local(state["momentum_buffer"])
        beta = group["momentum"]
        if self.config.momentum_style == "sum":
            buf.mul_(beta).add_(grad)
            return grad.add(buf, alpha=beta) if group["nesterov"] else buf.clone()
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
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _step_plan(self, plan: _MeshPlan) -> None:
        units = [u for u in plan.units if all(p.grad is not None for p in u.params)]
        if len(units) != len(plan.units):
            missing = [n for u in plan.units if u not in units for n in u.names]
            raise RuntimeError(f"ManifoldMuon: no gradient for {missing}; every rank must step every matrix")
        directions = {id(u): [self._momentum(p, self._group(u)) for p in u.params] for u in units}
        for unit in units:
            if self._warm(unit):
                self._init_dual(unit)
        # lr == 0 (e.g. DCP's state initialization) leaves weights and dual untouched.
        active = [u for u in units if self._group(u)["lr"] != 0]
        if not active:
            return

        def inputs(unit: _Unit) -> list:
            pieces = [(ExchangeKey("u", _param_rect(i)), d) for i, d in enumerate(directions[id(unit)])]
            if unit.geometry.is_manifold:
                pieces += [(ExchangeKey("w", _param_rect(i)), _local(p)) for i, p in enumerate(unit.params)]
            if self._warm(unit):
                pieces.append((_LAMBDA, _local(self.state[unit.params[0]]["dual"])))
            return pieces

        def outputs(unit: _Unit) -> list:
            name = "w" if unit.geometry.is_manifold else "update"
            keys = [ExchangeKey(name, _param_rect(i)) for i in range(len(unit.params))]
            return keys + ([_LAMBDA] if self._warm(unit) else [])

        def compute(owned: list[_Unit], fulls: list[dict]) -> list[dict]:
            start, start_cpu = time.perf_counter(), time.thread_time()
            out = self._solve(owned, fulls)
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
                if unit.geometry.is_manifold:
                    shard.copy_(result[ExchangeKey("w", _param_rect(i))].view_as(shard))
                else:
                    update = result[ExchangeKey("update", _param_rect(i))].view_as(shard).to(shard.dtype)
                    shard.mul_(1 - group["lr"] * group["weight_decay"])
                    shard.add_(update, alpha=-group["lr"])
            if self._warm(unit):
                state = self.state[unit.params[0]]
                dual = _local(state["dual"])
                dual.copy_(result[_LAMBDA].view_as(dual))
                state["dual_step"] += 1

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.stats = {"orth_time_s": 0.0, "orth_cpu_s": 0.0, "dual_iterations": 0, "retraction_fallbacks": 0}
        for group in self.param_groups:
            if group["geometry"] == "adamw":
                self._adamw(group)
        for plan in self._plans:
            self._step_plan(plan)
        return loss

    @torch.no_grad()
    def project_(self) -> None:
        """Project every manifold weight onto its manifold (collective; call on all ranks)."""
        for plan in self._plans:
            units = [u for u in plan.units if u.geometry.is_manifold]
            if not units:
                continue

            def inputs(unit: _Unit) -> list:
                return [(ExchangeKey("w", _param_rect(i)), _local(p)) for i, p in enumerate(unit.params)]

            def outputs(unit: _Unit) -> list:
                return [ExchangeKey("w", _param_rect(i)) for i in range(len(unit.params))]

            def compute(owned: list[_Unit], fulls: list[dict]) -> list[dict]:
                return [
                    self._split(u, u.geometry.project(self._assemble(u, full, "w"), self.settings), "w")
                    for u, full in zip(owned, fulls)
                ]

            local = self._exchange(plan, units, inputs, compute, outputs)
            for unit in units:
                for i, p in enumerate(unit.params):
                    shard = _local(p)
                    shard.copy_(local[id(unit)][ExchangeKey("w", _param_rect(i))].view_as(shard))
