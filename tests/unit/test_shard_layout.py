"""The sharding engine's pure parts: layouts, owners and the transfer plan (no processes needed)."""

import pytest
import torch

from archopt_plugins.shard.discover import local_piece
from archopt_plugins.shard.layout import (Block, FlatRange, ParamLayout, flat_fragments, read_piece, replicated,
                                          tp_split, write_piece)
from archopt_plugins.shard.owners import Unit, assign_owners
from archopt_plugins.shard.transport import build_plan


def row_blocks(fqn, shape, world):
    """FSDP2-style Shard(0): ceil-sized row chunks, trailing ranks possibly empty."""
    chunk = -(-shape[0] // world)
    pieces = []
    for r in range(world):
        lo, hi = min(r * chunk, shape[0]), min((r + 1) * chunk, shape[0])
        pieces.append(Block((lo, 0), (hi - lo, shape[1])) if hi > lo else None)
    return ParamLayout(fqn, shape, tuple(pieces))


def test_pieces_round_trip_through_a_complete_tensor():
    full = torch.arange(60.0).reshape(6, 10)
    for piece in (Block((1, 3), (4, 5)), FlatRange(7, 33)):
        data = read_piece(full, piece)
        assert data.numel() == piece.numel
        other = torch.zeros_like(full)
        write_piece(other, piece, data)
        assert torch.equal(read_piece(other, piece), data)


def test_layouts_cover_exactly():
    replicated("w", (4, 6), 3).validate()
    row_blocks("w", (3, 5), 4).validate()  # fewer rows than ranks: an empty rank
    tp_split("w", (4, 6), 1, [[0, 1], [2, 3]], 4).validate()
    flat_fragments("w", (5, 7), {0: (0, 11), 1: (11, 30), 2: (30, 35)}, 4)  # mid-row cuts, rank 3 empty


@pytest.mark.parametrize("pieces,message", [
    ((Block((0, 0), (2, 6)), Block((3, 0), (1, 6))), r"cover 18 of 24 elements"),
    ((Block((0, 0), (3, 6)), Block((2, 0), (2, 6))), r"cover 30 of 24"),
    ((Block((0, 0), (2, 6)), Block((2, 0), (2, 7))), r"lies outside its shape"),
    ((FlatRange(0, 12), FlatRange(10, 22), FlatRange(22, 24)), r"cover 26 of 24|overlap"),
])
def test_bad_layouts_raise_naming_the_parameter(pieces, message):
    with pytest.raises(ValueError, match=rf"parameter 'w': .*{message}"):
        ParamLayout("w", (4, 6), pieces).validate()


def test_overlap_with_right_total_is_caught():
    # Same element count as the tensor, but two blocks overlap and one region is missing.
    layout = ParamLayout("w", (4, 4), (Block((0, 0), (2, 4)), Block((1, 0), (2, 4))))
    with pytest.raises(ValueError, match="overlap|cover"):
        layout.validate()
    flat = ParamLayout("w", (4, 4), (FlatRange(0, 8), FlatRange(4, 12)))
    with pytest.raises(ValueError, match="cover 16 of 16|overlap"):
        flat.validate()


def test_owners_balance_largest_first_and_prefer_complete_holders():
    units = [Unit(f"p{i}", cost, ()) for i, cost in enumerate([8, 7, 6, 5, 4, 3, 2, 1])]
    owners = assign_owners(units, 2)
    load = [sum(u.cost for u in units if owners[u.fqn] == r) for r in range(2)]
    assert load == [18, 18]
    assert assign_owners(units, 2) == owners  # deterministic
    local = assign_owners([Unit("a", 5, (1,)), Unit("b", 5, ())], 2)
    assert local["a"] == 1 and local["b"] == 0


def test_transfer_plans():
    ddp = replicated("w", (4, 6), 3)
    plan = build_plan([ddp], {"w": 1}, rank=1, world=3)
    assert plan.computes == ["w"] and not plan.gather_any  # the owner holds it all
    assert [len(x) for x in plan.return_send] == [1, 0, 1] and plan.return_any

    fsdp = row_blocks("w", (4, 6), 2)
    owner_side = build_plan([fsdp], {"w": 0}, rank=0, world=2)
    assert [len(x) for x in owner_side.gather_recv] == [0, 1] and [len(x) for x in owner_side.return_send] == [0, 1]
    other = build_plan([fsdp], {"w": 0}, rank=1, world=2)
    assert other.computes == [] and [len(x) for x in other.gather_send] == [1, 0]

    redundant = build_plan([fsdp], {"w": 0}, rank=1, world=2, redundant=True)
    assert redundant.computes == ["w"] and not redundant.return_any


def test_local_piece_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"parameter 'q': a flat 1-D tensor of 12 elements .* no fragment map"):
        local_piece("q", torch.zeros(12), (4, 6), {})
    with pytest.raises(ValueError, match=r"parameter 'q': cannot determine its layout: .* shape \(3, 5\)"):
        local_piece("q", torch.zeros(3, 5), (4, 6), {})
    assert local_piece("q", torch.zeros(4, 6), (4, 6), {}) == Block((0, 0), (4, 6))
    assert local_piece("q", torch.zeros(5), (4, 6), {"q": FlatRange(3, 8)}) == FlatRange(3, 8)
