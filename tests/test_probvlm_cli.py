"""`bayesvlm-ext probvlm-train`, and `index` / `retrieve` with a ProbVLM adapter in place of a posterior."""

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from bayesvlm_ext import (EmbeddingDistribution, KronPosterior, ProbVLM, build_index, open_index, search, topk,
                          train_probvlm)
from bayesvlm_ext.index import save_index
from bayesvlm_ext.probvlm import LossWeights
from bayesvlm_ext.cli import main
from test_probvlm import paired_embeddings
from testing import command_fails

D = 12
LOGIT_SCALE = 2.5


def write_pairs(path, n=120, seed=0, **extra):
    image, text = paired_embeddings(n, D, seed=seed)
    save_file({"image": image, "text": text, **extra}, path)
    return image, text


def train(tmp_path, *extra):
    write_pairs(tmp_path / "pairs.safetensors")
    out = str(tmp_path / "adapter")
    assert main(["probvlm-train", "--embeddings", str(tmp_path / "pairs.safetensors"), "--out", out, "--hidden", "16",
                 "--epochs", "3", "--lr", "3e-3", "--batch-size", "32", "--dropout", "0.2", "--quiet", *extra]) == 0
    return out


def test_train_command_writes_a_loadable_adapter_and_its_history(tmp_path, capsys):
    out = train(tmp_path)
    printed = capsys.readouterr().out
    assert "trained ProbVLM on 120 pairs (D = 12) for 3 epochs" in printed
    history = json.load(open(os.path.join(out, "history.json")))
    assert history["epochs"] == 3 and len(history["val_loss"]) == 3
    assert history["best_val_loss"] == min(history["val_loss"])
    model = ProbVLM.load(out)
    assert model.config["hidden"] == 16 and model.config["dropout"] == 0.2
    # The same run in Python gives the same weights.
    image, text = paired_embeddings(120, D)
    expected, _ = train_probvlm(image, text, hidden=16, epochs=3, lr=3e-3, batch_size=32, dropout=0.2,
                                weights=LossWeights(), progress=False)
    for name, t in expected.state_dict().items():
        assert torch.equal(t, model.state_dict()[name]), name


def test_train_command_refuses_outputs_it_cannot_replace_before_training(tmp_path, capsys):
    write_pairs(tmp_path / "pairs.safetensors")
    out = tmp_path / "adapter"
    (out / "history.json").mkdir(parents=True)  # in the way of a file the command writes after training
    command = ["probvlm-train", "--embeddings", str(tmp_path / "pairs.safetensors"), "--out", str(out), "--hidden",
               "16", "--epochs", "1", "--quiet"]
    command_fails(main, capsys, command, f"--out {out / 'history.json'}: is a directory; give a file name", status=2)
    assert os.listdir(out) == ["history.json"]  # nothing trained, nothing saved
    os.rmdir(out / "history.json")
    os.symlink(tmp_path / "kept.json", out / "history.json")  # a link is written through and stays a link
    assert main(command) == 0
    assert os.path.islink(out / "history.json") and json.load(open(tmp_path / "kept.json"))["epochs"] == 1
    assert sorted(os.listdir(out)) == ["history.json", "probvlm.json", "probvlm.safetensors"]  # no temporary file


def test_train_command_resumes(tmp_path, capsys):
    whole = train(tmp_path)
    pairs = str(tmp_path / "pairs.safetensors")
    resumed = str(tmp_path / "resumed")
    common = ["probvlm-train", "--embeddings", pairs, "--out", resumed, "--hidden", "16", "--lr", "3e-3",
              "--batch-size", "32", "--dropout", "0.2", "--quiet", "--resume"]
    assert main([*common, "--epochs", "2"]) == 0
    assert os.path.isfile(os.path.join(resumed, "checkpoint.pt"))
    assert main([*common, "--epochs", "3"]) == 0
    capsys.readouterr()
    a, b = ProbVLM.load(whole), ProbVLM.load(resumed)
    assert a.image.fingerprint() == b.image.fingerprint() and a.text.fingerprint() == b.text.fingerprint()
    assert main([*common, "--epochs", "3", "--lr", "1e-3"]) == 1
    assert "other settings or data (differs in lr)" in capsys.readouterr().err


def test_train_command_fails_cleanly_on_embeddings_it_cannot_train_on(tmp_path, capsys):
    # Finite or fail (issue 15): embeddings of 1e20 saved an adapter of NaN weights with exit 0.
    image, text = paired_embeddings(120, D)
    save_file({"image": image * 1e20, "text": text * 1e20}, tmp_path / "huge.safetensors")
    out = tmp_path / "adapter"
    command = ["probvlm-train", "--embeddings", str(tmp_path / "huge.safetensors"), "--out", str(out), "--hidden", "16",
               "--epochs", "2", "--quiet"]
    command_fails(main, capsys, command, "error: train_probvlm: training diverged: the training loss of epoch 0")
    assert not out.exists() or os.listdir(out) == []  # no adapter, no history: nothing half-trained
    # NaN or Inf rows are refused before training, naming the file, the tensor and the rows.
    text = text.clone()
    text[7, 1] = float("nan")
    save_file({"image": image, "text": text}, tmp_path / "nan.safetensors")
    command[2] = str(tmp_path / "nan.safetensors")
    command_fails(main, capsys, command, f"error: --embeddings {tmp_path / 'nan.safetensors'}: argument 'text' "
                                         "contains NaN or Inf in row 7")
    assert not out.exists() or os.listdir(out) == []


@pytest.mark.parametrize("uncertainty,mean,score", [("total", "input", "probit"), ("epistemic", "adapter", "mean"),
                                                    ("aleatoric", "input", "pessimistic")])
def test_index_and_retrieve_with_an_adapter_equal_topk(uncertainty, mean, score, tmp_path, capsys):
    out = train(tmp_path)
    gallery, queries = paired_embeddings(30, D, seed=3)[0], paired_embeddings(7, D, seed=4)[1]
    save_file({"features": gallery, "ids": torch.arange(100, 130)}, tmp_path / "gallery.safetensors")
    save_file({"features": queries}, tmp_path / "queries.safetensors")
    assert main(["index", "--adapter", out, "--tower", "image", "--features", str(tmp_path / "gallery.safetensors"),
                 "--out", str(tmp_path / "index"), "--logit-scale", str(LOGIT_SCALE), "--uncertainty", uncertainty,
                 "--mc-samples", "5", "--mc-seed", "3", "--mean", mean, "--quiet"]) == 0
    assert "indexed 30 image items (diag form, D = 12" in capsys.readouterr().out
    index = open_index(tmp_path / "index")
    assert index.posteriors["gallery"]["method"] == "probvlm"
    assert index.posteriors["gallery"]["uncertainty"] == index.posteriors["query"]["uncertainty"] == uncertainty
    assert main(["retrieve", "--index", str(tmp_path / "index"), "--adapter", out, "--queries",
                 str(tmp_path / "queries.safetensors"), "--k", "4", "--score", score, "--out",
                 str(tmp_path / "results.jsonl"), "--quiet"]) == 0
    model = ProbVLM.load(out)
    options = dict(uncertainty=uncertainty, num_samples=5, seed=3, mean=mean)
    q, g = model.text.embed(queries, **options), model.image.embed(gallery, **options)
    values, indices, m, v = topk(q, g, 4, score, logit_scale=LOGIT_SCALE)
    lines = [json.loads(line) for line in open(tmp_path / "results.jsonl")]
    assert len(lines) == 7
    for i, line in enumerate(lines):
        assert line["ids"] == (indices[i] + 100).tolist()
        assert line["scores"] == values[i].tolist() and line["mean"] == m[i].tolist()
        assert line["variance"] == v[i].tolist()


def test_an_adapter_index_in_shards_matches_one_embedding(tmp_path, capsys):
    out = train(tmp_path)
    gallery = paired_embeddings(23, D, seed=3)[0]
    save_file({"features": gallery}, tmp_path / "gallery.safetensors")
    assert main(["index", "--adapter", out, "--tower", "text", "--features", str(tmp_path / "gallery.safetensors"),
                 "--out", str(tmp_path / "index"), "--logit-scale", str(LOGIT_SCALE), "--shard-rows", "5",
                 "--batch-size", "3", "--quiet"]) == 0
    capsys.readouterr()
    index = open_index(tmp_path / "index")
    model = ProbVLM.load(out)
    whole = model.text.embed(gallery)  # shared dropout masks: the rows do not depend on the batches
    stored = torch.cat([index.shard(n).variances for n in range(len(index.shards))])
    torch.testing.assert_close(stored, whole.variances, rtol=1e-6, atol=0)
    queries = model.image.embed(paired_embeddings(4, D, seed=8)[1])
    values, rows, _, _ = search(index, queries, 6, "probit")
    expected, indices, _, _ = topk(queries, whole, 6, "probit", logit_scale=LOGIT_SCALE)
    torch.testing.assert_close(values, expected, rtol=1e-6, atol=0)


def test_adapter_command_errors(tmp_path, capsys):
    out = train(tmp_path)
    other = str(tmp_path / "other")
    write_pairs(tmp_path / "other.safetensors", seed=1)
    assert main(["probvlm-train", "--embeddings", str(tmp_path / "other.safetensors"), "--out", other, "--hidden",
                 "16", "--epochs", "1", "--quiet"]) == 0
    save_file({"features": torch.randn(10, D)}, tmp_path / "gallery.safetensors")
    save_file({"features": torch.randn(10, D - 1)}, tmp_path / "narrow.safetensors")
    save_file({"features": torch.randn(3, D), "residual": torch.randn(3, D)}, tmp_path / "residual.safetensors")
    capsys.readouterr()

    def fails(argv, message, status=1):
        command_fails(main, capsys, argv, message, status)

    index = str(tmp_path / "index")
    base = ["index", "--adapter", out, "--tower", "image", "--out", index, "--logit-scale", "1", "--quiet"]
    fails([*base, "--features", str(tmp_path / "narrow.safetensors")], "the features are [N, 11] but the image "
          "adapter")
    fails([*base, "--features", str(tmp_path / "residual.safetensors")], "a ProbVLM adapter does not use")
    fails([*base, "--images", str(tmp_path), "--model", "ViT-B-32"], "with --adapter give --features")
    fails([*base, "--features", str(tmp_path / "gallery.safetensors"), "--mc-samples", "1"], "--mc-samples", status=2)
    fails([*base[:2], str(tmp_path / "absent"), *base[3:], "--features", str(tmp_path / "gallery.safetensors")],
          "--adapter", status=2)
    fails(["index", "--adapter", str(tmp_path), "--tower", "image", "--out", index, "--features",
           str(tmp_path / "gallery.safetensors")], "missing file")
    fails(["index", "--posterior", out, "--tower", "image", "--out", index, "--features",
           str(tmp_path / "gallery.safetensors"), "--mc-seed", "3"], "--mc-seed apply to --adapter only", status=2)
    fails(["index", "--adapter", out, "--posterior", out, "--tower", "image", "--out", index, "--features",
           str(tmp_path / "gallery.safetensors")], "not allowed with argument", status=2)
    assert main([*base, "--features", str(tmp_path / "gallery.safetensors")]) == 0
    capsys.readouterr()

    retrieve = ["retrieve", "--index", index, "--queries", str(tmp_path / "gallery.safetensors"), "--out",
                str(tmp_path / "out.jsonl"), "--k", "2", "--quiet"]
    fails([*retrieve, "--adapter", other], "built with another gallery adapter")
    fails([*retrieve, "--posterior", out], "was built with a ProbVLM adapter; give it with --adapter")
    fails([*retrieve[:3], "--queries", str(tmp_path / "narrow.safetensors"), *retrieve[5:], "--adapter", out],
          "the features are [N, 11] but the text adapter in")
    plain = str(tmp_path / "plain")  # an index of embeddings from Python: no adapter recorded
    save_index(plain, EmbeddingDistribution.diagonal(torch.randn(5, D), torch.ones(5, D)), tower="image",
               logit_scale=1.0)
    fails([*retrieve[:2], plain, *retrieve[3:], "--adapter", out], "was not built with a ProbVLM adapter; give it "
          "with --posterior")
    assert not (tmp_path / "out.jsonl").exists()

    pairs = str(tmp_path / "pairs.safetensors")
    train_base = ["probvlm-train", "--out", str(tmp_path / "bad"), "--quiet"]
    save_file({"image": torch.randn(4, D)}, tmp_path / "half.safetensors")
    fails([*train_base, "--embeddings", str(tmp_path / "half.safetensors")], "needs tensors 'image' and 'text'")
    save_file({"image": torch.randn(4, D), "text": torch.randn(5, D)}, tmp_path / "unpaired.safetensors")
    fails([*train_base, "--embeddings", str(tmp_path / "unpaired.safetensors")], "must have one shape")
    save_file({"image": torch.randn(4, D), "text": torch.randn(4, D), "val_image": torch.randn(2, D)},
              tmp_path / "half_val.safetensors")
    fails([*train_base, "--embeddings", str(tmp_path / "half_val.safetensors")], "go together")
    save_file({"image": torch.randn(1, D), "text": torch.randn(1, D)}, tmp_path / "one.safetensors")
    fails([*train_base, "--embeddings", str(tmp_path / "one.safetensors")], "too few to hold out")
    fails([*train_base, "--embeddings", pairs, "--val-fraction", "1.5"], "--val-fraction", status=2)
    fails([*train_base, "--embeddings", pairs, "--dropout", "1"], "--dropout", status=2)
    fails([*train_base, "--embeddings", str(tmp_path / "absent.safetensors")], "--embeddings", status=2)


def test_build_index_with_adapters_in_python(tmp_path):
    model, _ = train_probvlm(*paired_embeddings(60, D), hidden=8, epochs=1, progress=False)
    gallery = paired_embeddings(11, D, seed=2)[0]
    options = {"uncertainty": "epistemic", "num_samples": 4, "seed": 7}
    index = build_index(tmp_path / "built", model.image, gallery, model.text, embed_options=options, shard_rows=4,
                        tower="image", logit_scale=LOGIT_SCALE)
    expected = model.image.embed(gallery, **options)
    stored = torch.cat([index.shard(n).variances for n in range(len(index.shards))])
    torch.testing.assert_close(stored, expected.variances, rtol=1e-6, atol=0)
    assert torch.equal(torch.cat([index.shard(n).mean for n in range(len(index.shards))]), gallery)
    assert index.posteriors["gallery"] == {"method": "probvlm", **model.image.config, "fingerprint":
                                           model.image.fingerprint(), "uncertainty": "epistemic", "num_samples": 4,
                                           "seed": 7, "mean": "input"}
    with pytest.raises(ValueError, match="takes uncertainty, num_samples, seed and mean"):
        build_index(tmp_path / "bad", model.image, gallery, embed_options={"samples": 4})
    with pytest.raises(ValueError, match="'embed_options\\['uncertainty'\\]' must be one of"):
        build_index(tmp_path / "bad", model.image, gallery, embed_options={"uncertainty": "all"})
    with pytest.raises(ValueError, match="'residual' has no meaning for a ProbVLM adapter"):
        build_index(tmp_path / "bad", model.image, gallery, residual=gallery)
    posterior = KronPosterior(torch.eye(3), torch.eye(D), torch.zeros(D, 3))
    with pytest.raises(ValueError, match="'query_posterior' must be a ProbVLMAdapter"):
        build_index(tmp_path / "bad", model.image, gallery, posterior)
    with pytest.raises(ValueError, match="'embed_options' is for ProbVLM adapters"):
        build_index(tmp_path / "bad", posterior, torch.zeros(2, 3), embed_options=options)
    with pytest.raises(ValueError, match="must be a KronPosterior or a ProbVLMAdapter"):
        build_index(tmp_path / "bad", "posterior", gallery)
