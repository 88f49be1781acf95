"""The CUDA top-k's two paths (fused shared-memory lists for k <= 128, the streaming fallback above) on the inputs
that break them: NaN and -inf rows, exact and near ties, every dtype, k on both sides of the switch; two host
threads with different k; the fallback's memory bound; TF32 actually used. Skipped without a GPU; part of
`make gpu-check` (its CUDA tests are those whose names mention cuda). The CPU kernel, the PyTorch reference and
merge_topk are held to the same order (SPEC.md section 12) in test_degenerate.py.
"""

import math
import threading

import pytest
import torch
from testing import BIAS, SCALE, TRACE_CROSS, dtypes, needs_extension, oracle_moments, pair_data, tf32_matmul

from bayesvlm_ext import ops

pytestmark = [needs_extension, pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA top-k paths")]

KS = (1, 5, 90, 128, 129, 300)  # fused (fp64 up to ~90 by the device's shared memory), then the fallback
KAPPA = 1.5


def hard_gallery(dtype, generator, n=70, m=700, d=16):
    """(x, y, x_stats, y_stats) on the GPU: duplicated gallery rows (exact ties), rows one rounding apart
    (near-ties), a NaN row, -inf and +inf rows, a zero row, and a NaN variance (NaN for every score but the
    mean); 70 queries, past one 64-row tile."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(m, d, generator=generator, dtype=torch.float64)
    y[100:140] = y[60:100]  # exact ties: the lower index first
    y[140:180] = y[60:100] * (1 + 1e-7)  # near-ties at float32's rounding
    y[5, 3] = math.nan
    y[6] = -math.inf
    y[7] = math.inf
    y[8] = 0.0
    x, y = x.to(dtype), y.to(dtype)
    x_stats = (torch.rand(n, 3, generator=generator, dtype=torch.float64) + 0.1)
    y_stats = (torch.rand(m, 3, generator=generator, dtype=torch.float64) + 0.1)
    x_stats[:, 0] = 1 / x.double().norm(dim=1)
    y_stats[:, 0] = 1 / y.double().norm(dim=1).nan_to_num(nan=1.0, posinf=1.0).clamp_min(1e-300)
    y_stats[[6, 7], 0] = 0.5  # finite scales on infinite rows: scores +-inf, or NaN where 0 * inf
    y_stats[9, 1] = math.nan
    return [t.to("cuda") for t in (x, y, x_stats.to(acc), y_stats.to(acc))]


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", dtypes, ids=str)
@pytest.mark.parametrize("score", [0, 1, 2, 3], ids=["mean", "pessimistic", "optimistic", "probit"])
def test_cuda_topk_paths_agree_on_ties_nan_and_inf(dtype, score, generator):
    # Every k returns the first k rows of the k = 300 fallback's answer, bit for bit: the fused key and the
    # fallback's key come from one device function, and NaN ranks last on both (SPEC.md section 12).
    x, y, xs, ys = hard_gallery(dtype, generator)
    full = ops.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, 300, score, KAPPA)
    index = full[1].cpu()
    assert bool(((index >= 0) & (index < y.shape[0])).all()) and all(len(set(r.tolist())) == 300 for r in index)
    key = full[0].double().cpu()
    nan = key.isnan()
    assert not bool((nan[:, :-1] & ~nan[:, 1:]).any()), "a NaN score before a number"
    ordered = (key[:, :-1] > key[:, 1:]) | ((key[:, :-1] == key[:, 1:]) & (index[:, :-1] < index[:, 1:]))
    assert bool((ordered | nan[:, 1:]).all()), "not sorted by score, ties by the lower index"
    for k in KS[:-1]:
        got = ops.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, k, score, KAPPA)
        for part, whole in zip(got, full):
            same(part, whole[:, :k])


def test_cuda_topk_from_two_host_threads_with_different_k(generator):
    # k = 5 and k = 120 need different shared memory; the limit is raised once to the device maximum, so two
    # threads launching side by side never see each other's setting (a per-launch size raced).
    x, y, xs, ys, _, _ = pair_data(64, 5000, 32, torch.float32, "cuda", generator)
    expected = {k: ops.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, k, 3, KAPPA) for k in (5, 120)}
    torch.cuda.synchronize()
    failures = []

    def work(k):
        try:
            for _ in range(50):
                got = ops.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, k, 3, KAPPA)
                torch.cuda.synchronize()
                if not all(torch.equal(a, b) for a, b in zip(got, expected[k])):
                    failures.append(f"k = {k}: another answer")
        except Exception as error:  # a failed launch surfaces here
            failures.append(f"k = {k}: {error!r}")

    threads = [threading.Thread(target=work, args=(k,)) for k in (5, 120)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:3]


def test_cuda_topk_fallback_memory_is_o_n_k(generator):
    # k = 300 takes the fallback. Its scratch goes through the queries in blocks of 2^24 / (k + chunk) rows, so
    # it stays under about a dozen 2^24-element tensors; over all 100k queries at once it would be over 5 GB.
    n, m, d, k = 100_000, 2048, 16, 300
    x, y, xs, ys, _, _ = pair_data(n, m, d, torch.float32, "cuda", generator)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    result = ops.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS, TRACE_CROSS, k, 1, KAPPA)
    torch.cuda.synchronize()
    outputs = sum(t.numel() * t.element_size() for t in result)
    scratch = torch.cuda.max_memory_allocated() - before - outputs
    bound = 16 * 2**24 * 8
    assert scratch <= bound, f"fallback scratch {scratch / 2**30:.2f} GiB"
    assert bound < 10 * n * (k + 1024) * 4  # the unblocked scratch would not pass
    # Rows keep their answer across a block boundary (2^24 // (300 + 1024) = 12671 rows per block here): 64 queries
    # alone, one slice straddling the first boundary, give the same bits.
    for start in (0, 12640, n - 64):
        alone = ops.topk_moments(x[start:start + 64], y, xs[start:start + 64], ys, None, None, SCALE, BIAS,
                                 TRACE_CROSS, k, 1, KAPPA)
        for part, whole in zip(alone, result):
            same(part, whole[start:start + 64])


@pytest.mark.parametrize("k", [10, 200], ids=["fused", "fallback"])
def test_cuda_topk_tf32_runs_on_tensor_cores_within_its_budget(k, generator):
    # With TF32 allowed the fp32 GEMM rounds its inputs to 10-bit mantissas: the scores move by about 1e-4 of
    # their size (the tensor cores ran: full fp32 moves them by 1e-7), stay within the TF32 budget of the
    # float64 truth, and the chosen rows are the best up to that budget (near-ties may reorder: no index test).
    data = pair_data(128, 3000, 512, torch.float32, "cuda", generator)
    with tf32_matmul(True):
        values, index, mean, _ = ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, k, 0, KAPPA)
    with tf32_matmul(False):
        full_values, _, _, _ = ops.topk_moments(*data, SCALE, BIAS, TRACE_CROSS, k, 0, KAPPA)
    exp_mean, _, magnitude = oracle_moments(*data)
    index = index.cpu()
    truth = exp_mean.gather(1, index)
    size = magnitude.gather(1, index)
    error = ((values.double().cpu() - truth).abs() / size).max().item()
    assert 1e-6 < error <= 2e-3, error  # tf32's rounding, not fp32's (~1e-7), within the TF32 budget
    assert ((full_values.double().cpu() - values.double().cpu()).abs() / size).max().item() > 1e-6
    torch.testing.assert_close(mean.double().cpu(), values.double().cpu(), rtol=0, atol=0)  # the mean score
    kth_best = torch.sort(exp_mean, dim=1, descending=True).values[:, k - 1:k]
    assert bool((truth >= kth_best - 2e-3 * magnitude.max()).all()), "a chosen row is not among the best k"
