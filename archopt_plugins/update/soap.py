"""SOAP (Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"), blocked.

Adam run in the eigenbasis of Shampoo's statistics. For each block G (r×c):

    L ← β₂·L + (1−β₂)·G·Gᵀ,   R ← β₂·R + (1−β₂)·Gᵀ·G
    step 1: Q_L, Q_R = eigenvectors of L, R (descending eigenvalues)
    G' = Q_Lᵀ·G·Q_R
    m' ← β₁·m' + (1−β₁)·G'                              (first moment, rotated coordinates)
    v ← β₂·v + (1−β₂)·G'²                               (second moment, rotated coordinates)
    N = Q_L·(m' / (√v + ε))·Q_Rᵀ · √(1−β₂ᵗ)/(1−β₁ᵗ)      (t counts Adam steps: the step number − 1)
    W ← (1 − η·λ)·W − η·N
    every k Adam steps (after the update): sort Q's columns by qᵀLq, permute v's rows/columns with
    them, Q ← qr(L·Q).Q                                 (one power iteration instead of eigh),
    and re-express m' in the new basis: m' ← Q_L,newᵀ·(Q_L,old·m'·Q_R,oldᵀ)·Q_R,new

Defaults from the paper: lr 3e-3, β = (0.95, 0.95), weight decay 0.01, basis refresh every 10 steps.
As in the authors' code, the first step only sets L, R and the bases and leaves the parameter (and
m, v) untouched: in the eigenbasis of G₁'s own statistics G₁ is diagonal, so Adam's first step
there would divide roundoff by roundoff (measured: the fp32 update's norm 3.5× the fp64 one).
Very unbalanced blocks rotate only their shorter side (the other basis is the identity), as the
authors' code does for dimensions above ``max_precond_dim``.

Why m is kept rotated: the authors' code (and pytorch-optimizer's) keeps m in the original
coordinates and rotates it into the eigenbasis every step, six r×r/c×c matmuls per block per step
(G in, m in, the direction back). Keeping m' = Q_Lᵀ·m·Q_R instead needs four (G in, the direction
back), plus four at a refresh to carry m' from the old basis to the new one. Since the bases are
orthogonal this is the same algorithm in exact arithmetic; ``soap_reference_step`` below keeps m in
the original coordinates and the tests compare the two across several refreshes. The state key is
``exp_avg_rotated``, not ``exp_avg``: a checkpoint from before this layout (m unrotated under
"exp_avg") is refused on load, naming that key, rather than read in the wrong coordinates.

Everything (m', v, L, R, Q_L, Q_R) lives in owner state: ``transform`` needs the bases with G, m'
and v, and the engine keeps whole-matrix state on the owner rank.
"""

from __future__ import annotations

import torch

from .blocked_kernel import BlockedPreconditionerKernel, compute_dtype_of
from .blocking import BlockClass, BlockGrid
from .kernel import HParams, MatrixBatch, Segment, add_scaled_
from .matrix_roots import initial_eigenbasis, refresh_eigenbasis, refresh_eigenbasis_reference
from .owner_state import (gradient_rows_ok, per_matrix, spans, state_of, update_rows_, warn_decomposition_failed,
                          zero_nonfinite_)

# Adam's first moment in each block's eigenbasis. Not "exp_avg": until this layout, SOAP kept m in
# the original coordinates under that name, and a checkpoint of that meaning must not be read as
# rotated. state_shapes lists every key, so loading a checkpoint holding "exp_avg" is refused.
MOMENT_KEY = "exp_avg_rotated"


class SoapKernel(BlockedPreconditionerKernel):
    sides = "two_sided"
    transform_keys = ("betas", "eps", "precondition_frequency", "block_size", "one_sided_ratio", "root_dtype",
                      "compute_dtype")

    # Checked when a checkpoint loads (optim.archopt.refuse_retired_state), to say why it is refused.
    retired_state_keys: dict[str, str] = {
        "exp_avg": f"SOAP now keeps its first moment in each block's eigenbasis as {MOMENT_KEY!r}; "
                   "this checkpoint holds it in the original coordinates"}

    def owner_matrix_keys(self, hp: HParams) -> tuple[str, ...]:
        return (MOMENT_KEY, "exp_avg_sq")

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
        first = [seg for seg in batch.segments if seg.step == 1]
        refresh = [seg for seg in batch.segments if seg.step > 1 and (seg.step - 1) % freq == 0]
        adam_rows = per_matrix(batch, lambda step: float(step > 1)) > 0
        correction = per_matrix(batch, lambda step: 0.0 if step == 1 else
                                (1.0 - beta2 ** (step - 1)) ** 0.5 / (1.0 - beta1 ** (step - 1)), dtype=dtype)
        # m and v of the whole batch, both in each block's rotated coordinates, gathered per segment.
        M, V = torch.empty_like(G), torch.empty_like(G)
        for seg, a, b in spans(batch):
            M[a:b] = state_of(seg, MOMENT_KEY, (m, n), dtype, G.device)
            V[a:b] = state_of(seg, "exp_avg_sq", (m, n), dtype, G.device)
        ok = gradient_rows_ok(G)  # None: every matrix's statistics can be updated in place

        m_blocks, v_blocks, directions = grid.split(M), grid.split(V), []
        for index, (cl, g) in enumerate(zip(grid.classes, grid.split(G))):
            sides = [(side, size) for side, on, size in (("L", cl.left, cl.rows), ("R", cl.right, cl.cols)) if on]
            for side, size in sides:
                key, basis_key, shape = f"{side}.{cl.key}", f"Q{side}.{cl.key}", (cl.count, size, size)
                block_ok = None if ok is None else ok.repeat_interleave(cl.count)
                for seg, a, b in spans(batch, cl.count):
                    stat = state_of(seg, key, shape, dtype, G.device).view(-1, size, size)
                    x = g[a:b] if side == "L" else g[a:b].mT  # L ← β₂·L + (1−β₂)·x·xᵀ in one baddbmm
                    update_rows_(stat, lambda s: torch.baddbmm(s, x, x.mT, beta=beta2, alpha=1.0 - beta2),
                                 lambda s: s.baddbmm_(x, x.mT, beta=beta2, alpha=1.0 - beta2),
                                 None if block_ok is None else block_ok[a:b])
                    state_of(seg, basis_key, shape, dtype, G.device)
                if first:
                    self._initial_bases(first, key, basis_key, size, root_dtype)

            # Only G is rotated in: m already lives in these coordinates (re-expressed at refreshes).
            g_rot = self._rotate(batch, cl, g, sides, back=False)
            mom, v = m_blocks[index], v_blocks[index]
            # Adam's moments move on Adam steps (not step 1) of matrices with a finite ‖G‖² only.
            rows = adam_rows.repeat_interleave(cl.count)
            if ok is not None:
                rows = rows & ok.repeat_interleave(cl.count)
            mask = None if bool(rows.all()) else rows
            update_rows_(mom, lambda s: s.lerp(g_rot, 1.0 - beta1), lambda s: s.lerp_(g_rot, 1.0 - beta1), mask)
            square = g_rot * g_rot
            update_rows_(v, lambda s: s.lerp(square, 1.0 - beta2), lambda s: s.lerp_(square, 1.0 - beta2), mask)
            direction = self._rotate(batch, cl, mom / (v.sqrt() + hp["eps"]), sides, back=True)
            directions.append(direction * correction.repeat_interleave(cl.count).view(-1, 1, 1))
            if refresh:  # after the update: the next step uses the refreshed basis
                self._refresh_bases(batch, cl, refresh, sides, mom, v, root_dtype)

        grid.merge(m_blocks, out=M)
        grid.merge(v_blocks, out=V)
        for seg, a, b in spans(batch):
            seg.owner_state[MOMENT_KEY].copy_(M[a:b])
            seg.owner_state["exp_avg_sq"].copy_(V[a:b])
        return zero_nonfinite_(grid.merge(directions), batch, "soap")

    @staticmethod
    def _rotate(batch, cl, x, sides, back):
        """Q_Lᵀ·x·Q_R (back: Q_L·x·Q_Rᵀ) with each segment's own bases; a missing side is the identity."""
        for side, size in sides:
            out = torch.empty_like(x)
            for seg, a, b in spans(batch, cl.count):
                Q = seg.owner_state[f"Q{side}.{cl.key}"].view(-1, size, size)
                if side == "L":
                    torch.matmul(Q if back else Q.mT, x[a:b], out=out[a:b])
                else:
                    torch.matmul(x[a:b], Q.mT if back else Q, out=out[a:b])
            x = out
        return x

    @staticmethod
    def _initial_bases(first, key, basis_key, size, root_dtype):
        stats = [seg.owner_state[key].view(-1, size, size) for seg in first]
        bases, ok = initial_eigenbasis(stats[0] if len(stats) == 1 else torch.cat(stats), root_dtype)
        failed = []
        for seg, new_basis, seg_ok in zip(first, torch.split(bases, [s.shape[0] for s in stats]),
                                          torch.split(ok, [s.shape[0] for s in stats])):
            basis = seg.owner_state[basis_key].view(-1, size, size)
            if not bool(seg_ok.all()):  # eigh failed even in float64: start from the identity
                eye = torch.eye(size, dtype=basis.dtype, device=basis.device)
                new_basis = torch.where(seg_ok.view(-1, 1, 1), new_basis, eye)
                failed.append(seg.fqn)
            basis.copy_(new_basis)
        if failed:
            warn_decomposition_failed(failed, "soap")

    @staticmethod
    def _refresh_bases(batch: MatrixBatch, cl: BlockClass, refresh: list[Segment], sides: list[tuple[str, int]],
                       mom: torch.Tensor, v: torch.Tensor, root_dtype: torch.dtype) -> None:
        """Power iteration + QR for the refreshing segments; their m and v follow into the new basis.

        m is re-expressed exactly: m ← Q_newᵀ·(Q_old·m) on the left, (m·Q_oldᵀ)·Q_new on the right;
        one side at a time is exact because left and right products commute. v is not a linear
        quantity: as in the authors' code its rows/columns only follow the Rayleigh-quotient order.
        """
        where = {seg.fqn: (a, b) for seg, a, b in spans(batch, cl.count)}
        for side, size in sides:
            key, basis_key = f"{side}.{cl.key}", f"Q{side}.{cl.key}"
            stats = [seg.owner_state[key].view(-1, size, size) for seg in refresh]
            bases = [seg.owner_state[basis_key].view(-1, size, size) for seg in refresh]
            cat = (lambda ts: ts[0] if len(ts) == 1 else torch.cat(ts))
            new_bases, orders = refresh_eigenbasis(cat(stats), cat(bases), root_dtype)
            sizes = [s.shape[0] for s in stats]
            for seg, basis, new_basis, order in zip(refresh, bases, torch.split(new_bases, sizes),
                                                    torch.split(orders, sizes)):
                a, b = where[seg.fqn]
                # Per segment, before the old basis is overwritten: a matrix's m must not depend on
                # which other parameters refresh in the same batch (bitwise batch independence).
                if side == "L":
                    mom[a:b] = torch.matmul(new_basis.mT, torch.matmul(basis, mom[a:b]))
                else:
                    mom[a:b] = torch.matmul(torch.matmul(mom[a:b], basis.mT), new_basis)
                basis.copy_(new_basis)
                index = order.unsqueeze(-1) if side == "L" else order.unsqueeze(-2)
                v[a:b] = v[a:b].gather(-2 if side == "L" else -1, index.expand_as(v[a:b]))

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
