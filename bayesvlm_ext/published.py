"""The published factor format (SPEC.md section 10), as the reference code writes and reads it.

A directory of `A_<tower>_analytic.pt`, `B_<tower>_analytic.pt` (one float tensor each; tower "img" or "txt")
and `prior_precision_analytic.json` ({"lambda_img", "n_img", "lambda_txt", "n_txt"}). `read_tower` loads one
tower with `weights_only=True` (nothing but tensors is unpickled; CUDA-saved factors load on CPU) and names
the file at fault for anything missing, damaged or of the wrong shape; `write` produces the same layout
(every file written aside and renamed), which `BayesVLM.save` puts beside the package's own format.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

from ._files import replacing, write_json
from ._validation import FLOAT_DTYPES
from .storage import read_config

HYPER_FILE = "prior_precision_analytic.json"
TOWERS = ("img", "txt")


def factor_file(name: str, tower: str) -> str:
    """"A_img_analytic.pt" and the like: factor `name` ("A" or "B") of `tower` ("img" or "txt")."""
    return f"{name}_{tower}_analytic.pt"


def files() -> list[str]:
    """Every file of the format, relative to its directory."""
    return [HYPER_FILE] + [factor_file(name, tower) for name in "AB" for tower in TOWERS]


def read_tower(
    path: str | os.PathLike,
    tower: str,  # "img" or "txt"
    weight_shape: tuple[int, int],  # (D, P) of the layer
    has_bias: bool,  # A is then [P + 1, P + 1]
    map_location: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, float, float]:  # A [p, p], B [D, D] (as stored), lambda, n
    """One tower's factors and hyper-parameters; FileNotFoundError or ValueError naming the file at fault."""
    if tower not in TOWERS:
        raise ValueError(f"argument 'tower' must be 'img' or 'txt', got {tower!r}")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"factor directory {path} does not exist")
    paths = {name: os.path.join(path, factor_file(name, tower)) for name in ("A", "B")}
    json_file = os.path.join(path, HYPER_FILE)
    for file in (*paths.values(), json_file):
        if not os.path.isfile(file):
            raise FileNotFoundError(f"factor directory {path}: missing file {os.path.basename(file)}")
    hyper = read_hyperparameters(json_file, tower)  # the small file first: a damaged one fails before any load
    D, P = weight_shape
    expected = {"A": P + has_bias, "B": D}
    factors = {}
    for name, file in paths.items():
        factor = load_factor(file, map_location)
        size = expected[name]
        if tuple(factor.shape) != (size, size):
            raise ValueError(f"{file} has shape {tuple(factor.shape)}; weight [D, P] = {(D, P)} "
                             f"{'with' if has_bias else 'without'} bias needs ({size}, {size})")
        if not bool(torch.isfinite(factor).all()):
            raise ValueError(f"{file} contains NaN or Inf")
        factors[name] = factor
    return factors["A"], factors["B"], hyper[f"lambda_{tower}"], hyper[f"n_{tower}"]


def write(
    path: str | os.PathLike,  # an existing directory
    towers: dict[str, tuple[Tensor, Tensor, float, float]],  # "img"/"txt" -> (A, B, lambda, n)
    what: str = "argument 'path'",  # how errors name the destination
) -> None:
    """Writes the format (float32 factors, as published); each file aside, then renamed over the old one."""
    hyper = {}
    for tower, (A, B, prior_precision, pseudo_count) in towers.items():
        for name, factor in (("A", A), ("B", B)):
            with replacing(os.path.join(path, factor_file(name, tower)), what) as temporary:
                torch.save(factor.float().cpu().contiguous(), temporary)
        hyper[f"lambda_{tower}"], hyper[f"n_{tower}"] = prior_precision, pseudo_count
    write_json(os.path.join(path, HYPER_FILE), hyper, what)


def load_factor(file: str, map_location: torch.device | str) -> Tensor:
    """The tensor in a published `.pt` factor file, on `map_location`; ValueError naming the file when it is damaged,
    holds anything but one floating tensor, or would need arbitrary objects unpickled (SPEC.md section 10)."""
    try:
        factor = torch.load(file, map_location=map_location, weights_only=True)
    except MemoryError:
        raise
    except Exception as error:  # a damaged file surfaces as RuntimeError, OSError, EOFError, UnpicklingError, ...
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ValueError(f"{file} is not a readable tensor file ({type(error).__name__}: {reason})") from error
    if not isinstance(factor, Tensor):
        raise ValueError(f"{file} must hold one tensor, got {type(factor).__name__}")
    if factor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{file} holds a {factor.dtype} tensor; expected a floating factor")
    return factor


def read_hyperparameters(json_file: str, tower: str) -> dict[str, float]:
    """lambda_<tower> and n_<tower> from prior_precision_analytic.json: positive finite numbers, or a ValueError
    naming the file and the key."""
    hyper = read_config(json_file, "the published factors")
    for key in (f"lambda_{tower}", f"n_{tower}"):
        if key not in hyper:
            raise ValueError(f"{json_file} lacks the key '{key}'")
        value = hyper[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
            raise ValueError(f"{json_file} has '{key}' {value!r}; expected a positive finite number")
    return hyper
