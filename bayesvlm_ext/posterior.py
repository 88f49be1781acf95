"""KronPosterior: the Kronecker-factored Laplace posterior over one tower's last linear layer.

SPEC.md sections 2, 3 and 10. Factors are symmetrised on construction; their eigendecompositions
(`kron.KronDecomposed`: float64, negative eigenvalues clamped to 0) are computed once, on first use, and
everything else (inverses, log-determinants, the marginal likelihood and its optimum, quadratic forms,
samples) is algebra on the precision's grid of eigenvalues there.

Degenerate input is an error naming what is wrong, never a silent NaN: non-finite factors, weights or features
(the rows named), a factor with negative eigenvalues beyond round-off (kron.CLAMP_RTOL, raised on first use),
features whose statistics overflow their dtype, evidence without a finite optimum, and damaged files.

Over 400 lines for one reason: it is one class whose methods share its invariants (validated, symmetrised
factors; caches cleared when lam or n change). Its algebra is in kron.py, the saved-file helpers in
storage.py and the published format in published.py.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict

import torch
from torch import Tensor

from . import ops, published
from .storage import read_config, read_header, read_tensors, saved_files, write_saved
from ._validation import (accumulation_dtype, check_finite, check_finite_rows, check_positive_scalar,
                          check_same_device, check_shape, check_symmetric_factor, check_tensor, describe_rows,
                          parse_enum)
from .covariance import EigenCovariance, KronCovariance
from .distribution import EmbeddingDistribution
from .kron import Damping, FactorReport, KronDecomposed

logger = logging.getLogger("bayesvlm_ext")

SAVE_FORMAT = "bayesvlm_ext.KronPosterior"
SAVE_VERSION = 1
TENSORS_FILE = "posterior.safetensors"
CONFIG_FILE = "posterior.json"


class KronPosterior:
    """Gaussian posterior over W (D x P, plus a bias column when there is a bias) of one tower.

    Args:
      A: [P, P] input-side factor, [P+1, P+1] with a bias (the constant 1 is the last feature).
      B: [D, D] output-side factor.
      weight: [D, P] MAP weight, the nn.Linear convention (pass open_clip's `proj` [P, D] as `proj.T`).
      bias: [D] or None.
      prior_precision: lam > 0.  pseudo_count: n > 0.  damping: "kron" or "exact".
    All tensors are copied (never modified) and kept in float64 on their device.
    """

    def __init__(self, A: Tensor, B: Tensor, weight: Tensor, bias: Tensor | None = None,
                 prior_precision: float = 1.0, pseudo_count: float = 1.0, damping: str | Damping = "kron"):
        check_tensor("weight", weight, dim=2)
        out_features, in_features = weight.shape
        if out_features == 0 or in_features == 0:
            raise ValueError(f"argument 'weight' must be [D, P] with D, P >= 1, got {tuple(weight.shape)}")
        check_finite("weight", weight)
        if bias is not None:
            check_tensor("bias", bias, dim=1)
            check_shape("bias", bias, (out_features,), "[D] to match weight [D, P]")
            check_finite("bias", bias)
        check_same_device(A=A, B=B, weight=weight, bias=bias)
        p = in_features + (bias is not None)
        a_what = ("[P+1, P+1]: weight [D, P] plus the bias column" if bias is not None
                  else "[P, P] to match weight [D, P]")
        self.A, asym_a = check_symmetric_factor("A", A, p, a_what)
        self.B, asym_b = check_symmetric_factor("B", B, out_features, "[D, D] to match weight [D, P]")
        self._asymmetry = {"A": asym_a, "B": asym_b}
        # Contiguous whatever the input's strides (open_clip's proj.T is a view): the same numbers from
        # a fitted posterior and from its saved copy.
        self.weight = weight.detach().to(torch.float64, memory_format=torch.contiguous_format, copy=True)
        self.bias = None if bias is None else bias.detach().to(torch.float64, copy=True)
        self.damping = parse_enum("damping", damping, Damping)
        self._prior_precision = check_positive_scalar("prior_precision", prior_precision)
        self._pseudo_count = check_positive_scalar("pseudo_count", pseudo_count)
        self._decomposed: KronDecomposed | None = None
        self._derived: dict[tuple, dict[str, Tensor]] = {}

    # ---- sizes and hyper-parameters -------------------------------------------------------------
    @property
    def in_features(self) -> int:
        """P, the feature size without the bias column."""
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        """D, the embedding size."""
        return self.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def prior_precision(self) -> float:
        return self._prior_precision

    @prior_precision.setter
    def prior_precision(self, value: float) -> None:
        self._prior_precision = check_positive_scalar("prior_precision", value)
        self._derived.clear()

    @property
    def pseudo_count(self) -> float:
        return self._pseudo_count

    @pseudo_count.setter
    def pseudo_count(self, value: float) -> None:
        self._pseudo_count = check_positive_scalar("pseudo_count", value)
        self._derived.clear()

    def __repr__(self) -> str:
        return (f"KronPosterior(D={self.out_features}, P={self.in_features}, bias={self.bias is not None}, "
                f"damping={self.damping.value!r}, prior_precision={self.prior_precision:g}, "
                f"pseudo_count={self.pseudo_count:g}, device={self.device})")

    # ---- the decomposed precision (SPEC.md section 2) --------------------------------------------------
    @property
    def decomposed(self) -> KronDecomposed:
        """The factors' eigendecompositions (float64, computed once, on first use) and the precision's grid."""
        if self._decomposed is None:
            self._decomposed = KronDecomposed(self.A, self.B, self._asymmetry)
        return self._decomposed

    @property
    def factor_report(self) -> dict[str, FactorReport]:
        """{"A": FactorReport, "B": FactorReport}: asymmetry and clamped eigenvalues of each factor."""
        return dict(self.decomposed.reports)

    def _hyper(self, prior_precision: float | None = None) -> tuple[Damping, float, float]:
        """(damping, n, lam) for the grid; lam the current one unless given."""
        lam = self.prior_precision if prior_precision is None else check_positive_scalar("prior_precision",
                                                                                         prior_precision)
        return self.damping, self.pseudo_count, lam

    def _derived_for(self, dtype: torch.dtype, device: torch.device) -> dict[str, Tensor]:
        """Tensors that embed() needs, in `dtype` on `device`; cached until lam or n change."""
        key = (dtype, device)
        if key not in self._derived:
            qa, qb = self.decomposed.bases["A"], self.decomposed.bases["B"]
            da, db = self.decomposed.damped(*self._hyper())
            t = {"weight": self.weight, "basis_B": qb}
            if self.bias is not None:
                t["bias"] = self.bias
            if self.damping is Damping.KRON:
                t["A_inv"] = _symmetrised((qa / da) @ qa.T)  # [p, p], the bias row and column last
                t["B_inv"] = _symmetrised((qb / db) @ qb.T)
                t["B_inv_eigvals"] = 1 / db
            else:
                t["Qa"] = qa  # [p, p], the bias row last
                t["K"] = 1 / (da[:, None] * db[None, :] + self.prior_precision)  # [p, q]
            self._derived[key] = {name: v.to(device=device, dtype=dtype) for name, v in t.items()}
        return self._derived[key]

    # ---- the distribution of embeddings (SPEC.md section 3) ---------------------------------------
    def embed(
        self,
        phi: Tensor,  # [N, P] features entering the layer; fp16, bf16, fp32 or fp64
        residual: Tensor | None = None,  # [N, D] fixed residual added to the output (SigLIP image tower)
        against: "KronPosterior | None" = None,  # the other tower: cache the statistics a gallery needs
    ) -> EmbeddingDistribution:  # mean [N, D], covariance in "kron" or "eigen" form
        """g = W phi + b (+ r) as a Gaussian: mean and structured covariance (SPEC.md section 3).

        damping "kron" gives S_i = alpha_i B_d^-1 with alpha_i = phi_i^T A_d^-1 phi_i ("kron" form);
        "exact" gives S_i = Q_B diag(k_i) Q_B^T ("eigen" form). Computed in float32 (float64 for
        float64 input); differentiable with respect to phi. The mean, alpha (or k) and ||mean||^2 come
        from one fused pass over phi (`ops.item_stats`, `ops.item_stats_exact`); with `against` (the other
        tower's posterior) that pass also caches mean^T B_other^-1 mean, so the result is ready to
        be scored as a gallery (`EmbeddingDistribution.precompute`).
        """
        check_tensor("phi", phi, dim=2)
        if phi.shape[1] != self.in_features:
            raise ValueError(f"argument 'phi' must be [N, {self.in_features}] (P of weight [D, P]), "
                             f"got {tuple(phi.shape)}")
        if phi.device != self.device:
            raise ValueError(f"argument 'phi' must be on the posterior's device {self.device}, got {phi.device}")
        check_finite_rows("phi", phi)
        if against is not None and not isinstance(against, KronPosterior):
            raise ValueError(f"argument 'against' must be a KronPosterior (the other tower), got "
                             f"{type(against).__name__}")
        if against is not None and against.out_features != self.out_features:
            raise ValueError(f"argument 'against' must have D = {self.out_features}, got {against.out_features}")
        dtype = accumulation_dtype(phi.dtype)
        t = self._derived_for(dtype, phi.device)
        if residual is not None:
            check_tensor("residual", residual, dim=2)
            check_shape("residual", residual, (phi.shape[0], self.out_features), "[N, D]")
            if residual.device != phi.device:
                raise ValueError(f"argument 'residual' must be on {phi.device}, got {residual.device}")
            check_finite_rows("residual", residual)
            residual = residual.to(dtype)
        other_shared = None
        if against is not None and against.damping is Damping.KRON:
            other_shared = against._derived_for(dtype, phi.device)["B_inv"]
        if self.damping is Damping.KRON:
            mean, alpha, sq_norm, cross_quad = ops.item_stats(phi, t["weight"], t.get("bias"), residual, t["A_inv"],
                                                              other_shared)
            _check_no_overflow(dtype, alpha[:, None], sq_norm, cross_quad if other_shared is not None else None)
            covariance = KronCovariance(alpha, t["B_inv"], t["B_inv_eigvals"], t["basis_B"])
            return EmbeddingDistribution(mean, covariance, sq_norm=sq_norm, cross_shared=other_shared,
                                         cross_quad=cross_quad if other_shared is not None else None)
        mean, k, sq_norm, cross_quad = ops.item_stats_exact(phi, t["weight"], t.get("bias"), residual, t["Qa"],
                                                            t["K"], other_shared)
        _check_no_overflow(dtype, k, sq_norm, cross_quad if other_shared is not None else None)
        return EmbeddingDistribution(mean, EigenCovariance(k, t["basis_B"]), sq_norm=sq_norm, cross_shared=other_shared,
                                     cross_quad=cross_quad if other_shared is not None else None)

    # ---- evidence and the prior precision (SPEC.md section 2) --------------------------------------
    def _map_sq_norm(self) -> float:
        """||W*||^2, the bias included."""
        total = float((self.weight**2).sum())
        return total + (0.0 if self.bias is None else float((self.bias**2).sum()))

    def logdet(self, prior_precision: float | None = None) -> float:
        """log det of the posterior precision at `prior_precision` (default: the current lam)."""
        return self.decomposed.logdet(*self._hyper(prior_precision))

    def log_marginal_likelihood(self, prior_precision: float | None = None) -> float:
        """-1/2 lam ||W*||^2 + 1/2 p q log lam - 1/2 logdet(precision), up to the lam-free data term."""
        lam = self._hyper(prior_precision)[2]
        p, q = self.A.shape[0], self.B.shape[0]
        return -0.5 * lam * self._map_sq_norm() + 0.5 * p * q * math.log(lam) - 0.5 * self.logdet(lam)

    def _evidence_slope(self, log_lam: float) -> float:
        """2 d/d(log lam) of log_marginal_likelihood; strictly decreasing in lam, so its root is the optimum."""
        return self.decomposed.evidence_slope(self.damping, self.pseudo_count, math.exp(log_lam), self._map_sq_norm())

    def optimize_prior_precision(self, rtol: float = 1e-12) -> float:
        """Set lam to the maximiser of the marginal likelihood and return it.

        A bracketed bisection on log lam over the cached eigenvalues: each step is O(p q), no new
        decomposition, milliseconds in all. lam is tuned at the current pseudo-count n, which stays as
        set: this evidence cannot choose n, because it decreases monotonically in n (log det of the
        precision grows with n, and the tempered data term n log p(D | W*) is never positive), so its
        maximiser would be n -> 0.

        Raises ValueError where no finite optimum exists: the MAP weight is zero (the evidence grows without
        bound in lam), or the factors carry no curvature (the evidence is maximised as lam -> 0): under
        damping "kron" when A and B are both zero, under "exact" when either is.
        """
        if self._map_sq_norm() == 0:
            raise ValueError("the MAP weight is zero: the marginal likelihood has no finite optimum in lam")
        # The sign of the slope as lam -> 0, in closed form: the bracketing below evaluates it in floating point,
        # where a slope that is exactly 0 (zero factors) rounds to +-1e-15 and stops at an arbitrary lam ~ 1e-55.
        # kron: 1/2 (q #{a_i > 0} + p #{e_j > 0}); exact: #{(i, j): a_i e_j > 0}.
        if not self.decomposed.has_curvature(self.damping):
            positive_a, positive_e = (int((self.decomposed.eigenvalues[n] > 0).sum()) for n in ("A", "B"))
            p, q = self.A.shape[0], self.B.shape[0]
            raise ValueError(f"the marginal likelihood is maximised as lam -> 0: the factors carry no curvature "
                             f"(A has {positive_a} of {p} and B {positive_e} of {q} eigenvalues above 0; are the "
                             "factors zero?)")
        lo = hi = math.log(self.prior_precision)
        if self._evidence_slope(lo) > 0:
            step = 1.0
            while self._evidence_slope(hi) > 0:
                lo, hi, step = hi, hi + step, 2 * step
                if hi > 700:
                    raise ValueError("the marginal likelihood increases without bound in lam")
        else:
            step = 1.0
            while self._evidence_slope(lo) <= 0:
                hi, lo, step = lo, lo - step, 2 * step
                if lo < -700:
                    raise ValueError("the marginal likelihood is maximised as lam -> 0 (are the factors zero?)")
        while hi - lo > rtol:
            mid = 0.5 * (lo + hi)
            if self._evidence_slope(mid) > 0:
                lo = mid
            else:
                hi = mid
        self.prior_precision = math.exp(0.5 * (lo + hi))
        return self.prior_precision

    def precision_quadratic(
        self,
        delta: Tensor,  # [D, P] (or [D, P + 1], the bias column last) a displacement W - W* of the weight
    ) -> Tensor:  # [] vec(delta)^T Lambda vec(delta), in delta's dtype (float32 or float64), differentiable
        """The posterior precision's quadratic form (SPEC.md section 2).

        -1/2 of it is the log density of the Laplace posterior at W* + delta, up to a constant: the
        penalty that keeps a fine-tuned weight where the data behind the posterior put it (a Kronecker
        EWC). Computed in the factors' eigenbases, O(D P (D + P)): with delta~ = Q_B^T delta Q_A, the
        form is sum_ij delta~_ij^2 l_ij, l_ij = b_i a_j (kron: the damped factors' eigenvalues) or
        n e_i a_j + lam (exact).
        """
        check_tensor("delta", delta, dim=2)
        p = self.A.shape[0]
        if delta.shape[0] != self.out_features or delta.shape[1] not in (self.in_features, p):
            raise ValueError(f"argument 'delta' must be [D, P] = [{self.out_features}, {self.in_features}]"
                             + (" or [D, P + 1] with the bias column" if p != self.in_features else "")
                             + f", got {tuple(delta.shape)}")
        if delta.device != self.device:
            raise ValueError(f"argument 'delta' must be on the posterior's device {self.device}, got {delta.device}")
        return self.decomposed.quadratic(delta.to(accumulation_dtype(delta.dtype)), *self._hyper())

    # ---- sampling (SPEC.md section 2) --------------------------------------------------------------
    def displacement(
        self,
        z: Tensor,  # [..., D, p]: p = P, or P + 1 with the bias column last
    ) -> Tensor:  # [..., D, p] float64, differentiable
        """precision^-1/2 z (SPEC.md section 2): the displacement W - W* of the weight (and bias column) whose
        precision quadratic form is ||z||^2.

        A standard normal z gives a posterior sample (what `sample_weights` draws). Optimising over z instead
        of W whitens the posterior: the MAP of new data under this posterior as a prior (fine-tuning with
        `precision_quadratic` as the penalty) becomes a problem whose prior term is ||z||^2, well conditioned
        however far apart the precision's eigenvalues are.
        """
        check_tensor("z", z, dim=None)
        shape = (self.out_features, self.A.shape[0])
        if z.dim() < 2 or tuple(z.shape[-2:]) != shape:
            raise ValueError(f"argument 'z' must be [..., D, p] = [..., {shape[0]}, {shape[1]}] (p = P"
                             + (" + 1, the bias column last" if self.bias is not None else "")
                             + f"), got {tuple(z.shape)}")
        if z.device != self.device:
            raise ValueError(f"argument 'z' must be on the posterior's device {self.device}, got {z.device}")
        return self.decomposed.sample(z.to(torch.float64), *self._hyper())

    def sample_weights(
        self,
        k: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> tuple[Tensor, Tensor | None]:  # weights [k, D, P], biases [k, D] or None
        """k joint samples of (W, b) from the posterior, on the posterior's device."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"argument 'k' must be a non-negative int, got {k!r}")
        z = torch.randn((k, self.out_features, self.A.shape[0]), dtype=torch.float64, device=self.device,
                        generator=generator)
        delta = self.displacement(z)
        P = self.in_features
        weights = (self.weight + delta[..., :P]).to(dtype)
        biases = None if self.bias is None else (self.bias + delta[..., P]).to(dtype)
        return weights, biases

    # ---- persistence (SPEC.md section 10) -----------------------------------------------------------
    def to(self, device: torch.device | str) -> "KronPosterior":
        """A copy on `device` (cached decompositions are moved, not recomputed)."""
        moved = KronPosterior.__new__(KronPosterior)
        moved.__dict__.update(self.__dict__)
        moved.A, moved.B, moved.weight = self.A.to(device), self.B.to(device), self.weight.to(device)
        moved.bias = None if self.bias is None else self.bias.to(device)
        moved._decomposed = None if self._decomposed is None else self._decomposed.to(device)
        moved._derived = {}
        return moved

    def save(self, path: str | os.PathLike) -> None:
        """Write `path/posterior.safetensors` (A, B, weight, bias in float64) and `path/posterior.json`."""
        tensors = {"A": self.A, "B": self.B, "weight": self.weight}
        if self.bias is not None:
            tensors["bias"] = self.bias
        config = {"format": SAVE_FORMAT, "version": SAVE_VERSION, "prior_precision": self.prior_precision,
                  "pseudo_count": self.pseudo_count, "damping": self.damping.value, "in_features": self.in_features,
                  "out_features": self.out_features, "has_bias": self.bias is not None,
                  "factor_report": {} if self._decomposed is None else {n: asdict(r) for n, r in
                                                                        self._decomposed.reports.items()}}
        write_saved(path, TENSORS_FILE, tensors, CONFIG_FILE, config)

    KIND = "posterior"  # what messages call it

    def embed_options(self, options: dict | None = None) -> dict:
        """`embed` takes no options beyond residual and against (the protocol ProbVLMAdapter shares): {}."""
        if options:
            raise ValueError(f"argument 'embed_options' is for ProbVLM adapters; a KronPosterior takes none, got "
                             f"{sorted(options)}")
        return {}

    def summary(self, embed_options: dict | None = None) -> dict:
        """What identifies the posterior cheaply (stored in an index, checked on use): sizes and hyper-parameters."""
        self.embed_options(embed_options)
        return {"damping": self.damping.value, "in_features": self.in_features, "out_features": self.out_features,
                "bias": self.bias is not None, "prior_precision": self.prior_precision,
                "pseudo_count": self.pseudo_count}

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: torch.device | str = "cpu") -> "KronPosterior":
        """Read a posterior written by `save`; the result equals the saved one exactly.

        A damaged or inconsistent directory (truncated or malformed files, missing keys or tensors, sizes that
        disagree with the configuration, non-floating dtypes, invalid hyper-parameters) is a ValueError naming
        the file; shapes are checked from the safetensors header before any tensor is read.
        """
        owner = "KronPosterior.load"
        tensors_file, config_file = saved_files(path, TENSORS_FILE, CONFIG_FILE, owner)
        config = read_config(config_file, owner)
        for key in ("format", "prior_precision", "pseudo_count", "damping", "has_bias"):
            if key not in config:
                raise ValueError(f"{owner}: {config_file} lacks the key '{key}'")
        if config["format"] != SAVE_FORMAT:
            raise ValueError(f"{owner}: {config_file} has format {config['format']!r}, expected {SAVE_FORMAT!r}")
        if not isinstance(config["has_bias"], bool):
            raise ValueError(f"{owner}: {config_file} has 'has_bias' {config['has_bias']!r}, expected true or false")
        header = read_header(tensors_file, owner)
        needed = ("A", "B", "weight") + (("bias",) if config["has_bias"] else ())
        for name in needed:
            if name not in header:
                raise ValueError(f"{owner}: {tensors_file} lacks the tensor '{name}'")
        weight_shape = header["weight"][1]
        if len(weight_shape) != 2:
            raise ValueError(f"{owner}: {tensors_file} holds 'weight' of shape {weight_shape}, expected [D, P]")
        D, P = weight_shape
        for key, size in (("out_features", D), ("in_features", P)):
            if key in config and config[key] != size:
                raise ValueError(f"{owner}: {config_file} has '{key}' {config[key]!r}, but 'weight' in {tensors_file} "
                                 f"has shape {weight_shape} (D, P)")
        p = P + config["has_bias"]
        expected = {"weight": (D, P), "A": (p, p), "B": (D, D), "bias": (D,)}
        for name in needed:
            if header[name][1] != expected[name]:
                raise ValueError(f"{owner}: {tensors_file} holds '{name}' of shape {header[name][1]}, but "
                                 f"{config_file} (D = {D}, P = {P}, bias {config['has_bias']}) needs {expected[name]}")
        tensors = read_tensors(tensors_file, str(torch.device(map_location)), owner)
        try:  # the constructor checks the values: finite, symmetric factors, positive hyper-parameters
            bias = tensors["bias"] if config["has_bias"] else None
            return cls(tensors["A"], tensors["B"], tensors["weight"], bias, prior_precision=config["prior_precision"],
                       pseudo_count=config["pseudo_count"], damping=config["damping"])
        except ValueError as error:
            raise ValueError(f"{owner}: {path} does not hold a valid posterior: {error}") from None

    @classmethod
    def from_bayesvlm_dir(
        cls,
        path: str | os.PathLike,
        tower: str,  # "img" or "txt"
        weight: Tensor,  # [D, P]
        bias: Tensor | None = None,  # [D]
        damping: str | Damping = "kron",
        map_location: torch.device | str = "cpu",
    ) -> "KronPosterior":
        """Load one tower from the published factor directory (SPEC.md section 10).

        Reads `A_<tower>_analytic.pt`, `B_<tower>_analytic.pt` (with weights_only=True, so nothing but
        tensors is unpickled; CUDA-saved factors load on CPU) and lam, n from `prior_precision_analytic.json`
        (`published.read_tower`: every damaged or mismatched file is a ValueError naming it).
        """
        check_tensor("weight", weight, dim=2)
        D, P = weight.shape
        A, B, prior_precision, pseudo_count = published.read_tower(path, tower, (D, P), bias is not None, map_location)
        return cls(A.to(weight.device), B.to(weight.device), weight, bias, prior_precision=prior_precision,
                   pseudo_count=pseudo_count, damping=damping)


def _check_no_overflow(
    dtype: torch.dtype,  # the accumulation dtype the statistics were computed in
    spread: Tensor,  # [N, 1] alpha or [N, q] k
    sq_norm: Tensor,  # [N] ||mean||^2
    cross_quad: Tensor | None,  # [N] mean^T B_other^-1 mean
) -> None:
    """ValueError naming 'phi' and its rows when finite features gave a non-finite statistic.

    phi was checked finite, so a NaN or Inf here is overflow: features of 1e30 make phi_i phi_j = 1e60, beyond
    float32, and the quadratic form then sums inf - inf = NaN. The true value is not representable either
    (alpha ~ |phi|^2), so it is an error, not a silent NaN that would rank as a degenerate row.
    """
    bad = ~(torch.isfinite(spread).all(1) & torch.isfinite(sq_norm))
    if cross_quad is not None:
        bad |= ~torch.isfinite(cross_quad)
    if bool(bad.any()):
        advice = "pass float64 features or rescale them" if dtype != torch.float64 else "rescale them"
        raise ValueError(f"argument 'phi' (with 'residual', if given) overflows {str(dtype).removeprefix('torch.')} "
                         f"in {describe_rows(bad.nonzero().flatten())}: alpha = phi^T A_d^-1 phi (or k) or ||mean||^2 "
                         f"is not finite; {advice}")


def _symmetrised(x: Tensor) -> Tensor:
    return (x + x.T) / 2
