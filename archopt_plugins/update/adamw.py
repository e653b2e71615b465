"""AdamW (Loshchilov & Hutter): Adam moments with decoupled weight decay, elementwise.

    W ← (1 − η·λ)·W
    m ← β₁·m + (1−β₁)·g,   v ← β₂·v + (1−β₂)·g²
    W ← W − η·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε)

the same arithmetic as ``torch.optim.AdamW`` (foreach), so the two agree to rounding. Used for
every role that a name does not give a matrix rule (embeddings, heads, norms, biases, routers).
Low-precision parameters keep their dtype; their state is float32 and so is the arithmetic.
"""

from __future__ import annotations

import math

import torch

from .kernel import ElementwiseKernel, HParams, zeros_state


def adamw_foreach_(
    params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
    exp_avg_sqs: list[torch.Tensor], steps: list[int], *, lr: float, beta1: float, beta2: float,
    eps: float, weight_decay: float,
) -> None:
    """One AdamW step over float32/float64 tensor lists; ``steps`` are the step counts after this step."""
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1.0 - beta2)
    step_sizes = [-lr / (1.0 - beta1**t) for t in steps]
    root_corrections = [math.sqrt(1.0 - beta2**t) for t in steps]
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, root_corrections)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_sizes)


class AdamWKernel(ElementwiseKernel):
    local_state_keys = ("exp_avg", "exp_avg_sq")

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param), "exp_avg_sq": zeros_state(param)}

    def step(self, params, grads, states, hp):
        beta1, beta2 = hp["betas"]
        kw = dict(lr=hp["lr"], beta1=beta1, beta2=beta2, eps=hp["eps"], weight_decay=hp["weight_decay"])
        # Low-precision parameters run on float32 working copies (their state is float32 already)
        # and are rounded back once.
        work = [p if p.dtype == s["exp_avg"].dtype else p.float() for p, s in zip(params, states)]
        adamw_foreach_(
            work, [g.to(w.dtype) for g, w in zip(grads, work)], [s["exp_avg"] for s in states],
            [s["exp_avg_sq"] for s in states], [int(s["step"]) for s in states], **kw,
        )
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


def adamw_reference_step(
    W: torch.Tensor, G: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, *, lr: float,
    betas: tuple[float, float], eps: float, weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AdamW step in float64, written plainly; ``step`` counts this step. Returns (W, m, v)."""
    W, G, m, v = (t.to(torch.float64) for t in (W, G, m, v))
    b1, b2 = betas
    W = W * (1.0 - lr * weight_decay)
    m = b1 * m + (1.0 - b1) * G
    v = b2 * v + (1.0 - b2) * G * G
    m_hat = m / (1.0 - b1**step)
    v_hat = v / (1.0 - b2**step)
    return W - lr * m_hat / (v_hat.sqrt() + eps), m, v
