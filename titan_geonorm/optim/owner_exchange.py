"""Owner computes: move every rank's shards of a matrix to one owner rank, compute there on the
whole matrix, move the result's shards back. Independent of what is computed.

A *routed item* (one whole matrix and the tensors laid out like it) has one owner rank in the
process group spanning its device mesh, chosen by greedy cost balancing (largest first, to the
least loaded rank). One all-to-all moves every rank's shards of the inputs to the owners, which
rebuild the full tensors and run `compute` batched over all they own; a second all-to-all returns
each rank its shards of the outputs.

Shards are located as `ShardRect`s: sharding a 2-D tensor on one dim selects indices of that dim
only, so a local shard is `rows x cols` of the global tensor. Each rank finds its rows (and its
cols) by sharding `arange` of that one dim like the tensor (`distribute_tensor(...,
src_data_rank=None)`, no communication), which covers `Shard`, `_StridedShard` (FSDP x TP) and
`Replicate` alike; a contiguous range is kept as a `slice`, anything else as a list. Owners receive
every rank's rectangles once, on the first exchange. Nothing of the tensors' size is materialized
for the bookkeeping.
"""

from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Sequence

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.placement_types import _StridedShard

__all__ = ["ExchangeKey", "OwnerExchange", "RectKey", "Routed", "ShardRect", "local_rect", "mesh_group"]


class RectKey(NamedTuple):
    """Which global tensor of an item a shard rectangle belongs to, e.g. parameter 0 or the
    item's dual variable."""

    tensor: str
    index: int = 0


class ExchangeKey(NamedTuple):
    """One tensor travelling through an exchange: its name (what it holds, e.g. the momentum
    direction or the weights) and the global tensor whose layout it has."""

    name: str
    rect: RectKey


@dataclass(frozen=True)
class ShardRect:
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
        """Index of the rectangle into the global tensor: `full[rect.index(device)]`."""
        rows, cols = (torch.tensor(x, device=device) if isinstance(x, list) else x for x in (self.rows, self.cols))
        if isinstance(rows, torch.Tensor) and isinstance(cols, torch.Tensor):
            rows = rows[:, None]
        return rows, cols


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _compact(ids: torch.Tensor) -> slice | list[int]:
    if ids.numel() == 0:
        return slice(0, 0)
    first = int(ids[0])
    if bool((ids == torch.arange(first, first + ids.numel(), device=ids.device)).all()):
        return slice(first, first + ids.numel())
    return ids.tolist()


def local_rect(like: torch.Tensor, shape: tuple[int, int], placements=None) -> ShardRect:
    """The rectangle held locally by a tensor of global `shape` laid out like `like` (with
    `placements` instead of `like`'s when given)."""
    if not isinstance(like, DTensor):
        return ShardRect(slice(0, shape[0]), slice(0, shape[1]))
    placements = like.placements if placements is None else placements
    per_dim = []
    for dim in range(2):
        # Sharding on `dim` becomes the same sharding of a 1-D tensor; any other placement
        # leaves `dim` whole.
        layout = [
            _StridedShard(0, split_factor=p.split_factor)
            if isinstance(p, _StridedShard) and p.dim == dim
            else Shard(0)
            if isinstance(p, Shard) and p.dim == dim
            else Replicate()
            for p in placements
        ]
        ids = torch.arange(shape[dim], dtype=torch.int64, device=_local(like).device)
        local_ids = distribute_tensor(ids, like.device_mesh, layout, src_data_rank=None).to_local()
        per_dim.append(_compact(local_ids))
    return ShardRect(*per_dim)


def mesh_group(param: torch.Tensor) -> dist.ProcessGroup | None:
    """The process group spanning `param`'s device mesh; for a plain tensor in a multi-rank job,
    the world (replicated parameters, as under DDP, still split the work); None for one rank."""
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
        return dist.group.WORLD
    return None


@dataclass
class Routed:
    """Exchange bookkeeping of one item: its owner, the global shape of each of its tensors, this
    rank's rectangle of each, and (on the owner only, after the first exchange) every rank's."""

    shapes: dict[RectKey, tuple[int, int]]
    local: dict[RectKey, ShardRect]
    owner: int = 0
    everyone: dict[RectKey, list[ShardRect]] = field(default_factory=dict)


Tensors = dict[ExchangeKey, torch.Tensor]
Inputs = Callable[[Routed], list[tuple[ExchangeKey, torch.Tensor]]]
Compute = Callable[[list[Routed], list[Tensors]], list[Tensors]]
Outputs = Callable[[Routed], list[ExchangeKey]]


class OwnerExchange:
    """The owner-computes exchange over one process group (None: a single rank)."""

    def __init__(self, group: dist.ProcessGroup | None) -> None:
        self.group = group
        self.size = 1 if group is None else dist.get_world_size(group)
        self.rank = 0 if group is None else dist.get_rank(group)
        self._rects_known = False

    def assign_owners(self, items: Sequence[Routed], costs: Sequence[float]) -> None:
        """Greedy balancing, identical on every rank: largest cost first, to the least loaded."""
        load = [0.0] * self.size
        for i in sorted(range(len(items)), key=lambda i: -costs[i]):
            items[i].owner = min(range(self.size), key=lambda r: load[r])
            load[items[i].owner] += costs[i]

    def _all_to_all(self, send: list[list[torch.Tensor]], recv_sizes: list[int], like: torch.Tensor):
        """Send `cat(send[r])` to every rank r; return what each rank sent here (split by rank)."""
        chunks = [torch.cat(parts) if parts else like.new_empty(0) for parts in send]
        if self.group is None:
            return chunks
        out = like.new_empty(sum(recv_sizes))
        dist.all_to_all_single(out, torch.cat(chunks), recv_sizes, [c.numel() for c in chunks], group=self.group)
        return list(out.split(recv_sizes))

    def _gather_rects(self, items: Sequence[Routed]) -> None:
        """Once (collective over the group): every owner learns every rank's rectangles of the
        items it owns. `items` must be all the items, in the same order on every rank."""
        mine = [[item.local[k] for k in sorted(item.local)] for item in items]
        everyone = [mine]
        if self.group is not None:
            everyone = [None] * self.size
            dist.all_gather_object(everyone, mine, group=self.group)
        for u, item in enumerate(items):
            if item.owner == self.rank:
                for j, key in enumerate(sorted(item.local)):
                    item.everyone[key] = [everyone[src][u][j] for src in range(self.size)]
        self._rects_known = True

    def exchange(
        self,
        all_items: Sequence[Routed],
        items: Sequence[Routed],
        inputs: Inputs,
        compute: Compute,
        outputs: Outputs,
        like: torch.Tensor,
    ) -> dict[int, Tensors]:
        """Run `compute` on the owners of `items` (a subset of `all_items`, the same on every rank).

        `inputs(item)`: `[(key, local shard)]`; `compute(owned, fulls)` runs on each owner with
        `fulls[j][key]` the flat global fp32 tensors of `owned[j]` and returns full outputs keyed
        the same way; `outputs(item)` lists the output keys in travel order. `like`: a local
        tensor on the compute device. Returns `{id(item): {key: flat fp32 local shard}}`.
        """
        if not self._rects_known:
            self._gather_rects(all_items)
        like = like.new_empty(0, dtype=torch.float32)
        local_in = {id(item): inputs(item) for item in items}
        send = [[] for _ in range(self.size)]
        for item in items:
            send[item.owner] += [t.reshape(-1).float() for _, t in local_in[id(item)]]
        owned = [item for item in items if item.owner == self.rank]
        recv_sizes = [
            sum(item.everyone[key.rect][src].numel for item in owned for key, _ in local_in[id(item)])
            for src in range(self.size)
        ]
        received = self._all_to_all(send, recv_sizes, like)
        fulls = [{} for _ in owned]
        offsets = [0] * self.size
        for j, item in enumerate(owned):
            for key, _ in local_in[id(item)]:
                # Zeros, not empty: with fake collectives (dry runs) the rectangles need not cover it.
                full = like.new_zeros(item.shapes[key.rect])
                for src in range(self.size):
                    rect = item.everyone[key.rect][src]
                    piece = received[src][offsets[src] : offsets[src] + rect.numel]
                    full[rect.index(full.device)] = piece.view(rect.shape)
                    offsets[src] += rect.numel
                fulls[j][key] = full.view(-1)
        results = compute(owned, fulls) if owned else []
        back = [[] for _ in range(self.size)]
        for item, result in zip(owned, results):
            for dst in range(self.size):
                for key in outputs(item):
                    rect = item.everyone[key.rect][dst]
                    full = result[key].reshape(item.shapes[key.rect])
                    back[dst].append(full[rect.index(full.device)].reshape(-1))
        back_sizes = [
            sum(item.local[key.rect].numel for item in items if item.owner == src for key in outputs(item))
            for src in range(self.size)
        ]
        returned = self._all_to_all(back, back_sizes, like)
        offsets = [0] * self.size
        local_out = {}
        for item in items:
            parts = {}
            for key in outputs(item):
                count = item.local[key.rect].numel
                parts[key] = returned[item.owner][offsets[item.owner] : offsets[item.owner] + count]
                offsets[item.owner] += count
            local_out[id(item)] = parts
        return local_out
