"""Shampoo (Gupta et al. 2018) and one-sided Shampoo, blocked, grafted to Adam's step size.

For each block G (r×c) of a matrix's gradient:

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G       (statistics="ema"; "sum": L ← L + G·Gᵀ)
    every k steps:  L⁻ = (L/(1−β₂ᵗ))^(−1/4),  R⁻ = (R/(1−β₂ᵗ))^(−1/4)   (damped, matrix_roots.py)
    P = L⁻·G·R⁻

* **one side.** ``one_sided_shampoo`` — and two-sided Shampoo on blocks whose longer side exceeds
  ``one_sided_ratio``× the shorter — keep only the shorter side's factor with exponent 1/2:
  P = L^(−1/2)·G (or G·R^(−1/2)). "Structured Preconditioners in Adaptive Optimization: A Unified
  Analysis" (Xie et al. 2025) proves this variant a better rate than two-sided Shampoo; it also
  needs one factor instead of two.
* **grafting** (``graft="adam"``): Shampoo's direction, Adam's size. Per block,
  P ← P·‖A‖_F/‖P‖_F with A = G/(√(v/(1−β₂ᵗ)) + ε) and v the EMA (or sum) of G². This lets Adam's
  learning rate carry over and absorbs the roots' staleness between recomputations.
  ``graft="none"`` uses P as it is (≈ the polar factor U·Vᵀ at step 1).
* **momentum**: M ← β₁·M + (1−β₁)·P (bias-corrected), then W ← (1 − η·λ)·W − η·M̂.

Where it runs: ``prepare`` passes the gradient through; ``transform`` (complete matrices, batched by
shape) keeps L, R, their roots and the graft moment in owner state; ``apply`` does momentum and the
step on the local piece. Guards: see ``owner_state.py`` (finite statistics only) and
``matrix_roots.py`` (rank deficiency, eigh failure).
"""

from __future__ import annotations

import torch

from .blocked_kernel import BlockedPreconditionerKernel, compute_dtype_of
from .blocking import BlockGrid, Sides
from .kernel import HParams, MatrixBatch, add_scaled_, zeros_state
from .matrix_roots import inverse_root, inverse_root_reference
from .owner_state import (gradient_rows_ok, spans, state_of, update_rows_, warn_decomposition_failed,
                          zero_nonfinite_)

GRAFTS = ("adam", "none")
STATISTICS = ("ema", "sum")


class ShampooKernel(BlockedPreconditionerKernel):
    local_state_keys = ("exp_avg",)  # only with betas[0] > 0
    transform_keys = ("betas", "eps", "matrix_eps", "precondition_frequency", "statistics", "block_size",
                      "one_sided_ratio", "graft", "root_dtype", "compute_dtype")

    def __init__(self, sides: Sides = "two_sided") -> None:
        self.sides = sides
        if sides == "one_sided":  # every block is one-sided: the ratio is not a hyperparameter
            self.transform_keys = tuple(k for k in self.transform_keys if k != "one_sided_ratio")
        self.label = "shampoo" if sides == "two_sided" else "one_sided_shampoo"

    # -- state layout ---------------------------------------------------------------------------
    def local_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("exp_avg",) if hp["betas"][0] > 0 else ()

    def owner_matrix_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("graft_sq",) if hp["graft"] == "adam" else ()

    def factor_keys(self, side: str) -> tuple[str, ...]:
        return (side, f"{side}_root")

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {"exp_avg": zeros_state(param)} if hp["betas"][0] > 0 else {}

    # -- the three phases -----------------------------------------------------------------------
    def prepare(self, param, grad, state, hp):
        return grad

    def transform(self, batch: MatrixBatch, hp: HParams) -> torch.Tensor:
        dtype = compute_dtype_of(hp)
        root_dtype = compute_dtype_of({"compute_dtype": hp["root_dtype"]})
        # Contiguous, so a matrix's arithmetic is the same whether it came alone (maybe a transposed
        # view of its gradient) or concatenated with others. May alias the gradient: never modified.
        G = batch.data.to(dtype).contiguous()
        N, m, n = G.shape
        grid = self.grid(m, n, hp)
        beta2, ema = hp["betas"][1], hp["statistics"] == "ema"
        # EMA bias corrections 1 − β₂ᵗ per parameter, as Python floats (see owner_state.per_matrix).
        corrections = {seg.fqn: (1.0 - beta2 ** seg.step) if ema else 1.0 for seg in batch.segments}
        due = [seg for seg in batch.segments if (seg.step - 1) % hp["precondition_frequency"] == 0]
        ok = gradient_rows_ok(G)  # None: every matrix's statistics can be updated in place

        directions = []
        for cl, g in zip(grid.classes, grid.split(G)):
            block = g  # preconditioned side by side; the statistics use the raw gradient g
            for side, on, size in (("L", cl.left, cl.rows), ("R", cl.right, cl.cols)):
                if not on:
                    continue
                key, root_key, shape = f"{side}.{cl.key}", f"{side}_root.{cl.key}", (cl.count, size, size)
                block_ok = None if ok is None else ok.repeat_interleave(cl.count)
                for seg, a, b in spans(batch, cl.count):
                    stat = state_of(seg, key, shape, dtype, G.device).view(-1, size, size)
                    x = g[a:b] if side == "L" else g[a:b].mT  # L ← x·xᵀ terms
                    self._accumulate(stat, x, beta2, ema, None if ok is None else block_ok[a:b])
                    state_of(seg, root_key, shape, dtype, G.device)
                if due:
                    self._recompute_roots(batch, due, key, root_key, shape, corrections, cl.exponent,
                                          hp["matrix_eps"], dtype, root_dtype)
                out = torch.empty_like(block)
                for seg, a, b in spans(batch, cl.count):
                    root = seg.owner_state[root_key].view(-1, size, size)
                    if side == "L":
                        torch.matmul(root, block[a:b], out=out[a:b])
                    else:
                        torch.matmul(block[a:b], root, out=out[a:b])
                block = out
            directions.append(block)

        if hp["graft"] == "adam":
            directions = self._graft(batch, G, grid, directions, corrections, hp, dtype)
        update = grid.merge(directions)
        return zero_nonfinite_(update, batch, self.label)

    @staticmethod
    def _accumulate(stat, x, beta2, ema, ok):
        """L ← β₂·L + (1−β₂)·x·xᵀ (ema) or L + x·xᵀ (sum), in place (one baddbmm), skipping rows whose
        gradient overflowed."""
        beta, alpha = (beta2, 1.0 - beta2) if ema else (1.0, 1.0)
        if not ema:  # a sum can overflow even from finite terms: the diagonals (largest entries) tell
            grown = stat.diagonal(dim1=-2, dim2=-1) + x.square().sum(dim=-1)
            sums_ok = torch.isfinite(grown).all(dim=-1)
            if not bool(sums_ok.all()):
                ok = sums_ok if ok is None else sums_ok & ok
        update_rows_(stat, lambda s: torch.baddbmm(s, x, x.mT, beta=beta, alpha=alpha),
                     lambda s: s.baddbmm_(x, x.mT, beta=beta, alpha=alpha), ok)

    def _recompute_roots(self, batch, due, key, root_key, shape, corrections, exponent, matrix_eps, dtype,
                         root_dtype):
        size = shape[-1]
        # Bias-correct the EMA so a root does not depend on how many steps the EMA has seen.
        stats = [seg.owner_state[key].view(-1, size, size) * (1.0 / corrections[seg.fqn]) for seg in due]
        new_roots, ok = inverse_root(stats[0] if len(stats) == 1 else torch.cat(stats), exponent, matrix_eps,
                                     root_dtype)
        sizes = [seg.count * shape[0] for seg in due]
        failed = []
        for seg, new_root, seg_ok in zip(due, torch.split(new_roots, sizes), torch.split(ok, sizes)):
            root = seg.owner_state[root_key].view(-1, size, size)
            if bool(seg_ok.all()):
                root.copy_(new_root)
            else:
                root.copy_(torch.where(seg_ok.view(-1, 1, 1), new_root.to(dtype), root))
                failed.append(seg.fqn)
        if failed:
            warn_decomposition_failed(failed, self.label)

    def _graft(self, batch, G, grid: BlockGrid, directions, corrections, hp, dtype):
        beta2, eps, ema = hp["betas"][1], hp["eps"], hp["statistics"] == "ema"
        adam, ok = torch.empty_like(G), gradient_rows_ok(G)
        for seg, a, b in spans(batch):
            v = state_of(seg, "graft_sq", tuple(G.shape[1:]), dtype, G.device)
            square = G[a:b] * G[a:b]
            self._accumulate_elementwise(v, square, beta2, ema, None if ok is None else ok[a:b])
            torch.div(G[a:b], (v * (1.0 / corrections[seg.fqn])).sqrt_().add_(eps), out=adam[a:b])
        grafted = []
        for direction, adam_block in zip(directions, grid.split(adam)):
            size = torch.linalg.matrix_norm(adam_block, keepdim=True)
            norm = torch.linalg.matrix_norm(direction, keepdim=True)
            # A zero direction (zero gradient) stays zero instead of 0/0.
            scale = torch.where(norm > 0, size / norm.clamp_min(torch.finfo(dtype).tiny), torch.zeros_like(norm))
            grafted.append(direction * scale)
        return grafted

    @staticmethod
    def _accumulate_elementwise(v, square, beta2, ema, ok):
        if ema:
            update_rows_(v, lambda s: s.lerp(square, 1.0 - beta2), lambda s: s.lerp_(square, 1.0 - beta2), ok)
        else:  # v ≥ 0, so a finite per-matrix sum means every entry is finite
            sums_ok = torch.isfinite(v.flatten(1).sum(dim=1) + square.flatten(1).sum(dim=1))
            update_rows_(v, lambda s: s + square, lambda s: s.add_(square),
                         None if bool(sums_ok.all()) and ok is None else sums_ok & (True if ok is None else ok))

    def apply(self, param, update, state, hp, fan_out, fan_in):
        beta1 = hp["betas"][0]
        if beta1 > 0:
            buf = state["exp_avg"]
            buf.lerp_(update.to(buf.dtype), 1.0 - beta1)
            update = buf / (1.0 - beta1 ** int(state["step"]))
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], 1.0)


def shampoo_reference_step(W: torch.Tensor, G: torch.Tensor, state: dict, step: int, *, sides: Sides,
                           lr: float, betas: tuple[float, float], eps: float, matrix_eps: float,
                           weight_decay: float, precondition_frequency: int, statistics: str,
                           block_size: int, one_sided_ratio: float, graft: str) -> torch.Tensor:
    """One Shampoo step on a single [m, n] matrix in float64, written block by block with loops.

    ``state`` (a plain dict, updated in place) holds per-block "L"/"R"/"L_root"/"R_root" keyed by
    (block row, block col), "graft_sq" and "exp_avg". Returns the new W.
    """
    W, G = W.to(torch.float64), G.to(torch.float64)
    beta1, beta2 = betas
    ema = statistics == "ema"
    grid = BlockGrid(W.shape[0], W.shape[1], block_size, sides, one_sided_ratio)
    if graft == "adam":
        v = state.get("graft_sq", torch.zeros_like(G))
        v = beta2 * v + (1 - beta2) * G * G if ema else v + G * G
        state["graft_sq"] = v
        v_hat = v / (1 - beta2 ** step) if ema else v
        adam = G / (v_hat.sqrt() + eps)
    update = torch.zeros_like(G)
    for cl in grid.classes:
        for bi in range(cl.row_count):
            for bj in range(cl.col_count):
                r0, c0 = cl.row_start + bi * cl.rows, cl.col_start + bj * cl.cols
                rows, cols = slice(r0, r0 + cl.rows), slice(c0, c0 + cl.cols)
                g = G[rows, cols]
                p = g
                for side, on, outer in (("L", cl.left, g @ g.T), ("R", cl.right, g.T @ g)):
                    if not on:
                        continue
                    key = (side, r0, c0)
                    stat = state.get(key, torch.zeros_like(outer))
                    stat = beta2 * stat + (1 - beta2) * outer if ema else stat + outer
                    state[key] = stat
                    if (step - 1) % precondition_frequency == 0:
                        corrected = stat / (1 - beta2 ** step) if ema else stat
                        state[(side + "_root", r0, c0)] = inverse_root_reference(corrected, cl.exponent, matrix_eps)
                    root = state[(side + "_root", r0, c0)]
                    p = root @ p if side == "L" else p @ root
                if graft == "adam":
                    a = adam[rows, cols]
                    norm = float(torch.linalg.norm(p))
                    p = p * (float(torch.linalg.norm(a)) / norm) if norm > 0 else torch.zeros_like(p)
                update[rows, cols] = p
    if beta1 > 0:
        m = state.get("exp_avg", torch.zeros_like(G))
        m = beta1 * m + (1 - beta1) * update
        state["exp_avg"] = m
        update = m / (1 - beta1 ** step)
    return (1 - lr * weight_decay) * W - lr * update
