"""The Kronecker-factored precision of one linear layer: its factors as data sums, and decomposed once.

SPEC.md sections 2, 6 and 8; laplace-torch's `Kron` and `KronDecomposed` are the models.

`KronFactors` holds the curvature factors with the number of data N they were summed over. The fit stores
them scaled by 1/sqrt(N) (A = sum_i a_i a_i^T / sqrt(N), B = sum_i H_i / sqrt(N)); a KronFactors keeps the
unscaled sums, so more data is factor addition: `KronFactors.from_factors(A, B, N) + KronFactors.from_sums(
sum a a^T, sum H, n)` holds the factors of one fit on all N + n data.

`KronDecomposed` holds the two factors' eigendecompositions, A = Q_A diag(a) Q_A^T and B = Q_B diag(e) Q_B^T
(float64; negative round-off clamped to 0, a factor far from PSD refused). Both damping modes are then a grid
of the precision's eigenvalues in the basis Q_B (x) Q_A, entry (j, i) for output j and input i:
  "kron":  (sqrt(n) e_j + sqrt(lam)) (sqrt(n) a_i + sqrt(lam))
  "exact": n e_j a_i + lam
and the log-determinant, the evidence's slope in lam, quadratic forms and samples are element-wise algebra
on that grid plus two rotations, for any n and lam, without another decomposition.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from enum import Enum

import torch
from torch import Tensor

from ._validation import check_finite, check_tensor

logger = logging.getLogger("bayesvlm_ext")

# Negative eigenvalues are round-off and clamped to 0 (SPEC.md section 2) down to this fraction of the largest
# eigenvalue; published factors reach 1e-6. Beyond it the factor is not a curvature (negated, damaged): an error.
CLAMP_RTOL = 1e-2


class Damping(str, Enum):
    KRON = "kron"  # precision (sqrt(n) A + sqrt(lam) I) x (sqrt(n) B + sqrt(lam) I)
    EXACT = "exact"  # precision n (A x B) + lam I


@dataclass(frozen=True)
class FactorReport:
    """What symmetrising and clamping did to one factor (SPEC.md section 2)."""

    name: str  # "A" or "B"
    size: int
    asymmetry: float  # max |X - X^T| of the factor as given
    num_clamped: int  # eigenvalues below 0, set to 0
    min_eigenvalue: float  # before clamping
    max_eigenvalue: float
    clamped_mass: float  # sum of the clamped eigenvalues' magnitudes


@dataclass(frozen=True)
class KronFactors:
    """Curvature factors of `num_data` data, kept as their unscaled sums A_sum [p, p] and B_sum [q, q] (float64).

    The factors a posterior uses are A = A_sum / sqrt(N) and B = B_sum / sqrt(N) (`A`, `B`); adding two is
    adding their sums and counts, the factors of one fit on both sets of data.
    """

    A_sum: Tensor
    B_sum: Tensor
    num_data: int

    @classmethod
    def from_sums(cls, A_sum: Tensor, B_sum: Tensor, num_data: int) -> "KronFactors":
        """From sum_i a_i a_i^T [p, p] and sum_i H_i [q, q] over `num_data` data."""
        if isinstance(num_data, bool) or not isinstance(num_data, int) or num_data < 0:
            raise ValueError(f"argument 'num_data' must be a non-negative int, got {num_data!r}")
        for name, x in (("A_sum", A_sum), ("B_sum", B_sum)):
            check_tensor(name, x, dim=2)
            if x.shape[0] != x.shape[1]:
                raise ValueError(f"argument '{name}' must be square, got shape {tuple(x.shape)}")
            check_finite(name, x)
        return cls(A_sum.to(torch.float64), B_sum.to(torch.float64), num_data)

    @classmethod
    def from_factors(cls, A: Tensor, B: Tensor, num_data: int) -> "KronFactors":
        """From the scaled factors of a fit (a posterior's A and B) and the number of data behind them (0: they
        count for nothing)."""
        root = math.sqrt(num_data) if isinstance(num_data, int) and num_data > 0 else 0.0
        return cls.from_sums(root * A.to(torch.float64), root * B.to(torch.float64), num_data)

    @property
    def A(self) -> Tensor:  # [p, p] A_sum / sqrt(N)
        return self.A_sum / math.sqrt(self.num_data) if self.num_data else self.A_sum

    @property
    def B(self) -> Tensor:  # [q, q] B_sum / sqrt(N)
        return self.B_sum / math.sqrt(self.num_data) if self.num_data else self.B_sum

    def __add__(self, other: "KronFactors") -> "KronFactors":
        """The factors of both sets of data: the sums and the counts add."""
        if not isinstance(other, KronFactors):
            return NotImplemented
        if self.A_sum.shape != other.A_sum.shape or self.B_sum.shape != other.B_sum.shape:
            raise ValueError(f"factors of different layers cannot be added: A {tuple(self.A_sum.shape)} and "
                             f"{tuple(other.A_sum.shape)}, B {tuple(self.B_sum.shape)} and {tuple(other.B_sum.shape)}")
        if self.num_data + other.num_data == 0:
            raise ValueError("adding factors of no data at all (N1 + N2 = 0)")
        return KronFactors(self.A_sum + other.A_sum.to(self.A_sum), self.B_sum + other.B_sum.to(self.B_sum),
                           self.num_data + other.num_data)


class KronDecomposed:
    """The eigendecompositions of one posterior's factors and the precision's eigenvalue grid (see the module).

    Args: A [p, p], B [q, q], float64 and symmetric (the posterior symmetrises them); `asymmetry` what that
    removed, for the reports. Raises ValueError for a factor with an eigenvalue below -CLAMP_RTOL times its largest.
    """

    def __init__(self, A: Tensor, B: Tensor, asymmetry: dict[str, float] | None = None):
        asymmetry = asymmetry or {}
        self.eigenvalues: dict[str, Tensor] = {}  # "A": a [p], "B": e [q], clamped
        self.bases: dict[str, Tensor] = {}  # "A": Q_A [p, p], "B": Q_B [q, q]
        self.reports: dict[str, FactorReport] = {}
        for name, factor in (("A", A), ("B", B)):
            values, vectors = torch.linalg.eigh(factor)
            negative = values < 0
            report = FactorReport(name=name, size=values.numel(), asymmetry=asymmetry.get(name, 0.0),
                                  num_clamped=int(negative.sum()), min_eigenvalue=float(values.min()),
                                  max_eigenvalue=float(values.max()), clamped_mass=float(-values[negative].sum()))
            if report.min_eigenvalue < -CLAMP_RTOL * max(report.max_eigenvalue, 0.0):
                raise ValueError(f"argument '{name}' is not positive semi-definite: its smallest eigenvalue "
                                 f"{report.min_eigenvalue:.3g} is below -{CLAMP_RTOL:g} times its largest "
                                 f"{report.max_eigenvalue:.3g}, far more than round-off (was it negated or "
                                 "damaged?); clamping it to 0 would silently change the posterior")
            if report.num_clamped:
                logger.info("factor %s: clamped %d negative eigenvalues (min %.3g, total %.3g) to 0", name,
                            report.num_clamped, report.min_eigenvalue, report.clamped_mass)
            self.eigenvalues[name], self.bases[name], self.reports[name] = values.clamp_min(0), vectors, report

    def to(self, device: torch.device | str) -> "KronDecomposed":
        moved = KronDecomposed.__new__(KronDecomposed)
        moved.eigenvalues = {n: v.to(device) for n, v in self.eigenvalues.items()}
        moved.bases = {n: q.to(device) for n, q in self.bases.items()}
        moved.reports = dict(self.reports)
        return moved

    @property
    def sizes(self) -> tuple[int, int]:  # (p, q)
        return self.eigenvalues["A"].numel(), self.eigenvalues["B"].numel()

    # ---- the grid ----------------------------------------------------------------------------------
    def damped(self, damping: Damping, pseudo_count: float, lam: float) -> tuple[Tensor, Tensor]:  # [p], [q]
        """kron: the eigenvalues of A_d and B_d, whose outer product is the grid; exact: n a and e (grid
        n e_j a_i + lam)."""
        a, e = self.eigenvalues["A"], self.eigenvalues["B"]
        if damping is Damping.KRON:
            root_n, root_lam = math.sqrt(pseudo_count), math.sqrt(lam)
            return root_n * a + root_lam, root_n * e + root_lam
        return pseudo_count * a, e

    def grid(self, damping: Damping, pseudo_count: float, lam: float) -> Tensor:  # [q, p]
        """The precision's eigenvalues, entry (j, i) for the eigenvectors Q_B[:, j] (x) Q_A[:, i]."""
        da, db = self.damped(damping, pseudo_count, lam)
        return db[:, None] * da[None, :] + (0.0 if damping is Damping.KRON else lam)

    def logdet(self, damping: Damping, pseudo_count: float, lam: float) -> float:
        """log det of the precision."""
        if damping is Damping.KRON:  # the grid is an outer product: q sum log da + p sum log db, O(p + q)
            da, db = self.damped(damping, pseudo_count, lam)
            p, q = self.sizes
            return float(q * da.log().sum() + p * db.log().sum())
        return float(self.grid(damping, pseudo_count, lam).log().sum())

    def evidence_slope(self, damping: Damping, pseudo_count: float, lam: float, map_sq_norm: float) -> float:
        """2 d/d(log lam) of the log marginal likelihood, p q - lam ||W*||^2 - lam tr(precision^-1); strictly
        decreasing in lam, so its root is the evidence's optimum (SPEC.md section 2)."""
        p, q = self.sizes
        if damping is Damping.KRON:  # d log det / d log lam = 1/2 (q sum sqrt(lam)/da + p sum sqrt(lam)/db)
            da, db = self.damped(damping, pseudo_count, lam)
            root_lam = math.sqrt(lam)
            fit = 0.5 * q * float((root_lam / da).sum()) + 0.5 * p * float((root_lam / db).sum())
            return p * q - lam * map_sq_norm - fit
        da, db = self.damped(damping, pseudo_count, lam)
        curvature = db[:, None] * da[None, :]
        return float((curvature / (curvature + lam)).sum()) - lam * map_sq_norm

    def has_curvature(self, damping: Damping) -> bool:
        """Whether the evidence has a finite optimum as lam -> 0: kron needs curvature in A or B, exact in both."""
        positive_a, positive_e = (bool((self.eigenvalues[n] > 0).any()) for n in ("A", "B"))
        return (positive_a or positive_e) if damping is Damping.KRON else (positive_a and positive_e)

    # ---- quadratic forms and samples -----------------------------------------------------------------
    def rotate(self, delta: Tensor) -> Tensor:  # [..., q, p'] -> [..., q, p'] in the eigenbases
        """Q_B^T delta Q_A; a delta with fewer than p columns (no bias column) is zero in the others."""
        qa, qb = self.bases["A"].to(delta.dtype), self.bases["B"].to(delta.dtype)
        return qb.T @ delta @ qa[:delta.shape[-1]]

    def quadratic(self, delta: Tensor, damping: Damping, pseudo_count: float, lam: float) -> Tensor:  # []
        """vec(delta)^T precision vec(delta) for delta [q, p] (or [q, p - 1], the bias column zero), in delta's
        dtype, differentiable."""
        rotated = self.rotate(delta)
        return (rotated * rotated * self.grid(damping, pseudo_count, lam).to(delta.dtype)).sum()

    def sample(self, z: Tensor, damping: Damping, pseudo_count: float, lam: float) -> Tensor:  # [k, q, p]
        """precision^-1/2 z for standard normal z [k, q, p]: samples of W - W*, float64."""
        qa, qb = self.bases["A"], self.bases["B"]
        if damping is Damping.KRON:  # L_B Z L_A^T with L L^T the inverse of the damped factor
            da, db = self.damped(damping, pseudo_count, lam)
            return (qb * db.rsqrt()) @ z @ (qa * da.rsqrt()).T
        return qb @ (z * self.grid(damping, pseudo_count, lam).rsqrt()) @ qa.T
