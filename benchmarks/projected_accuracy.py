"""Published against projected cosine variance (SPEC.md section 4), measured against Monte Carlo over weight samples.

`python -m benchmarks.projected_accuracy` prints a markdown table (the README's) and writes
benchmarks/results/projected_accuracy.json: for each damping and rho = ||mu||^2 / tr(S) (the median over the
items), the median and worst relative error of each variant's variance against 2e4 joint weight samples of
both towers (P = 24, D = 12, 6 x 6 pairs, float64, seeded; the setting of tests/test_projected.py).
"""

from __future__ import annotations

import json
import math
import os

import torch

from bayesvlm_ext import KronPosterior, cosine_moments

P, D, N, M, SAMPLES = 24, 12, 6, 6, 20000
GRID = [(1.0, 3.0), (1.0, 30.0), (1.0, 300.0), (10.0, 1e3), (100.0, 1e4), (1e3, 1e5), (1e4, 1e6)]
OUT = os.path.join(os.path.dirname(__file__), "results", "projected_accuracy.json")


def spd(n: int, generator: torch.Generator) -> torch.Tensor:
    x = torch.randn(n + 3, n, generator=generator, dtype=torch.float64)
    x = x * torch.logspace(0, -1.5, n, dtype=torch.float64)[None, :]
    return x.T @ x / (n + 3)


def measure() -> list[dict]:
    g = torch.Generator().manual_seed(1)
    towers = [(spd(P + 1, g), spd(D, g), torch.randn(D, P, generator=g, dtype=torch.float64) / math.sqrt(P),
               0.1 * torch.randn(D, generator=g, dtype=torch.float64)) for _ in range(2)]
    phi_x = torch.randn(N, P, generator=g, dtype=torch.float64)
    phi_y = torch.randn(M, P, generator=g, dtype=torch.float64)
    rows = []
    for damping in ("kron", "exact"):
        for n, lam in GRID:
            px, py = (KronPosterior(*t, pseudo_count=n, prior_precision=lam, damping=damping) for t in towers)
            x, y = px.embed(phi_x, against=py), py.embed(phi_y, against=px)
            wx, bx = px.sample_weights(SAMPLES, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
            wy, by = py.sample_weights(SAMPLES, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
            gx = torch.nn.functional.normalize(torch.einsum("kdp,np->knd", wx, phi_x) + bx[:, None], dim=2)
            gy = torch.nn.functional.normalize(torch.einsum("kdp,np->knd", wy, phi_y) + by[:, None], dim=2)
            mc = torch.einsum("knd,kmd->knm", gx, gy).var(0)
            row = {"damping": damping, "rho": float(((x.mean ** 2).sum(1) / x.trace()).median())}
            for name, variant in (("published", None), ("projected", "projected")):
                rel = ((cosine_moments(x, y, 0.0, variant=variant)[1] - mc).abs() / mc).flatten()
                row[name] = {"median": float(rel.median()), "worst": float(rel.max())}
            rows.append(row)
    return rows


def main() -> None:
    rows = measure()
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump({"setting": {"P": P, "D": D, "pairs": [N, M], "samples": SAMPLES, "dtype": "float64"},
                   "rows": rows}, f, indent=1)
    print("| damping | rho | published median | published worst | projected median | projected worst |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['damping']} | {r['rho']:.3g} | {100 * r['published']['median']:.1f} % | "
              f"{100 * r['published']['worst']:.1f} % | {100 * r['projected']['median']:.1f} % | "
              f"{100 * r['projected']['worst']:.1f} % |")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
