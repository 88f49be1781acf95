"""ProbVLM (SPEC.md section 9): the generalised Gaussian against scipy, the adapter, its training and its
distribution through the shared scoring stack."""

import copy
import itertools
import json
import math

import pytest
import torch

from bayesvlm_ext import KronPosterior, cosine_moments, reference, topk
from bayesvlm_ext.probvlm import (LossWeights, ProbVLM, ProbVLMAdapter, adapter_loss, ggd_nll, ggd_variance,
                                  probvlm_loss, train_probvlm)
from testing import devices

stats = pytest.importorskip("scipy.stats")

ALPHAS = (1e-3, 0.05, 1.0, 7.5)
BETAS = (0.3, 0.5, 1.0, 1.7, 2.0, 4.0, 10.0)


def paired_embeddings(n: int, dim: int = 12, seed: int = 0, noise: float = 0.3, dtype=torch.float32):
    """Unit-norm image and text embeddings sharing a low-dimensional latent (a stand-in for a VLM's)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(n, 4, generator=g, dtype=torch.float64)
    image = latent @ torch.randn(4, dim, generator=g, dtype=torch.float64) + noise * torch.randn(n, dim, generator=g,
                                                                                                  dtype=torch.float64)
    text = latent @ torch.randn(4, dim, generator=g, dtype=torch.float64) + noise * torch.randn(n, dim, generator=g,
                                                                                                 dtype=torch.float64)
    return (torch.nn.functional.normalize(image, dim=1).to(dtype), torch.nn.functional.normalize(text, dim=1).to(dtype))


# ---- the distribution against scipy.stats.gennorm ------------------------------------------------------

@pytest.mark.parametrize("alpha,beta", list(itertools.product(ALPHAS, BETAS)))
def test_ggd_nll_and_variance_match_scipy_gennorm(alpha, beta):
    mu = 0.3
    x = mu + alpha * torch.tensor([-6.0, -1.5, -0.2, 0.0, 1e-3, 0.7, 3.0], dtype=torch.float64)
    nll = ggd_nll(x, torch.tensor(mu, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float64),
                  torch.tensor(beta, dtype=torch.float64))
    expected = -stats.gennorm(beta, loc=mu, scale=alpha).logpdf(x.numpy())
    torch.testing.assert_close(nll, torch.from_numpy(expected), rtol=1e-12, atol=1e-12)
    variance = ggd_variance(torch.tensor(alpha, dtype=torch.float64), torch.tensor(beta, dtype=torch.float64))
    assert variance.item() == pytest.approx(stats.gennorm(beta, scale=alpha).var(), rel=1e-12)


def test_ggd_nll_gradient_is_finite_at_the_mode_and_matches_finite_differences():
    beta = torch.tensor([0.5, 1.0, 2.0, 3.0], dtype=torch.float64, requires_grad=True)
    alpha = torch.full((4,), 0.4, dtype=torch.float64, requires_grad=True)
    mu = torch.full((4,), 0.1, dtype=torch.float64, requires_grad=True)
    ggd_nll(mu.detach().clone(), mu, alpha, beta).sum().backward()  # x == mu: |x - mu|^beta has no slope < inf
    for t in (mu, alpha, beta):
        assert torch.isfinite(t.grad).all()
    # d/dalpha at the mode is 1/alpha, d/dbeta is -1/beta - psi(1/beta)/beta^2 (the residual term vanishes).
    torch.testing.assert_close(alpha.grad, 1 / alpha.detach(), rtol=1e-12, atol=0)
    torch.testing.assert_close(beta.grad, -1 / beta.detach() - torch.digamma(1 / beta.detach()) / beta.detach() ** 2,
                               rtol=1e-12, atol=0)
    x = torch.tensor([0.9, -0.5, 0.35, 1.8], dtype=torch.float64)
    inputs = (torch.tensor([0.2, 0.1, 0.3, -0.4], dtype=torch.float64, requires_grad=True),
              torch.tensor([0.3, 1.2, 0.05, 2.0], dtype=torch.float64, requires_grad=True),
              torch.tensor([0.7, 1.0, 2.0, 6.0], dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda m, a, b: ggd_nll(x, m, a, b), inputs)


def test_ggd_arguments_are_checked():
    one = torch.ones(3)
    with pytest.raises(ValueError, match="'alpha' must be positive"):
        ggd_nll(one, one, torch.tensor([1.0, 0.0, 1.0]), one)
    with pytest.raises(ValueError, match="'beta' must be positive"):
        ggd_nll(one, one, one, -one)
    with pytest.raises(ValueError, match="'beta' must be positive"):
        ggd_variance(one, torch.zeros(3))
    with pytest.raises(ValueError, match="'x' must be a torch.Tensor"):
        ggd_nll([1.0], one, one, one)


# ---- the adapter -------------------------------------------------------------------------------------------

def test_adapter_shapes_ranges_and_published_defaults():
    adapter = ProbVLMAdapter(12)
    assert (adapter.hidden, adapter.depth, adapter.dropout) == (256, 1, 0.05)
    x, _ = paired_embeddings(20)
    mu, alpha, beta = adapter(x)
    assert mu.shape == alpha.shape == beta.shape == (20, 12)
    # The heads start at alpha = 1 / (1 + 1/alpha_max) and beta = 2 for every input (no dead output unit).
    torch.testing.assert_close(alpha, torch.full_like(alpha, 1 / (1 + 1 / adapter.alpha_range[1])))
    torch.testing.assert_close(beta, torch.full_like(beta, 2.0))
    with torch.no_grad():  # push the heads far out: the outputs stay inside their ranges
        adapter.inv_alpha_head[2].bias.fill_(1e9)
        adapter.beta_head[2].bias.fill_(-1e9)
    _, alpha, beta = adapter(x)
    assert bool((alpha == adapter.alpha_range[0]).all()) and bool((beta == adapter.beta_range[0]).all())
    with torch.no_grad():
        adapter.inv_alpha_head[2].bias.fill_(-1e9)
        adapter.beta_head[2].bias.fill_(1e9)
    _, alpha, beta = adapter(x)
    torch.testing.assert_close(alpha, torch.full_like(alpha, adapter.alpha_range[1]), rtol=1e-6, atol=0)
    assert bool((beta == adapter.beta_range[1]).all())


@pytest.mark.parametrize("kwargs,match", [
    (dict(dim=0), "'dim' must be a positive int"), (dict(dim=4, hidden=0), "'hidden'"),
    (dict(dim=4, depth=0), "'depth'"), (dict(dim=4, dropout=1.0), "'dropout' must be a number in"),
    (dict(dim=4, alpha_range=(1.0, 0.5)), "'alpha_range'"), (dict(dim=4, beta_range=(0, 2)), "'beta_range'"),
])
def test_adapter_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ProbVLMAdapter(**kwargs)


def test_loss_is_l1_plus_weighted_nll_with_cross_modal_terms():
    model = ProbVLM(12, hidden=16).eval()  # dropout off: both sides see one forward
    image, text = paired_embeddings(9)
    weights = LossWeights(l1=0.7, nll=0.3, cross=0.2)

    def own(params, target):  # written out from SPEC.md section 9
        mu, alpha, beta = (t.double() for t in params)
        nll = torch.from_numpy(-stats.gennorm.logpdf(target.double().numpy(), beta.detach().numpy(),
                                                     loc=mu.detach().numpy(), scale=alpha.detach().numpy()))
        return 0.7 * (mu - target.double()).abs().mean() + 0.3 * nll.mean()

    with torch.no_grad():
        pi, pt = model.image(image), model.text(text)
        expected = own(pi, image) + own(pt, text) + 0.2 * (own(pi, text) + own(pt, image))
        torch.testing.assert_close(probvlm_loss(model, image, text, weights).double(), expected, rtol=1e-5, atol=0)
        torch.testing.assert_close(adapter_loss(pi, image, weights).double(), own(pi, image), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="'nll' must be a finite number >= 0"):
        LossWeights(nll=-1.0)


# ---- training ----------------------------------------------------------------------------------------------

def test_training_lowers_the_validation_loss_and_keeps_the_best_epoch():
    image, text = paired_embeddings(800)
    image, text, val_image, val_text = image[:600], text[:600], image[600:], text[600:]
    torch.manual_seed(0)
    untrained = ProbVLM(12, hidden=32).eval()
    with torch.no_grad():
        before = probvlm_loss(untrained, val_image, val_text).item()
    model, history = train_probvlm(image, text, val_image=val_image, val_text=val_text, hidden=32, epochs=15,
                                   lr=2e-3, batch_size=64, progress=False)
    assert len(history.train_loss) == len(history.val_loss) == 15 and not history.stopped_early
    best = history.val_loss[history.best_epoch]
    assert best == min(history.val_loss) and best < 0.2 * before
    assert history.train_loss[-1] < 0.2 * history.train_loss[0]
    assert not model.training
    with torch.no_grad():  # the returned weights are the best epoch's
        assert probvlm_loss(model, val_image, val_text).item() == pytest.approx(best, rel=1e-6)
    # The fitted GGD explains held-out embeddings far better than the initial one.
    with torch.no_grad():
        trained_nll = ggd_nll(val_image, *model.image(val_image)).mean()
        assert trained_nll < ggd_nll(val_image, *untrained.image(val_image)).mean() - 1


def test_early_stopping_after_patience_epochs_without_improvement():
    image, text = paired_embeddings(200)
    val_image, val_text = paired_embeddings(100, seed=5, noise=3.0)  # other projections and noise: overfitting shows
    model, history = train_probvlm(image, text, val_image=val_image, val_text=val_text, hidden=32, epochs=200,
                                   lr=1e-2, batch_size=32, patience=3, progress=False)
    assert history.stopped_early
    assert len(history.val_loss) == history.best_epoch + 1 + 3
    assert all(v >= history.val_loss[history.best_epoch] for v in history.val_loss[history.best_epoch + 1:])
    with torch.no_grad():
        assert probvlm_loss(model, val_image, val_text).item() == pytest.approx(history.val_loss[history.best_epoch],
                                                                                rel=1e-6)


def test_training_is_deterministic_for_a_seed_and_leaves_the_global_rng_alone():
    image, text = paired_embeddings(120)
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first, h1 = train_probvlm(image, text, hidden=16, epochs=3, batch_size=16, lr=1e-3, seed=4, progress=False)
    assert torch.equal(torch.rand(3), expected_draw)
    second, h2 = train_probvlm(image, text, hidden=16, epochs=3, batch_size=16, lr=1e-3, seed=4, progress=False)
    other, _ = train_probvlm(image, text, hidden=16, epochs=3, batch_size=16, lr=1e-3, seed=5, progress=False)
    assert h1.train_loss == h2.train_loss and h1.val_loss == h2.val_loss
    for name, t in first.state_dict().items():
        assert torch.equal(t, second.state_dict()[name]), name
    assert first.image.fingerprint() == second.image.fingerprint() != other.image.fingerprint()


def test_resumed_training_ends_with_the_uninterrupted_weights(tmp_path):
    image, text = paired_embeddings(150)
    kwargs = dict(hidden=16, batch_size=32, lr=3e-3, seed=2, progress=False)
    whole, whole_history = train_probvlm(image, text, epochs=6, **kwargs)
    path = tmp_path / "checkpoint.pt"
    _, part = train_probvlm(image, text, epochs=3, checkpoint=path, **kwargs)
    assert len(part.train_loss) == 3
    resumed, history = train_probvlm(image, text, epochs=6, checkpoint=path, **kwargs)
    assert history.train_loss == whole_history.train_loss and history.val_loss == whole_history.val_loss
    assert history.best_epoch == whole_history.best_epoch
    for name, t in whole.state_dict().items():
        assert torch.equal(t, resumed.state_dict()[name]), name
    with pytest.raises(ValueError, match="other settings or data .*lr"):
        train_probvlm(image, text, epochs=6, checkpoint=path, **{**kwargs, "lr": 1e-3})
    with pytest.raises(ValueError, match="other settings or data .*data"):
        train_probvlm(image[1:], text[1:], epochs=6, checkpoint=path, **kwargs)


def test_float64_embeddings_train_a_float64_model_with_its_ranges():
    image, text = paired_embeddings(40, dtype=torch.float64)
    model, _ = train_probvlm(image, text, hidden=8, epochs=1, progress=False,
                             adapter_config={"beta_range": (1.0, 3.0)})
    assert all(t.dtype == torch.float64 for t in model.parameters())
    assert model.text.config["beta_range"] == [1.0, 3.0]
    with torch.no_grad():
        beta = model.text(text).beta
    assert float(beta.min()) >= 1.0 and float(beta.max()) <= 3.0


@pytest.mark.parametrize("kwargs,match", [
    (dict(text=torch.zeros(5, 12)), "paired"), (dict(epochs=0), "'epochs'"), (dict(lr=-1.0), "'lr'"),
    (dict(val_fraction=1.0), "'val_fraction'"), (dict(val_image=torch.zeros(3, 12)), "given together"),
    (dict(val_image=torch.zeros(3, 11), val_text=torch.zeros(3, 11)), "'val_image' must be"),
    (dict(image=torch.zeros(1, 12), text=torch.zeros(1, 12)), "too few"),
    (dict(image=torch.full((4, 12), float("nan"))), "'image' contains NaN"),
    (dict(weights=(1.0, 1.0, 1.0)), "'weights' must be a LossWeights"),
    (dict(adapter_config={"hidden": 8}), "'adapter_config' takes alpha_range and beta_range"),
    (dict(hidden=0), "'hidden' must be a positive int"),
])
def test_training_arguments_are_checked(kwargs, match):
    image, text = paired_embeddings(4)
    args = {"image": image, "text": text, **kwargs}
    with pytest.raises(ValueError, match=match):
        train_probvlm(args.pop("image"), args.pop("text"), progress=False, **args)


# ---- uncertainty -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained():
    image, text = paired_embeddings(400, noise=0.5)
    model, _ = train_probvlm(image, text, hidden=32, dropout=0.2, epochs=8, lr=3e-3, batch_size=32, progress=False)
    return model, image[:23], text[:31]


def brute_force_passes(adapter, x, num_samples, seed):
    """(mu_k, variance_k) [K, N, D] in float64 from the K masked passes, written out one by one."""
    masks = adapter.dropout_masks(num_samples, seed)
    mus, variances = [], []
    with torch.no_grad():
        for k in range(num_samples):
            mu, alpha, beta = adapter(x, masks=masks[k])
            mus.append(mu.double())
            variances.append(torch.from_numpy(stats.gennorm(beta.double().numpy(), scale=alpha.double().numpy()).var()))
    return torch.stack(mus), torch.stack(variances)


def test_uncertainty_modes_against_the_masked_passes(trained):
    model, image, _ = trained
    adapter = model.image
    mus, variances = brute_force_passes(adapter, image, 16, seed=3)
    epistemic = mus.var(0, unbiased=False)
    aleatoric = variances.mean(0)
    got = {mode: adapter.embed(image, mode, num_samples=16, seed=3).variances for mode in ("epistemic", "total")}
    torch.testing.assert_close(got["epistemic"].double(), epistemic, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(got["total"].double(), aleatoric + epistemic, rtol=1e-5, atol=0)
    assert float(epistemic.min()) > 0  # dropout 0.2 moves mu
    # Aleatoric: one pass with dropout off, the GGD's variance (scipy's).
    with torch.no_grad():
        model.eval()
        _, alpha, beta = adapter(image)
    expected = torch.from_numpy(stats.gennorm(beta.double().numpy(), scale=alpha.double().numpy()).var())
    torch.testing.assert_close(adapter.embed(image, "aleatoric").variances.double(), expected, rtol=1e-5, atol=0)


def test_total_variance_matches_monte_carlo_samples_of_the_mixture(trained):
    """Draw from the Monte Carlo mixture itself (a mask, then a GGD sample): its empirical variance is the total."""
    model, image, _ = trained
    adapter, x = model.text, image[:2]
    masks = adapter.dropout_masks(8, seed=0)
    samples = []
    with torch.no_grad():
        for k in range(8):
            mu, alpha, beta = (t.double().numpy() for t in adapter(x, masks=masks[k]))
            samples.append(torch.from_numpy(stats.gennorm.rvs(beta, loc=mu, scale=alpha, size=(25000, *mu.shape),
                                                              random_state=k)))
    empirical = torch.cat(samples).var(0)
    total = adapter.embed(x, "total", num_samples=8, seed=0).variances.double()
    torch.testing.assert_close(empirical, total, rtol=0.05, atol=0)


def test_embed_means_dtypes_and_batch_independence(trained):
    model, image, _ = trained
    adapter = model.image
    dist = adapter.embed(image)
    assert dist.form.value == "diag" and dist.mean is image and dist.variances.dtype == torch.float32
    with torch.no_grad():
        model.eval()
        mu = adapter(image).mu
    torch.testing.assert_close(adapter.embed(image, "aleatoric", mean="adapter").mean, mu, rtol=0, atol=0)
    masks = adapter.dropout_masks(32, 0)
    with torch.no_grad():
        mc_mean = torch.stack([adapter(image, masks=m).mu.double() for m in masks]).mean(0)
    torch.testing.assert_close(adapter.embed(image, mean="adapter").mean.double(), mc_mean, rtol=1e-5, atol=1e-7)
    doubled = adapter.embed(image.double())
    assert doubled.mean.dtype == doubled.variances.dtype == torch.float64
    # One mask set for the whole batch: an item's distribution does not depend on its batch.
    alone = adapter.embed(image[5:6])
    torch.testing.assert_close(alone.variances, dist.variances[5:6], rtol=1e-6, atol=0)
    assert adapter.embed(image[:0]).variances.shape == (0, 12)
    assert model.training is False


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.zeros(3, 5)), r"'x' must be \[N, 12\]"), (dict(uncertainty="both"), "'uncertainty' must be one of"),
    (dict(num_samples=1), "'num_samples' must be an int >= 2"), (dict(mean="mu"), "'mean' must be one of"),
    (dict(seed=0.5), "'seed' must be an int"), (dict(x=torch.full((2, 12), float("inf"))), "'x' contains NaN"),
])
def test_embed_arguments_are_checked(trained, kwargs, match):
    model, image, _ = trained
    args = {"x": image, **kwargs}
    with pytest.raises(ValueError, match=match):
        model.image.embed(args.pop("x"), **args)
    with pytest.raises(ValueError, match="'tower' must be 'image' or 'text'"):
        model.embed(image, "audio")


def test_save_and_load_round_trip_exactly(trained, tmp_path):
    model, image, text = trained
    model.save(tmp_path / "adapter")
    loaded = ProbVLM.load(tmp_path / "adapter")
    assert loaded.config == model.config and not loaded.training
    for name, t in model.state_dict().items():
        assert torch.equal(t, loaded.state_dict()[name]), name
    for tower, x in (("image", image), ("text", text)):
        assert loaded.adapter(tower).fingerprint() == model.adapter(tower).fingerprint()
        assert torch.equal(loaded.embed(x, tower).variances, model.embed(x, tower).variances)
    (tmp_path / "adapter" / "probvlm.json").write_text('{"format": "other"}')
    with pytest.raises(ValueError, match="not a ProbVLM configuration"):
        ProbVLM.load(tmp_path / "adapter")
    with pytest.raises(FileNotFoundError, match="missing file"):
        ProbVLM.load(tmp_path / "absent")


def test_probvlm_speaks_the_bayesvlm_protocol(trained, tmp_path):
    # encode_*_features, logits, topk and save / load as BayesVLM has them, so that the index, the commands and
    # the evaluation take either method; the logit scale is the embedding model's, saved with the adapters.
    model, image, text = copy.deepcopy(trained[0]), trained[1], trained[2]
    options = dict(uncertainty="total", num_samples=8, seed=3)
    images, texts = model.encode_image_features(image, **options), model.encode_text_features(text, **options)
    assert torch.equal(images.variances, model.image.embed(image, **options).variances)
    assert torch.equal(texts.variances, model.text.embed(text, **options).variances)
    with pytest.raises(ValueError, match="logit_scale is not set"):
        model.logits(images, texts)
    model.logit_scale, model.logit_bias = math.log(20.0), -1.0
    for output in ("mean", "probit"):
        got = model.logits(images, texts, output=output)
        expected = cosine_moments(images, texts, math.log(20.0), -1.0, output=output)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    got = model.topk(images, texts, 4, score="probit")
    expected = topk(images, texts, 4, "probit", logit_scale=math.log(20.0), logit_bias=-1.0)
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    model.save(tmp_path / "adapter")
    loaded = ProbVLM.load(tmp_path / "adapter")
    assert (loaded.logit_scale, loaded.logit_bias) == (math.log(20.0), -1.0)
    # The embedding protocol shared with KronPosterior: residual refused, against ignored, options completed.
    with pytest.raises(ValueError, match="'residual' has no meaning"):
        model.image.embed(image, residual=image)
    assert torch.equal(model.image.embed(image, against=model.text).variances, model.image.embed(image).variances)
    assert model.image.embed_options({"uncertainty": "aleatoric"})["num_samples"] == 32
    with pytest.raises(ValueError, match="takes uncertainty, num_samples, seed and mean"):
        model.image.embed_options({"temperature": 2})
    assert model.image.summary()["method"] == "probvlm" and model.image.KIND == "adapter"
    posterior = KronPosterior(torch.eye(3, dtype=torch.float64), torch.eye(12, dtype=torch.float64),
                              torch.ones(12, 3, dtype=torch.float64))
    assert posterior.embed_options(None) == {} and posterior.summary()["damping"] == "kron"
    with pytest.raises(ValueError, match="a KronPosterior takes none"):
        posterior.embed_options({"uncertainty": "total"})


# ---- finite or fail, damaged files (issue 15) ---------------------------------------------------------------

def test_training_that_overflows_stops_with_an_error_instead_of_nan_weights(tmp_path):
    # float32 embeddings of 1e20: the GGD term (|x - mu| / alpha)^beta = 1e40 overflows at the first batch.
    image, text = paired_embeddings(64)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError, match=r"training diverged: the training loss of epoch 0, batch 0 is inf .*e\+19"):
        train_probvlm(image * 1e20, text * 1e20, hidden=8, epochs=2, checkpoint=checkpoint, progress=False)
    assert not checkpoint.exists()


def test_non_finite_parameters_never_reach_the_best_state_or_the_checkpoint(tmp_path, monkeypatch):
    # The guard at the end of an epoch: an update that leaves the loss finite but a parameter infinite (here
    # forced after epoch 1's last step) stops the run; the checkpoint keeps epoch 0's finite state.
    from bayesvlm_ext.probvlm import training

    real_epoch = training._train_epoch

    def poisoned_epoch(model, optimizer, *args):
        loss = real_epoch(model, optimizer, *args)
        if args[-1] == 1:  # the epoch number
            with torch.no_grad():
                model.text.trunk_out.weight[0, 0] = float("inf")
        return loss

    monkeypatch.setattr(training, "_train_epoch", poisoned_epoch)
    image, text = paired_embeddings(64)
    checkpoint = tmp_path / "checkpoint.pt"
    with pytest.raises(ValueError, match="after epoch 1 the parameters text.trunk_out.weight hold NaN or Inf"):
        train_probvlm(image, text, hidden=8, epochs=3, checkpoint=checkpoint, progress=False)
    state = torch.load(checkpoint, weights_only=True)
    assert len(json.loads(state["history"])["train_loss"]) == 1
    assert all(bool(torch.isfinite(t).all()) for t in state["model"].values())


def test_non_finite_embeddings_are_refused_naming_the_rows():
    image, text = paired_embeddings(20)
    text = text.clone()
    text[3, 0], text[11, 5] = float("inf"), float("nan")
    with pytest.raises(ValueError, match="'text' contains NaN or Inf in rows 3, 11"):
        train_probvlm(image, text, hidden=8, epochs=1, progress=False)
    val = image[:4].clone()
    val[2, 2] = float("nan")
    with pytest.raises(ValueError, match="'val_image' contains NaN or Inf in row 2"):
        train_probvlm(image, text.nan_to_num(posinf=0.0), val_image=val, val_text=image[:4], hidden=8, epochs=1,
                      progress=False)


@pytest.fixture
def saved_adapter(tmp_path):
    image, text = paired_embeddings(40)
    model, _ = train_probvlm(image, text, hidden=8, epochs=1, progress=False)
    model.save(tmp_path / "good")
    return model, tmp_path / "good"


def _adapter_copy(source, target, *, config=None, tensors=None, raw_config=None, raw_tensors=None):
    from safetensors.torch import save_file

    target.mkdir()
    (target / "probvlm.json").write_text(raw_config if raw_config is not None else json.dumps(config))
    if raw_tensors is not None:
        (target / "probvlm.safetensors").write_bytes(raw_tensors)
    else:
        save_file(tensors, target / "probvlm.safetensors")
    return target


def test_load_checks_the_configuration_against_the_stored_shapes_before_building(saved_adapter, tmp_path,
                                                                                  monkeypatch):
    from safetensors.torch import load_file

    _, good = saved_adapter
    config = json.loads((good / "probvlm.json").read_text())
    tensors = load_file(good / "probvlm.safetensors")
    # hidden = 1e9 would allocate 12 x 1e9 floats (and 1e18 for the hidden layer) before any check: every real
    # Linear that large is an error here, so the test fails instead of exhausting the machine.
    real_linear = torch.nn.Linear.__init__

    def bounded_linear(self, in_features, out_features, *args, **kwargs):
        if in_features * out_features > 10**7 and torch.get_default_device().type != "meta":
            raise AssertionError(f"ProbVLM.load allocated a Linear({in_features}, {out_features}) before checking")
        real_linear(self, in_features, out_features, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Linear, "__init__", bounded_linear)
    huge = _adapter_copy(good, tmp_path / "huge", config={**config, "config": {**config["config"], "hidden": 10**9}},
                         tensors=tensors)
    with pytest.raises(ValueError, match=r"probvlm.safetensors holds '.*' of shape \(8, 12\), but .*probvlm.json .*"
                                         r"needs \(1000000000, 12\)"):
        ProbVLM.load(huge)
    deeper = _adapter_copy(good, tmp_path / "deeper", config={**config, "config": {**config["config"], "depth": 2}},
                           tensors=tensors)
    with pytest.raises(ValueError, match=r"does not fit .*probvlm.json \(missing \['image.trunk_hidden.1.bias'"):
        ProbVLM.load(deeper)


def test_load_names_damaged_files(saved_adapter, tmp_path):
    from safetensors.torch import load_file

    _, good = saved_adapter
    config = json.loads((good / "probvlm.json").read_text())
    tensors = load_file(good / "probvlm.safetensors")
    raw = (good / "probvlm.safetensors").read_bytes()
    name = "image.trunk_in.weight"
    cases = [
        (dict(config=config, raw_tensors=raw[:-5]), "probvlm.safetensors is not a readable safetensors file"),
        (dict(config=config, raw_tensors=raw[:7]), "probvlm.safetensors is not a readable safetensors file"),
        (dict(raw_config='{"format": "bayesvlm_ext.Pro', tensors=tensors), "probvlm.json is not valid JSON"),
        (dict(raw_config="[1, 2]", tensors=tensors), "probvlm.json must hold a JSON object"),
        (dict(config={**config, "config": {k: v for k, v in config["config"].items() if k != "dim"}},
              tensors=tensors), "probvlm.json is not a ProbVLM configuration \\('dim'\\)"),
        (dict(config={**config, "config": [3]}, tensors=tensors), "'config' must be an object"),
        (dict(config=config, tensors={k: v for k, v in tensors.items() if k != name}), f"missing \\['{name}'\\]"),
        (dict(config=config, tensors={**tensors, name: tensors[name].to(torch.int32)}),
         f"holds '{name}' as I32; expected a floating dtype"),
        (dict(config=config, tensors={**tensors, name: tensors[name].double()}), "mixes dtypes \\['F32', 'F64'\\]"),
        (dict(config=config, tensors={**tensors, name: torch.full_like(tensors[name], float("nan"))}),
         f"holds NaN or Inf in '{name}'"),
    ]
    for number, (files, message) in enumerate(cases):
        folder = _adapter_copy(good, tmp_path / f"case{number}", **files)
        with pytest.raises(ValueError, match=f"ProbVLM.load: .*{message}"):
            ProbVLM.load(folder)


# ---- the shared stack: moments and retrieval ------------------------------------------------------------

@pytest.mark.parametrize("device", devices, ids=str)
def test_adapter_distributions_give_the_same_moments_through_fused_and_reference_paths(trained, device):
    model, image, text = trained
    model = copy.deepcopy(model).to(device)
    img, txt = model.image.embed(image.to(device)), model.text.embed(text.to(device))
    mean, var = cosine_moments(img, txt, logit_scale=math.log(30.0))  # the fused kernel on this device
    ref_mean, ref_var = reference.cosine_moments_diag(img.mean, img.variances, txt.mean, txt.variances,
                                                      math.log(30.0))
    torch.testing.assert_close(mean, ref_mean, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(var, ref_var, rtol=2e-5, atol=1e-8)
    # And against the dense float64 formulas of SPEC.md section 4.
    mx, my, sx, sy = (t.double().cpu() for t in (img.mean, txt.mean, img.variances, txt.variances))
    norm = ((mx * mx).sum(1) + sx.sum(1))[:, None] * ((my * my).sum(1) + sy.sum(1))[None, :]
    dense_var = (mx * mx) @ sy.T + sx @ (my * my).T + sx @ sy.T
    torch.testing.assert_close(mean.double().cpu(), 30 * (mx @ my.T) / norm.sqrt(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(var.double().cpu(), 900 * dense_var / norm, rtol=2e-5, atol=1e-8)
    # Top-k streams the same moments and ranks them as a dense sort does.
    values, indices, top_mean, top_var = topk(img, txt, 5, "probit", logit_scale=math.log(30.0))
    key = (ref_mean / torch.sqrt(1 + math.pi / 8 * ref_var)).cpu()
    expected = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :5]
    assert torch.equal(indices.cpu(), expected)
    torch.testing.assert_close(top_mean, ref_mean.gather(1, indices), rtol=2e-5, atol=2e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_embedding_on_a_gpu():
    device = torch.device("cuda")
    image, text = paired_embeddings(200)
    kwargs = dict(hidden=16, epochs=3, batch_size=32, lr=3e-3, progress=False, device=device)
    first, h1 = train_probvlm(image, text, **kwargs)
    second, h2 = train_probvlm(image.to(device), text.to(device), **kwargs)
    assert next(first.parameters()).device.type == "cuda" and h1.val_loss == h2.val_loss
    for name, t in first.state_dict().items():
        assert torch.equal(t, second.state_dict()[name]), name
    # The same masks (drawn on the CPU) on either device: the GPU distribution matches the CPU one.
    on_gpu = first.image.embed(image[:9].to(device))
    on_cpu = copy.deepcopy(first).cpu().image.embed(image[:9])
    torch.testing.assert_close(on_gpu.variances.cpu(), on_cpu.variances, rtol=1e-4, atol=1e-9)
