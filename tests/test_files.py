"""Output files (bayesvlm_ext._files, storage.write_saved): written beside the target and renamed over it;
symlinks written through; directories, devices and FIFOs refused before any work; no temporary file left."""

import json
import os
import stat

import pytest
import torch

from bayesvlm_ext import KronPosterior
from bayesvlm_ext._files import atomic_open, output_directory, output_file, replacing, write_json
from testing import spd


def listing(folder):
    return sorted(os.listdir(folder))


def test_a_symlink_is_written_through_and_stays_a_link(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "results.json"
    target.write_text("old")
    os.symlink(target, tmp_path / "middle.json")
    os.symlink(tmp_path / "middle.json", tmp_path / "link.json")  # a chain of links
    write_json(tmp_path / "link.json", {"a": 1}, "--out")
    assert os.path.islink(tmp_path / "link.json") and os.path.islink(tmp_path / "middle.json")
    assert json.loads(target.read_text()) == {"a": 1}
    assert listing(tmp_path / "real") == ["results.json"]  # the temporary file sat beside the real target
    # a dangling link: its target is created
    os.symlink(tmp_path / "real" / "new.json", tmp_path / "dangling.json")
    write_json(tmp_path / "dangling.json", [1], "--out")
    assert os.path.islink(tmp_path / "dangling.json")
    assert json.loads((tmp_path / "real" / "new.json").read_text()) == [1]


def test_a_directory_target_is_refused_naming_the_option(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="--out .*folder: is a directory; give a file name"):
        write_json(tmp_path / "folder", {}, "--out")
    with pytest.raises(ValueError, match="--out .*: names a directory; give a file name"):
        output_file(f"{tmp_path}/not-yet/", "--out")  # a trailing separator: never a file named like the folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="--out .*file: exists and is not a directory"):
        output_directory(tmp_path / "file", "--out")
    with pytest.raises(ValueError, match="--out .*: .*file is not a directory"):
        output_file(tmp_path / "file" / "inside.json", "--out", create=False)
    with pytest.raises(ValueError, match="--out: the output path is empty"):
        output_file("", "--out")
    assert listing(tmp_path) == ["file", "folder"] and listing(tmp_path / "folder") == []


def test_a_fifo_or_device_target_is_refused_before_any_work(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)  # not a regular file, like a device node (which only root can make)
    ran = []
    with pytest.raises(ValueError, match="--out .*pipe: is not a regular file \\(a device, FIFO or socket\\)"):
        with replacing(fifo, "--out"):
            ran.append(True)
    with pytest.raises(ValueError, match="is not a regular file"):
        with atomic_open(fifo, "w", "--out") as f:
            ran.append(f)
    with pytest.raises(ValueError, match="is not a regular file"):
        output_file(fifo, "--out", create=False)
    assert ran == [] and stat.S_ISFIFO(os.lstat(fifo).st_mode) and listing(tmp_path) == ["pipe"]
    if os.path.exists("/dev/null"):  # a character device, through a symlink too
        os.symlink("/dev/null", tmp_path / "null")
        with pytest.raises(ValueError, match="is not a regular file"):
            write_json(tmp_path / "null", {}, "--out")
        assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


@pytest.mark.parametrize("failure", [RuntimeError, KeyboardInterrupt])
def test_a_failure_leaves_the_old_file_and_no_temporary_file(tmp_path, failure):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(failure):
        with atomic_open(target, "w", "--out") as f:
            f.write("half a result")
            f.flush()
            raise failure()
    assert target.read_text() == "old\n" and listing(tmp_path) == ["out.jsonl"]
    with pytest.raises(TypeError):  # a value JSON cannot hold: serialised first, so the file is never touched
        write_json(target, {"x": object()}, "--out")
    assert target.read_text() == "old\n" and listing(tmp_path) == ["out.jsonl"]
    # a folder that is created on the way is fine; the new file appears only whole
    with replacing(tmp_path / "a" / "b.bin", "--out") as temporary:
        assert os.path.dirname(temporary) == str(tmp_path / "a") and not (tmp_path / "a" / "b.bin").exists()
        with open(temporary, "wb") as f:
            f.write(b"whole")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"whole" and listing(tmp_path / "a") == ["b.bin"]


def test_permissions_of_a_replaced_file_are_kept_and_a_new_file_follows_the_umask(tmp_path):
    target = tmp_path / "kept.json"
    target.write_text("{}")
    os.chmod(target, 0o604)
    write_json(target, [1], "--out")
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o604
    umask = os.umask(0o027)
    try:
        write_json(tmp_path / "new.json", [2], "--out")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o640  # 0o666 less the umask, as open() gives


def test_checking_without_create_makes_nothing(tmp_path):
    assert output_file(tmp_path / "x" / "y" / "out.json", "--out", create=False) == str(tmp_path / "x" / "y" /
                                                                                      "out.json")
    assert output_directory(tmp_path / "d" / "e", "--out", create=False) == str(tmp_path / "d" / "e")
    assert listing(tmp_path) == []


def kron_posterior(generator):
    return KronPosterior(spd(3, generator), spd(2, generator), torch.randn(2, 3, generator=generator,
                                                                         dtype=torch.float64), prior_precision=0.5)


def test_write_saved_replaces_each_file_atomically_config_last(generator, tmp_path, monkeypatch):
    import safetensors.torch

    old = kron_posterior(generator)
    old.save(tmp_path / "posterior")
    before = {name: (tmp_path / "posterior" / name).read_bytes() for name in listing(tmp_path / "posterior")}
    renamed = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renamed.append(os.path.basename(b)), real_replace(a, b)))
    new = kron_posterior(generator)
    new.save(tmp_path / "posterior")
    assert renamed == ["posterior.safetensors", "posterior.json"]  # the configuration, which load reads first, last
    assert torch.equal(KronPosterior.load(tmp_path / "posterior").A, new.A)

    # A write that dies half-way (a full disk) leaves the previous pair whole and no temporary file.
    new.save(tmp_path / "posterior")
    saved = {name: (tmp_path / "posterior" / name).read_bytes() for name in listing(tmp_path / "posterior")}
    assert saved != before

    def torn_save_file(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", torn_save_file)
    with pytest.raises(OSError, match="No space left"):
        old.save(tmp_path / "posterior")
    assert {name: (tmp_path / "posterior" / name).read_bytes() for name in listing(tmp_path / "posterior")} == saved


def test_write_saved_refuses_a_directory_in_place_of_a_file_before_writing(generator, tmp_path):
    (tmp_path / "posterior" / "posterior.json").mkdir(parents=True)
    with pytest.raises(ValueError, match="argument 'path' .*posterior.json: is a directory"):
        kron_posterior(generator).save(tmp_path / "posterior")
    assert listing(tmp_path / "posterior") == ["posterior.json"]  # the tensors were not written either
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="argument 'path' .*file: exists and is not a directory"):
        kron_posterior(generator).save(tmp_path / "file")
