"""Loads the compiled extension `bayesvlm_ext._C` when it is there and says which path serves calls.

Set BAYESVLM_EXT_DISABLE_EXTENSION=1 to run everything on the pure-PyTorch path, or
BAYESVLM_EXT_LIBRARY=PATH to load another build of `_C` in place of the package's own (the
AddressSanitizer build of `make sanitize-cpu`).
"""

from __future__ import annotations

import os
import warnings

import torch

DISABLE_ENV = "BAYESVLM_EXT_DISABLE_EXTENSION"
LIBRARY_ENV = "BAYESVLM_EXT_LIBRARY"


def _load_library(path: str):
    """The extension module `bayesvlm_ext._C` from the file `path` (another build of the same sources)."""
    import importlib.util
    import sys

    if not os.path.isfile(path):
        raise ImportError(f"{LIBRARY_ENV}={path}: no such file")
    spec = importlib.util.spec_from_file_location(f"{__package__}._C", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module
    return module


_C = None
load_error: str | None = None
if os.environ.get(DISABLE_ENV, "0").strip().lower() in ("1", "true", "yes", "on"):
    load_error = f"disabled by {DISABLE_ENV}"
else:
    try:
        if os.environ.get(LIBRARY_ENV):
            _C = _load_library(os.environ[LIBRARY_ENV])  # loading runs the TORCH_LIBRARY registrations
        else:
            from . import _C  # noqa: F401  (importing runs the TORCH_LIBRARY registrations)
    except ImportError as exc:
        load_error = f"{type(exc).__name__}: {exc}"

if _C is None:
    warnings.warn(f"bayesvlm_ext: compiled extension not loaded ({load_error}); every op runs on the "
                  "pure-PyTorch path (backend 'torch'). Build it with `make build` or "
                  "`pip install --no-build-isolation -e .`.", RuntimeWarning, stacklevel=2)


def has_extension() -> bool:
    """True when `bayesvlm_ext._C` is loaded (its ops are registered under torch.ops.bayesvlm_ext)."""
    return _C is not None


def _has_kernel(dispatch_key: str) -> bool:
    return _C is not None and torch.ops.bayesvlm_ext.kron_quadform.default.has_kernel_for_dispatch_key(dispatch_key)


def backend(device: torch.device | str = "cpu") -> str:
    """Which implementation serves ops on `device`: "cuda" or "cpu" (compiled kernels) or "torch" (pure PyTorch)."""
    device = torch.device(device)
    if device.type == "cuda" and _has_kernel("CUDA"):
        return "cuda"
    if device.type == "cpu" and _has_kernel("CPU"):
        return "cpu"
    return "torch"


def build_info() -> dict:
    """What was compiled: {"extension": bool, "cpu_kernels": bool, "cuda_kernels": bool, "load_error": str | None}."""
    return {"extension": has_extension(), "cpu_kernels": _has_kernel("CPU"), "cuda_kernels": _has_kernel("CUDA"),
            "load_error": load_error}
