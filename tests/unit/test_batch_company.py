"""A parameter's whole-matrix update does not depend on which other parameters share its batch.

The sharding engine's exactness rests on this: one process batches all same-shape matrices of a
model together, an owner rank only those it owns, so the same matrix meets different company. Every
matrix rule is run through ``transform_complete`` alone and in company, for a shape that batches
(sides multiples of 16) and one that goes alone (see ``MatrixKernel.batches_bitwise``), and the
updates and owner state must be bitwise equal.
"""

import pytest
import torch

from archopt_plugins import build_optimizer
from archopt_plugins.planner.rules import RULES
from archopt_plugins.roles.types import ParamStructure
from archopt_plugins.update.batching import Complete, transform_complete
from archopt_plugins.update.kernel import MatrixKernel

MATRIX_RULES = sorted(name for name, rule in RULES.items() if isinstance(rule.kernel, MatrixKernel))
SHAPES = {"aligned 32x48": (32, 48), "unaligned 27x41": (27, 41), "unaligned 9x9": (9, 9)}


def _hparams(rule: str, shape: tuple[int, int]) -> dict:
    extra = {k: v for k, v in dict(block_size=16, precondition_frequency=2, compute_dtype="float32").items()
             if k in RULES[rule].hparams}
    group = {"params": [torch.nn.Parameter(torch.randn(shape))], "param_names": ["w"], "role": "hidden",
             "rule": rule, **extra}
    return build_optimizer([group], "adamw").plan.entry("w").hparams


def _item(fqn: str, rule: str, tensor: torch.Tensor, param: torch.Tensor, hp: dict, state: dict,
          step: int) -> Complete:
    return Complete(fqn, RULES[rule].kernel, rule, tensor, ParamStructure(), hp, state, step, param)


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
@pytest.mark.parametrize("rule", MATRIX_RULES)
def test_update_and_owner_state_are_independent_of_batch_company(rule, shape_name):
    shape = SHAPES[shape_name]
    hp = _hparams(rule, shape)
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(shape, generator=gen)
    alone_state, company_state, neighbour_states = {}, {}, [{}, {}]
    for step in range(1, 5):
        grad = torch.randn(shape, generator=gen)
        # in company the tensor is a view at an odd offset of a larger buffer, as after a receive
        buffer = torch.randn(grad.numel() + 3, generator=gen)
        buffer[3:] = grad.flatten()
        viewed = buffer[3:].view(shape)
        others = [torch.randn(shape, generator=gen) for _ in range(2)]
        (alone,) = transform_complete([_item("w", rule, grad.clone(), param, hp, alone_state, step)])
        company = transform_complete([
            _item("a", rule, others[0], param, hp, neighbour_states[0], step + 2),
            _item("w", rule, viewed, param, hp, company_state, step),
            _item("b", rule, others[1], param, hp, neighbour_states[1], step)])
        assert torch.equal(alone, company[1]), f"step {step}"
    assert alone_state.keys() == company_state.keys()
    for key, value in alone_state.items():
        assert torch.equal(value, company_state[key]), key
