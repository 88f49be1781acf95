"""KFAC factors (SPEC.md section 6): the algebraic expansion against the per-sample formulation and
against a GGN built from autograd Jacobians and Hessians."""

import math

import pytest
import torch

from bayesvlm_ext import curvature, kfac_factors, reference
from bayesvlm_ext.curvature import FactorAccumulator

LOGIT_SCALE, LOGIT_BIAS = math.log(20.0), -3.0


def data(n, p, d, generator):
    features = torch.randn(n, p, generator=generator, dtype=torch.float64)
    embeddings = torch.randn(n, d, generator=generator, dtype=torch.float64) * 3
    targets = embeddings / 3 + 0.8 * torch.randn(n, d, generator=generator, dtype=torch.float64)  # correlated pairs
    return features, embeddings, targets


def rel_error(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("n,class_batch_size", [(37, 37), (50, 16), (9, 100)])
def test_fast_factors_equal_the_per_sample_formulation(likelihood, bias, n, class_batch_size, generator):
    features, embeddings, targets = data(n, 6, 5, generator)
    A, B = kfac_factors(features, embeddings, targets, likelihood, LOGIT_SCALE, LOGIT_BIAS, class_batch_size, bias)
    A_ref, B_ref = reference.kfac_factors_per_sample(features, embeddings, targets, likelihood, LOGIT_SCALE,
                                                     LOGIT_BIAS, class_batch_size, bias)
    assert A.shape == (6 + bias, 6 + bias) and B.shape == (5, 5) and A.dtype == B.dtype == torch.float64
    assert rel_error(A, A_ref) <= 1e-12
    assert rel_error(B, B_ref) <= 1e-10
    assert torch.equal(B, B.T)
    assert torch.linalg.eigvalsh(B).min() >= -1e-10 * B.abs().max()  # a sum of GGNs is PSD


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
@pytest.mark.parametrize("block_elements", [37, 100, 1 << 22])  # 1, 2 and all 37 source rows per block
def test_source_blocks_give_the_per_sample_factors(likelihood, block_elements, generator, monkeypatch):
    # The expansion is summed over blocks of source rows (a [rows, C] slice of the cosines at a time); any
    # blocking, a last block shorter than the others included, gives the per-sample result.
    monkeypatch.setattr(curvature, "CURVATURE_BLOCK_ELEMENTS", block_elements)
    features, embeddings, targets = data(37, 6, 5, generator)
    _, B = kfac_factors(features, embeddings, targets, likelihood, LOGIT_SCALE, LOGIT_BIAS, 37)
    _, B_ref = reference.kfac_factors_per_sample(features, embeddings, targets, likelihood, LOGIT_SCALE, LOGIT_BIAS,
                                                 37)
    assert rel_error(B, B_ref) <= 1e-10
    assert torch.equal(B, B.T)


@pytest.mark.parametrize("likelihood", ["infonce", "siglip"])
def test_factor_b_equals_the_autograd_ggn(likelihood, generator):
    # Independent of SPEC's formulas for M_i: for each source i the GGN of its loss with respect to
    # the embedding g_i is J_z^T H_z J_z, with J_z = dz/dg_i (autograd Jacobian of the logits) and
    # H_z the autograd Hessian of the loss in the logits.
    n, d = 7, 4
    _, embeddings, targets = data(n, 3, d, generator)
    s = math.exp(LOGIT_SCALE)
    y = targets / targets.norm(dim=1, keepdim=True)
    ggn = torch.zeros(d, d, dtype=torch.float64)
    for i in range(n):
        def logits(g):
            return s * (y @ (g / g.norm())) + (LOGIT_BIAS if likelihood == "siglip" else 0.0)

        def loss(z):
            if likelihood == "infonce":
                return -torch.log_softmax(z, dim=0)[i]
            labels = -torch.ones(n, dtype=torch.float64)
            labels[i] = 1.0
            return -torch.nn.functional.logsigmoid(labels * z).sum()

        J = torch.autograd.functional.jacobian(logits, embeddings[i])  # [C, D]
        H = torch.autograd.functional.hessian(loss, logits(embeddings[i]))  # [C, C]
        ggn += J.T @ H @ J
    _, B = kfac_factors(torch.zeros(n, 1, dtype=torch.float64), embeddings, targets, likelihood, LOGIT_SCALE,
                        LOGIT_BIAS, class_batch_size=n)
    assert rel_error(B, ggn / math.sqrt(n)) <= 1e-10


def test_accumulators_merge_to_the_whole(generator):
    features, embeddings, targets = data(40, 5, 4, generator)
    whole = FactorAccumulator("siglip", LOGIT_SCALE, LOGIT_BIAS, bias=True)
    left, right = (FactorAccumulator("siglip", LOGIT_SCALE, LOGIT_BIAS, bias=True) for _ in range(2))
    for start in range(0, 40, 10):
        rows = slice(start, start + 10)
        whole.update(features[rows], embeddings[rows], targets[rows])
        (left if start < 20 else right).update(features[rows], embeddings[rows], targets[rows])
    left.merge(right)
    for merged, expected in zip(left.factors(), whole.factors()):
        torch.testing.assert_close(merged, expected, rtol=1e-14, atol=0)
    assert left.count == 40


def test_factor_errors_name_the_argument(generator):
    features, embeddings, targets = data(6, 3, 4, generator)
    with pytest.raises(ValueError, match="one row per pair"):
        kfac_factors(features[:5], embeddings, targets)
    with pytest.raises(ValueError, match="must share D"):
        kfac_factors(features, embeddings, targets[:, :3])
    with pytest.raises(ValueError, match="'likelihood'"):
        kfac_factors(features, embeddings, targets, likelihood="hinge")
    with pytest.raises(ValueError, match="'class_batch_size'"):
        kfac_factors(features, embeddings, targets, class_batch_size=0)
    with pytest.raises(ValueError, match="zero row"):
        kfac_factors(features, torch.zeros_like(embeddings), targets)
    with pytest.raises(ValueError, match="no data"):
        kfac_factors(features[:0], embeddings[:0], targets[:0])
    with pytest.raises(ValueError, match="'distributed' is True"):
        kfac_factors(features, embeddings, targets, distributed=True)
    with pytest.raises(ValueError, match="'features'"):
        kfac_factors(features.masked_fill(features > 1, float("nan")), embeddings, targets)


def _distributed_worker(rank, world, init_file, inputs, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        A, B = kfac_factors(*inputs, "siglip", LOGIT_SCALE, LOGIT_BIAS, class_batch_size=8, bias=True)
        results[rank] = (A, B)
    finally:
        dist.destroy_process_group()


def test_two_process_gloo_run_matches_one_process(generator, tmp_path):
    # Two CPU processes (gloo) shard the 7 class batches of 8 pairs and all-reduce the sums.
    import torch.multiprocessing as mp

    inputs = data(53, 5, 4, generator)
    A_single, B_single = kfac_factors(*inputs, "siglip", LOGIT_SCALE, LOGIT_BIAS, class_batch_size=8, bias=True)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), inputs, results), nprocs=2, join=True)
        results = dict(results)
    for rank in (0, 1):
        A, B = results[rank]
        assert rel_error(A, A_single) <= 1e-14 and rel_error(B, B_single) <= 1e-14
    assert torch.equal(results[0][1], results[1][1])  # every rank holds the same factors
