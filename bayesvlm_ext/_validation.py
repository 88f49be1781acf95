"""Argument checks shared by the public API: each failure is a ValueError naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# A factor is "clearly non-symmetric" past this relative asymmetry max|X - X^T| / max|X|;
# published factors reach 3e-7 (float32 round-off), SPEC.md section 2.
SYMMETRY_RTOL = 1e-4

# The largest logit scale log s: the logit variances carry s^2, which must stay finite in float32 (the results'
# dtype unless both inputs are float64; e^88.7 overflows it). A round bound just inside: s^2 = e^88 = 1.7e38.
LOGIT_SCALE_MAX = 44.0


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype (SPEC.md: sums in fp32/fp64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_tensor(name: str, x, *, dim: int | None = None, floating: bool = True) -> Tensor:
    if not isinstance(x, Tensor):
        raise ValueError(f"argument '{name}' must be a torch.Tensor, got {type(x).__name__}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"argument '{name}' must be {dim}-D, got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"argument '{name}' must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_shape(name: str, x: Tensor, shape: tuple, what: str = "") -> None:
    if tuple(x.shape) != tuple(shape):
        hint = f" ({what})" if what else ""
        raise ValueError(f"argument '{name}' must have shape {tuple(shape)}{hint}, got {tuple(x.shape)}")


def check_finite(name: str, x: Tensor) -> None:
    if x.numel() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"argument '{name}' contains NaN or Inf")


def check_finite_rows(name: str, x: Tensor) -> None:
    """ValueError naming `name` and its first rows (along dim 0) that hold NaN or Inf."""
    if x.dim() == 0 or not x.numel():
        check_finite(name, x)
        return
    bad = ~torch.isfinite(x).reshape(x.shape[0], -1).all(1)
    if bool(bad.any()):
        raise ValueError(f"argument '{name}' contains NaN or Inf in {describe_rows(bad.nonzero().flatten())}")


def describe_rows(rows: Tensor) -> str:
    """'row 3' or 'rows 3, 7, 9, 12, 20 and 41 more': enough to find them, short enough to read."""
    shown = ", ".join(str(r) for r in rows[:5].tolist())
    more = f" and {rows.numel() - 5} more" if rows.numel() > 5 else ""
    return f"row{'s' if rows.numel() > 1 else ''} {shown}{more}"


def check_logit_scale(name: str, value) -> float:
    """log s as a float: finite and at most LOGIT_SCALE_MAX, so that s = exp(value) and s^2 are finite in float32."""
    value = check_finite_scalar(name, value)
    if value > LOGIT_SCALE_MAX:
        raise ValueError(f"argument '{name}' (log s) must be at most {LOGIT_SCALE_MAX:g}, got {value:g}: the logit "
                         f"variances carry s^2 = exp(2 * {name}), which overflows float32 beyond that (trained CLIP "
                         "and SigLIP models have log s <= log 100 = 4.6)")
    return value


def check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"'{n}' on {d}" for n, d in devices.items())
        raise ValueError(f"arguments must be on one device, got {listed}")


def check_finite_scalar(name: str, value, what: str = "a finite number") -> float:
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"argument '{name}' must be {what}, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"argument '{name}' must be {what}, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"argument '{name}' must be {what}, got {value}")
    return value


def check_positive_scalar(name: str, value) -> float:
    value = check_finite_scalar(name, value, what="a positive finite number")
    if not value > 0:
        raise ValueError(f"argument '{name}' must be a positive finite number, got {value}")
    return value


def check_symmetric_factor(name: str, x: Tensor, size: int, what: str) -> tuple[Tensor, float]:
    """A square, finite, nearly symmetric factor of the given size: ((X + X^T)/2 in float64, max|X - X^T|)."""
    check_tensor(name, x, dim=2)
    if x.shape[0] != x.shape[1]:
        raise ValueError(f"argument '{name}' must be square, got shape {tuple(x.shape)}")
    check_shape(name, x, (size, size), what)
    check_finite(name, x)
    x64 = x.detach().to(torch.float64)
    scale = float(x64.abs().max()) if x64.numel() else 0.0
    asymmetry = float((x64 - x64.T).abs().max()) if x64.numel() else 0.0
    if asymmetry > SYMMETRY_RTOL * scale:
        raise ValueError(f"argument '{name}' must be symmetric: max|X - X^T| = {asymmetry:.3g} exceeds "
                         f"{SYMMETRY_RTOL:g} * max|X| = {SYMMETRY_RTOL * scale:.3g}")
    return (x64 + x64.T) / 2, asymmetry


def parse_enum(name: str, value, enum_cls):
    try:
        return enum_cls(value)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"argument '{name}' must be one of {allowed}, got {value!r}") from None
