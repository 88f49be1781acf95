"""EmbeddingDistribution: a batch of Gaussian embeddings g_i ~ N(mean_i, S_i) in structured form.

The covariances are one small object per form (SPEC.md section 3), never stored densely:
- `KronCovariance`  S_i = alpha_i * shared, one [D, D] matrix for the batch (BayesVLM, damping "kron");
                    `shared = basis diag(shared_eigvals) basis^T` is kept too, for the exact moments.
- `EigenCovariance` S_i = basis diag(k_i) basis^T, one orthonormal basis for the batch (damping "exact").
- `DiagCovariance`  S_i = diag(variances_i) (ProbVLM and other per-dimension models).
Each says which of its tensors are per item (`PER_ITEM`, one row per item: sliced by `take`, joined by
`cat`) and which the batch shares (`SHARED`: kept by `take`, required equal by `cat`), and answers `trace`,
`diagonal`, `dense` and, for the two forms with a shared basis, `eigen_form`. Code that stores, moves or
scores a batch (the index, `cosine_moments`) goes through these and never switches on the form's fields.

The constructors `EmbeddingDistribution.kron`, `eigen` and `diagonal` check the covariance parts (finite,
variances >= 0, bases orthonormal) and name the argument and rows at fault; the means are not checked: a NaN,
Inf or zero mean row is degenerate but legal, its scores are NaN and rank last (SPEC.md section 12).
"""

from __future__ import annotations

import dataclasses
from enum import Enum
from typing import ClassVar, Sequence

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


class Covariance:
    """The covariances S_i of N items in one structured form; subclasses are dataclasses of their tensors.

    Construction does not check the tensors (the embedding ops build them in hot loops); `check(n, d)` does.
    """

    FORM: ClassVar[CovarianceForm]
    PER_ITEM: ClassVar[tuple[str, ...]]  # tensors with one row per item
    SHARED: ClassVar[tuple[str, ...]]  # tensors the whole batch shares

    def __len__(self) -> int:
        return getattr(self, self.PER_ITEM[0]).shape[0]

    @classmethod
    def shapes(cls, n: int, d: int) -> dict[str, tuple[int, ...]]:
        """The shape of every tensor, per item and shared, for n items of size d (what a stored copy must have)."""
        return {name: (n, d) for name in cls.PER_ITEM} | {name: (d, d) for name in cls.SHARED}

    def per_item_tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.PER_ITEM}

    def shared_tensors(self) -> dict[str, Tensor]:
        """Every shared tensor (a kron form's eigenbasis is computed first when it is missing)."""
        return {name: getattr(self, name) for name in self.SHARED}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor]) -> "Covariance":
        """The covariance from `per_item_tensors() | shared_tensors()` (as an index stores them); unchecked."""
        return cls(**{name: tensors.get(name) for name in cls.PER_ITEM + cls.SHARED})

    def replace(self, **tensors: Tensor | None) -> "Covariance":
        """A copy with the named tensors replaced (unchecked), e.g. `replace(shared=equal_copy)`."""
        return dataclasses.replace(self, **tensors)

    def take(self, rows) -> "Covariance":
        """Items `rows` (a slice, index tensor or mask); shared tensors are not copied."""
        return dataclasses.replace(self, **{name: getattr(self, name)[rows] for name in self.PER_ITEM})

    def to(self, *args, **kwargs) -> "Covariance":
        """Every tensor moved or cast like Tensor.to."""
        return dataclasses.replace(self, **{f.name: _move(getattr(self, f.name), args, kwargs)
                                            for f in dataclasses.fields(self)})

    @classmethod
    def cat(cls, parts: Sequence["Covariance"]) -> "Covariance":
        """The items of `parts` in order; ValueError unless they share one form and equal shared tensors."""
        if not parts or any(type(p) is not type(parts[0]) for p in parts):
            raise ValueError("argument 'parts' must be a non-empty sequence of covariances of one form, got "
                             f"{[type(p).__name__ for p in parts]}")
        first = parts[0]
        for name in first.SHARED:
            mine = getattr(first, name)
            for part in parts[1:]:
                theirs = getattr(part, name)
                if theirs is not mine and not (theirs is not None and mine is not None and torch.equal(theirs, mine)):
                    raise ValueError(f"argument 'parts' must share one '{name}': only items of one batch or posterior "
                                     "can be joined")
        return dataclasses.replace(first, **{name: torch.cat([getattr(p, name) for p in parts])
                                             for name in first.PER_ITEM})

    def trace(self) -> Tensor:  # [N] tr(S_i)
        raise NotImplementedError

    def diagonal(self) -> Tensor:  # [N, D] diag(S_i)
        raise NotImplementedError

    def dense(self) -> Tensor:  # [N, D, D]
        """Dense covariances. O(N D^2) memory: for tests and small batches only."""
        raise NotImplementedError

    def eigen_form(self) -> tuple[Tensor, Tensor]:  # k [N, D], basis [D, D]
        """(k, basis) with S_i = basis diag(k_i) basis^T, for the forms with a shared eigenbasis."""
        raise ValueError(f"a '{self.FORM.value}'-form covariance has no shared eigenbasis")

    def check(self, n: int, d: int) -> None:
        """ValueError naming the argument (and rows) unless the tensors are a valid batch of n items of size d."""
        raise NotImplementedError


@dataclasses.dataclass(eq=False)
class KronCovariance(Covariance):
    """S_i = alpha_i * shared."""

    alpha: Tensor  # [N] >= 0
    shared: Tensor  # [D, D] symmetric PSD
    shared_eigvals: Tensor | None = None  # [D], with basis: shared = basis diag(shared_eigvals) basis^T
    basis: Tensor | None = None  # [D, D]; both computed (float64 eigh) on first need when absent

    FORM = CovarianceForm.KRON
    PER_ITEM = ("alpha",)
    SHARED = ("shared", "shared_eigvals", "basis")

    @classmethod
    def shapes(cls, n: int, d: int) -> dict[str, tuple[int, ...]]:
        return {"alpha": (n,), "shared": (d, d), "shared_eigvals": (d,), "basis": (d, d)}

    def shared_tensors(self) -> dict[str, Tensor]:
        self.eigen_form()
        return super().shared_tensors()

    def trace(self) -> Tensor:
        return self.alpha * torch.diagonal(self.shared).sum()

    def diagonal(self) -> Tensor:
        return self.alpha[:, None] * torch.diagonal(self.shared)[None, :]

    def dense(self) -> Tensor:
        return self.alpha[:, None, None] * self.shared[None]

    def eigen_form(self) -> tuple[Tensor, Tensor]:
        if self.basis is None:  # cached on the object: every copy made from it afterwards shares the result
            eigvals, basis = torch.linalg.eigh(self.shared.to(torch.float64))
            self.shared_eigvals, self.basis = eigvals.to(self.shared.dtype), basis.to(self.shared.dtype)
        return self.alpha[:, None] * self.shared_eigvals[None, :], self.basis

    def check(self, n: int, d: int) -> None:
        check_tensor("alpha", self.alpha, dim=1)
        check_shape("alpha", self.alpha, (n,), "one scalar per item")
        _check_non_negative("alpha", self.alpha)
        check_tensor("shared", self.shared, dim=2)
        check_shape("shared", self.shared, (d, d), "[D, D]")
        check_finite("shared", self.shared)
        if (self.shared_eigvals is None) != (self.basis is None):
            raise ValueError("arguments 'shared_eigvals' and 'basis' must be given together")
        if self.basis is not None:
            check_tensor("shared_eigvals", self.shared_eigvals, dim=1)
            check_shape("shared_eigvals", self.shared_eigvals, (d,))
            _check_non_negative("shared_eigvals", self.shared_eigvals)
            _check_basis(self.basis, d)


@dataclasses.dataclass(eq=False)
class EigenCovariance(Covariance):
    """S_i = basis diag(k_i) basis^T."""

    k: Tensor  # [N, D] >= 0
    basis: Tensor  # [D, D] orthonormal columns

    FORM = CovarianceForm.EIGEN
    PER_ITEM = ("k",)
    SHARED = ("basis",)

    def trace(self) -> Tensor:
        return self.k.sum(-1)

    def diagonal(self) -> Tensor:
        return self.k @ (self.basis * self.basis).T

    def dense(self) -> Tensor:
        return torch.einsum("ij,nj,kj->nik", self.basis, self.k, self.basis)

    def eigen_form(self) -> tuple[Tensor, Tensor]:
        return self.k, self.basis

    def check(self, n: int, d: int) -> None:
        check_tensor("k", self.k, dim=2)
        check_shape("k", self.k, (n, d), "[N, D]")
        _check_non_negative("k", self.k)
        _check_basis(self.basis, d)


@dataclasses.dataclass(eq=False)
class DiagCovariance(Covariance):
    """S_i = diag(variances_i)."""

    variances: Tensor  # [N, D] >= 0

    FORM = CovarianceForm.DIAG
    PER_ITEM = ("variances",)
    SHARED = ()

    def trace(self) -> Tensor:
        return self.variances.sum(-1)

    def diagonal(self) -> Tensor:
        return self.variances

    def dense(self) -> Tensor:
        return torch.diag_embed(self.variances)

    def check(self, n: int, d: int) -> None:
        check_tensor("variances", self.variances, dim=2)
        check_shape("variances", self.variances, (n, d), "[N, D]")
        _check_non_negative("variances", self.variances)


COVARIANCE_TYPES: dict[CovarianceForm, type[Covariance]] = {
    cls.FORM: cls for cls in (KronCovariance, EigenCovariance, DiagCovariance)}


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
    A gallery keeps them so that scoring and top-k cost O(M) per query on top of the mean GEMM.
    `alpha`, `shared`, `shared_eigvals`, `basis`, `k` and `variances` read the covariance's tensor of that
    name (None where its form has none).
    """

    def __init__(self, mean: Tensor, covariance: Covariance, *, sq_norm: Tensor | None = None,
                 cross_quad: Tensor | None = None, cross_shared: Tensor | None = None):
        """Unchecked (the embedding ops build one per batch); the `kron`, `eigen` and `diagonal` constructors check."""
        self.mean = mean
        self.covariance = covariance
        self.sq_norm = sq_norm
        self.cross_quad = cross_quad
        self.cross_shared = cross_shared

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
                                     cross_quad=_rows(self.cross_quad, rows), cross_shared=self.cross_shared)

    __getitem__ = take

    def to(self, *args, **kwargs) -> "EmbeddingDistribution":
        """Moves/casts every tensor like Tensor.to."""
        return EmbeddingDistribution(self.mean.to(*args, **kwargs), self.covariance.to(*args, **kwargs),
                                     sq_norm=_move(self.sq_norm, args, kwargs),
                                     cross_quad=_move(self.cross_quad, args, kwargs),
                                     cross_shared=_move(self.cross_shared, args, kwargs))

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
        return cls(torch.cat([p.mean for p in parts]), type(first.covariance).cat([p.covariance for p in parts]),
                   sq_norm=torch.cat(sq_norms) if all(s is not None for s in sq_norms) else None,
                   cross_quad=torch.cat([p.cross_quad for p in parts]) if keep else None,
                   cross_shared=cross if keep else None)

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
        return EmbeddingDistribution(self.mean, self.covariance, sq_norm=(mean * mean).sum(-1), cross_quad=cross_quad,
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
