"""Per-expert units of a MoE weight (shard/experts.py): clipping pieces to experts and back."""

import torch

from archopt_plugins.shard.experts import held_experts, join_experts, split_by_expert, take_expert
from archopt_plugins.shard.layout import Block, BlockRange, FlatRange, ParamLayout, read_piece, write_piece

SHAPE = (4, 3, 5)  # 4 experts of 3x5


def _roundtrip(layout: ParamLayout) -> None:
    """Every rank's local tensor, cut into experts and joined back, is unchanged; the per-expert
    pieces hold exactly the elements of that expert."""
    full = torch.arange(60, dtype=torch.float32).reshape(SHAPE)
    parts = split_by_expert(layout)
    assert parts is not None and [p.shape for p in parts] == [(1, 3, 5)] * 4
    for part in parts:
        part.validate()  # the clipped pieces cover each expert exactly once
    for rank, piece in enumerate(layout.pieces):
        if piece is None or piece.numel == 0:
            continue
        local = read_piece(full, piece)  # as the rank stores it: a block in its shape, a fragment flat
        local = local.reshape(piece.sizes) if isinstance(piece, Block) else local
        held = held_experts(piece, 4, (3, 5))
        cut = [take_expert(local, piece, e, (3, 5)) for e in held]
        for e, data in zip(held, cut):
            expert = torch.zeros(1, 3, 5)
            write_piece(expert, parts[e].pieces[rank], data.reshape(-1))
            mask = torch.zeros(1, 3, 5, dtype=torch.bool)
            write_piece(mask, parts[e].pieces[rank], torch.ones(data.numel(), dtype=torch.bool))
            assert torch.equal(expert[mask], full[e:e + 1][mask])
        assert torch.equal(join_experts(cut, piece, local.shape), local)


def test_fsdp_rows_give_whole_experts_to_their_holders():
    # Shard(0) over 3 ranks of 4 experts: 2, 2, 0 experts (uneven, one rank empty)
    pieces = (Block((0, 0, 0), (2, 3, 5)), Block((2, 0, 0), (2, 3, 5)), Block((4, 0, 0), (0, 3, 5)))
    layout = ParamLayout("w", SHAPE, pieces)
    parts = split_by_expert(layout)
    assert [part.full_holders() for part in parts] == [[0], [0], [1], [1]]
    _roundtrip(layout)


def test_flat_fragments_are_clipped_to_each_expert():
    # ZeRO-like ranges cutting experts mid-row; rank 2 holds nothing
    layout = ParamLayout("w", SHAPE, (FlatRange(0, 22), FlatRange(22, 60), None))
    parts = split_by_expert(layout)
    assert parts[1].pieces == (FlatRange(0, 7), FlatRange(7, 15), None)
    assert parts[0].full_holders() == [0] and parts[3].full_holders() == [1]
    _roundtrip(layout)


def test_replicated_and_tp_blocks():
    _roundtrip(ParamLayout("w", SHAPE, (Block((0, 0, 0), SHAPE),) * 2))
    _roundtrip(ParamLayout("w", SHAPE, (Block((0, 0, 0), (4, 3, 2)), Block((0, 0, 2), (4, 3, 3)))))


def test_other_piece_kinds_and_single_experts_are_not_split():
    block_range = BlockRange(Block((0, 0, 0), SHAPE), 0, 60)
    assert split_by_expert(ParamLayout("w", SHAPE, (block_range,))) is None
    assert split_by_expert(ParamLayout("w", (1, 3, 5), (Block((0, 0, 0), (1, 3, 5)),))) is None
