"""EmbeddingDistribution: a batch of Gaussian embeddings g_i ~ N(mean_i, S_i) in structured form.

Three covariance forms (SPEC.md section 3), never stored densely:
- "kron":  S_i = alpha_i * shared, one [D, D] matrix for the batch (BayesVLM, damping "kron");
           `shared = basis diag(shared_eigvals) basis^T` is kept too, for the exact moments.
- "eigen": S_i = basis diag(k_i) basis^T, one orthonormal basis for the batch (damping "exact").
- "diag":  S_i = diag(variances_i) (ProbVLM and other per-dimension models).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from ._validation import check_finite, check_shape, check_tensor


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
    """

    def __init__(self, mean: Tensor, form: CovarianceForm, *, alpha=None, shared=None, shared_eigvals=None, k=None,
                 basis=None, variances=None):
        self.mean = mean
        self.form = CovarianceForm(form)
        self.alpha = alpha
        self.shared = shared
        self.shared_eigvals = shared_eigvals
        self.k = k
        self.basis = basis
        self.variances = variances

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
        """S_i = alpha_i * shared. Without eigvals/basis they are computed (float64 eigh) on demand."""
        n, d = _check_mean(mean)
        check_tensor("alpha", alpha, dim=1)
        check_shape("alpha", alpha, (n,), "one scalar per item")
        check_tensor("shared", shared, dim=2)
        check_shape("shared", shared, (d, d), "[D, D]")
        if (shared_eigvals is None) != (basis is None):
            raise ValueError("arguments 'shared_eigvals' and 'basis' must be given together")
        if basis is not None:
            check_shape("shared_eigvals", shared_eigvals, (d,))
            check_shape("basis", basis, (d, d))
        return cls(mean, CovarianceForm.KRON, alpha=alpha, shared=shared, shared_eigvals=shared_eigvals, basis=basis)

    @classmethod
    def eigen(
        cls,
        mean: Tensor,  # [N, D]
        k: Tensor,  # [N, D], >= 0
        basis: Tensor,  # [D, D] orthonormal columns
    ) -> "EmbeddingDistribution":
        """S_i = basis diag(k_i) basis^T."""
        n, d = _check_mean(mean)
        check_tensor("k", k, dim=2)
        check_shape("k", k, (n, d), "[N, D]")
        check_tensor("basis", basis, dim=2)
        check_shape("basis", basis, (d, d), "[D, D]")
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
        check_finite("variances", variances)
        if variances.numel() and bool((variances < 0).any()):
            raise ValueError("argument 'variances' must be non-negative")
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
                                     k=take(self.k), basis=self.basis, variances=take(self.variances))

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
                                     basis=move(self.basis), variances=move(self.variances))


def _check_mean(mean: Tensor) -> tuple[int, int]:
    check_tensor("mean", mean, dim=2)
    return mean.shape[0], mean.shape[1]
