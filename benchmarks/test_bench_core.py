"""Core op benchmarks: the fused ops against torch.mm, the published formulation and chunked top-k.

Every benchmark first checks its result (float64 oracle, error budget of its precision), then times
with `benchmark.pedantic` (one warm-up round, a fixed number of rounds, synchronised on CUDA).
`extra_info["key"]` names the entry for the targets in benchmarks/report.py and `extra_info["role"]`
marks the group's baseline ("baseline") and the naive reference ("reference"); ratios are taken to those.

Run: `pytest benchmarks --benchmark-only`; `python -m benchmarks.report` runs this and writes
`benchmarks/results/<device>.json`.
"""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor

import bayesvlm_ext
from bayesvlm_ext import EmbeddingDistribution, _torch_impl, cosine_moments, kfac_factors, ops, reference, topk
from bayesvlm_ext.moments import pairwise_inputs

from .conftest import LOGIT_SCALE, bench_dtypes, shapes, synchronize

ROUNDS = 10
TOPK_CHUNK = 16384  # gallery rows per torch.mm in the chunked baseline: a [N, 16384] score block


def group_name(kind: str, dtype: torch.dtype = torch.float32) -> str:
    shape = shapes()[kind]
    dims = " ".join(f"{k}={v}" for k, v in shape.items() if not k.startswith("P_"))
    return f"{kind} {dims} {str(dtype).replace('torch.', '')}"


def tolerance(dtype: torch.dtype) -> float:
    """Error budget relative to the largest magnitude of the result: float32 accumulation of up to
    2D = 1024 products of exactly-read inputs loses a few hundred ulps at worst (2^-23 ~ 1.2e-7)."""
    return 1e-12 if dtype == torch.float64 else 1e-5


def assert_close_to_oracle(name: str, actual: Tensor, oracle: Tensor, dtype: torch.dtype = torch.float32) -> None:
    """max |actual - oracle| <= tolerance * max |oracle| (oracle float64)."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    error = (actual.double() - oracle).abs().max().item()
    bound = tolerance(dtype) * oracle.abs().max().item()
    assert error <= bound, f"{name}: max abs error {error:.3g} exceeds {bound:.3g}"


def run_timed(benchmark, fn, device: torch.device, role: str, key: str, kind: str, dtype=torch.float32,
              rounds: int = ROUNDS, warmup_rounds: int = 1):
    """Time fn() with pedantic rounds, synchronising on CUDA, and record what the report needs."""
    def call():
        result = fn()
        synchronize(device)
        return result

    benchmark.extra_info.update(role=role, key=key, kind=kind, dtype=str(dtype).replace("torch.", ""),
                                device=str(device), backend=bayesvlm_ext.backend(device),
                                threads=torch.get_num_threads(), shape=shapes(device)[kind])
    return benchmark.pedantic(call, rounds=rounds, iterations=1, warmup_rounds=warmup_rounds)


def with_mean_dtype(dist: EmbeddingDistribution, dtype: torch.dtype) -> EmbeddingDistribution:
    """The same distribution with its means stored in `dtype` (statistics stay float32)."""
    return EmbeddingDistribution(dist.mean.to(dtype), dist.covariance, sq_norm=dist.sq_norm,
                                 cross_quad=dist.cross_quad, cross_shared=dist.cross_shared)


# ---- (a) alpha = phi^T C phi per row, and the per-item statistics ---------------------------------------
@pytest.mark.benchmark(group=group_name("quadform"))
def test_kron_quadform_ops(benchmark, quadform_inputs, device):
    phi, C = quadform_inputs
    oracle = _torch_impl.kron_quadform(phi.double(), C.double())
    assert_close_to_oracle("ops.kron_quadform", ops.kron_quadform(phi, C), oracle)
    run_timed(benchmark, lambda: ops.kron_quadform(phi, C), device, "candidate", "ops", "quadform")


@pytest.mark.benchmark(group=group_name("quadform"))
def test_kron_quadform_reference(benchmark, quadform_inputs, device):
    phi, C = quadform_inputs
    run_timed(benchmark, lambda: _torch_impl.kron_quadform(phi, C), device, "baseline", "reference", "quadform")


@pytest.fixture(scope="module")
def item_stats_inputs(quadform_inputs, device):
    phi, C = quadform_inputs  # [N, P], [P, P]
    d = shapes(device)["item_stats"]["D"]
    generator = torch.Generator().manual_seed(3)
    weight = (torch.randn(d, phi.shape[1], generator=generator) / phi.shape[1] ** 0.5).to(device)
    B = (torch.eye(d) + 0.01 * torch.ones(d, d)).to(device)
    return phi, weight, None, None, C, B


@pytest.mark.benchmark(group=group_name("item_stats"))
@pytest.mark.parametrize("impl", ["ops", "reference"])
def test_item_stats(benchmark, item_stats_inputs, device, impl):
    fn = getattr(ops if impl == "ops" else _torch_impl, "item_stats")
    if impl == "ops":
        oracle = _torch_impl.item_stats(*(t.double() if t is not None else None for t in item_stats_inputs))
        for name, got, expected in zip(("mean", "alpha", "sq_norm", "cross_quad"), fn(*item_stats_inputs), oracle):
            assert_close_to_oracle(f"item_stats {name}", got, expected)
    run_timed(benchmark, lambda: fn(*item_stats_inputs), device, "candidate" if impl == "ops" else "baseline", impl,
              "item_stats")


# ---- (b) logit mean and variance for an N x M block --------------------------------------------
def moments_oracle(
    img: EmbeddingDistribution,  # N items, kron form
    txt: EmbeddingDistribution,  # M items, kron form
    diag: bool = False,  # True: per-dimension variances only (the "diag" approximation)
    rows: int = 256,  # oracle on the first rows only: float64 N x M x D is slow
) -> tuple[Tensor, Tensor]:  # mean [rows, M], var [rows, M], float64
    """SPEC.md section 4 in float64 from each item's covariance, never through the fused path.

    Kron form: S = alpha * shared, so mu_x^T S_y mu_x = alpha_y (mu_x^T By mu_x) and
    tr(S_x S_y) = alpha_x alpha_y tr(Bx By); "diag" replaces each shared matrix by its diagonal.
    """
    mx, my = img.mean[:rows].double().cpu(), txt.mean.double().cpu()
    ax, ay = img.alpha[:rows].double().cpu(), txt.alpha.double().cpu()
    bx, by = img.shared.double().cpu(), txt.shared.double().cpu()
    if diag:
        bx, by = torch.diag(torch.diagonal(bx)), torch.diag(torch.diagonal(by))
    quad_x = torch.einsum("nd,de,ne->n", mx, by, mx)  # [N] mu_x^T By mu_x
    quad_y = torch.einsum("md,de,me->m", my, bx, my)  # [M]
    dot_var = ay[None] * quad_x[:, None] + ax[:, None] * quad_y[None] + torch.outer(ax, ay) * torch.trace(bx @ by)
    sq_norm_x = (mx * mx).sum(1) + ax * torch.trace(bx)  # E||x||^2
    sq_norm_y = (my * my).sum(1) + ay * torch.trace(by)
    norms = torch.outer(sq_norm_x, sq_norm_y)
    scale = torch.tensor(LOGIT_SCALE, dtype=torch.float64).exp()
    return scale * (mx @ my.T) / norms.sqrt(), scale**2 * dot_var / norms


def projected_oracle(
    img: EmbeddingDistribution,  # N items
    txt: EmbeddingDistribution,  # M items
    rows: int = 256,
) -> tuple[Tensor, Tensor]:  # mean [rows, M], var [rows, M], float64
    """The projected variant's moments in float64 through the PyTorch twin (not the compiled kernel)."""
    inputs = pairwise_inputs(img[:rows].to("cpu", torch.float64), txt.to("cpu", torch.float64), "projected")
    return _torch_impl.pairwise_moments(*inputs[:6], math.exp(LOGIT_SCALE), 0.0, inputs.trace_cross, 0,
                                        inputs.x_proj, inputs.y_proj)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
@pytest.mark.parametrize("variant", ["kron", "diag", "projected"])
def test_cosine_moments(benchmark, moments_inputs, device, variant, dtype):
    benchmark.group = group_name("moments", dtype)
    img, txt = (with_mean_dtype(d, dtype) for d in moments_inputs)
    if variant == "projected":  # both sides keep their projection statistics, as they keep cross_quad
        img, txt = img.with_projection(), txt.with_projection()
    mean, var = cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant=variant)
    if variant == "projected":
        oracle_mean, oracle_var = projected_oracle(img, txt)
    else:
        oracle_mean, oracle_var = moments_oracle(img, txt, diag=variant == "diag")
    assert_close_to_oracle(f"cosine_moments {variant}: mean", mean[:256].cpu(), oracle_mean)
    assert_close_to_oracle(f"cosine_moments {variant}: var", var[:256].cpu(), oracle_var)
    del mean, var
    run_timed(benchmark, lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant=variant), device,
              "candidate", variant, "moments", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_cosine_moments_kron_uncached(benchmark, moments_inputs, device, dtype):
    """"kron" when neither side carries cached statistics: mu^T B_other mu is computed in the call."""
    benchmark.group = group_name("moments", dtype)
    img, txt = (EmbeddingDistribution(d.mean.to(dtype), d.covariance) for d in moments_inputs)
    run_timed(benchmark, lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant="kron"), device,
              "candidate", "kron_uncached", "moments", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_cosine_moments_per_dimension(benchmark, moments_inputs, device, dtype):
    """Per-dimension diagonal covariances (ProbVLM): the mean GEMM plus one GEMM of inner size 2D."""
    benchmark.group = group_name("moments", dtype)
    img, txt = (EmbeddingDistribution.diagonal(d.mean.to(dtype), d.diagonal_variance()) for d in moments_inputs)
    mean, var = cosine_moments(img, txt, logit_scale=LOGIT_SCALE)
    oracle_mean, oracle_var = moments_oracle(*moments_inputs, diag=True)
    assert_close_to_oracle("cosine_moments per-dimension: var", var[:256].cpu(), oracle_var)
    del mean, var
    run_timed(benchmark, lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE), device, "candidate",
              "per_dimension", "moments", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_cosine_moments_reference_diag(benchmark, moments_inputs, device, dtype):
    """The published formulation: per-dimension variances [N, D] and three N x M x D GEMMs."""
    benchmark.group = group_name("moments", dtype)
    img, txt = moments_inputs
    var_img, var_txt = img.diagonal_variance(), txt.diagonal_variance()  # [N, D], [M, D], outside the timing
    mean_img, mean_txt = img.mean.to(dtype), txt.mean.to(dtype)
    run_timed(benchmark, lambda: reference.cosine_moments_diag(mean_img, var_img, mean_txt, var_txt,
                                                               logit_scale=LOGIT_SCALE),
              device, "reference", "reference_diag", "moments", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_cosine_similarity_mm(benchmark, moments_inputs, device, dtype):
    """The deterministic model's cost: one GEMM of the means, the floor for any moment computation."""
    benchmark.group = group_name("moments", dtype)
    img, txt = (d.mean.to(dtype) for d in moments_inputs)
    run_timed(benchmark, lambda: torch.mm(img, txt.T), device, "baseline", "mm", "moments", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_write_both_outputs(benchmark, moments_inputs, device, dtype):
    """A device copy of as many bytes as the two float32 [N, M] outputs: the memory-traffic floor."""
    if device.type != "cuda":
        pytest.skip("the output-write floor is a GPU target")
    benchmark.group = group_name("moments", dtype)
    n, m = len(moments_inputs[0]), len(moments_inputs[1])
    source = torch.empty(2 * n * m, dtype=torch.float32, device=device)
    target = torch.empty_like(source)
    run_timed(benchmark, lambda: target.copy_(source), device, "floor", "write_outputs", "moments", dtype)


# ---- (c) streaming top-k -------------------------------------------------------------------------------
def chunked_mm_topk(queries: Tensor, gallery: Tensor, k: int) -> tuple[Tensor, Tensor]:  # [N, k] each
    """What a user writes without this package: score the gallery in chunks, keep each chunk's top-k, merge."""
    values, indices = [], []
    for start in range(0, gallery.shape[0], TOPK_CHUNK):
        v, i = torch.topk(queries @ gallery[start:start + TOPK_CHUNK].T, k, dim=1)
        values.append(v)
        indices.append(i + start)
    v, j = torch.topk(torch.cat(values, dim=1), k, dim=1)
    return v, torch.cat(indices, dim=1).gather(1, j)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
@pytest.mark.parametrize("score", ["mean", "pessimistic", "probit", "probit_projected"])
def test_topk(benchmark, topk_inputs, device, score, dtype):
    benchmark.group = group_name("topk", dtype)
    queries, gallery = (with_mean_dtype(d, dtype) for d in topk_inputs)
    k = shapes(device)["topk"]["k"]
    name, score, variant = score, score.removesuffix("_projected"), "projected" if score.endswith("projected") else None
    if variant:  # the gallery keeps its projection statistics (computed once, like its cross_quad)
        gallery = gallery.with_projection()
    values, indices, mean, var = topk(queries, gallery, k, score=score, logit_scale=LOGIT_SCALE, variant=variant)
    # Check on the first queries against the dense moments of the same pairs (float64 oracle).
    oracle_mean, oracle_var = (projected_oracle(queries, gallery, rows=8) if variant
                               else moments_oracle(queries, gallery, rows=8))
    key = {"mean": oracle_mean, "pessimistic": oracle_mean - oracle_var.sqrt(),
           "probit": oracle_mean / torch.sqrt(1 + torch.pi / 8 * oracle_var)}[score]
    best = key.topk(k, dim=1).values
    assert_close_to_oracle(f"topk {score}: best scores", values[:8].cpu(),
                           torch.sigmoid(best) if score == "probit" else best)
    run_timed(benchmark, lambda: topk(queries, gallery, k, score=score, logit_scale=LOGIT_SCALE, variant=variant),
              device, "candidate", f"topk_{name}", "topk", dtype)


@pytest.mark.benchmark
@pytest.mark.parametrize("dtype", bench_dtypes(), ids=str)
def test_topk_chunked_mm_baseline(benchmark, topk_inputs, device, dtype):
    benchmark.group = group_name("topk", dtype)
    queries, gallery = (d.mean.to(dtype) for d in topk_inputs)
    k = shapes(device)["topk"]["k"]
    run_timed(benchmark, lambda: chunked_mm_topk(queries, gallery, k), device, "baseline", "chunked_mm_topk", "topk",
              dtype)


# ---- (d) KFAC factors: the algebraic expansion against the per-sample formulation -----------------------
@pytest.fixture(scope="module")
def kfac_inputs(device):
    shape = shapes(device)["kfac"]
    generator = torch.Generator().manual_seed(4)
    features = torch.randn(shape["N"], shape["P"], generator=generator)
    embeddings = torch.randn(shape["N"], shape["D"], generator=generator)
    # Weakly paired (positive cosine ~0.1, a logit gap ~10 at s = 100), as in a trained CLIP; strongly
    # paired random data make the softmax one-hot and B ~ e^-70, all cancellation.
    targets = 0.1 * embeddings + torch.randn(shape["N"], shape["D"], generator=generator)
    return features.to(device), embeddings.to(device), targets.to(device)


@pytest.mark.benchmark
@pytest.mark.parametrize("impl", ["fast", "per_sample"])
def test_kfac_factors(benchmark, kfac_inputs, device, impl):
    """Float64 sums over one class batch of C = N pairs (InfoNCE). The per-sample formulation costs
    O(N C D^2): it runs one round, no warm-up (about two minutes here)."""
    benchmark.group = group_name("kfac", torch.float64)
    c = shapes(device)["kfac"]["N"]
    fast = partial(kfac_factors, *kfac_inputs, "infonce", LOGIT_SCALE, class_batch_size=c)
    if impl == "fast":
        A, B = fast()
        # The oracle on a slice: the first 64 pairs as their own class batch, both ways.
        small = [t[:64] for t in kfac_inputs]
        A_ref, B_ref = reference.kfac_factors_per_sample(*small, "infonce", LOGIT_SCALE, class_batch_size=64)
        A_small, B_small = kfac_factors(*small, "infonce", LOGIT_SCALE, class_batch_size=64)
        assert_close_to_oracle("kfac_factors B", B_small, B_ref, torch.float64)
        assert_close_to_oracle("kfac_factors A", A_small, A_ref, torch.float64)
        run_timed(benchmark, fast, device, "candidate", "fast", "kfac", torch.float64)
        return
    run_timed(benchmark, partial(reference.kfac_factors_per_sample, *kfac_inputs, "infonce", LOGIT_SCALE,
                                 class_batch_size=c), device, "baseline", "per_sample", "kfac", torch.float64,
              rounds=1, warmup_rounds=0)
