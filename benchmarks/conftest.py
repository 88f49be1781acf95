"""Shared inputs for the benchmarks: seeded, built once per session, on the benchmark device.

The device is `cpu` unless BAYESVLM_BENCH_DEVICE names another (e.g. `cuda`); timings on CUDA
synchronise after every call (see `synchronize`). Shapes are the issue's targets for each device
type (SHAPES); benchmarks/report.py writes them to the results JSON.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import Tensor

from bayesvlm_ext import EmbeddingDistribution, KronPosterior

DEVICE_ENV = "BAYESVLM_BENCH_DEVICE"
SEED = 0
LOGIT_SCALE = math.log(100.0)  # log s, as stored in CLIP models

SHAPES = {
    "cpu": {
        "quadform": {"N": 4096, "P": 768},
        "item_stats": {"N": 4096, "P": 768, "D": 512},
        "moments": {"N": 4096, "M": 4096, "D": 512, "P_img": 768, "P_txt": 768},
        "topk": {"N": 256, "M": 200_000, "D": 512, "k": 10, "P_img": 768, "P_txt": 768},
        "kfac": {"N": 4096, "D": 512, "P": 768},
    },
    "cuda": {
        "quadform": {"N": 65536, "P": 768},
        "item_stats": {"N": 65536, "P": 768, "D": 512},
        "moments": {"N": 16384, "M": 16384, "D": 512, "P_img": 768, "P_txt": 768},
        "topk": {"N": 1024, "M": 1_000_000, "D": 512, "k": 10, "P_img": 768, "P_txt": 768},
        "kfac": {"N": 32768, "D": 512, "P": 768},
    },
}
# Input dtypes of the pairwise benchmarks: the CPU targets are float32; the GPU ones bf16 and fp32.
DTYPES = {"cpu": [torch.float32], "cuda": [torch.bfloat16, torch.float32]}


def bench_device() -> torch.device:
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip(f"{DEVICE_ENV}={device} but CUDA is not available")
    return device


def shapes(device: torch.device | str | None = None) -> dict:
    device = torch.device(device if device is not None else os.environ.get(DEVICE_ENV, "cpu"))
    return SHAPES["cuda" if device.type == "cuda" else "cpu"]


def bench_dtypes() -> list[torch.dtype]:
    return DTYPES["cuda" if os.environ.get(DEVICE_ENV, "cpu").startswith("cuda") else "cpu"]


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels so a timed call covers its own work and nothing else."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_factor(
    size: int,
    generator: torch.Generator,
    samples: int = 4096,
) -> Tensor:  # [size, size] symmetric PSD, float32, eigenvalues decaying like 1/k
    q, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    x = torch.randn(samples, size, generator=generator, dtype=torch.float64)
    x = (x * torch.arange(1, size + 1, dtype=torch.float64).rsqrt()) @ q.T  # [samples, size]
    return (x.T @ x / math.sqrt(samples)).float()


def towers(shape: dict, generator: torch.Generator) -> tuple[KronPosterior, KronPosterior]:
    """Image and text posteriors over synthetic factors, prior tuned (float64 storage)."""
    posteriors = []
    for p in (shape["P_img"], shape["P_txt"]):
        weight = torch.randn(shape["D"], p, generator=generator) / math.sqrt(p)  # [D, P]
        posterior = KronPosterior(random_factor(p, generator), random_factor(shape["D"], generator), weight)
        posterior.optimize_prior_precision()
        posteriors.append(posterior)
    return posteriors[0], posteriors[1]


def embed_in_chunks(posterior: KronPosterior, rows: int, generator: torch.Generator, device: torch.device,
                    against: KronPosterior | None = None, chunk: int = 65536) -> EmbeddingDistribution:
    """N embeddings of random features with their cached statistics, built chunk by chunk (bounded memory)."""
    parts = []
    for start in range(0, rows, chunk):
        phi = torch.randn(min(chunk, rows - start), posterior.in_features, generator=generator)
        parts.append(posterior.embed(phi.to(device), against=against))
    return EmbeddingDistribution.cat(parts)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return bench_device()


@pytest.fixture(scope="session")
def quadform_inputs(device) -> tuple[Tensor, Tensor]:  # phi [N, P], C [P, P] float32
    """Features and a damped-inverse factor C = (A + sqrt(lam) I)^-1, the matrix `embed` uses."""
    generator = torch.Generator().manual_seed(SEED)
    n, p = shapes(device)["quadform"]["N"], shapes(device)["quadform"]["P"]
    phi = torch.randn(n, p, generator=generator)
    damped = random_factor(p, generator).double() + 20.0 * torch.eye(p, dtype=torch.float64)
    C = torch.linalg.inv(damped)
    C = ((C + C.T) / 2).float()
    return phi.to(device), C.to(device)


@pytest.fixture(scope="session")
def moments_inputs(device) -> tuple[EmbeddingDistribution, EmbeddingDistribution]:  # N, M kron-form, float32
    """Image and text embeddings from two KronPosteriors, each embedded `against` the other tower, so both
    carry the per-item statistics that `item_stats` computes in its one pass over the features."""
    generator = torch.Generator().manual_seed(SEED + 1)
    shape = shapes(device)["moments"]
    post_img, post_txt = towers(shape, generator)
    post_img, post_txt = post_img.to(device), post_txt.to(device)
    img = embed_in_chunks(post_img, shape["N"], generator, device, against=post_txt)
    txt = embed_in_chunks(post_txt, shape["M"], generator, device, against=post_img)
    return img, txt


@pytest.fixture(scope="session")
def topk_inputs(device) -> tuple[EmbeddingDistribution, EmbeddingDistribution]:  # queries, gallery (float32)
    """Text queries against an image gallery that caches its statistics, as an index would."""
    generator = torch.Generator().manual_seed(SEED + 2)
    shape = shapes(device)["topk"]
    post_img, post_txt = towers(shape, generator)
    post_img, post_txt = post_img.to(device), post_txt.to(device)
    queries = embed_in_chunks(post_txt, shape["N"], generator, device)
    gallery = embed_in_chunks(post_img, shape["M"], generator, device, against=post_txt)
    return queries, gallery
