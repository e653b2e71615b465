"""Accuracy of Newton–Schulz against the exact polar factor (fp64 SVD), per coefficient set and step count.

Writes the table to docs/newton_schulz.md (and prints it). Run:
    .venv/bin/python benchmarks/newton_schulz_accuracy.py
"""

from __future__ import annotations

import datetime
import platform
from pathlib import Path

import torch

from archopt_plugins.update.newton_schulz import newton_schulz_reference, orthogonality_error, singular_value_range

STEPS = (3, 5, 6, 8, 10)


def matrices() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    cases = {
        "Gaussian 128x256": torch.randn(128, 256, generator=gen, dtype=torch.float64),
        "Gaussian 256x256": torch.randn(256, 256, generator=gen, dtype=torch.float64),
    }
    U, _ = torch.linalg.qr(torch.randn(128, 128, generator=gen, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(256, 128, generator=gen, dtype=torch.float64))
    cases["condition 1e3, 128x256"] = U @ torch.diag(torch.logspace(0, -3, 128, dtype=torch.float64)) @ V.T
    return cases


def main() -> None:
    rows = ["| matrix | coefficients | steps | ‖X − UVᵀ‖/‖UVᵀ‖ | singular values of X |", "|---|---|---|---|---|"]
    for label, G in matrices().items():
        for coefficients in ("quintic", "polar_express"):
            for steps in STEPS:
                X = newton_schulz_reference(G, steps, coefficients)
                lo, hi = singular_value_range(X)
                rows.append(f"| {label} | {coefficients} | {steps} | {orthogonality_error(X, G):.4f} | "
                            f"[{lo:.3f}, {hi:.3f}] |")
    table = "\n".join(rows)
    print(table)
    doc = Path(__file__).resolve().parents[1] / "docs" / "newton_schulz.md"
    doc.write_text(f"""# Newton–Schulz accuracy

How close the Newton–Schulz iteration (`archopt_plugins/update/newton_schulz.py`, run here in float64
through its reference) comes to the exact polar factor UVᵀ of G = USVᵀ computed by SVD.

- `quintic` (3.4445, −4.7750, 2.0315), Muon's default, is tuned to lift small singular values fast,
  not to converge: its singular values settle in about [0.68, 1.13] and stay there, a relative
  error near 0.2 whatever the step count. Muon relies on the direction, not on exact orthogonality.
- `polar_express` (Amsel et al. 2025, the 5-step schedule with a 2% safety factor) is about twice as
  close at 5 steps on well-conditioned matrices; beyond 5 steps it continues with the classical
  quintic (15/8, −5/4, 3/8) and converges to the exact polar factor.
- Ill-conditioned inputs need more steps for the smallest singular values to rise.

Regenerate: `.venv/bin/python benchmarks/newton_schulz_accuracy.py`
(machine: {platform.machine()}, torch {torch.__version__}, {datetime.date.today().isoformat()}).

{table}
""")


if __name__ == "__main__":
    main()
