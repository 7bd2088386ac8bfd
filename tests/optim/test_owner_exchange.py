"""The owner-computes exchange on one rank: bookkeeping, balancing and a round trip. The
multi-rank layouts (FSDP2, TP, FSDP x TP with `_StridedShard`) are exercised end to end by
`test_manifold_muon.py::test_distributed_equivalence`."""

import torch

from titan_geonorm.optim.owner_exchange import (
    ExchangeKey,
    OwnerExchange,
    RectKey,
    Routed,
    ShardRect,
    local_rect,
    mesh_group,
)


def test_shard_rect_shapes_and_indexing():
    full = torch.arange(24.0).view(4, 6)
    contiguous = ShardRect(slice(1, 3), slice(0, 6))
    assert contiguous.shape == (2, 6) and contiguous.numel == 12
    assert torch.equal(full[contiguous.index(full.device)], full[1:3])
    strided = ShardRect([0, 2], [1, 4, 5])
    assert strided.shape == (2, 3)
    assert torch.equal(full[strided.index(full.device)], full[[0, 2]][:, [1, 4, 5]])


def test_plain_tensors_are_whole_on_one_rank():
    w = torch.zeros(5, 3)
    assert local_rect(w, (5, 3)) == ShardRect(slice(0, 5), slice(0, 3))
    assert mesh_group(w) is None


def test_owner_balancing_largest_first():
    exchange = OwnerExchange(None)
    items = [Routed({}, {}) for _ in range(3)]
    exchange.assign_owners(items, [1.0, 5.0, 2.0])
    assert [item.owner for item in items] == [0, 0, 0]
    exchange.size = 2  # the balancing alone, as on a 2-rank group
    exchange.assign_owners(items, [1.0, 5.0, 2.0])
    assert [item.owner for item in items] == [1, 0, 1]


def test_single_rank_round_trip():
    key = RectKey("param", 0)
    item = Routed({key: (4, 3)}, {key: ShardRect(slice(0, 4), slice(0, 3))})
    x = torch.randn(4, 3)
    inp, out = ExchangeKey("x", key), ExchangeKey("twice", key)

    def compute(owned, fulls):
        assert owned == [item] and fulls[0][inp].shape == (12,)
        return [{out: 2 * fulls[0][inp]}]

    result = OwnerExchange(None).exchange([item], [item], lambda _: [(inp, x)], compute, lambda _: [out], x)
    assert torch.equal(result[id(item)][out].view(4, 3), 2 * x)
