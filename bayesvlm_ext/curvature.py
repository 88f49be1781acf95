"""Kronecker factors A and B of one tower's last layer from data, post hoc (SPEC.md section 6).

`kfac_factors` works on precomputed tensors; `FactorAccumulator` holds the running float64 sums so
that streaming over a DataLoader, resuming from a checkpoint and all-reducing across processes
all add the same sums. B uses the algebraic expansion of SPEC.md section 6: per class batch of C
pairs, a few GEMMs of cost O(C^2 D + C D^2), never one D x D matrix per sample.
"""

from __future__ import annotations

import math
from enum import Enum

import torch
from torch import Tensor

from ._validation import check_finite, check_finite_scalar, check_logit_scale, check_tensor, parse_enum
from .distributed import collective_device, distributed_rank

__all__ = ["Likelihood", "FactorAccumulator", "kfac_factors"]

DEFAULT_CLASS_BATCH_SIZE = 32768  # the published setting


class Likelihood(str, Enum):
    INFONCE = "infonce"  # CLIP: softmax over the C targets of the class batch
    SIGLIP = "siglip"  # SigLIP: independent sigmoids, logit bias included


class FactorAccumulator:
    """Running sums sum_i phi_i phi_i^T and sum_i H_i (float64) over class batches, and their count.

    `factors()` returns (A, B) = sums / sqrt(count) (SPEC.md section 6). Sums from several
    accumulators (other processes, other shards) simply add: see `merge`.
    """

    def __init__(self, likelihood: str | Likelihood, logit_scale: float, logit_bias: float = 0.0,
                 bias: bool = False):
        self.likelihood = parse_enum("likelihood", likelihood, Likelihood)
        self.scale = math.exp(check_logit_scale("logit_scale", logit_scale))  # a ValueError, never an OverflowError
        self.logit_bias = check_finite_scalar("logit_bias", logit_bias)
        self.bias = bool(bias)
        self.A_sum: Tensor | None = None  # [p, p] float64
        self.B_sum: Tensor | None = None  # [D, D] float64
        self.count = 0

    def update(
        self,
        features: Tensor,  # [C, P] features entering the layer, for the sources of one class batch
        embeddings: Tensor,  # [C, D] the sources' unnormalised embeddings g
        targets: Tensor,  # [C, D] the paired targets (normalised here); pair i is the positive pair
    ) -> None:
        """Adds one class batch: each source is scored against the batch's C targets."""
        c = _check_batch(features, embeddings, targets)
        if c == 0:
            return
        x = features.to(torch.float64)
        if self.bias:
            x = torch.cat([x, x.new_ones(c, 1)], dim=1)
        a_part = x.T @ x
        b_part = projected_curvature(embeddings, targets, self.likelihood, self.scale, self.logit_bias)
        if self.A_sum is None:
            self.A_sum, self.B_sum = a_part, b_part
        else:
            if a_part.shape != self.A_sum.shape or b_part.shape != self.B_sum.shape:
                raise ValueError(f"class batch shapes changed: features give A {tuple(a_part.shape)} after "
                                 f"{tuple(self.A_sum.shape)}, embeddings B {tuple(b_part.shape)} after "
                                 f"{tuple(self.B_sum.shape)}")
            self.A_sum += a_part
            self.B_sum += b_part
        self.count += c

    def merge(self, other: "FactorAccumulator") -> None:
        """Adds another accumulator's sums (same likelihood, scale, bias and sizes)."""
        if (other.likelihood, other.scale, other.logit_bias, other.bias) != (
                self.likelihood, self.scale, self.logit_bias, self.bias):
            raise ValueError("argument 'other' must accumulate the same likelihood, logit_scale, logit_bias and bias")
        if other.A_sum is None:
            return
        if self.A_sum is None:
            self.A_sum, self.B_sum = other.A_sum.clone(), other.B_sum.clone()
        else:
            self.A_sum += other.A_sum.to(self.A_sum.device)
            self.B_sum += other.B_sum.to(self.B_sum.device)
        self.count += other.count

    def all_reduce(self, group=None) -> None:
        """Sums the accumulators of every process of `group` (torch.distributed, any backend), in place.

        Ranks that saw no data take part with zero sums; afterwards every rank holds the global
        sums and count, so `factors()` gives the same A and B everywhere.
        """
        import torch.distributed as dist

        device = collective_device(group)  # NCCL reduces CUDA tensors only; the sums come back where they were
        home = self.A_sum.device if self.A_sum is not None else torch.device("cpu")
        sizes = torch.tensor([0 if self.A_sum is None else self.A_sum.shape[0],
                              0 if self.B_sum is None else self.B_sum.shape[0], self.count],
                             dtype=torch.float64, device=device)
        shapes = sizes[:2].clone()
        dist.all_reduce(shapes, op=dist.ReduceOp.MAX, group=group)
        p, d = int(shapes[0]), int(shapes[1])
        if p == 0:
            raise ValueError("no data accumulated on any rank: nothing to all-reduce")
        if self.A_sum is None:
            A_sum = torch.zeros(p, p, dtype=torch.float64, device=device)
            B_sum = torch.zeros(d, d, dtype=torch.float64, device=device)
        elif self.A_sum.shape != (p, p) or self.B_sum.shape != (d, d):
            raise ValueError(f"ranks accumulated different sizes: A {tuple(self.A_sum.shape)} here, [{p}, {p}] "
                             "elsewhere")
        else:
            A_sum, B_sum = self.A_sum.to(device), self.B_sum.to(device)
        count = sizes[2:].clone()
        for t in (A_sum, B_sum, count):
            dist.all_reduce(t, group=group)
        self.A_sum, self.B_sum, self.count = A_sum.to(home), B_sum.to(home), int(count.item())

    def factors(self) -> tuple[Tensor, Tensor]:  # A [p, p], B [D, D], float64
        """(A, B) = (sum phi phi^T, sum H) / sqrt(N) over everything accumulated."""
        if self.count == 0:
            raise ValueError("no data accumulated: FactorAccumulator.update was never given a non-empty batch")
        root = math.sqrt(self.count)
        return self.A_sum / root, self.B_sum / root


def kfac_factors(
    features: Tensor,  # [N, P] features entering the projection
    embeddings: Tensor,  # [N, D] unnormalised embeddings g of the same tower (the sources)
    targets: Tensor,  # [N, D] the other tower's embeddings, pair i with source i
    likelihood: str | Likelihood = "infonce",
    logit_scale: float | Tensor = math.log(100.0),  # log s, as stored in the model
    logit_bias: float | Tensor = 0.0,  # SigLIP's bias (ignored by InfoNCE's softmax)
    class_batch_size: int = DEFAULT_CLASS_BATCH_SIZE,
    bias: bool = False,  # the layer has a bias: a constant 1 is appended to the features
    distributed: bool | None = None,  # None: whenever torch.distributed is initialised with several ranks
    group=None,  # the torch.distributed process group (default: the world)
) -> tuple[Tensor, Tensor]:  # A [P, P] ([P+1, P+1] with bias), B [D, D], float64
    """The KFAC factors of one tower (SPEC.md section 6), from precomputed tensors.

    Consecutive class batches of `class_batch_size` pairs (the last one may be smaller; all of the
    data when there are fewer pairs): each source is scored against its batch's targets. Sums in
    float64, divided by sqrt(N). Memory O(C^2 + C D + D^2); time O(N C D + N D^2).

    Distributed (e.g. under `torchrun`): every rank passes the same tensors, rank r scores the class
    batches r, r + K, r + 2K, ... of the K ranks, and the sums are all-reduced, so every rank returns
    the single-process factors up to float64 rounding of the summation order.
    """
    n = _check_batch(features, embeddings, targets)
    if isinstance(class_batch_size, bool) or not isinstance(class_batch_size, int) or class_batch_size < 1:
        raise ValueError(f"argument 'class_batch_size' must be a positive int, got {class_batch_size!r}")
    rank, world = distributed_rank(distributed, group)
    accumulator = FactorAccumulator(likelihood, logit_scale, logit_bias, bias)
    for batch, start in enumerate(range(0, n, class_batch_size)):
        if batch % world == rank:
            rows = slice(start, start + class_batch_size)
            accumulator.update(features[rows], embeddings[rows], targets[rows])
    if world > 1:
        accumulator.all_reduce(group)
    return accumulator.factors()


CURVATURE_BLOCK_ELEMENTS = 1 << 22  # elements of one block of the [C, C] cosines (32 MB in float64)


def projected_curvature(
    embeddings: Tensor,  # [C, D] unnormalised sources g_i
    targets: Tensor,  # [C, D] targets, normalised here
    likelihood: Likelihood,
    scale: float,  # s = exp(logit_scale)
    logit_bias: float,
) -> Tensor:  # [D, D] float64: sum_i J_i M_i J_i over the batch's sources
    """sum_i H_i of one class batch by the expansion of SPEC.md section 6.

    With u_i = g_i/||g_i||, w_i = 1/||g_i||^2, P_i = I - u_i u_i^T and G_i = Y^T diag(q_i) Y
    (q = softmax probabilities for InfoNCE, sigmoid curvatures for SigLIP):
      sum_i w_i P_i G_i P_i = Y^T diag(sum_i w_i q_i) Y - U^T diag(w) V - V^T diag(w) U + U^T diag(w t) U,
    v_i = G_i u_i, t_i = u_i^T G_i u_i; InfoNCE subtracts sum_i w_i (P_i m_i)(P_i m_i)^T, m_i = Y^T q_i.
    """
    g = embeddings.to(torch.float64)
    y = targets.to(torch.float64)
    y = y / y.norm(dim=1, keepdim=True)
    sq_norm = (g * g).sum(1)  # [C]
    u = g / sq_norm.sqrt()[:, None]
    w = 1.0 / sq_norm
    # Every term is a sum over the sources i, so they are taken in blocks of rows: a [rows, C] block of the
    # cosines instead of the whole [C, C] (512 MB per temporary at C = 8192, where the time went into page
    # faults and memory traffic rather than arithmetic).
    rows = max(1, CURVATURE_BLOCK_ELEMENTS // max(1, y.shape[0]))
    total = torch.zeros(y.shape[1], y.shape[1], dtype=torch.float64, device=g.device)
    r = torch.zeros(y.shape[0], dtype=torch.float64, device=g.device)  # [C targets] sum_i w_i q_ij
    for start in range(0, g.shape[0], rows):
        u_b, w_b = u[start:start + rows], w[start:start + rows]
        cosines = u_b @ y.T  # [rows sources, C targets]: y_j . u_i
        if likelihood is Likelihood.INFONCE:
            q = torch.softmax(scale * cosines, dim=1)
        else:
            sig = torch.sigmoid(scale * cosines + logit_bias)
            q = sig * (1 - sig)
        qc = q * cosines
        v = qc @ y  # [rows, D] v_i = Y^T (q_i * (Y u_i))
        t = (qc * cosines).sum(1)  # [rows]
        r += q.T @ w_b
        wu = w_b[:, None] * u_b
        total += (wu * t[:, None]).T @ u_b - wu.T @ v - v.T @ wu
        if likelihood is Likelihood.INFONCE:
            m = q @ y  # [rows, D]
            projected = m - u_b * (u_b * m).sum(1, keepdim=True)  # P_i m_i
            total -= (w_b[:, None] * projected).T @ projected
    total += y.T @ (r[:, None] * y)
    total = scale * scale * total
    return (total + total.T) / 2  # exact symmetry; the expansion is symmetric up to rounding


def _check_batch(features: Tensor, embeddings: Tensor, targets: Tensor) -> int:
    check_tensor("features", features, dim=2)
    check_tensor("embeddings", embeddings, dim=2)
    check_tensor("targets", targets, dim=2)
    n = features.shape[0]
    if embeddings.shape[0] != n or targets.shape[0] != n:
        raise ValueError(f"arguments 'features', 'embeddings' and 'targets' must have one row per pair, got "
                         f"{features.shape[0]}, {embeddings.shape[0]} and {targets.shape[0]} rows")
    if embeddings.shape[1] != targets.shape[1]:
        raise ValueError(f"arguments 'embeddings' [N, D] and 'targets' [N, D] must share D, got "
                         f"{tuple(embeddings.shape)} and {tuple(targets.shape)}")
    if not (features.device == embeddings.device == targets.device):
        raise ValueError("arguments 'features', 'embeddings' and 'targets' must be on one device")
    for name, t in (("features", features), ("embeddings", embeddings), ("targets", targets)):
        check_finite(name, t)
    if n and bool((embeddings.norm(dim=1) == 0).any()):
        raise ValueError("argument 'embeddings' has a zero row: the normalisation u = g / ||g|| is undefined")
    if n and bool((targets.norm(dim=1) == 0).any()):
        raise ValueError("argument 'targets' has a zero row: it cannot be normalised")
    return n
