"""EmbeddingDistribution: a batch of Gaussian embeddings g_i ~ N(mean_i, S_i) in structured form.

Three covariance forms (SPEC.md section 3), never stored densely:
- "kron":  S_i = alpha_i * shared, one [D, D] matrix for the batch (BayesVLM, damping "kron");
           `shared = basis diag(shared_eigvals) basis^T` is kept too, for the exact moments.
- "eigen": S_i = basis diag(k_i) basis^T, one orthonormal basis for the batch (damping "exact").
- "diag":  S_i = diag(variances_i) (ProbVLM and other per-dimension models).

The constructors `kron`, `eigen` and `diagonal` check the covariance parts (finite, variances >= 0, bases
orthonormal) and name the argument and rows at fault; the means are not checked: a NaN, Inf or zero mean row is
degenerate but legal, its scores are NaN and rank last (SPEC.md section 12).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from ._validation import accumulation_dtype, check_finite, check_finite_rows, check_shape, check_tensor, describe_rows

# How far basis^T basis may stray from I: a bfloat16 copy of an orthonormal basis strays ~4e-3 / sqrt(D),
# a wrong matrix (a covariance, a non-normalised basis) by O(1).
BASIS_ATOL = 1e-2


class CovarianceForm(str, Enum):
    KRON = "kron"
    EIGEN = "eigen"
    DIAG = "diag"


class EmbeddingDistribution:
    """Gaussian embeddings with structured covariance. Build with `kron`, `eigen` or `diagonal`.

    Attributes (None where the form does not use them):
      mean            [N, D]
      form            CovarianceForm
      alpha           [N]      kron: per-item scalar
      shared          [D, D]   kron: shared matrix (B_d^-1)
      shared_eigvals  [D]      kron: eigenvalues of `shared` in `basis`
      k               [N, D]   eigen: per-item variances along `basis`
      basis           [D, D]   kron, eigen: orthonormal columns
      variances       [N, D]   diag: per-dimension variances
    Cached per-item statistics (None until `precompute` or `KronPosterior.embed(..., against=...)`):
      sq_norm         [N]      ||mean_i||^2
      cross_quad      [N]      mean_i^T cross_shared mean_i
      cross_shared    [D, D]   the other tower's shared matrix that cross_quad was computed against
    A gallery keeps them so that scoring and top-k cost O(M) per query on top of the mean GEMM.
    """

    def __init__(self, mean: Tensor, form: CovarianceForm, *, alpha=None, shared=None, shared_eigvals=None, k=None,
                 basis=None, variances=None, sq_norm=None, cross_quad=None, cross_shared=None):
        self.mean = mean
        self.form = CovarianceForm(form)
        self.alpha = alpha
        self.shared = shared
        self.shared_eigvals = shared_eigvals
        self.k = k
        self.basis = basis
        self.variances = variances
        self.sq_norm = sq_norm
        self.cross_quad = cross_quad
        self.cross_shared = cross_shared

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def kron(
        cls,
        mean: Tensor,  # [N, D]
        alpha: Tensor,  # [N], >= 0
        shared: Tensor,  # [D, D] symmetric PSD
        shared_eigvals: Tensor | None = None,  # [D]
        basis: Tensor | None = None,  # [D, D], shared = basis diag(shared_eigvals) basis^T
    ) -> "EmbeddingDistribution":
        """S_i = alpha_i * shared. Without eigvals/basis they are computed (float64 eigh) on demand.

        alpha, shared, shared_eigvals and basis must be finite, alpha and shared_eigvals >= 0 and basis
        orthonormal (see `eigen`); the means may hold NaN, Inf or zero rows (SPEC.md section 12).
        """
        n, d = _check_mean(mean)
        check_tensor("alpha", alpha, dim=1)
        check_shape("alpha", alpha, (n,), "one scalar per item")
        _check_non_negative("alpha", alpha)
        check_tensor("shared", shared, dim=2)
        check_shape("shared", shared, (d, d), "[D, D]")
        check_finite("shared", shared)
        if (shared_eigvals is None) != (basis is None):
            raise ValueError("arguments 'shared_eigvals' and 'basis' must be given together")
        if basis is not None:
            check_tensor("shared_eigvals", shared_eigvals, dim=1)
            check_shape("shared_eigvals", shared_eigvals, (d,))
            _check_non_negative("shared_eigvals", shared_eigvals)
            _check_basis(basis, d)
        return cls(mean, CovarianceForm.KRON, alpha=alpha, shared=shared, shared_eigvals=shared_eigvals, basis=basis)

    @classmethod
    def eigen(
        cls,
        mean: Tensor,  # [N, D]
        k: Tensor,  # [N, D], >= 0
        basis: Tensor,  # [D, D] orthonormal columns
    ) -> "EmbeddingDistribution":
        """S_i = basis diag(k_i) basis^T.

        k must be finite and >= 0; basis finite with orthonormal columns (|basis^T basis - I| <= BASIS_ATOL
        entrywise, loose enough for a bfloat16 copy of an eigh result: a wrong matrix, not round-off, fails).
        The means may hold NaN, Inf or zero rows (SPEC.md section 12).
        """
        n, d = _check_mean(mean)
        check_tensor("k", k, dim=2)
        check_shape("k", k, (n, d), "[N, D]")
        _check_non_negative("k", k)
        _check_basis(basis, d)
        return cls(mean, CovarianceForm.EIGEN, k=k, basis=basis)

    @classmethod
    def diagonal(
        cls,
        mean: Tensor,  # [N, D]
        variances: Tensor,  # [N, D], >= 0
    ) -> "EmbeddingDistribution":
        """S_i = diag(variances_i), e.g. ProbVLM's per-dimension variances."""
        n, d = _check_mean(mean)
        check_tensor("variances", variances, dim=2)
        check_shape("variances", variances, (n, d), "[N, D]")
        _check_non_negative("variances", variances)
        return cls(mean, CovarianceForm.DIAG, variances=variances)

    # ---- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def __repr__(self) -> str:
        return (f"EmbeddingDistribution(form={self.form.value!r}, N={len(self)}, D={self.dim}, "
                f"dtype={self.mean.dtype}, device={self.device})")

    def __getitem__(self, rows) -> "EmbeddingDistribution":
        """Rows `rows` (a slice, index tensor or mask) of the batch; shared parts are not copied."""
        def take(t):
            return None if t is None else t[rows]
        return EmbeddingDistribution(take(self.mean), self.form,
                                     alpha=take(self.alpha), shared=self.shared, shared_eigvals=self.shared_eigvals,
                                     k=take(self.k), basis=self.basis, variances=take(self.variances),
                                     sq_norm=take(self.sq_norm), cross_quad=take(self.cross_quad),
                                     cross_shared=self.cross_shared)

    def precompute(
        self,
        against: "EmbeddingDistribution | Tensor | None" = None,  # the other tower's embeddings or shared [D, D]
    ) -> "EmbeddingDistribution":
        """A copy with the per-item statistics cached: ||mean||^2 and, when `against` is a kron-form
        distribution (or its shared matrix), mean^T shared mean (SPEC.md section 4). Do this once for a
        gallery that is scored often."""
        from . import ops  # ops does not import this module; the local import keeps it that way

        dtype = accumulation_dtype(self.mean.dtype)
        mean = self.mean.to(dtype)
        if isinstance(against, EmbeddingDistribution):
            if against.dim != self.dim:
                raise ValueError(f"argument 'against' must have D = {self.dim}, got {against.dim}")
            against = against.shared if against.form is CovarianceForm.KRON else None
        elif against is not None:
            check_tensor("against", against, dim=2)
            check_shape("against", against, (self.dim, self.dim), "the other tower's shared [D, D]")
        cross_quad = None if against is None else ops.kron_quadform(self.mean, against.to(dtype))
        return EmbeddingDistribution(self.mean, self.form, alpha=self.alpha, shared=self.shared,
                                     shared_eigvals=self.shared_eigvals, k=self.k, basis=self.basis,
                                     variances=self.variances, sq_norm=(mean * mean).sum(-1), cross_quad=cross_quad,
                                     cross_shared=against)

    def cached_cross_quad(self, shared: Tensor) -> Tensor | None:  # [N] or None
        """The cached mean^T shared mean when it was computed against this very matrix, else None."""
        if self.cross_quad is None or self.cross_shared is None:
            return None
        if self.cross_shared is shared or (self.cross_shared.shape == shared.shape
                                           and self.cross_shared.device == shared.device
                                           and torch.equal(self.cross_shared.to(shared.dtype), shared)):
            return self.cross_quad
        return None

    def eigen_form(self) -> tuple[Tensor, Tensor]:
        """(k [N, D], basis [D, D]) with S_i = basis diag(k_i) basis^T; for the kron and eigen forms."""
        if self.form is CovarianceForm.EIGEN:
            return self.k, self.basis
        if self.form is CovarianceForm.KRON:
            if self.basis is None:
                eigvals, basis = torch.linalg.eigh(self.shared.to(torch.float64))
                self.shared_eigvals, self.basis = eigvals.to(self.shared.dtype), basis.to(self.shared.dtype)
            return self.alpha[:, None] * self.shared_eigvals[None, :], self.basis
        raise ValueError("a 'diag' EmbeddingDistribution has no shared eigenbasis")

    def diagonal_variance(self) -> Tensor:  # [N, D]
        """diag(S_i) per item."""
        if self.form is CovarianceForm.DIAG:
            return self.variances
        if self.form is CovarianceForm.KRON:
            return self.alpha[:, None] * torch.diagonal(self.shared)[None, :]
        return self.k @ (self.basis * self.basis).T

    def trace(self) -> Tensor:  # [N]
        """tr(S_i) per item."""
        if self.form is CovarianceForm.DIAG:
            return self.variances.sum(-1)
        if self.form is CovarianceForm.KRON:
            return self.alpha * torch.diagonal(self.shared).sum()
        return self.k.sum(-1)

    def covariance(self) -> Tensor:  # [N, D, D]
        """Dense covariances. O(N D^2) memory: for tests and small batches only."""
        if self.form is CovarianceForm.DIAG:
            return torch.diag_embed(self.variances)
        if self.form is CovarianceForm.KRON:
            return self.alpha[:, None, None] * self.shared[None]
        return torch.einsum("ij,nj,kj->nik", self.basis, self.k, self.basis)

    def to(self, *args, **kwargs) -> "EmbeddingDistribution":
        """Moves/casts every tensor like Tensor.to."""
        def move(t):
            return None if t is None else t.to(*args, **kwargs)
        return EmbeddingDistribution(move(self.mean), self.form, alpha=move(self.alpha), shared=move(self.shared),
                                     shared_eigvals=move(self.shared_eigvals), k=move(self.k),
                                     basis=move(self.basis), variances=move(self.variances),
                                     sq_norm=move(self.sq_norm), cross_quad=move(self.cross_quad),
                                     cross_shared=move(self.cross_shared))


def _check_mean(mean: Tensor) -> tuple[int, int]:
    check_tensor("mean", mean, dim=2)
    return mean.shape[0], mean.shape[1]


def _check_non_negative(name: str, x: Tensor) -> None:
    """Finite and >= 0 (a variance scale): NaN, Inf or negative entries named with their rows."""
    check_finite_rows(name, x)
    negative = (x < 0).reshape(x.shape[0], -1).any(1) if x.numel() else x.new_zeros(0, dtype=torch.bool)
    if bool(negative.any()):
        raise ValueError(f"argument '{name}' must be non-negative, got negative values in "
                         f"{describe_rows(negative.nonzero().flatten())}")


def _check_basis(basis: Tensor, d: int) -> None:
    """[D, D], finite, orthonormal columns up to BASIS_ATOL.

    Probed in O(D^2) rather than by forming basis^T basis (O(D^3), 10 ms at D = 512 on every embedded batch):
    basis^T basis v = v for a fixed pseudo-random unit v holds for an orthonormal basis and, for a wrong
    matrix (a covariance, a non-normalised basis), fails unless v happens to be an eigenvector of it."""
    check_tensor("basis", basis, dim=2)
    check_shape("basis", basis, (d, d), "[D, D]")
    check_finite("basis", basis)
    if not d:
        return
    q = basis.detach().to(accumulation_dtype(basis.dtype))
    probe = torch.randn(d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    probe = (probe / probe.norm()).to(device=q.device, dtype=q.dtype)
    error = float((q.T @ (q @ probe) - probe).abs().max())
    if error > BASIS_ATOL:
        raise ValueError(f"argument 'basis' must have orthonormal columns: |basis^T basis v - v| = {error:.3g} for a "
                         f"unit v exceeds {BASIS_ATOL:g}")
