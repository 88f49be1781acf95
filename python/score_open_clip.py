"""Zero-shot classification with calibrated uncertainty: an open_clip model plus published BayesVLM factors.

    python python/score_open_clip.py --checkpoint open_clip_model.safetensors \\
        --factors hessians/hessian_CLIP-ViT-B-32-laion2B-s34B-b79K --images photos/ --classes cat,dog,car
    python python/score_open_clip.py --self-test     # random weights, synthetic factors, no files needed

Only the last linear map of each tower is Bayesian (SPEC.md section 1): open_clip keeps it as a Parameter
`visual.proj` / `text_projection` of shape [P, D] applied as `phi @ proj`. The script captures phi (the
features entering it) by running the model with that projection set to None (both towers skip a None
projection), builds one KronPosterior per tower from the factor directory (SPEC.md section 10), and prints
per image the most probable classes under the probit predictive with each logit's standard deviation.
Nothing is downloaded: the checkpoint is a local file, the tokenizer ships with open_clip.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch
from torch import Tensor, nn

import bayesvlm_ext
from bayesvlm_ext import KronPosterior, cosine_moments, predictive
from bayesvlm_ext.capture import ProjectionSite, capture, find_projection

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
PROMPT = "a photo of a {}."
REPRODUCTION_TOL = 1e-5  # captured features @ proj against the model's own encode_image / encode_text


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32", help="open_clip model name (default: %(default)s)")
    parser.add_argument("--checkpoint", help="local open_clip checkpoint, passed as create_model(pretrained=PATH)")
    parser.add_argument("--factors", help="BayesVLM factor directory: A_/B_{img,txt}_analytic.pt and "
                                          "prior_precision_analytic.json")
    parser.add_argument("--images", help="folder of image files")
    parser.add_argument("--classes", help="comma-separated class names, e.g. 'cat,dog,car'")
    parser.add_argument("--top-k", type=int, default=5, help="classes printed per image (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
    parser.add_argument("--self-test", action="store_true",
                        help="random-init model, synthetic factors (unless --factors is given) and two generated "
                             "images; checks the captured features and exits non-zero on a mismatch")
    args = parser.parse_args(argv)
    if not args.self_test:
        missing = [f"--{name}" for name in ("checkpoint", "factors", "images", "classes") if not getattr(args, name)]
        if missing:
            parser.error(f"the following arguments are required without --self-test: {', '.join(missing)}")
    return args


# ---- the projections and the features entering them (bayesvlm_ext.capture) ------------------------------
def projection_site(model: nn.Module, tower: str) -> ProjectionSite:
    """The tower's last linear map (SPEC.md section 1); a clear exit for towers this script cannot score."""
    try:
        site = find_projection(model, tower)
        site.layer()
    except ValueError as exc:
        raise SystemExit(f"{exc} (ModifiedResNet image towers and Hugging Face models are not supported by this "
                         "example)") from exc
    if site.residual_from is not None:
        raise SystemExit(f"the {tower} tower's last layer sits inside a residual (SigLIP): this example scores "
                         "plain projections only; use bayesvlm_ext.capture and KronPosterior.embed(phi, residual)")
    return site


def project(
    site: ProjectionSite,
    phi: Tensor,  # [N, P]
) -> Tensor:  # [N, D] = phi W^T (+ b), as the tower applies it
    weight, bias = site.layer()
    return phi @ weight.T if bias is None else phi @ weight.T + bias


def image_features(
    model: nn.Module,
    images: Tensor,  # [N, 3, H, W] preprocessed
) -> Tensor:  # [N, P] the input of visual.proj
    return capture(model.encode_image, images, projection_site(model, "image")).features


def text_features(
    model: nn.Module,
    tokens: Tensor,  # [M, context_length]
) -> Tensor:  # [M, P] the input of text_projection
    return capture(model.encode_text, tokens, projection_site(model, "text")).features


# ---- data -------------------------------------------------------------------------------------------
def image_files(folder: str) -> list[str]:
    if not os.path.isdir(folder):
        raise SystemExit(f"--images {folder}: not a directory")
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise SystemExit(f"--images {folder}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def load_pixels(
    preprocess,
    files: list[str],
) -> Tensor:  # [N, 3, H, W] the model's eval preprocessing of each file, as RGB
    from PIL import Image

    pixels = []
    for file in files:
        with Image.open(file) as image:
            pixels.append(preprocess(image.convert("RGB")))
    return torch.stack(pixels)


def encode_folder(
    model: nn.Module,
    preprocess,
    files: list[str],
    batch_size: int,
    device: torch.device,
) -> Tensor:  # [N, P] the input of visual.proj, batch by batch
    return torch.cat([image_features(model, load_pixels(preprocess, files[start:start + batch_size]).to(device))
                      for start in range(0, len(files), batch_size)])


# ---- scoring ------------------------------------------------------------------------------------------
def build_posteriors(model: nn.Module, factors: str, device: torch.device) -> tuple[KronPosterior, KronPosterior]:
    """One KronPosterior per tower, MAP weights from the model, factors and lambda, n from `factors`."""
    weight_img, bias_img = projection_site(model, "image").layer()
    weight_txt, bias_txt = projection_site(model, "text").layer()
    posterior_img = KronPosterior.from_bayesvlm_dir(factors, tower="img", weight=weight_img, bias=bias_img,
                                                    map_location=device)
    posterior_txt = KronPosterior.from_bayesvlm_dir(factors, tower="txt", weight=weight_txt, bias=bias_txt,
                                                    map_location=device)
    for name, posterior in (("img", posterior_img), ("txt", posterior_txt)):
        clamped = {k: r.num_clamped for k, r in posterior.factor_report.items() if r.num_clamped}
        print(f"posterior {name}: {posterior}" + (f", clamped negative eigenvalues {clamped}" if clamped else ""))
    return posterior_img, posterior_txt


def logit_parameters(model: nn.Module) -> tuple[float, float]:
    """(log s, beta): open_clip stores the scale as a log; beta is 0 without a logit_bias (CLIP)."""
    bias = getattr(model, "logit_bias", None)
    return model.logit_scale.detach().item(), 0.0 if bias is None else bias.detach().item()


def score(
    posterior_img: KronPosterior,
    posterior_txt: KronPosterior,
    phi_img: Tensor,  # [N, P_img]
    phi_txt: Tensor,  # [M, P_txt]
    logit_scale: float,
    logit_bias: float,
) -> tuple[Tensor, Tensor, Tensor]:  # probit probabilities [N, M], logit mean [N, M], logit var [N, M]
    img, txt = posterior_img.embed(phi_img), posterior_txt.embed(phi_txt)
    mean, var = cosine_moments(img, txt, logit_scale=logit_scale, logit_bias=logit_bias, variant="kron")
    return predictive(mean, var, link="probit"), mean, var


def print_ranking(names: list[str], classes: list[str], probs: Tensor, mean: Tensor, var: Tensor, k: int) -> None:
    k = min(k, len(classes))
    width = max(len(c) for c in classes)
    for i, name in enumerate(names):
        print(name)
        top_prob, top_class = probs[i].topk(k)
        for p, c in zip(top_prob.tolist(), top_class.tolist()):
            print(f"  {p:6.3f}  {classes[c]:<{width}}  logit {mean[i, c]:7.2f} +- {var[i, c].sqrt():.2f}")


def load_model(name: str, checkpoint: str | None, device: torch.device):
    """(model in eval mode, eval preprocess, tokenizer). checkpoint None: random init, nothing downloaded."""
    import open_clip

    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise SystemExit(f"--checkpoint {checkpoint}: no such file")
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=checkpoint, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    device = torch.device(args.device)
    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, device)
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if len(classes) < 2:
        raise SystemExit("--classes needs at least two comma-separated names")
    files = image_files(args.images)
    posterior_img, posterior_txt = build_posteriors(model, args.factors, device)
    phi_img = encode_folder(model, preprocess, files, args.batch_size, device)  # [N, P_img]
    phi_txt = text_features(model, tokenizer([PROMPT.format(c) for c in classes]).to(device))  # [M, P_txt]
    probs, mean, var = score(posterior_img, posterior_txt, phi_img, phi_txt, *logit_parameters(model))
    print_ranking([os.path.basename(f) for f in files], classes, probs, mean, var, args.top_k)
    return 0


# ---- self-test ----------------------------------------------------------------------------------------
def write_synthetic_factors(folder: str, sizes: dict[str, int], generator: torch.Generator) -> None:
    """Random PSD factors X^T X / sqrt(N) of the given sizes, in the published format (SPEC.md section 10)."""
    for name, size in sizes.items():
        samples = 4 * size
        x = torch.randn(samples, size, generator=generator) * torch.arange(1, size + 1).rsqrt()  # decaying spectrum
        torch.save(x.T @ x / math.sqrt(samples), os.path.join(folder, f"{name}_analytic.pt"))
    with open(os.path.join(folder, "prior_precision_analytic.json"), "w") as f:
        json.dump({"lambda_img": 100.0, "n_img": 1.0, "lambda_txt": 100.0, "n_txt": 1.0}, f)


def write_test_images(folder: str) -> None:
    """Two generated RGB images: a red disc on white and a blue-green checkerboard."""
    from PIL import Image, ImageDraw

    disc = Image.new("RGB", (256, 256), "white")
    ImageDraw.Draw(disc).ellipse((48, 48, 208, 208), fill=(220, 30, 30))
    disc.save(os.path.join(folder, "red_disc.png"))
    board = Image.new("RGB", (240, 320), (20, 40, 200))
    draw = ImageDraw.Draw(board)
    for row in range(8):
        for col in range(6):
            if (row + col) % 2:
                draw.rectangle((40 * col, 40 * row, 40 * col + 39, 40 * row + 39), fill=(20, 180, 60))
    board.save(os.path.join(folder, "checkerboard.png"))


def max_relative_error(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


@torch.no_grad()
def self_test(args: argparse.Namespace) -> int:
    """Everything of `run` on a random-init model; exit status 1 when a check fails."""
    torch.manual_seed(0)  # the random init of the model
    device = torch.device(args.device)
    print(f"self-test: {args.model} at random init on {device}, bayesvlm_ext backend {bayesvlm_ext.backend(device)!r}")
    model, preprocess, tokenizer = load_model(args.model, None, device)
    classes = [c.strip() for c in (args.classes or "red disc,checkerboard,cat,dog").split(",") if c.strip()]
    failures = []
    with tempfile.TemporaryDirectory() as folder:
        images, factors = os.path.join(folder, "images"), args.factors or os.path.join(folder, "factors")
        os.makedirs(images)
        write_test_images(images)
        if args.factors is None:
            os.makedirs(factors)
            (d, p_img), p_txt = projection_site(model, "image").layer()[0].shape, \
                projection_site(model, "text").layer()[0].shape[1]
            write_synthetic_factors(factors, {"A_img": p_img, "B_img": d, "A_txt": p_txt, "B_txt": d},
                                    torch.Generator().manual_seed(0))
        files = image_files(images)
        posterior_img, posterior_txt = build_posteriors(model, factors, device)
        phi_img = encode_folder(model, preprocess, files, args.batch_size, device)  # [N, P_img]
        tokens = tokenizer([PROMPT.format(c) for c in classes]).to(device)
        phi_txt = text_features(model, tokens)  # [M, P_txt]

        # The captured features, projected, must be the model's own unnormalised embeddings.
        pixels = load_pixels(preprocess, files).to(device)
        expected = {"image": model.encode_image(pixels), "text": model.encode_text(tokens)}
        projected = {tower: project(projection_site(model, tower), phi)
                     for tower, phi in (("image", phi_img), ("text", phi_txt))}
        posterior_mean = {"image": posterior_img.embed(phi_img).mean, "text": posterior_txt.embed(phi_txt).mean}
        for tower in ("image", "text"):
            for what, actual in (("features @ proj", projected[tower]), ("posterior mean", posterior_mean[tower])):
                error = max_relative_error(actual, expected[tower])
                ok = error <= REPRODUCTION_TOL
                print(f"  {tower:<5} {what:<15} vs encode_{tower}: max rel error {error:.2e} "
                      f"{'ok' if ok else f'FAIL (> {REPRODUCTION_TOL:g})'}")
                if not ok:
                    failures.append(f"{tower} {what}")

        probs, mean, var = score(posterior_img, posterior_txt, phi_img, phi_txt, *logit_parameters(model))
        if not (bool(torch.isfinite(probs).all()) and bool(torch.isfinite(var).all()) and bool((var >= 0).all())):
            failures.append("non-finite probabilities or negative variances")
        if not torch.allclose(probs.sum(-1), torch.ones(len(files), device=device), atol=1e-5):
            failures.append("probabilities do not sum to 1")
        print_ranking([os.path.basename(f) for f in files], classes, probs, mean, var, args.top_k)
    if failures:
        print(f"self-test FAILED: {', '.join(failures)}", file=sys.stderr)
        return 1
    print("self-test passed")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return self_test(args) if args.self_test else run(args)


if __name__ == "__main__":
    sys.exit(main())
