"""Blockwise Adam: Adam's first moment per coordinate, one second moment per block.

    m ← β₁·m + (1−β₁)·g                                    (per coordinate, like Adam)
    v_b ← β₂·v_b + (1−β₂)·mean_{i∈b}(g_i²)                (one number per block b)
    W ← (1 − η·λ)·W − η·(m/(1−β₁ᵗ)) / (√(v_b/(1−β₂ᵗ)) + ε)

A block is, on the parameter's matrix view [fan_out, fan_in] (``block``):

* ``"row"`` — one output row (an output neuron; for an embedding table or output head, a token);
* ``"head"`` — one attention head's rows (the per-head matrix view; needs detected heads);
* ``"tensor"`` — the whole matrix (each expert of a stacked MoE weight is its own matrix).

Adam-mini (Zhang et al. 2024) observed that Adam's per-coordinate v is largely redundant inside
such blocks; keeping one v per block cuts the second moment from 4 bytes per parameter to a few
per row, so the rule's state is about 4 bytes per parameter instead of AdamW's 8. With blocks of
one coordinate this is exactly AdamW.

Needs reductions (a sum of squares per block). Here it is written as a :class:`MatrixKernel`:
``prepare`` advances m and hands over the gradient, ``transform`` reduces complete matrices to
block statistics, advances v (kept with the whole matrix, ``owner_state["exp_avg_sq"]``) and returns
the per-coordinate 1/(√v̂ + ε), ``apply`` multiplies it into m̂ and writes the step.
"""

from __future__ import annotations

import math

import torch

from .kernel import HParams, MatrixBatch, MatrixKernel, add_scaled_, zeros_state

BLOCKS = ("row", "head", "tensor")


def block_mean_square(G: torch.Tensor, block: str) -> torch.Tensor:
    """mean(g²) per block of a batch [N, m, n]: [N, m, 1] for rows, [N, 1, 1] for heads/tensors."""
    if block == "row":
        return (G * G).mean(dim=-1, keepdim=True)
    if block in ("head", "tensor"):  # with block="head" each matrix of the view is one head
        return (G * G).mean(dim=(-2, -1), keepdim=True)
    raise ValueError(f"block must be one of {list(BLOCKS)}, got {block!r}")


class BlockwiseAdamKernel(MatrixKernel):
    needs = "reductions"
    local_state_keys = ("exp_avg",)
    transform_keys = ("betas", "eps", "block")

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param)}

    state_shapes_complete = True  # a checkpoint made with another block setting is refused on load

    def state_shapes(self, shape, matrix_shape, hp):
        count, rows, _ = matrix_shape
        blocks = (count, rows, 1) if hp.get("block", "row") == "row" else (count, 1, 1)
        return {"exp_avg": tuple(shape), "exp_avg_sq": blocks}

    def state_bytes(self, shape, matrix_shape, hp):
        return 4 * sum(math.prod(s) for s in self.state_shapes(tuple(shape), matrix_shape, hp).values())

    def cost(self, count: int, fan_out: int, fan_in: int) -> float:
        return float(count) * fan_out * fan_in

    def prepare(self, param, grad, state, hp):
        m = state["exp_avg"]
        g = grad.to(m.dtype)
        m.lerp_(g, 1.0 - hp["betas"][0])
        return g

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        beta2, eps = hp["betas"][1], hp["eps"]
        stats = block_mean_square(batch.data, hp["block"])
        scales = []
        for seg, piece in zip(batch.segments, batch.split(stats)):
            v = batch_state(seg.owner_state, piece, seg.fqn)
            v.mul_(beta2).add_(piece, alpha=1.0 - beta2)
            denom = (v / (1.0 - beta2**seg.step)).sqrt_().add_(eps)
            scales.append(denom.reciprocal_())
        inv = torch.cat(scales, dim=0) if len(scales) > 1 else scales[0]
        return inv.expand_as(batch.data)

    def apply(self, param, update, state, hp, fan_out, fan_in):
        beta1 = hp["betas"][0]
        step = int(state["step"])
        direction = state["exp_avg"] * update.to(state["exp_avg"].dtype)
        add_scaled_(param, direction, hp["lr"], hp["weight_decay"], 1.0 / (1.0 - beta1**step))


def batch_state(owner_state: dict[str, torch.Tensor], like: torch.Tensor, fqn: str) -> torch.Tensor:
    """The parameter's block second moment, created at its first step; a wrong shape is an error."""
    v = owner_state.get("exp_avg_sq")
    if v is None:
        v = owner_state["exp_avg_sq"] = torch.zeros_like(like)
    elif v.shape != like.shape:
        raise ValueError(f"parameter {fqn!r}: its blockwise second moment has shape {tuple(v.shape)} but the "
                         f"current block setting needs {tuple(like.shape)}; the state was made with another "
                         "'block' or per-head view (start the state afresh, or keep the block setting)")
    return v


def blockwise_adam_reference_step(
    W: torch.Tensor, G: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, *, lr: float,
    betas: tuple[float, float], eps: float, weight_decay: float, block: str, head_dim: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step on a single [fan_out, fan_in] matrix in float64, written plainly. Returns (W, m, v).

    ``v`` has one entry per block: [fan_out] for rows, [fan_out // head_dim] for heads, [] for the tensor.
    """
    W, G, m, v = (t.to(torch.float64) for t in (W, G, m, v))
    b1, b2 = betas
    rows, cols = G.shape
    if block == "row":
        stat = torch.stack([(G[i] ** 2).sum() / cols for i in range(rows)])
        per_coord = lambda x: x[:, None].expand(rows, cols)  # noqa: E731
    elif block == "head":
        heads = rows // head_dim
        stat = torch.stack([(G[h * head_dim:(h + 1) * head_dim] ** 2).sum() / (head_dim * cols) for h in range(heads)])
        per_coord = lambda x: x.repeat_interleave(head_dim)[:, None].expand(rows, cols)  # noqa: E731
    elif block == "tensor":
        stat = (G ** 2).sum() / G.numel()
        per_coord = lambda x: x.expand(rows, cols)  # noqa: E731
    else:
        raise ValueError(f"block must be one of {list(BLOCKS)}, got {block!r}")
    m = b1 * m + (1 - b1) * G
    v = b2 * v + (1 - b2) * stat
    m_hat = m / (1 - b1**step)
    v_hat = per_coord(v / (1 - b2**step))
    W = (1 - lr * weight_decay) * W - lr * m_hat / (v_hat.sqrt() + eps)
    return W, m, v
