"""EmbeddingDistribution: a batch of Gaussian embeddings g_i ~ N(mean_i, S_i) in structured form.

A distribution is its means [N, D], one covariance object of N items (`covariance.py`: KronCovariance,
EigenCovariance or DiagCovariance, never stored densely; SPEC.md section 3) and the per-item statistics a
gallery caches. The constructors `EmbeddingDistribution.kron`, `eigen` and `diagonal` check the covariance
parts (finite, variances >= 0, bases orthonormal) and name the argument and rows at fault; the means are not
checked: a NaN, Inf or zero mean row is degenerate but legal, its scores are NaN and rank last (SPEC.md
section 12).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import Tensor

from ._validation import accumulation_dtype, check_shape, check_tensor
from .covariance import (COVARIANCE_TYPES, Covariance, CovarianceForm, DiagCovariance, EigenCovariance,
                         KronCovariance)

__all__ = ["EmbeddingDistribution", "Covariance", "CovarianceForm", "KronCovariance", "EigenCovariance",
           "DiagCovariance", "COVARIANCE_TYPES"]















class EmbeddingDistribution:
    """N Gaussian embeddings: means [N, D] and a structured `covariance`. Build with `kron`, `eigen` or `diagonal`.

    Attributes:
      mean            [N, D]
      covariance      KronCovariance | EigenCovariance | DiagCovariance of N items
      form            CovarianceForm, the covariance's
    Cached per-item statistics (None until `precompute` or `KronPosterior.embed(..., against=...)`):
      sq_norm         [N]      ||mean_i||^2
      cross_quad      [N]      mean_i^T cross_shared mean_i
      cross_shared    [D, D]   the other tower's shared matrix that cross_quad was computed against
      projection      (S u [N, D], 1 / ||mu|| [N], u^T S u [N]) for the "projected" variance, or None
    A gallery keeps them so that scoring and top-k cost O(M) per query on top of the mean GEMM.
    `alpha`, `shared`, `shared_eigvals`, `basis`, `k` and `variances` read the covariance's tensor of that
    name (None where its form has none).
    """

    def __init__(self, mean: Tensor, covariance: Covariance, *, sq_norm: Tensor | None = None,
                 cross_quad: Tensor | None = None, cross_shared: Tensor | None = None,
                 projection: tuple[Tensor, Tensor, Tensor] | None = None):
        """Unchecked (the embedding ops build one per batch); the `kron`, `eigen` and `diagonal` constructors check."""
        self.mean = mean
        self.covariance = covariance
        self.sq_norm = sq_norm
        self.cross_quad = cross_quad
        self.cross_shared = cross_shared
        self.projection = projection

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def checked(cls, mean: Tensor, covariance: Covariance) -> "EmbeddingDistribution":
        """mean [N, D] with `covariance` of N items of size D, checked (see `Covariance.check`)."""
        if not isinstance(covariance, Covariance):
            raise ValueError(f"argument 'covariance' must be a Covariance, got {type(covariance).__name__}")
        n, d = _check_mean(mean)
        covariance.check(n, d)
        return cls(mean, covariance)

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
        return cls.checked(mean, KronCovariance(alpha, shared, shared_eigvals, basis))

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
        return cls.checked(mean, EigenCovariance(k, basis))

    @classmethod
    def diagonal(
        cls,
        mean: Tensor,  # [N, D]
        variances: Tensor,  # [N, D], >= 0
    ) -> "EmbeddingDistribution":
        """S_i = diag(variances_i), e.g. ProbVLM's per-dimension variances."""
        return cls.checked(mean, DiagCovariance(variances))

    # ---- queries ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.mean.shape[0]

    @property
    def dim(self) -> int:
        return self.mean.shape[1]

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def form(self) -> CovarianceForm:
        return self.covariance.FORM

    def __getattr__(self, name: str):  # alpha, shared, shared_eigvals, basis, k, variances
        if name in _COVARIANCE_FIELDS:
            return getattr(self.__dict__.get("covariance"), name, None)
        raise AttributeError(f"'EmbeddingDistribution' object has no attribute '{name}'")

    def __repr__(self) -> str:
        return (f"EmbeddingDistribution(form={self.form.value!r}, N={len(self)}, D={self.dim}, "
                f"dtype={self.mean.dtype}, device={self.device})")

    def take(self, rows) -> "EmbeddingDistribution":
        """Items `rows` (a slice, index tensor or mask) with their cached statistics; shared parts are not copied."""
        return EmbeddingDistribution(self.mean[rows], self.covariance.take(rows), sq_norm=_rows(self.sq_norm, rows),
                                     cross_quad=_rows(self.cross_quad, rows), cross_shared=self.cross_shared,
                                     projection=None if self.projection is None else
                                     tuple(t[rows] for t in self.projection))

    __getitem__ = take

    def to(self, *args, **kwargs) -> "EmbeddingDistribution":
        """Moves/casts every tensor like Tensor.to."""
        return EmbeddingDistribution(self.mean.to(*args, **kwargs), self.covariance.to(*args, **kwargs),
                                     sq_norm=_move(self.sq_norm, args, kwargs),
                                     cross_quad=_move(self.cross_quad, args, kwargs),
                                     cross_shared=_move(self.cross_shared, args, kwargs),
                                     projection=None if self.projection is None else
                                     tuple(t.to(*args, **kwargs) for t in self.projection))

    @classmethod
    def cat(cls, parts: Sequence["EmbeddingDistribution"]) -> "EmbeddingDistribution":
        """The items of `parts` in order (shards of one gallery, batches of one posterior): one form, equal shared
        tensors; the cached statistics are kept where every part has them against one matrix."""
        if not parts:
            raise ValueError("argument 'parts' must hold at least one EmbeddingDistribution")
        first = parts[0]
        cross = first.cross_shared
        keep = all(p.cross_quad is not None and (p.cross_shared is cross or torch.equal(p.cross_shared, cross))
                   for p in parts) if cross is not None else False
        sq_norms = [p.sq_norm for p in parts]
        projected = all(p.projection is not None for p in parts)
        return cls(torch.cat([p.mean for p in parts]), type(first.covariance).cat([p.covariance for p in parts]),
                   sq_norm=torch.cat(sq_norms) if all(s is not None for s in sq_norms) else None,
                   cross_quad=torch.cat([p.cross_quad for p in parts]) if keep else None,
                   cross_shared=cross if keep else None,
                   projection=tuple(torch.cat(ts) for ts in zip(*(p.projection for p in parts))) if projected
                   else None)

    def precompute(
        self,
        against: "EmbeddingDistribution | Tensor | None" = None,  # the other tower's embeddings or shared [D, D]
        projected: bool = False,  # also cache what the "projected" variance needs (S u, 1 / ||mu||, u^T S u)
    ) -> "EmbeddingDistribution":
        """A copy with the per-item statistics cached: ||mean||^2 and, when `against` is a kron-form
        distribution (or its shared matrix), mean^T shared mean (SPEC.md section 4); with `projected`, the
        projection statistics too (O(N D^2) once instead of per call). Do this once for a gallery that is scored
        often."""
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
        result = EmbeddingDistribution(self.mean, self.covariance, sq_norm=(mean * mean).sum(-1), cross_quad=cross_quad,
                                       cross_shared=against)
        return result.with_projection() if projected else result

    def with_projection(self) -> "EmbeddingDistribution":
        """A copy that also caches the "projected" variance's statistics (S u, 1 / ||mu||, u^T S u; O(N D^2) in the
        kron form), every other cached statistic kept as it is."""
        from .moments import projection_statistics  # moments imports this module

        projection = projection_statistics(self, accumulation_dtype(self.mean.dtype))
        return EmbeddingDistribution(self.mean, self.covariance, sq_norm=self.sq_norm, cross_quad=self.cross_quad,
                                     cross_shared=self.cross_shared, projection=projection)

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
        return self.covariance.eigen_form()

    def diagonal_variance(self) -> Tensor:  # [N, D]
        """diag(S_i) per item."""
        return self.covariance.diagonal()

    def trace(self) -> Tensor:  # [N]
        """tr(S_i) per item."""
        return self.covariance.trace()

    def dense_covariance(self) -> Tensor:  # [N, D, D]
        """Dense covariances. O(N D^2) memory: for tests and small batches only."""
        return self.covariance.dense()


_COVARIANCE_FIELDS = frozenset(f.name for cls in COVARIANCE_TYPES.values() for f in dataclasses.fields(cls))


def _move(t: Tensor | None, args, kwargs) -> Tensor | None:
    return None if t is None else t.to(*args, **kwargs)


def _rows(t: Tensor | None, rows) -> Tensor | None:
    return None if t is None else t[rows]


def _check_mean(mean: Tensor) -> tuple[int, int]:
    check_tensor("mean", mean, dim=2)
    return mean.shape[0], mean.shape[1]




