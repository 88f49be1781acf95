"""Structured covariances of a batch of Gaussian embeddings: one small class per form (SPEC.md section 3).

- `KronCovariance`  S_i = alpha_i * shared, one [D, D] matrix for the batch (BayesVLM, damping "kron");
                    `shared = basis diag(shared_eigvals) basis^T` is kept too, for the exact moments.
- `EigenCovariance` S_i = basis diag(k_i) basis^T, one orthonormal basis for the batch (damping "exact").
- `DiagCovariance`  S_i = diag(variances_i) (ProbVLM and other per-dimension models).
Each says which of its tensors are per item (`PER_ITEM`, one row per item: sliced by `take`, joined by
`cat`) and which the batch shares (`SHARED`: kept by `take`, required equal by `cat`), and answers `trace`,
`diagonal`, `dense` and, for the two forms with a shared basis, `eigen_form`. Code that stores, moves or
scores a batch (the index, `cosine_moments`) goes through these and never switches on the form's fields.
`check` validates the tensors (finite, variances >= 0, bases orthonormal), naming the argument and rows.
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
        tensors = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **{name: None if t is None else t.to(*args, **kwargs)
                                            for name, t in tensors.items()})

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

    def matvec(self, v: Tensor) -> Tensor:
        return self.alpha[:, None] * (v @ self.shared)  # shared is symmetric

    def eigen_form(self) -> tuple[Tensor, Tensor]:
        if self.basis is None:  # cached on the object: every copy made from it afterwards shares the result
            eigvals, basis = torch.linalg.eigh(self.shared.to(torch.float64))
            self.shared_eigvals, self.basis = eigvals.to(self.shared.dtype), basis.to(self.shared.dtype)
        return self.alpha[:, None] * self.shared_eigvals[None, :], self.basis

    def check(self, n: int, d: int) -> None:
        check_tensor("alpha", self.alpha, dim=1)
        check_shape("alpha", self.alpha, (n,), "one scalar per item")
        check_non_negative("alpha", self.alpha)
        check_tensor("shared", self.shared, dim=2)
        check_shape("shared", self.shared, (d, d), "[D, D]")
        check_finite("shared", self.shared)
        if (self.shared_eigvals is None) != (self.basis is None):
            raise ValueError("arguments 'shared_eigvals' and 'basis' must be given together")
        if self.basis is not None:
            check_tensor("shared_eigvals", self.shared_eigvals, dim=1)
            check_shape("shared_eigvals", self.shared_eigvals, (d,))
            check_non_negative("shared_eigvals", self.shared_eigvals)
            check_basis(self.basis, d)


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

    def matvec(self, v: Tensor) -> Tensor:
        return ((v @ self.basis) * self.k) @ self.basis.T

    def eigen_form(self) -> tuple[Tensor, Tensor]:
        return self.k, self.basis

    def check(self, n: int, d: int) -> None:
        check_tensor("k", self.k, dim=2)
        check_shape("k", self.k, (n, d), "[N, D]")
        check_non_negative("k", self.k)
        check_basis(self.basis, d)


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

    def matvec(self, v: Tensor) -> Tensor:
        return self.variances * v

    def check(self, n: int, d: int) -> None:
        check_tensor("variances", self.variances, dim=2)
        check_shape("variances", self.variances, (n, d), "[N, D]")
        check_non_negative("variances", self.variances)


COVARIANCE_TYPES: dict[CovarianceForm, type[Covariance]] = {
    cls.FORM: cls for cls in (KronCovariance, EigenCovariance, DiagCovariance)}


def check_non_negative(name: str, x: Tensor) -> None:
    """Finite and >= 0 (a variance scale): NaN, Inf or negative entries named with their rows."""
    check_finite_rows(name, x)
    negative = (x < 0).reshape(x.shape[0], -1).any(1) if x.numel() else x.new_zeros(0, dtype=torch.bool)
    if bool(negative.any()):
        raise ValueError(f"argument '{name}' must be non-negative, got negative values in "
                         f"{describe_rows(negative.nonzero().flatten())}")


def check_basis(basis: Tensor, d: int) -> None:
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
