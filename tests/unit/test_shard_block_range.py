"""BlockRange pieces: flat ranges of a tensor-parallel block (Megatron's distributed optimizer under TP)."""

from __future__ import annotations

import pytest
import torch

from archopt_plugins.shard.layout import Block, BlockRange, FlatRange, ParamLayout, read_piece, write_piece


def _column_block_ranges(shape, tp, cuts):
    """TP column blocks of ``shape``, each cut into flat ranges at ``cuts`` (fractions of the block)."""
    rows, cols = shape
    width = cols // tp
    pieces = []
    for t in range(tp):
        block = Block((0, t * width), (rows, width))
        bounds = [round(c * block.numel) for c in (0.0, *cuts, 1.0)]
        pieces += [BlockRange(block, a, b) for a, b in zip(bounds, bounds[1:])]
    return pieces


def test_block_range_reads_and_writes_row_major_within_the_block():
    full = torch.arange(6 * 8, dtype=torch.float32).view(6, 8)
    block = Block((0, 4), (6, 4))
    piece = BlockRange(block, 3, 13)  # starts mid-row, spans rows, ends mid-row
    expected = full[:, 4:8].reshape(-1)[3:13]
    assert torch.equal(read_piece(full, piece), expected)
    target = torch.zeros(6, 8)
    write_piece(target, piece, expected)
    mask = torch.zeros(6, 4)
    mask.view(-1)[3:13] = 1
    assert torch.equal(target[:, 4:8], full[:, 4:8] * mask)
    assert torch.equal(target[:, :4], torch.zeros(6, 4))  # nothing outside the block is touched


def test_column_blocks_cut_into_ranges_cover_exactly_and_assemble():
    shape = (6, 8)
    pieces = _column_block_ranges(shape, tp=2, cuts=(0.3, 0.55))
    layout = ParamLayout("w", shape, tuple(pieces))
    layout.validate()
    source = torch.randn(shape)
    assembled = torch.full(shape, float("nan"))
    for piece in pieces:
        write_piece(assembled, piece, read_piece(source, piece))
    assert torch.equal(assembled, source)


@pytest.mark.parametrize("pieces, message", [
    ((BlockRange(Block((0, 0), (6, 4)), 0, 24), BlockRange(Block((0, 4), (6, 4)), 0, 20)), "cover 44 of 48"),
    ((BlockRange(Block((0, 0), (6, 4)), 0, 24), BlockRange(Block((0, 4), (6, 4)), 0, 24),
      FlatRange(5, 6)), "cover 49 of 48"),
    ((BlockRange(Block((0, 0), (6, 4)), 0, 25), BlockRange(Block((0, 4), (6, 4)), 1, 24)), "outside its block"),
    ((BlockRange(Block((0, 6), (6, 4)), 0, 24), BlockRange(Block((0, 0), (6, 4)), 0, 24)), "outside its shape"),
])
def test_bad_block_ranges_raise_naming_the_parameter(pieces, message):
    with pytest.raises(ValueError, match=rf"parameter 'w'.*{message}"):
        ParamLayout("w", (6, 8), pieces).validate()


def test_overlapping_block_ranges_with_the_right_total_are_caught():
    # The flat range [7, 8) is element (0, 7), the 4th element of the right block, which its first
    # range already holds; the right block's last element is missing: the total still adds up.
    left = Block((0, 0), (6, 4))
    right = Block((0, 4), (6, 4))
    pieces = (BlockRange(left, 0, 24), BlockRange(right, 0, 23), FlatRange(7, 8))
    with pytest.raises(ValueError, match=r"parameter 'w': two shards overlap"):
        ParamLayout("w", (6, 8), pieces).validate()
