"""Thin wrappers over torch.ops.bayesvlm_ext, with fake kernels and autograd formulas.

Each wrapper validates its arguments (ValueError naming the argument), then calls the compiled
op when `backend(device)` says one serves that device, else its differentiable PyTorch twin of the
same name (`bayesvlm_ext._torch_impl`). The ops without an autograd formula (item_stats,
pairwise_moments, topk_moments) also take the PyTorch path when a gradient is needed: same numbers,
differentiable. Argument conventions of the pairwise ops: csrc/moments.h.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _torch_impl
from ._extension import backend, has_extension
from ._validation import accumulation_dtype, check_finite_scalar, check_tensor

__all__ = ["kron_quadform", "item_stats", "item_stats_exact", "pairwise_moments", "topk_moments", "topk_order"]

# The top-k order every backend ranks by (SPEC.md sections 7 and 12): key descending, NaN after every other
# key, equal keys by the lower column. Public here for the modules that merge top-k lists themselves.
topk_order = _torch_impl.topk_order


def kron_quadform(
    phi: Tensor,  # [N, P] float16, bfloat16, float32 or float64; any strides
    C: Tensor,  # [P, P] float32 (float64 when phi is float64)
) -> Tensor:  # [N] in C's dtype
    """Batched quadratic form alpha[i] = phi[i]^T C phi[i] (SPEC.md section 3).

    Accumulates in float32 (float64 for float64 input). Differentiable in both arguments.
    """
    check_tensor("phi", phi, dim=2)
    check_tensor("C", C, dim=2)
    if C.shape != (phi.shape[1], phi.shape[1]):
        raise ValueError(f"argument 'C' must have shape ({phi.shape[1]}, {phi.shape[1]}) to match phi "
                         f"[N, P] = {tuple(phi.shape)}, got {tuple(C.shape)}")
    if C.dtype != accumulation_dtype(phi.dtype):
        raise ValueError(f"argument 'C' must be {accumulation_dtype(phi.dtype)} for phi of dtype {phi.dtype}, "
                         f"got {C.dtype}")
    if C.device != phi.device:
        raise ValueError(f"arguments 'phi' and 'C' must be on one device, got {phi.device} and {C.device}")
    if backend(phi.device) == "torch":
        return _torch_impl.kron_quadform(phi, C)
    return torch.ops.bayesvlm_ext.kron_quadform(phi, C)


def _compiled(op: str, device: torch.device, *tensors: Tensor | None) -> bool:
    """True when a compiled kernel of `op` serves `device` and no gradient has to flow through `tensors`."""
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device.type)
    if not has_extension() or key is None:
        return False
    if not getattr(torch.ops.bayesvlm_ext, op).default.has_kernel_for_dispatch_key(key):
        return False
    return not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


def _check_acc(name: str, t: Tensor | None, acc: torch.dtype, device: torch.device, shape: tuple | None = None,
               what: str = "") -> None:
    if t is None:
        return
    check_tensor(name, t)
    if shape is not None and tuple(t.shape) != shape:
        raise ValueError(f"argument '{name}' must have shape {shape}{what}, got {tuple(t.shape)}")
    if t.dtype != acc:
        raise ValueError(f"argument '{name}' must be {acc} (the accumulation dtype), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"argument '{name}' must be on {device}, got {t.device}")


def _check_item_inputs(phi, weight, bias, residual, B_cross, **factors) -> None:
    """The shared contract of item_stats and item_stats_exact; `factors`: A_inv, or Qa and K."""
    check_tensor("phi", phi, dim=2)
    acc, (n, p) = accumulation_dtype(phi.dtype), phi.shape
    check_tensor("weight", weight, dim=2)
    d = weight.shape[0]
    _check_acc("weight", weight, acc, phi.device, (d, p), " ([D, P] with P of phi)")
    _check_acc("bias", bias, acc, phi.device, (d,))
    _check_acc("residual", residual, acc, phi.device, (n, d))
    _check_acc("B_cross", B_cross, acc, phi.device, (d, d))
    pa = p + (bias is not None)
    for name, t in factors.items():  # A_inv and Qa are [p, p], K is [p, D]
        _check_acc(name, t, acc, phi.device, (pa, d if name == "K" else pa),
                   " (P + 1 with a bias)" if bias is not None else "")


def item_stats(
    phi: Tensor,  # [N, P] float16, bfloat16, float32 or float64; any strides
    weight: Tensor,  # [D, P] accumulation dtype (float32; float64 for float64 phi)
    bias: Tensor | None,  # [D]
    residual: Tensor | None,  # [N, D]
    A_inv: Tensor,  # [P, P]; [P+1, P+1] with a bias (the constant 1 is the last feature)
    B_cross: Tensor | None,  # [D, D] the other tower's shared matrix, or None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # mean [N, D], alpha [N], sq_norm [N], cross_quad [N] ([0] w/o B_cross)
    """Per-item statistics of one tower in one pass over phi (SPEC.md section 3)."""
    _check_item_inputs(phi, weight, bias, residual, B_cross, A_inv=A_inv)
    if _compiled("item_stats", phi.device, phi, weight, bias, residual, A_inv, B_cross):
        return torch.ops.bayesvlm_ext.item_stats(phi, weight, bias, residual, A_inv, B_cross)
    return _torch_impl.item_stats(phi, weight, bias, residual, A_inv, B_cross)


def item_stats_exact(
    phi: Tensor,  # [N, P] float16, bfloat16, float32 or float64; any strides
    weight: Tensor,  # [D, P] accumulation dtype
    bias: Tensor | None,  # [D]
    residual: Tensor | None,  # [N, D]
    Qa: Tensor,  # [p, p] eigenvectors of A, p = P (+ 1 with a bias: the constant 1 is the last feature)
    K: Tensor,  # [p, D] 1 / (n a_i e_j + lambda)
    B_cross: Tensor | None,  # [D, D] the other tower's shared matrix, or None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # mean [N, D], k [N, D], sq_norm [N], cross_quad [N] ([0] w/o B_cross)
    """Per-item statistics of a tower with damping "exact" in one pass over phi (SPEC.md section 3):
    k = (z * z) K with z = [phi, 1] Qa, never written out."""
    _check_item_inputs(phi, weight, bias, residual, B_cross, Qa=Qa, K=K)
    if _compiled("item_stats_exact", phi.device, phi, weight, bias, residual, Qa, K, B_cross):
        return torch.ops.bayesvlm_ext.item_stats_exact(phi, weight, bias, residual, Qa, K, B_cross)
    return _torch_impl.item_stats_exact(phi, weight, bias, residual, Qa, K, B_cross)


def _check_pairwise(x, y, x_stats, y_stats, x_var, y_var, x_proj=None, y_proj=None) -> None:
    check_tensor("x", x, dim=2)
    check_tensor("y", y, dim=2)
    if y.dtype != x.dtype:
        raise ValueError(f"arguments 'x' and 'y' must have one dtype, got {x.dtype} and {y.dtype}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"arguments 'x' [N, D] and 'y' [M, D] must share D, got {tuple(x.shape)} and {tuple(y.shape)}")
    if x.device != y.device:
        raise ValueError(f"arguments 'x' and 'y' must be on one device, got {x.device} and {y.device}")
    acc = accumulation_dtype(x.dtype)
    if (x_proj is None) != (y_proj is None):
        raise ValueError("arguments 'x_proj' and 'y_proj' must be given together")
    stats, what = (3, " (inv_norm, alpha, quad)") if x_proj is None else \
        (5, " (inv_norm, alpha, quad, inv_mu_norm, r) with projection features")
    _check_acc("x_stats", x_stats, acc, x.device, (x.shape[0], stats), what)
    _check_acc("y_stats", y_stats, acc, x.device, (y.shape[0], stats), what)
    if x_proj is not None:
        _check_acc("x_proj", x_proj, acc, x.device, (x.shape[0], x.shape[1]), " (S u per item)")
        _check_acc("y_proj", y_proj, acc, x.device, (y.shape[0], x.shape[1]), " (S u per item)")
    if (x_var is None) != (y_var is None):
        raise ValueError("arguments 'x_var' and 'y_var' must be given together")
    if x_var is not None:
        check_tensor("x_var", x_var, dim=2)
        _check_acc("x_var", x_var, acc, x.device, (x.shape[0], x_var.shape[1]))
        _check_acc("y_var", y_var, acc, x.device, (y.shape[0], x_var.shape[1]), " (K of x_var)")


def _pairwise_scalars(scale, bias, trace_cross) -> tuple[float, float, float]:
    """The scalar arguments of the pairwise ops, each finite (NaN or Inf there is a caller's mistake, not data)."""
    return (check_finite_scalar("scale", scale), check_finite_scalar("bias", bias),
            check_finite_scalar("trace_cross", trace_cross))


def pairwise_moments(
    x: Tensor,  # [N, D] float16, bfloat16, float32 or float64; any strides
    y: Tensor,  # [M, D] x's dtype
    x_stats: Tensor,  # [N, 3] (inv_norm, alpha, quad), accumulation dtype
    y_stats: Tensor,  # [M, 3]
    x_var: Tensor | None,  # [N, K] var features (exact / diagonal forms), or None for the Kronecker form
    y_var: Tensor | None,  # [M, K]
    scale: float,  # s = exp(logit_scale)
    bias: float,  # logit bias
    trace_cross: float,  # tr(Bx By) (Kronecker form)
    output: int = 0,  # first output: 0 mean logit, 1 probit logit, 2 sigmoid probit
    x_proj: Tensor | None = None,  # [N, D] S u per item, the "projected" variance's features; stats then [N, 5]
    y_proj: Tensor | None = None,  # [M, D]
) -> tuple[Tensor, Tensor]:  # first [N, M], var [N, M], accumulation dtype
    """Logit mean (or its probit transforms) and variance of every pair, fused (SPEC.md sections 4-5)."""
    _check_pairwise(x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj)
    if output not in (0, 1, 2):
        raise ValueError(f"argument 'output' must be 0 (mean), 1 (probit logit) or 2 (sigmoid probit), got {output!r}")
    args = (x, y, x_stats, y_stats, x_var, y_var, *_pairwise_scalars(scale, bias, trace_cross), int(output), x_proj,
            y_proj)
    if _compiled("pairwise_moments", x.device, x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj):
        return torch.ops.bayesvlm_ext.pairwise_moments(*args)
    return _torch_impl.pairwise_moments(*args)


def topk_moments(
    x: Tensor,  # [N, D] queries
    y: Tensor,  # [M, D] gallery, x's dtype
    x_stats: Tensor,  # [N, 3]
    y_stats: Tensor,  # [M, 3]
    x_var: Tensor | None,  # [N, K]
    y_var: Tensor | None,  # [M, K]
    scale: float,
    bias: float,
    trace_cross: float,
    k: int,  # 0 <= k <= M
    score: int,  # 0 mean, 1 pessimistic, 2 optimistic, 3 probit
    kappa: float,
    x_proj: Tensor | None = None,  # [N, D] ("projected" variance)
    y_proj: Tensor | None = None,  # [M, D]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # values, indices (int64), mean, var: [N, k] each
    """Streaming top-k over the gallery by score, ties to the lower index (SPEC.md section 7). No gradients."""
    _check_pairwise(x, y, x_stats, y_stats, x_var, y_var, x_proj, y_proj)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= y.shape[0]:
        raise ValueError(f"argument 'k' must be an int in [0, M] = [0, {y.shape[0]}], got {k!r}")
    if score not in (0, 1, 2, 3):
        raise ValueError(f"argument 'score' must be 0, 1, 2 or 3, got {score!r}")
    args = (x, y, x_stats, y_stats, x_var, y_var, *_pairwise_scalars(scale, bias, trace_cross), k, int(score),
            check_finite_scalar("kappa", kappa), x_proj, y_proj)
    with torch.no_grad():
        if _compiled("topk_moments", x.device):
            return torch.ops.bayesvlm_ext.topk_moments(*args)
        return _torch_impl.topk_moments(*args)


if has_extension():

    @torch.library.register_fake("bayesvlm_ext::item_stats")
    def _item_stats_fake(phi, weight, bias, residual, A_inv, B_cross):
        acc = accumulation_dtype(phi.dtype)
        n, d = phi.shape[0], weight.shape[0]
        return (phi.new_empty((n, d), dtype=acc), phi.new_empty((n,), dtype=acc), phi.new_empty((n,), dtype=acc),
                phi.new_empty((n if B_cross is not None else 0,), dtype=acc))

    @torch.library.register_fake("bayesvlm_ext::item_stats_exact")
    def _item_stats_exact_fake(phi, weight, bias, residual, Qa, K, B_cross):
        acc = accumulation_dtype(phi.dtype)
        n, d = phi.shape[0], weight.shape[0]
        return (phi.new_empty((n, d), dtype=acc), phi.new_empty((n, d), dtype=acc), phi.new_empty((n,), dtype=acc),
                phi.new_empty((n if B_cross is not None else 0,), dtype=acc))

    @torch.library.register_fake("bayesvlm_ext::pairwise_moments")
    def _pairwise_moments_fake(x, y, x_stats, y_stats, x_var, y_var, scale, bias, trace_cross, output, x_proj=None,
                               y_proj=None):
        torch._check(x.shape[1] == y.shape[1], lambda: "pairwise_moments: x and y must share D")
        acc = accumulation_dtype(x.dtype)
        return x.new_empty((x.shape[0], y.shape[0]), dtype=acc), x.new_empty((x.shape[0], y.shape[0]), dtype=acc)

    @torch.library.register_fake("bayesvlm_ext::topk_moments")
    def _topk_moments_fake(x, y, x_stats, y_stats, x_var, y_var, scale, bias, trace_cross, k, score, kappa,
                           x_proj=None, y_proj=None):
        torch._check(x.shape[1] == y.shape[1], lambda: "topk_moments: x and y must share D")
        acc = accumulation_dtype(x.dtype)
        shape = (x.shape[0], k)
        return (x.new_empty(shape, dtype=acc), x.new_empty(shape, dtype=torch.long), x.new_empty(shape, dtype=acc),
                x.new_empty(shape, dtype=acc))


    @torch.library.register_fake("bayesvlm_ext::kron_quadform")
    def _kron_quadform_fake(phi: Tensor, C: Tensor) -> Tensor:
        torch._check(phi.dim() == 2, lambda: "kron_quadform: phi must be 2-D")
        torch._check(C.shape == (phi.shape[1], phi.shape[1]), lambda: "kron_quadform: C must be [P, P]")
        torch._check(C.dtype == accumulation_dtype(phi.dtype), lambda: "kron_quadform: C has the wrong dtype")
        return phi.new_empty((phi.shape[0],), dtype=C.dtype)

    def _kron_quadform_setup_context(ctx, inputs, output):
        phi, C = inputs
        ctx.save_for_backward(phi, C)

    def _kron_quadform_backward(ctx, grad: Tensor):
        # d alpha_i / d phi_i = (C + C^T) phi_i ;  d alpha_i / d C = phi_i phi_i^T
        phi, C = ctx.saved_tensors
        x = phi.to(C.dtype)
        grad_phi = grad_C = None
        if ctx.needs_input_grad[0]:
            grad_phi = (grad[:, None] * (x @ (C + C.mT))).to(phi.dtype)
        if ctx.needs_input_grad[1]:
            grad_C = (x * grad[:, None]).mT @ x
        return grad_phi, grad_C

    torch.library.register_autograd("bayesvlm_ext::kron_quadform", _kron_quadform_backward,
                                    setup_context=_kron_quadform_setup_context)
