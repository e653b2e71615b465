"""Evaluation batches over ranks: the same batches are counted; collective forwards run equally often."""

import pytest

from archopt_plugins.recipe.runner import eval_indices


@pytest.mark.parametrize("n,world", [(2, 4), (4, 4), (5, 2), (7, 3), (1, 1)])
def test_counted_batches_are_each_batch_once(n, world):
    for collective in (False, True):
        counted = sorted(i for r in range(world) for i in eval_indices(n, r, world, collective) if i < n)
        assert counted == list(range(n))


@pytest.mark.parametrize("n,world", [(2, 4), (5, 2), (7, 3)])
def test_collective_forwards_run_the_same_number_of_times_on_every_rank(n, world):
    counts = {len(eval_indices(n, r, world, True)) for r in range(world)}
    assert counts == {-(-n // world)}  # uneven counts would leave a rank waiting in an all-gather


def test_replicated_engines_split_as_before():
    assert eval_indices(2, 3, 4, False) == [] and eval_indices(5, 1, 2, False) == [1, 3]
