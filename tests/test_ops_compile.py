"""The fused ops pairwise_moments and topk_moments traced together by torch.compile(fullgraph=True)."""

import torch
from testing import BIAS, SCALE, TRACE_CROSS, needs_extension, pair_data


@needs_extension
def test_fused_ops_compile_fullgraph(generator):
    data = pair_data(12, 17, 6, torch.float32, "cpu", generator, with_var=True)

    def score(x, y, xs, ys, xv, yv):
        mean, var = torch.ops.bayesvlm_ext.pairwise_moments(x, y, xs, ys, xv, yv, SCALE, BIAS, TRACE_CROSS, 0)
        values, indices, _, _ = torch.ops.bayesvlm_ext.topk_moments(x, y, xs, ys, None, None, SCALE, BIAS,
                                                                    TRACE_CROSS, 3, 0, 1.0)
        return mean - var.sqrt(), values, indices

    compiled = torch.compile(score, fullgraph=True, backend="inductor")
    for got, expected in zip(compiled(*data), score(*data)):
        torch.testing.assert_close(got, expected)
