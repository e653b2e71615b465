"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"), blocked.

Adam run in the eigenbasis of Shampoo's statistics. For each block G (r×c):

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G
    step 1: Q_L, Q_R = eigenvectors of L, R (descending eigenvalues)
    m ← β₁·m + (1−β₁)·G                                 (first moment, original coordinates)
    G' = Q_Lᵀ·G·Q_R,  m' = Q_Lᵀ·m·Q_R
    v ← β₂·v + (1−β₂)·G'²                               (second moment, rotated coordinates)
    N = Q_L·(m' / (√v + ε))·Q_Rᵀ · √(1−β₂ᵗ)/(1−β₁ᵗ)      (t counts Adam steps: the step number − 1)
    W ← (1 − η·λ)·W − η·N
    every k Adam steps (after the update): sort Q's columns by qᵀLq, permute v's rows/columns with
    them, Q ← qr(L·Q).Q                                 (one power iteration instead of eigh)

Defaults from the paper: lr 3e-3, β = (0.95, 0.95), weight decay 0.01, basis refresh every 10 steps.
As in the authors' code, the first step only sets L, R and the bases and leaves the parameter (and
m, v) untouched: in the eigenbasis of G₁'s own statistics G₁ is diagonal, so Adam's first step
there would divide roundoff by roundoff (measured: the fp32 update's norm 3.5× the fp64 one).
Very unbalanced blocks rotate only their shorter side (the other basis is the identity), as the
authors' code does for dimensions above ``max_precond_dim``.

Everything (m, v, L, R, Q_L, Q_R) lives in owner state: ``transform`` needs m and G together, and
the engine keeps whole-matrix state on the owner rank.
"""

from __future__ import annotations

import torch

from .blocked_kernel import BlockedPreconditionerKernel, compute_dtype_of
from .blocking import BlockGrid
from .kernel import HParams, MatrixBatch, add_scaled_
from .matrix_roots import initial_eigenbasis, refresh_eigenbasis, refresh_eigenbasis_reference
from .owner_state import (gather_state, keep_finite_, per_matrix, scatter_state, warn_decomposition_failed,
                          zero_nonfinite_)


class SoapKernel(BlockedPreconditionerKernel):
    sides = "two_sided"
    transform_keys = ("betas", "eps", "precondition_frequency", "block_size", "one_sided_ratio", "root_dtype",
                      "compute_dtype")

    def owner_matrix_keys(self, hp: HParams) -> tuple[str, ...]:
        return ("exp_avg", "exp_avg_sq")

    def factor_keys(self, side: str) -> tuple[str, ...]:
        return (side, f"Q{side}")

    def init_state(self, param: torch.Tensor, hp: HParams) -> dict[str, torch.Tensor]:
        return {}

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
        beta1, beta2 = hp["betas"]
        freq = hp["precondition_frequency"]
        # Step 1 sets the statistics and bases only; Adam's own count t is the step number − 1.
        first = per_matrix(batch, lambda step: float(step == 1)) > 0
        refresh = per_matrix(batch, lambda step: float(step > 1 and (step - 1) % freq == 0)) > 0
        correction = per_matrix(batch, lambda step: 0.0 if step == 1 else
                                (1.0 - beta2 ** (step - 1)) ** 0.5 / (1.0 - beta1 ** (step - 1)), dtype=dtype)
        exp_avg = gather_state(batch, "exp_avg", (m, n), dtype)
        keep_finite_(exp_avg, torch.where(first.view(-1, 1, 1), exp_avg, exp_avg.lerp(G, 1.0 - beta1)))
        scatter_state(batch, "exp_avg", exp_avg)
        exp_avg_sq = gather_state(batch, "exp_avg_sq", (m, n), dtype)
        v_blocks = grid.split(exp_avg_sq)

        directions = []
        for index, (cl, g, mom) in enumerate(zip(grid.classes, grid.split(G), grid.split(exp_avg))):
            block_first, block_refresh = (mask.repeat_interleave(cl.count) for mask in (first, refresh))
            bases = {}
            for side, on, size in (("L", cl.left, cl.rows), ("R", cl.right, cl.cols)):
                if not on:
                    continue
                stat = gather_state(batch, f"{side}.{cl.key}", (cl.count, size, size), dtype)
                flat = stat.view(-1, size, size)
                outer = g @ g.mT if side == "L" else g.mT @ g
                keep_finite_(flat, beta2 * flat + (1.0 - beta2) * outer)
                scatter_state(batch, f"{side}.{cl.key}", stat)
                basis = gather_state(batch, f"Q{side}.{cl.key}", (cl.count, size, size), dtype)
                if bool(block_first.any()):
                    self._initial_basis(batch, flat, basis.view(-1, size, size), block_first, cl.count, root_dtype)
                    scatter_state(batch, f"Q{side}.{cl.key}", basis)
                bases[side] = (flat, basis, size)

            QL = bases["L"][1].view(-1, cl.rows, cl.rows) if "L" in bases else None
            QR = bases["R"][1].view(-1, cl.cols, cl.cols) if "R" in bases else None
            g_rot, m_rot = _rotate(g, QL, QR), _rotate(mom, QL, QR)
            v = v_blocks[index]
            keep_finite_(v, torch.where(block_first.view(-1, 1, 1), v, beta2 * v + (1.0 - beta2) * g_rot * g_rot))
            step_rot = m_rot / (v.sqrt() + hp["eps"])
            direction = _rotate_back(step_rot, QL, QR)
            directions.append(direction * correction.repeat_interleave(cl.count).view(-1, 1, 1))

            if bool(block_refresh.any()):  # after the update: the next step uses the refreshed basis
                rows = block_refresh.nonzero().flatten()
                for side, (flat, basis, size) in bases.items():
                    flat_basis = basis.view(-1, size, size)
                    new_basis, order = refresh_eigenbasis(flat.index_select(0, rows), flat_basis.index_select(0, rows),
                                                          root_dtype)
                    flat_basis.index_copy_(0, rows, new_basis)
                    scatter_state(batch, f"Q{side}.{cl.key}", basis)
                    dim = -2 if side == "L" else -1
                    chosen = v.index_select(0, rows)
                    index_shape = order.unsqueeze(-1) if side == "L" else order.unsqueeze(-2)
                    v.index_copy_(0, rows, chosen.gather(dim, index_shape.expand_as(chosen)))

        grid.merge(v_blocks, out=exp_avg_sq)
        scatter_state(batch, "exp_avg_sq", exp_avg_sq)
        return zero_nonfinite_(grid.merge(directions), batch, "soap")

    def _initial_basis(self, batch, stat, basis, first, per_matrix, root_dtype):
        rows = first.nonzero().flatten()
        new_basis, ok = initial_eigenbasis(stat.index_select(0, rows), root_dtype)
        if not bool(ok.all()):
            full_ok = torch.ones(stat.shape[0], dtype=torch.bool, device=stat.device)
            full_ok[rows] = ok
            warn_decomposition_failed(batch, full_ok, per_matrix, "soap")
            eye = torch.eye(stat.shape[-1], dtype=new_basis.dtype, device=new_basis.device)
            new_basis = torch.where(ok.view(-1, 1, 1), new_basis, eye)
        basis.index_copy_(0, rows, new_basis)

    def apply(self, param, update, state, hp, fan_out, fan_in):
        if int(state["step"]) == 1:  # the basis-only first step: no weight decay either (as the authors)
            return
        add_scaled_(param, update, hp["lr"], hp["weight_decay"], 1.0)


def _rotate(x: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Q_Lᵀ·x·Q_R (a missing side is the identity)."""
    if QL is not None:
        x = QL.mT @ x
    if QR is not None:
        x = x @ QR
    return x


def _rotate_back(x: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Q_L·x·Q_Rᵀ."""
    if QL is not None:
        x = QL @ x
    if QR is not None:
        x = x @ QR.mT
    return x


def soap_reference_step(W: torch.Tensor, G: torch.Tensor, state: dict, step: int, *, lr: float,
                        betas: tuple[float, float], eps: float, weight_decay: float, precondition_frequency: int,
                        block_size: int, one_sided_ratio: float) -> torch.Tensor:
    """One SOAP step on a single [m, n] matrix in float64, block by block with loops; returns the new W.

    ``state`` (a plain dict, updated in place) holds "exp_avg", "exp_avg_sq" and per-block
    "L"/"R"/"QL"/"QR" keyed by (block row start, block col start).
    """
    W, G = W.to(torch.float64), G.to(torch.float64)
    beta1, beta2 = betas
    grid = BlockGrid(W.shape[0], W.shape[1], block_size, "two_sided", one_sided_ratio)
    t = step - 1  # Adam's count: step 1 only sets the statistics and bases
    m = state.get("exp_avg", torch.zeros_like(G))
    if step > 1:
        m = beta1 * m + (1 - beta1) * G
    state["exp_avg"] = m
    v_all = state.get("exp_avg_sq", torch.zeros_like(G)).clone()
    update = torch.zeros_like(G)
    for cl in grid.classes:
        for bi in range(cl.row_count):
            for bj in range(cl.col_count):
                r0, c0 = cl.row_start + bi * cl.rows, cl.col_start + bj * cl.cols
                rows, cols = slice(r0, r0 + cl.rows), slice(c0, c0 + cl.cols)
                g, mom = G[rows, cols], m[rows, cols]
                Q = {}
                for side, on, outer in (("L", cl.left, g @ g.T), ("R", cl.right, g.T @ g)):
                    if not on:
                        continue
                    stat = beta2 * state.get((side, r0, c0), torch.zeros_like(outer)) + (1 - beta2) * outer
                    state[(side, r0, c0)] = stat
                    if step == 1:
                        state[("Q" + side, r0, c0)] = torch.linalg.eigh(stat).eigenvectors.flip(-1)
                    Q[side] = state[("Q" + side, r0, c0)]
                QL = Q.get("L", torch.eye(cl.rows, dtype=torch.float64))
                QR = Q.get("R", torch.eye(cl.cols, dtype=torch.float64))
                if step == 1:
                    continue
                v = beta2 * v_all[rows, cols] + (1 - beta2) * (QL.T @ g @ QR) ** 2
                n_rot = (QL.T @ mom @ QR) / (v.sqrt() + eps)
                update[rows, cols] = QL @ n_rot @ QR.T * ((1 - beta2 ** t) ** 0.5 / (1 - beta1 ** t))
                if t % precondition_frequency == 0:
                    for side in Q:
                        key = ("Q" + side, r0, c0)
                        state[key], order = refresh_eigenbasis_reference(state[(side, r0, c0)], state[key])
                        v = v[order, :] if side == "L" else v[:, order]
                v_all[rows, cols] = v
    state["exp_avg_sq"] = v_all
    if step == 1:
        return W
    return (1 - lr * weight_decay) * W - lr * update
