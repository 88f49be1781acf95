"""`bayesvlm-ext fit` end to end on a random-init open_clip model and generated image-caption pairs."""

import json
import os
import subprocess
import sys

import pytest
import torch

from bayesvlm_ext import KronPosterior
from bayesvlm_ext.cli import main

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")


def write_pairs(folder, unreadable=True):
    """Six good pairs plus one of each kind of bad line (the unreadable image optional)."""
    colours = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    lines = []
    for i, (name, rgb) in enumerate(list(colours.items()) * 2):
        Image.new("RGB", (40 + 8 * i, 32), rgb).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a {name} square number {i}"}))
    if unreadable:
        with open(os.path.join(folder, "broken.png"), "wb") as f:
            f.write(b"not an image")
        lines.append(json.dumps({"image": "broken.png", "caption": "unreadable"}))
    lines += [json.dumps({"image": "absent.png", "caption": "missing"}),
              json.dumps({"image": "0.png", "caption": "  "}),
              "{not json", json.dumps({"caption": "no image key"})]
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def test_fit_command_writes_loadable_posteriors_and_the_published_format(tmp_path, capsys):
    pairs = write_pairs(str(tmp_path))
    out = str(tmp_path / "out")
    torch.manual_seed(0)
    status = main(["fit", "--model", "ViT-B-32", "--pairs", pairs, "--out", out, "--batch-size", "4",
                   "--class-batch-size", "4", "--device", "cpu", "--quiet"])
    assert status == 0
    printed = capsys.readouterr().out
    assert "fitted 6 pairs" in printed
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["pairs"] == 6
    assert summary["skipped"] == {"unreadable image": 1, "missing image": 1, "empty caption": 1,
                                  "malformed line": 2}
    for tower, short in (("image", "img"), ("text", "txt")):
        posterior = KronPosterior.load(os.path.join(out, f"posterior_{tower}"))
        assert posterior.prior_precision == summary["towers"][tower]["prior_precision"] > 0
        published = KronPosterior.from_bayesvlm_dir(os.path.join(out, "bayesvlm"), short, posterior.weight)
        torch.testing.assert_close(published.A, posterior.A, rtol=1e-6, atol=1e-9)  # float32 files
        assert published.prior_precision == posterior.prior_precision


def test_fit_command_fails_when_nothing_is_left(tmp_path, capsys):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "absent.png", "caption": "x"}) + "\n")
    status = main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", str(tmp_path / "o"), "--quiet",
                   "--device", "cpu"])
    assert status == 1 and "no usable pairs" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "ViT-B-32", "--pairs", str(tmp_path / "nope.jsonl"), "--out", "o"])


def test_fit_command_fails_when_every_image_is_unreadable(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(b"not an image")
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    status = main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", str(tmp_path / "o"), "--quiet",
                   "--device", "cpu"])
    err = capsys.readouterr().err
    assert status == 1 and "no pairs" in err and "unreadable image" in err
    with pytest.raises(SystemExit):
        main(["fit", "--model", "ViT-B-32", "--pairs", str(path), "--out", "o", "--pseudo-count", "0"])


def test_fit_command_refuses_outputs_it_cannot_replace_before_any_work(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"image": "absent.png", "caption": "x"}) + "\n")
    common = ["fit", "--model", "ViT-B-32", "--pairs", str(pairs), "--quiet", "--device", "cpu"]
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "out" / "summary.json").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "bayesvlm").write_text("not a folder")
    for out, message in ((tmp_path / "a-file", "a-file: exists and is not a directory"),
                         (tmp_path / "out", "summary.json: is a directory; give a file name"),
                         (tmp_path / "other", "bayesvlm is not a directory")):
        with pytest.raises(SystemExit) as raised:  # argparse's error: exit 2 before the model is even built
            main([*common, "--out", str(out)])
        assert raised.value.code == 2
        err = capsys.readouterr().err
        assert f"--out {out}" in err and message in err, err
    assert sorted(os.listdir(tmp_path / "out")) == ["summary.json"] and os.listdir(tmp_path / "other") == ["bayesvlm"]


def run_fit(arguments, launcher=()):
    # OMP_NUM_THREADS=1 in both runs, as torchrun sets it: the model's float32 forward then rounds alike.
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *launcher, "-m", "bayesvlm_ext", "fit", *arguments], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_fit_command_under_torchrun_matches_one_process(tmp_path):
    # 6 readable pairs in class batches of 4 (two class batches, one per rank), loader batches of 3;
    # the malformed, missing and empty-caption lines are dropped before the data are dealt out.
    pairs = write_pairs(str(tmp_path), unreadable=False)
    common = ["--model", "ViT-B-32", "--pairs", pairs, "--batch-size", "3", "--class-batch-size", "4", "--device",
              "cpu", "--quiet", "--likelihood", "siglip", "--pseudo-count", "2"]
    run_fit([*common, "--out", str(tmp_path / "one")])
    printed = run_fit([*common, "--out", str(tmp_path / "two")],
                      launcher=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"))
    assert "fitted 6 pairs" in printed and "2 processes" in printed
    one, two = (json.load(open(tmp_path / name / "summary.json")) for name in ("one", "two"))
    assert one["pairs"] == two["pairs"] == 6 and two["processes"] == 2
    assert one["skipped"] == two["skipped"] == {"missing image": 1, "empty caption": 1, "malformed line": 2}
    for tower in ("image", "text"):
        single = KronPosterior.load(tmp_path / "one" / f"posterior_{tower}")
        sharded = KronPosterior.load(tmp_path / "two" / f"posterior_{tower}")
        assert single.pseudo_count == sharded.pseudo_count == 2.0
        for name in ("A", "B"):
            mine, theirs = getattr(sharded, name), getattr(single, name)
            assert ((mine - theirs).norm() / theirs.norm()).item() <= 1e-14
        assert sharded.prior_precision == pytest.approx(single.prior_precision, rel=1e-9)


# ---- one bad line or image costs only itself; a checkpoint resumes only its own inputs ----------------------

GOOD_PAIRS = 5


def write_good_pairs(folder, bad_line: bytes | None = None, at: int = 3) -> str:
    """pairs.jsonl with GOOD_PAIRS small solid-colour pairs; `bad_line` (raw bytes) becomes line `at`."""
    colours = [(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 200, 20), (10, 10, 10)]
    lines = []
    for i, rgb in enumerate(colours[:GOOD_PAIRS]):
        Image.new("RGB", (16 + 2 * i, 16), rgb).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"colour number {i}"}).encode())
    if bad_line is not None:
        lines.insert(at - 1, bad_line)
    path = os.path.join(folder, "pairs.jsonl")
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")
    return path


def tiny_fit(folder, pairs, *extra):
    """`bayesvlm-ext fit` of the tiny model on `pairs` into folder/out, one image per forward (so that leaving a
    pair out cannot change how the others are batched and rounded); (status, summary or None, posteriors)."""
    from testing import tiny_open_clip_config

    name = tiny_open_clip_config(os.path.join(folder, "configs"))
    out = os.path.join(folder, "out")
    status = main(["fit", "--model", name, "--pairs", pairs, "--out", out, "--batch-size", "1",
                   "--class-batch-size", "3", "--device", "cpu", "--quiet", *extra])
    if status != 0:
        return status, None, None
    posteriors = {tower: KronPosterior.load(os.path.join(out, f"posterior_{tower}")) for tower in ("image", "text")}
    return status, json.load(open(os.path.join(out, "summary.json"))), posteriors


@pytest.fixture(scope="module")
def fit_of_good_lines(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("good"))
    status, summary, posteriors = tiny_fit(folder, write_good_pairs(folder))
    assert status == 0 and summary["skipped"] == {} and summary["pairs"] == GOOD_PAIRS
    return posteriors


def skip_reports(err: str) -> dict[int, str]:
    """{line number: report} of the "line N: ...; skipped" lines on stderr."""
    found = [line for line in err.splitlines() if line.startswith("line ") and line.endswith("; skipped")]
    return {int(line.split(":")[0].split()[1]): line for line in found}


def _bad_image_line(name):
    return json.dumps({"image": name, "caption": "the bad one"}).encode()


# trigger: (line 3 of the file, (reason counted, what stderr says about line 3))
BAD_LINES = {
    "number image": (b'{"image": 5, "caption": "five"}', ("malformed line", "image is not a string (got 5)")),
    "null image": (b'{"image": null, "caption": "none"}', ("malformed line", "image is not a string (got null)")),
    "list line": (b'["0.png", "a list"]', ("malformed line", "not a JSON object (got [\"0.png\", \"a list\"])")),
    "non-UTF-8 line": (b'{"image": "0.png", "caption": "caf\xe9 au lait"}',
                       ("not UTF-8", "not UTF-8 text (byte 0xe9 at column 35)")),
    "decompression bomb": (_bad_image_line("bomb.png"), ("unreadable image", "DecompressionBombError")),
    "bomb warning": (_bad_image_line("big.png"), ("unreadable image", "DecompressionBombWarning")),
    "truncated png": (_bad_image_line("truncated.png"), ("unreadable image", "image file is truncated")),
}


def write_bad_images(folder, monkeypatch) -> None:
    from testing import png_declaring, truncated_png

    with open(os.path.join(folder, "bomb.png"), "wb") as f:
        f.write(png_declaring(30000, 30000))  # 9e8 pixels: over twice Pillow's default limit
    truncated_png(os.path.join(folder, "truncated.png"))
    Image.new("RGB", (40, 40), (90, 90, 90)).save(os.path.join(folder, "big.png"))
    # 1600 pixels: over the limit, under twice it (Pillow only warns there); the good images have <= 576, the
    # preprocessed ones 1024
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)


@pytest.mark.parametrize("trigger", list(BAD_LINES))
def test_fit_skips_one_bad_line_reports_its_number_and_fits_the_rest(trigger, fit_of_good_lines, tmp_path, capsys,
                                                                     monkeypatch):
    line, (reason, says) = BAD_LINES[trigger]
    write_bad_images(str(tmp_path), monkeypatch)
    status, summary, posteriors = tiny_fit(str(tmp_path), write_good_pairs(str(tmp_path), line, at=3))
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert list(skip_reports(captured.err)) == [3] and says in skip_reports(captured.err)[3]
    assert summary["skipped"] == {reason: 1} and summary["pairs"] == GOOD_PAIRS
    assert f"fitted {GOOD_PAIRS} pairs" in captured.out and reason in captured.out
    for tower in ("image", "text"):  # exactly the fit of a file holding only the good lines
        for name in ("A", "B"):
            assert torch.equal(getattr(posteriors[tower], name), getattr(fit_of_good_lines[tower], name))


def test_fit_fails_only_when_no_line_is_usable(tmp_path, capsys, monkeypatch):
    write_bad_images(str(tmp_path), monkeypatch)
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES.values()) + b"\n")
    status, _, _ = tiny_fit(str(tmp_path), str(path))
    err = capsys.readouterr().err
    assert status == 1 and "no pairs" in err and "'unreadable image': 3" in err and "'malformed line': 3" in err
    reported = skip_reports(err)
    for number, (_, (_, says)) in enumerate(BAD_LINES.values(), 1):
        assert says in reported[number]


def test_fit_resume_refuses_a_checkpoint_of_other_inputs_and_resumes_its_own(tmp_path, capsys):
    folder = str(tmp_path)
    pairs = write_good_pairs(folder)
    status, _, first = tiny_fit(folder, pairs, "--resume")
    assert status == 0 and os.path.isfile(os.path.join(folder, "out", "checkpoint.pt"))
    status, _, again = tiny_fit(folder, pairs, "--resume")  # the same inputs: resumed (nothing left to do)
    assert status == 0
    for tower in ("image", "text"):
        assert torch.equal(again[tower].A, first[tower].A) and torch.equal(again[tower].B, first[tower].B)
    capsys.readouterr()
    fewer = os.path.join(folder, "fewer.jsonl")
    with open(pairs) as f, open(fewer, "w") as g:
        g.writelines(f.readlines()[:3])
    for extra, differs in (((), ["pairs (5 in the checkpoint, 3 in this run)", "pairs_sha256"]),
                           (("--seed", "1"), ["model_weights", "projections", "seed (0 in the checkpoint, 1 in"]),
                           (("--likelihood", "siglip"), ['likelihood ("infonce" in the checkpoint, "siglip" in']),
                           (("--batch-size", "2"), ["batch_size (1 in the checkpoint, 2 in this run)"]),
                           (("--class-batch-size", "2"), ["class_batch_size (3 in the checkpoint, 2 in this run)"])):
        # --batch-size and --class-batch-size given twice: argparse keeps the last
        status, _, _ = tiny_fit(folder, fewer if not extra else pairs, "--resume", *extra)
        err = capsys.readouterr().err
        assert status == 1 and "checkpoint.pt was made from other inputs or settings" in err, err
        assert all(part in err for part in differs), err
    checkpoint = os.path.join(folder, "out", "checkpoint.pt")
    with open(checkpoint, "r+b") as f:
        f.truncate(os.path.getsize(checkpoint) // 2)
    status, _, _ = tiny_fit(folder, pairs, "--resume")
    err = capsys.readouterr().err
    assert status == 1 and f"checkpoint {checkpoint}: cannot be read, damaged" in err and "Traceback" not in err


def test_a_pair_whose_preprocessing_or_tokenising_fails_is_skipped_with_its_line_number(tmp_path):
    from bayesvlm_ext.cli.inputs import PairsDataset, SkippingLoader

    pairs = write_good_pairs(str(tmp_path))

    def preprocess(image):
        if image.size[0] == 20:  # 2.png, line 3
            raise RuntimeError("cannot resize")
        return torch.zeros(3, 4, 4)

    def tokenizer(texts):
        if texts[0].endswith("3"):  # line 4
            raise UnicodeError("bad text")
        return torch.zeros(1, 8, dtype=torch.long)

    reports = []
    dataset = PairsDataset(pairs, preprocess, tokenizer, reports.append)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=list)
    batches = list(SkippingLoader(loader, dataset.skipped, reports.append))
    assert [batch[0].shape[0] for batch in batches] == [2, 1]  # the pairs of lines 1, 2 and 5
    assert dataset.skipped == {"unreadable image": 1, "unusable caption": 1}
    assert reports == [f"line 3: image {tmp_path / '2.png'}: cannot be read (RuntimeError: cannot resize); skipped",
                       "line 4: caption cannot be tokenised (UnicodeError: bad text); skipped"]


def test_fit_command_chooses_the_pseudo_count_on_held_out_pairs(tmp_path, capsys):
    from bayesvlm_ext.tuning import DEFAULT_GRID

    folder, held_out = str(tmp_path / "fit"), str(tmp_path / "val")
    os.makedirs(folder)
    os.makedirs(held_out)
    val = write_good_pairs(held_out, bad_line=json.dumps({"image": "absent.png", "caption": "gone"}).encode())
    status, summary, posteriors = tiny_fit(folder, write_good_pairs(folder), "--val", val)
    assert status == 0
    tuning = summary["tuning"]
    assert tuning["pseudo_counts"] == list(DEFAULT_GRID) and len(tuning["nlpd"]) == len(DEFAULT_GRID)
    assert tuning["held_out"] == GOOD_PAIRS and tuning["skipped"] == {"missing image": 1}
    best = tuning["best"]
    assert tuning["nlpd"][best] == min(tuning["nlpd"]) and summary["pseudo_count"] == DEFAULT_GRID[best]
    for tower, posterior in posteriors.items():
        assert posterior.pseudo_count == DEFAULT_GRID[best]
        assert posterior.prior_precision == tuning["prior_precisions"][tower][best]
        assert summary["towers"][tower]["prior_precision"] == posterior.prior_precision
    assert "<- chosen" in capsys.readouterr().out


def test_fit_command_refuses_a_pseudo_count_beside_val(tmp_path, capsys):
    from testing import command_fails

    pairs = write_good_pairs(str(tmp_path))
    command_fails(main, capsys, ["fit", "--model", "ViT-B-32", "--pairs", pairs, "--out", str(tmp_path / "o"),
                                 "--val", pairs, "--pseudo-count", "2"], "--pseudo-count and --val exclude each other",
                  status=2)
    command_fails(main, capsys, ["fit", "--model", "ViT-B-32", "--pairs", pairs, "--out", str(tmp_path / "o"),
                                 "--val", str(tmp_path / "none.jsonl")], "--val", status=2)
