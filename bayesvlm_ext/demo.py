"""End-to-end demo on synthetic data: `python -m bayesvlm_ext.demo` (what `make demo` runs).

Seeded, CPU only, a few seconds on 2 cores, public API only. The steps follow SPEC.md:

1. Curvature factors A = X^T X / sqrt(N) from random features with a decaying spectrum in a random
   basis (so they are far from isotropic), B likewise from random D-vectors, for an image tower
   (P=768, D=512) and a text tower (P=512, D=512), and random MAP projections W [D, P] (section 2).
   Their eigenvalues span about the range of the published ViT-B-32 factors (SPEC.md section 10).
2. One `KronPosterior` per tower, damping "kron", prior precision tuned on the marginal likelihood.
3. A 10-class zero-shot problem: the text features are class prototypes (a shared component plus
   a class part, like CLIP prompts "a photo of a <class>"); each image feature is a noisy mixture
   of its class's prototype with another class's, lifted into the image feature space so that its
   MAP image embedding lies near the mixed text embedding. Ambiguous images make the
   deterministic model overconfident, which is what the predictive uncertainty should correct.
4. Logit moments with variant "kron" (exact under the Kronecker posterior) and "diag" (the
   published per-dimension approximation), the latter checked against `bayesvlm_ext.reference`
   (section 4).
5. Predictive probabilities: the deterministic MAP model, the mean logits alone, probit and Monte
   Carlo; accuracy, NLPD and ECE; the first images' top-3 classes; a timing per stage (section 5).
"""

from __future__ import annotations

import math
import time

import torch
from torch import Tensor

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, cosine_moments, predictive, reference

SEED = 0
P_IMG, P_TXT, D = 768, 512, 512  # feature sizes entering the projections, embedding size
FACTOR_SAMPLES = 4096  # N of the synthetic fitting set behind A and B
# Feature standard deviations: with N = 4096 the top eigenvalues become about 7e4 (A) and 4e2 (B),
# those of the published ViT-B-32 factors; smaller values give a prior-dominated, far wider posterior.
FEATURE_STD = 33.0  # inputs of the projections (A's data and the synthetic image/text features)
OUTPUT_STD = 2.6  # the random D-vectors behind B
NUM_IMAGES = 1000
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
CLASS_SPREAD = 0.3  # size of a prototype's class part relative to the shared part
MAX_MIXTURE = 0.8  # an image is up to this far from its own class prototype towards another one
IMAGE_NOISE = 1.0  # std of the per-image feature noise relative to FEATURE_STD
LOGIT_SCALE = math.log(100.0)  # log s, stored as a log like open_clip's logit_scale (SPEC.md section 4)
MC_SAMPLES = 1000
REFERENCE_RTOL = 1e-5  # "diag" vs the reference, relative to the largest value: float32 round-off
TIMING_REPEATS = 5


def random_rotation(
    size: int,
    generator: torch.Generator,
) -> Tensor:  # [size, size] orthonormal
    q, r = torch.linalg.qr(torch.randn(size, size, generator=generator))
    return q * torch.sign(torch.diagonal(r))  # sign fix: Haar-distributed


def decaying_features(
    num: int,
    rotation: Tensor,  # [size, size] the basis of the spectrum
    std: float,
    generator: torch.Generator,
) -> Tensor:  # [num, size]
    """Gaussian features with covariance eigenvalues std^2 / k (k = 1..size) along `rotation`'s columns."""
    size = rotation.shape[0]
    spectrum = std * torch.arange(1, size + 1, dtype=torch.float32).rsqrt()  # [size] standard deviations
    return (torch.randn(num, size, generator=generator) * spectrum) @ rotation.T


def synthetic_factor(
    samples: Tensor,  # [N, size]
) -> Tensor:  # [size, size] symmetric PSD
    """X^T X / sqrt(N), the scaling of SPEC.md section 6."""
    factor = samples.T @ samples / math.sqrt(samples.shape[0])
    return (factor + factor.T) / 2  # float32 round-off leaves it a few ulps from symmetric


def synthetic_tower(
    in_features: int,
    generator: torch.Generator,
) -> tuple[KronPosterior, Tensor]:  # posterior over W [D, in_features], feature basis [P, P]
    """A posterior from synthetic factors, prior precision tuned; the basis draws more features like A's."""
    basis = random_rotation(in_features, generator)
    A = synthetic_factor(decaying_features(FACTOR_SAMPLES, basis, FEATURE_STD, generator))  # [P, P]
    B = synthetic_factor(decaying_features(FACTOR_SAMPLES, random_rotation(D, generator), OUTPUT_STD,
                                           generator))  # [D, D]
    weight = torch.randn(D, in_features, generator=generator) / math.sqrt(in_features)  # [D, P]
    posterior = KronPosterior(A, B, weight, prior_precision=1.0, damping="kron")
    posterior.optimize_prior_precision()
    return posterior, basis


def zero_shot_problem(
    img_tower: KronPosterior,
    img_basis: Tensor,  # [P_IMG, P_IMG]
    txt_tower: KronPosterior,
    txt_basis: Tensor,  # [P_TXT, P_TXT]
    generator: torch.Generator,
) -> tuple[Tensor, Tensor, Tensor]:  # phi_img [N, P_IMG], labels [N], phi_txt [C, P_TXT]
    """Class-prototype text features and noisy, partly ambiguous image features (see the module docstring).

    `lift` solves W_img lift = W_txt (least squares; exact, W_img has full row rank), so the MAP image
    embedding of `lift @ t` equals the MAP text embedding of t.
    """
    num_classes = len(CLASS_NAMES)
    shared = decaying_features(1, txt_basis, FEATURE_STD, generator)  # [1, P_TXT]
    phi_txt = shared + CLASS_SPREAD * decaying_features(num_classes, txt_basis, FEATURE_STD, generator)  # [C, P_TXT]
    labels = torch.randint(num_classes, (NUM_IMAGES,), generator=generator)  # [N]
    other = (labels + torch.randint(1, num_classes, (NUM_IMAGES,), generator=generator)) % num_classes  # [N] != labels
    mixture = MAX_MIXTURE * torch.rand(NUM_IMAGES, 1, generator=generator)  # [N, 1]
    mixed_txt = (1 - mixture) * phi_txt[labels] + mixture * phi_txt[other]  # [N, P_TXT]
    lift = torch.linalg.lstsq(img_tower.weight, txt_tower.weight).solution.float()  # [P_IMG, P_TXT]
    noise = decaying_features(NUM_IMAGES, img_basis, IMAGE_NOISE * FEATURE_STD, generator)  # [N, P_IMG]
    return mixed_txt @ lift.T + noise, labels, phi_txt


def timed(fn, repeats: int = TIMING_REPEATS):
    """(result of fn(), median wall time in ms over `repeats` calls after one warm-up call)."""
    result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return result, sorted(times)[len(times) // 2]


def map_logits(
    mean_img: Tensor,  # [N, D]
    mean_txt: Tensor,  # [M, D]
) -> Tensor:  # [N, M] s * cos(mu_img, mu_txt): the deterministic model at the MAP weights
    unit_img = mean_img / mean_img.norm(dim=1, keepdim=True)
    unit_txt = mean_txt / mean_txt.norm(dim=1, keepdim=True)
    return math.exp(LOGIT_SCALE) * unit_img @ unit_txt.T


def main() -> None:
    start_all = time.perf_counter()
    print(f"bayesvlm_ext {bayesvlm_ext.__version__}, torch {torch.__version__}, "
          f"backend('cpu') = {bayesvlm_ext.backend('cpu')!r}, {torch.get_num_threads()} threads")
    generator = torch.Generator().manual_seed(SEED)

    # 1-2. posteriors over the two projections
    img_tower, img_basis = synthetic_tower(P_IMG, generator)
    txt_tower, txt_basis = synthetic_tower(P_TXT, generator)
    for name, tower in (("image", img_tower), ("text", txt_tower)):
        report = tower.factor_report
        print(f"{name} tower: {tower}\n  A eigenvalues {report['A'].min_eigenvalue:.3g} .. "
              f"{report['A'].max_eigenvalue:.3g}, B eigenvalues {report['B'].min_eigenvalue:.3g} .. "
              f"{report['B'].max_eigenvalue:.3g}, log marginal likelihood {tower.log_marginal_likelihood():.6g}")

    # 3. data and embeddings
    phi_img, labels, phi_txt = zero_shot_problem(img_tower, img_basis, txt_tower, txt_basis, generator)
    timings = {}
    img, timings["embed img"] = timed(lambda: img_tower.embed(phi_img))  # kron form, N = 1000
    txt, timings["embed txt"] = timed(lambda: txt_tower.embed(phi_txt))  # kron form, M = 10
    print(f"embeddings: {img}, {txt}")

    # 4. logit moments, fused "kron" (exact) and "diag" (approximation), and the reference for "diag"
    (mean_kron, var_kron), timings["moments kron"] = timed(
        lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant="kron"))  # [N, M] each
    (mean_diag, var_diag), timings["moments diag"] = timed(
        lambda: cosine_moments(img, txt, logit_scale=LOGIT_SCALE, variant="diag"))
    var_img_diag, var_txt_diag = img.diagonal_variance(), txt.diagonal_variance()  # [N, D], [M, D]
    (mean_ref, var_ref), timings["reference diag"] = timed(lambda: reference.cosine_moments_diag(
        img.mean, var_img_diag, txt.mean, var_txt_diag, logit_scale=LOGIT_SCALE))
    mean_err, var_err = (mean_diag - mean_ref).abs().max().item(), (var_diag - var_ref).abs().max().item()
    print(f"diag vs reference: max |mean diff| {mean_err:.3g} (|mean| up to {mean_ref.abs().max():.3g}), "
          f"max |var diff| {var_err:.3g} (var up to {var_ref.max():.3g})")
    # float32 round-off of sums over D = 512 terms: a few ulps of the largest value
    if mean_err > REFERENCE_RTOL * mean_ref.abs().max() or var_err > REFERENCE_RTOL * var_ref.max():
        raise SystemExit(f"variant 'diag' disagrees with reference.cosine_moments_diag beyond rtol {REFERENCE_RTOL}")
    print(f"kron (exact) vs diag (approximation): logit variance ratio kron/diag "
          f"{(var_kron / var_diag).min():.3f} .. {(var_kron / var_diag).max():.3f}")

    # 5. predictives and metrics
    mc_generator = torch.Generator()  # re-seeded per call: every timed repeat draws the same samples
    prob_probit, timings["probit"] = timed(lambda: predictive(mean_kron, var_kron, link="probit"))  # [N, M]
    prob_mc, timings["mc"] = timed(lambda: predictive(
        mean_kron, var_kron, link="mc", num_samples=MC_SAMPLES, generator=mc_generator.manual_seed(SEED + 1)))
    logits_map = map_logits(img.mean, txt.mean)
    methods = {  # name: (probabilities [N, M], logit variances [N, M])
        "MAP: softmax(s cos(mu_x, mu_y))": (torch.softmax(logits_map, dim=1), torch.zeros_like(var_kron)),
        "mean only: softmax(E[logit])": (torch.softmax(mean_kron, dim=1), torch.zeros_like(var_kron)),
        "probit, kron": (prob_probit, var_kron),
        f"mc ({MC_SAMPLES} samples), kron": (prob_mc, var_kron),
        "probit, diag": (predictive(mean_diag, var_diag, link="probit"), var_diag),
    }
    print(f"\nzero-shot, {NUM_IMAGES} images, {len(CLASS_NAMES)} classes (chance {1 / len(CLASS_NAMES):.2f}):")
    print(f"{'method':<34} {'accuracy':>8} {'NLPD':>8} {'ECE':>8} {'mean logit var':>15}")
    for name, (probs, var) in methods.items():
        print(f"{name:<34} {bayesvlm_ext.accuracy(probs, labels):>8.4f} {bayesvlm_ext.nlpd(probs, labels):>8.4f} "
              f"{bayesvlm_ext.ece(probs, labels):>8.4f} {var.mean().item():>15.4g}")

    print("\nfirst images, top-3 classes: probit probability (MAP probability) [logit mean +- std]")
    prob_map = methods["MAP: softmax(s cos(mu_x, mu_y))"][0]
    for i in range(3):
        top_prob, top_class = prob_probit[i].topk(3)
        ranked = ", ".join(
            f"{CLASS_NAMES[c]} {p:.3f} ({prob_map[i, c]:.3f}) [{mean_kron[i, c]:.1f} +- {var_kron[i, c].sqrt():.1f}]"
            for p, c in zip(top_prob.tolist(), top_class.tolist()))
        print(f"  image {i} (true: {CLASS_NAMES[labels[i]]}): {ranked}")

    print(f"\ntimings (median of {TIMING_REPEATS} after a warm-up, ms):")
    for stage, ms in timings.items():
        print(f"  {stage:<15} {ms:9.3f}")
    print(f"total demo wall time {time.perf_counter() - start_all:.1f} s")


if __name__ == "__main__":
    main()
