"""Argument checks shared by acquisition scores and the posterior update (SPEC.md section 8)."""

from __future__ import annotations

import torch

from .._validation import check_finite, check_tensor
from ..zeroshot import ZeroShotClassifier


def check_classifier(classifier) -> None:
    if not isinstance(classifier, ZeroShotClassifier):
        raise ValueError(f"argument 'classifier' must be a ZeroShotClassifier, got {type(classifier).__name__}")


def check_rows(name: str, x, rows: int | None, cols: int, device: torch.device, what: str) -> int:
    """A finite 2-D float tensor [rows, cols] on `device`; returns its row count."""
    check_tensor(name, x, dim=2)
    if x.shape[1] != cols or (rows is not None and x.shape[0] != rows):
        expected = f"[{'N' if rows is None else rows}, {cols}]"
        raise ValueError(f"argument '{name}' must be {what} = {expected}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"argument '{name}' must be on {device}, got {x.device}")
    check_finite(name, x)
    return x.shape[0]
