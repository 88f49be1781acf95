"""Thin wrappers over torch.ops.bayesvlm_ext, with fake kernels and autograd formulas.

Each wrapper validates its arguments (ValueError naming the argument), then calls the compiled
op when `backend(device)` says one serves that device, else the same-named function of
`bayesvlm_ext.reference`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._extension import backend, has_extension
from ._validation import accumulation_dtype, check_tensor

__all__ = ["kron_quadform"]


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
        return reference.kron_quadform(phi, C)
    return torch.ops.bayesvlm_ext.kron_quadform(phi, C)


if has_extension():

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
