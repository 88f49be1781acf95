"""`bayesvlm-ext index --images`: a bad line or image of the list is counted, reported with its line number and
left out; the index holds the other images, numbered in list order, exactly as an index of only those."""

import json
import os
import subprocess
import sys

import pytest
import torch
from testing import png_declaring, spd, tiny_open_clip_config, truncated_png

from bayesvlm_ext import KronPosterior, open_index
from bayesvlm_ext.cli import main

open_clip = pytest.importorskip("open_clip")
Image = pytest.importorskip("PIL.Image")

GOOD = 5
FIELDS = ("mean", "alpha", "sq_norm", "cross_quad")


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """(folder with images/ and fit/, the `index` arguments without --images and --out)."""
    folder = tmp_path_factory.mktemp("gallery")
    name = tiny_open_clip_config(str(folder / "configs"))
    (folder / "images").mkdir()
    for i, rgb in enumerate([(220, 30, 30), (30, 200, 40), (30, 40, 220), (200, 200, 20), (10, 10, 10)]):
        Image.new("RGB", (16 + 2 * i, 16), rgb).save(folder / "images" / f"{i}.png")
    with open(folder / "images" / "bomb.png", "wb") as f:
        f.write(png_declaring(30000, 30000))  # 9e8 pixels: over twice Pillow's default limit
    truncated_png(str(folder / "images" / "truncated.png"))
    Image.new("RGB", (40, 40), (90, 90, 90)).save(folder / "images" / "big.png")
    generator = torch.Generator().manual_seed(7)
    P, D = 32, 12  # the tiny model's image projection
    for tower, p in (("image", P), ("text", 8)):
        KronPosterior(spd(p, generator), spd(D, generator), torch.randn(D, p, generator=generator, dtype=torch.float64),
                      prior_precision=0.5).save(folder / "fit" / f"posterior_{tower}")
    command = ["index", "--posterior", str(folder / "fit"), "--tower", "image", "--model", name, "--quiet",
               "--shard-rows", "2", "--batch-size", "2"]
    return folder, command


def image_list(folder, bad_line: bytes | None = None, at: int = 3, name: str = "list.jsonl") -> str:
    """A JSONL of the GOOD images; `bad_line` (raw bytes) becomes line `at`."""
    lines = [json.dumps({"image": f"images/{i}.png"}).encode() for i in range(GOOD)]
    if bad_line is not None:
        lines.insert(at - 1, bad_line)
    path = folder / name
    path.write_bytes(b"\n".join(lines) + b"\n")
    return str(path)


def skip_reports(err: str) -> dict[int, str]:
    """{line number: report} of the "--images LIST: line N: ...; skipped" lines on stderr."""
    found = [line.split(": ", 1)[1] for line in err.splitlines() if line.startswith("--images ") and ": line " in line
             and line.endswith("; skipped")]
    return {int(line.split(":")[0].split()[1]): line for line in found}


def assert_same_index(a, b):
    assert len(a) == len(b) and [(s.start, s.stop) for s in a.shards] == [(s.start, s.stop) for s in b.shards]
    assert a.ids_of(torch.arange(len(a))) == b.ids_of(torch.arange(len(b)))
    for number in range(len(a.shards)):
        for field in FIELDS:
            assert torch.equal(getattr(a.shard(number), field), getattr(b.shard(number), field)), field


@pytest.fixture(scope="module")
def index_of_good_lines(setting):
    folder, command = setting
    assert main([*command, "--images", image_list(folder, name="good.jsonl"), "--out", str(folder / "good")]) == 0
    return open_index(folder / "good")


def _image_line(name):
    return json.dumps({"image": f"images/{name}"}).encode()


# trigger: (line 3 of the list, (reason counted, what stderr says about line 3))
BAD_LINES = {
    "number image": (b'{"image": 5}', ("malformed line", "image is not a string (got 5)")),
    "null image": (b'{"image": null}', ("malformed line", "image is not a string (got null)")),
    "not JSON": (b'{"image": "images/0.png"', ("malformed line", "not JSON (")),
    "non-UTF-8 line": (b'{"image": "images/caf\xe9.png"}', ("not UTF-8", "not UTF-8 text (byte 0xe9 at column 22)")),
    "missing image": (_image_line("absent.png"), ("missing image", "absent.png: no such file")),
    "decompression bomb": (_image_line("bomb.png"), ("unreadable image", "DecompressionBombError")),
    "bomb warning": (_image_line("big.png"), ("unreadable image", "DecompressionBombWarning")),
    "truncated png": (_image_line("truncated.png"), ("unreadable image", "image file is truncated")),
}


@pytest.mark.parametrize("trigger", list(BAD_LINES))
def test_index_images_skips_one_bad_line_reports_its_number_and_indexes_the_rest(trigger, setting,
                                                                                 index_of_good_lines, capsys,
                                                                                 monkeypatch):
    folder, command = setting
    line, (reason, says) = BAD_LINES[trigger]
    # big.png has 1600 pixels: over this limit, under twice it (Pillow only warns there); the good images have
    # <= 384 pixels, the preprocessed ones 1024
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    out = folder / trigger.replace(" ", "-")
    assert main([*command, "--images", image_list(folder, line), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    reported = skip_reports(err)
    assert list(reported) == [3] and says in reported[3], err
    assert f"skipped 1 of {GOOD + 1} listed images ({ {reason: 1} }); the index holds the other {GOOD}" in err
    assert_same_index(open_index(out), index_of_good_lines)  # rows numbered by the usable images


def test_index_images_fails_only_when_no_image_is_usable(setting, capsys, monkeypatch):
    folder, command = setting
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1200)
    path = folder / "bad.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES.values()) + b"\n")
    assert main([*command, "--images", str(path), "--out", str(folder / "none")]) == 1
    err = capsys.readouterr().err
    assert f"no usable images among {len(BAD_LINES)} listed" in err
    reported = skip_reports(err)
    for number, (_, (_, says)) in enumerate(BAD_LINES.values(), 1):
        assert says in reported[number]
    assert not (folder / "none" / "index.json").exists()


def test_index_images_under_torchrun_agrees_on_the_usable_images(setting, capsys):
    # 7 listed, 2 unusable (lines 2 and 6, found by different ranks of the first pass), 5 rows in 3 shards
    folder, command = setting
    lines = [json.dumps({"image": f"images/{i}.png"}).encode() for i in range(GOOD)]
    lines.insert(1, _image_line("truncated.png"))
    lines.insert(5, _image_line("bomb.png"))
    path = folder / "torchrun.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    arguments = [*command[:-4], "--shard-rows", "2", "--batch-size", "2", "--images", str(path)]
    assert main([*arguments, "--out", str(folder / "one")]) == 0
    one_err = capsys.readouterr().err
    launcher = folder / "launch.py"  # the command in each rank, after registering the tiny model's config
    launcher.write_text(f"import sys\nimport open_clip\nopen_clip.add_model_config({str(folder / 'configs')!r})\n"
                        "from bayesvlm_ext.cli import main\nsys.exit(main(sys.argv[1:]))\n")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(launcher), *arguments, "--out", str(folder / "two")],
                            env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 processes" in result.stdout
    for err in (one_err, result.stderr):
        reported = skip_reports(err)
        assert sorted(reported) == [2, 6] and "truncated" in reported[2] and "DecompressionBomb" in reported[6]
    assert_same_index(open_index(folder / "two"), open_index(folder / "one"))
    assert len(open_index(folder / "one")) == GOOD
