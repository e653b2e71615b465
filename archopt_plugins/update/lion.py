"""Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"): sign descent with momentum.

    c = β₁·m + (1−β₁)·g                  (the interpolation the sign is taken of)
    W ← (1 − η·λ)·W − η·sign(c)
    m ← β₂·m + (1−β₂)·g                  (the momentum is updated *after*, with the slower β₂)

Steepest descent under the ℓ∞ norm: every coordinate moves by exactly η (or 0 where c is 0), so
the update's RMS is η whatever the gradient scale. That is why Lion wants a 3–10× smaller learning
rate than AdamW and a correspondingly larger weight decay (the paper's advice). One state tensor
(4 bytes per parameter in fp32), half of AdamW's.

Elementwise: it runs on any shard as it is, on every parameter kind (the paper applies it to all
parameters, embeddings and norms included). Low-precision parameters keep their dtype; the state
and the arithmetic are float32.
"""

from __future__ import annotations

import torch

from .kernel import ElementwiseKernel, HParams, zeros_state


def lion_foreach_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor], *,
                  lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """One Lion step over same-dtype tensor lists (float32 or float64), in place."""
    if not params:
        return
    direction = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_sign_(direction)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    # At lr = 0 this adds exact zeros: the zero-lr initialising step of torch.distributed.checkpoint
    # leaves parameters bit-identical.
    torch._foreach_add_(params, direction, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)


class LionKernel(ElementwiseKernel):
    local_state_keys = ("exp_avg",)

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param)}

    def step(self, params, grads, states, hp):
        beta1, beta2 = hp["betas"]
        work = [p if p.dtype == s["exp_avg"].dtype else p.float() for p, s in zip(params, states)]
        lion_foreach_(work, [g.to(w.dtype) for g, w in zip(grads, work)], [s["exp_avg"] for s in states],
                      lr=hp["lr"], beta1=beta1, beta2=beta2, weight_decay=hp["weight_decay"])
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)


def lion_reference_step(
    W: torch.Tensor, G: torch.Tensor, m: torch.Tensor, *, lr: float, betas: tuple[float, float],
    weight_decay: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Lion step in float64, written plainly. Returns (W, m); inputs are not modified."""
    W, G, m = (t.to(torch.float64) for t in (W, G, m))
    b1, b2 = betas
    update = torch.sign(b1 * m + (1.0 - b1) * G)
    W = (1.0 - lr * weight_decay) * W - lr * update
    return W, b2 * m + (1.0 - b2) * G
