"""The demo's building blocks on small inputs: its worker processes and the active-learning fine-tuning.

(The demo as a whole runs in test_examples.py.)
"""

import math

import pytest
import torch
from testing import spd

from bayesvlm_ext import KronPosterior
from bayesvlm_ext.demo import active_protocol, common, probvlm_seeds
from bayesvlm_ext.demo.common import Workers

f64 = torch.float64


def seeded_sum(seed: int) -> tuple[float, int]:
    """A seeded float result and the number of threads it ran with (a module-level function: it is pickled)."""
    x = torch.randn(300, 300, generator=torch.Generator().manual_seed(seed))
    return (x @ x.T).sum().item(), torch.get_num_threads()


def test_workers_give_the_results_of_an_inline_run_in_order():
    calls = [(seed,) for seed in range(5)]
    with Workers(1) as inline:
        expected = inline.map(seeded_sum, calls)
    with Workers(2) as workers:
        assert workers.map(seeded_sum, calls) == expected  # bit for bit, in the order of the calls
        assert workers.map(seeded_sum, calls[:2]) == expected[:2]  # the processes are reused
    assert {threads for _, threads in expected} == {1}  # every task on one thread, here as in the workers
    assert torch.get_num_threads() >= 1 and Workers().processes >= 1
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="'processes' must be a positive int"):
            Workers(bad)


def test_workers_run_the_tasks_inline_where_no_process_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("process creation refused")

    monkeypatch.setattr(common, "ProcessPoolExecutor", refuse)
    calls = [(seed,) for seed in range(3)]
    with Workers(1) as inline:
        expected = inline.map(seeded_sum, calls)
    with Workers(2) as workers, pytest.warns(UserWarning, match="running the tasks in this process"):
        assert workers.map(seeded_sum, calls) == expected
    assert workers.processes == 1


def test_probvlm_trainings_in_workers_equal_inline_ones(generator):
    # What the demo hands its workers: one candidate and seed per task, its record and adapters returned.
    images = torch.nn.functional.normalize(torch.randn(64, 8, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(images + 0.3 * torch.randn(64, 8, generator=generator), dim=1)
    rows = torch.arange(16) % 12
    validation = (images[:16], texts[:12], rows, texts[:12][rows])
    calls = [(images, texts, validation, math.log(10.0), {"lr": 1e-3, "epochs": 2, "patience": 2}, seed)
             for seed in (0, 1)]
    with Workers(1) as inline:
        expected = inline.map(probvlm_seeds.train_one, calls)
    with Workers(2) as workers:
        outcomes = workers.map(probvlm_seeds.train_one, calls)
    for (model, record), (model_ref, record_ref) in zip(outcomes, expected):
        assert model.image.fingerprint() == model_ref.image.fingerprint()
        assert model.text.fingerprint() == model_ref.text.fingerprint()
        assert {k: v for k, v in record.items() if k != "seconds"} == \
            {k: v for k, v in record_ref.items() if k != "seconds"}
    assert outcomes[0][0].image.fingerprint() != outcomes[1][0].image.fingerprint()  # the seed matters


@pytest.mark.parametrize("bias", [False, True])
def test_finetune_projection_reaches_the_map(bias, generator):
    # The whitened L-BFGS solution is a stationary point of the objective written in W itself (autograd through
    # precision_quadratic), with an ill-conditioned precision, and its objective is below that of W*.
    D, P, C, n = 4, 6, 3, 40
    A, B = spd(P + bias, generator), spd(D, generator)
    A = A + torch.diag(torch.logspace(-3, 3, P + bias, dtype=f64))  # eigenvalues over six orders of magnitude
    prior = KronPosterior(A, B, torch.randn(D, P, generator=generator, dtype=f64),
                          torch.randn(D, generator=generator, dtype=f64) if bias else None, prior_precision=0.5,
                          pseudo_count=50.0)
    phi = torch.randn(n, P, generator=generator, dtype=f64)
    labels = torch.randint(0, C, (n,), generator=generator)
    classes = torch.randn(C, D, generator=generator, dtype=f64)
    scale = 10.0

    def objective(weight, b):
        mean = phi @ weight.T + (0.0 if b is None else b)
        logits = scale * torch.nn.functional.normalize(mean, dim=1) @ torch.nn.functional.normalize(classes, dim=1).T
        delta = weight - prior.weight if b is None else torch.cat([weight - prior.weight, (b - prior.bias)[:, None]], 1)
        return torch.nn.functional.cross_entropy(logits, labels, reduction="sum") \
            + 0.5 * active_protocol.FINETUNE_PRIOR * prior.precision_quadratic(delta)

    weight, b = active_protocol.finetune_projection(prior, phi, labels, classes, scale)
    assert weight.shape == (D, P) and weight.dtype == f64 and (b is None) == (not bias)
    params = [weight.clone().requires_grad_(True)] + ([b.clone().requires_grad_(True)] if bias else [])
    value = objective(*params, *([] if bias else [None]))
    grads = torch.autograd.grad(value, params)
    start = [prior.weight.clone().requires_grad_(True)] + ([prior.bias.clone().requires_grad_(True)] if bias else [])
    start_value = objective(*start, *([] if bias else [None]))
    start_grads = torch.autograd.grad(start_value, start)
    gradient = torch.cat([g.reshape(-1) for g in grads]).norm()
    assert gradient <= 1e-5 * torch.cat([g.reshape(-1) for g in start_grads]).norm()
    assert value < start_value
