"""The demo and the python/ examples run end to end (no weights, no network)."""

import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_demo_prints_and_writes_its_results(tmp_path):
    # Trains the default model on the first run on this machine (a few minutes on 2 cores), then reuses it.
    out = run("-m", "bayesvlm_ext.demo", "--out", str(tmp_path))
    results = json.load(open(tmp_path / "results.json"))
    for domain in ("in_domain", "shifted"):
        for method in ("map", "bayesvlm_probit", "bayesvlm_mc", "bayesvlm_tuned", "probvlm"):
            values = results["zero_shot"][domain][method]
            assert set(values) == {"acc", "nlpd", "ece"}
            assert f"{domain:<10} {method:<18} {values['acc']:>8.4f} {values['nlpd']:>8.4f}" in out  # table = file
            assert 0 <= values["acc"] <= 1 and values["nlpd"] > 0 and 0 <= values["ece"] <= 1
    # The default model has learnt the task: far above chance (1/6) in domain.
    assert results["zero_shot"]["in_domain"]["map"]["acc"] > 0.6
    for method in ("map", "bayesvlm", "probvlm"):
        for direction in ("image_to_text", "text_to_image"):
            values = results["retrieval"][method][direction]
            expected = {"recall@1", "recall@5", "recall@10"} | ({"spearman"} if method != "map" else set())
            assert set(values) == expected
            assert f"{direction:<14} {method:<9} {values['recall@1']:>7.4f} {values['recall@5']:>7.4f}" in out
            assert 0 <= values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= 1
            if method != "map":
                assert -1 <= values["spearman"] <= 1
                bins = results["uncertainty_bins"][method][direction]["recall@1"]
                assert len(bins) == 10 and all(0 <= r <= 1 for r in bins)
    # Selective prediction (SPEC 11) for both tasks, both domains and every method.
    for task, methods in (("zero_shot", {"map", "bayesvlm", "bayesvlm_tuned", "probvlm"}),
                          ("retrieval", {"map", "bayesvlm", "probvlm"})):
        for domain in ("in_domain", "shifted"):
            assert set(results["selective"][task][domain]) == methods
            for method, values in results["selective"][task][domain].items():
                assert set(values) == {"aurc", "eaurc", "auroc"}
                assert -1e-12 <= values["eaurc"] <= values["aurc"] <= 1
                assert values["auroc"] is None or 0 <= values["auroc"] <= 1
                assert f"{task:<10} {domain:<10} {method:<16} {values['aurc']:>8.4f} {values['eaurc']:>8.4f}" in out
    # The pseudo-count search: one NLPD and one lambda per tower at each n of the grid, the best one chosen.
    tuning = results["tuning"]
    grid = tuning["pseudo_counts"]
    assert len(tuning["nlpd"]) == len(grid) == len(tuning["prior_precisions"]["image"]) > 1
    assert tuning["pseudo_count"] == grid[tuning["best"]] and tuning["nlpd"][tuning["best"]] == min(tuning["nlpd"])
    # ProbVLM: every candidate over >= 3 seeds, the choice by the validation criterion, and the spread reported.
    selection = results["probvlm"]["selection"]
    assert len(selection["seeds"]) >= 3 and len(selection["candidates"]) >= 2
    criterion = selection["criterion"]
    chosen = selection["candidates"][selection["chosen"]]
    assert all(chosen["mean"][criterion] >= c["mean"][criterion] for c in selection["candidates"].values())
    for candidate in selection["candidates"].values():
        assert len(candidate["per_seed"]) == len(selection["seeds"])
        assert all(run["best_val_loss"] < run["first_val_loss"] for run in candidate["per_seed"])  # they learnt
    assert len(results["probvlm"]["per_seed"]) == len(selection["seeds"])
    assert results["probvlm"]["std"]["retrieval"]["image_to_text"]["spearman"] >= 0
    assert set(results["probvlm"]["spearman_by_part"]) == {"total", "aleatoric", "epistemic"}
    # Active learning on the mixed pool: both selections, every method, >= 5 seeds, the target-domain share.
    active = results["active_learning"]
    assert results["settings"]["active_learning"]["seeds"] >= 5
    for selection_name in ("top", "class_balanced"):
        curves = active["accuracy"][selection_name]
        assert set(curves) == {"epig", "bald", "entropy", "random"}
        for method, curve in curves.items():
            assert [row[0] for row in curve] == [0, 25, 50, 100, 200, 400]
            assert curve[0][1] == curves["random"][0][1]  # every method starts from the same zero-shot model
            for labels, mean, std in curve:
                assert 0 <= mean <= 1 and std >= 0
                assert f"{mean:>8.4f} +-{std:.3f}" in out  # table = file
            fractions = active["target_fraction"][selection_name][method]
            assert [row[0] for row in fractions] == [25, 50, 100, 200, 400]
            assert all(0 <= mean <= 1 for _, mean, _ in fractions)
            assert len(active["per_seed"][selection_name][method]) == results["settings"]["active_learning"]["seeds"]
    for name in ("reliability.png", "uncertainty_recall.png", "risk_coverage.png", "active_learning.png"):
        with open(tmp_path / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"default_model", "fit_posterior", "tune_pseudo_count", "probvlm_fit", "zero_shot", "retrieval",
            "active_learning", "plots", "total"} <= set(results["timings"])


CALIBRATE = os.path.join("python", "calibrate.py")


@pytest.mark.parametrize("kind, likelihood", [("open_clip", "softmax"), ("hf-clip", "softmax"),
                                              ("hf-siglip", "sigmoid")])
def test_calibrate_self_test_fits_evaluates_and_writes_results(kind, likelihood, tmp_path):
    # A random-init model and generated PNG + JSONL files through the user's path: fit, evaluate, reload, check.
    pytest.importorskip("open_clip" if kind == "open_clip" else "transformers")
    out = run(CALIBRATE, "--self-test", kind, "--quiet", "--out", str(tmp_path))
    assert f"self-test passed ({kind})" in out
    results = json.load(open(tmp_path / "results.json"))
    assert results["model"]["likelihood"] == likelihood
    for method in ("map", "bayesvlm_probit", "bayesvlm_mc"):
        values = results["zero_shot"]["eval"][method]
        assert set(values) == {"acc", "nlpd", "ece"}
        assert f"{method:<18} {values['acc']:>8.4f} {values['nlpd']:>8.4f} {values['ece']:>8.4f}" in out  # table = file
        assert 0 <= values["acc"] <= 1 and 0 < values["nlpd"] < math.inf and 0 <= values["ece"] <= 1
    for method in ("map", "bayesvlm"):
        for direction in ("image_to_text", "text_to_image"):
            values = results["retrieval"][method][direction]
            expected = {"recall@1", "recall@5", "recall@10"} | ({"spearman"} if method == "bayesvlm" else set())
            assert set(values) == expected
            assert 0 <= values["recall@1"] <= values["recall@5"] <= values["recall@10"] <= 1
            rho = values.get("spearman")
            assert rho is None or -1 <= rho <= 1  # None: Recall@1 equal in every uncertainty bin
    assert results["data"]["eval_images"] == 48 and results["data"]["distinct_captions"] >= 10
    for tower in ("image", "text"):  # the fitted posterior, reusable with --posterior
        assert (tmp_path / f"posterior_{tower}" / "posterior.json").is_file()
        assert 0 < results["posterior"][tower]["prior_precision"] < math.inf
    assert (tmp_path / "from_posterior" / "results.json").is_file()  # the rerun with --posterior (compared inside)


@pytest.mark.parametrize("args, message", [
    ([], "required without --self-test"),
    (["--library", "hf", "--model", ".", "--checkpoint", "x.pt", "--eval", "e", "--posterior", "p"],
     "--checkpoint is for open_clip"),
    (["--library", "open_clip", "--model", "ViT-B-32", "--eval", "e", "--posterior", "p"], "needs --checkpoint"),
    (["--library", "open_clip", "--model", "hf-hub:org/model", "--eval", "e", "--posterior", "p"], "would download"),
    (["--self-test", "hf-clip", "--eval", "e.jsonl"], "drop --eval"),
])
def test_calibrate_argument_errors(args, message):
    proc = subprocess.run([sys.executable, CALIBRATE, *args], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


SELECT_LABELS = os.path.join("python", "select_labels.py")


@pytest.mark.parametrize("kind", ["open_clip", "hf-clip", "hf-siglip"])
def test_select_labels_self_test_selects_with_every_method(kind, tmp_path):
    # Random-init model, generated pool (PNG folder) and shifted-domain targets (JSONL): every method end to end,
    # the same seed twice, another seed for random, EPIG against acquisition_scores recomputed in-process.
    pytest.importorskip("open_clip" if kind == "open_clip" else "transformers")
    out = run(SELECT_LABELS, "--self-test", kind, "--quiet", "--out", str(tmp_path))
    assert f"self-test passed ({kind})" in out
    assert "against acquisition_scores recomputed in-process" in out and "True ok" in out
    classes = {"circle", "square", "triangle", "diamond", "cross", "ring"}
    for method in ("variance", "entropy", "aleatoric", "bald", "epig", "random"):
        lines = (tmp_path / f"{method}.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert len(records) == 8 and len({r["image"] for r in records}) == 8
        for rank, record in enumerate(records, start=1):
            assert set(record) == {"rank", "image", "score", "predicted", "probability"}
            assert record["rank"] == rank and os.path.basename(os.path.dirname(record["image"])) == "eval"
            assert record["predicted"] in classes and 0 <= record["probability"] <= 1
            assert math.isfinite(record["score"]) and (method in ("variance", "random") or record["score"] >= 0)
        scores = [r["score"] for r in records]
        assert scores == sorted(scores, reverse=True)  # strategy top
        assert (tmp_path / f"{method}-again.jsonl").read_text() == "\n".join(lines) + "\n"  # same seed, same file
        assert f"wrote {tmp_path / method}.jsonl (8 images)" in out
    assert (tmp_path / "random-other-seed.jsonl").read_text() != (tmp_path / "random.jsonl").read_text()
    assert "the 2 nearest (wasserstein) of each target" in out
    for tower in ("image", "text"):  # --save-posterior, reused by the other runs with --posterior
        assert (tmp_path / "posterior" / f"posterior_{tower}" / "posterior.json").is_file()


@pytest.mark.parametrize("args, message", [
    ([], "required without --self-test"),
    (["--library", "hf", "--model", ".", "--posterior", "p", "--pool", "x", "--classes", "a,b", "--budget", "2",
      "--method", "epig"], "--method epig scores the information about target images: give --targets"),
    (["--library", "hf", "--model", ".", "--posterior", "p", "--pool", "x", "--classes", "a,b", "--budget", "2",
      "--support-k", "3"], "--support-k keeps the pool images nearest to the targets: give --targets"),
    (["--library", "hf", "--model", "{model}", "--posterior", "{posterior}", "--pool", "{missing}", "--classes",
      "a,b", "--budget", "2"], "no such file or directory"),
    (["--library", "hf", "--model", "{model}", "--posterior", "{posterior}", "--pool", "{pool}", "--classes", "a,b",
      "--budget", "4"], "--budget 4 is larger than the pool (3 images in"),
    (["--self-test", "hf-clip", "--pool", "x"], "drop --pool"),
])
def test_select_labels_argument_errors(args, message, tmp_path):
    # Stops before any model loads: argparse's exit status 2 and the reason on stderr.
    paths = {"model": tmp_path / "model", "posterior": tmp_path / "posterior", "pool": tmp_path / "pool",
             "missing": tmp_path / "missing.jsonl"}
    for folder in ("model", "posterior/posterior_image", "posterior/posterior_text", "pool"):
        (tmp_path / folder).mkdir(parents=True)
    for i in range(3):  # counted by name; never opened before the budget check
        (tmp_path / "pool" / f"{i}.png").write_bytes(b"")
    argv = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
    proc = subprocess.run([sys.executable, SELECT_LABELS, *argv], capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr
