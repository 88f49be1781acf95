"""fit_factors: streaming both towers' factors over a DataLoader equals kfac_factors on the same pairs,
and a run stopped and resumed from its checkpoint ends with the same factors as an uninterrupted one."""

import pytest
import torch
from testing import tiny_hugging_face_configs, tiny_open_clip

from bayesvlm_ext import kfac_factors
from bayesvlm_ext.capture import capture, find_projection
from bayesvlm_ext.fit import ClassBatchSampler, fit_factors

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def model_and_batches():
    torch.manual_seed(0)
    model = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    g = torch.Generator().manual_seed(3)
    words = ["red", "blue", "disc", "square", "small", "large", "left", "right"]
    batches = []
    for b in range(3):  # 3 loader batches of 4 pairs
        images = torch.randn(4, 3, 224, 224, generator=g)
        captions = [" ".join(words[(b * 4 + i + j) % len(words)] for j in range(3)) for i in range(4)]
        batches.append((images, tokenizer(captions)))
    return model, batches


def test_streamed_factors_equal_kfac_factors_on_the_captured_pairs(model_and_batches):
    model, batches = model_and_batches
    result = fit_factors(model, batches, class_batch_size=5, progress=False)  # class batches straddle loader batches
    captured = {tower: [capture(getattr(model, f"encode_{tower}"), batch[i], find_projection(model, tower))
                        for batch in batches] for i, tower in enumerate(("image", "text"))}
    feats = {t: torch.cat([c.features for c in captured[t]]).double() for t in captured}
    embs = {t: torch.cat([c.embeddings for c in captured[t]]).double() for t in captured}
    log_scale = model.logit_scale.detach().item()
    for tower, other in (("image", "text"), ("text", "image")):
        A, B = kfac_factors(feats[tower], embs[tower], embs[other], "infonce", log_scale, class_batch_size=5)
        torch.testing.assert_close(result[tower].A, A, rtol=1e-12, atol=0)
        torch.testing.assert_close(result[tower].B, B, rtol=1e-12, atol=0)
        assert result[tower].count == 12
        assert result[tower].weight.shape == (B.shape[0], A.shape[0])


def test_stopped_and_resumed_run_equals_an_uninterrupted_one(model_and_batches, tmp_path):
    model, batches = model_and_batches
    whole = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0, progress=False)
    path = tmp_path / "kfac.pt"
    partial = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0, checkpoint=path,
                          checkpoint_every=1, max_batches=2, progress=False)
    assert partial == {} and path.exists()  # stopped: nothing final yet, everything in the checkpoint
    resumed = fit_factors(model, batches, likelihood="siglip", class_batch_size=5, logit_bias=-1.0,
                          checkpoint=path, progress=False)
    for tower in ("image", "text"):
        assert torch.equal(resumed[tower].A, whole[tower].A) and torch.equal(resumed[tower].B, whole[tower].B)
    with pytest.raises(ValueError, match="differs in likelihood"):
        fit_factors(model, batches, likelihood="infonce", class_batch_size=5, logit_bias=-1.0, checkpoint=path,
                    progress=False)


def test_a_checkpoint_resumes_only_the_inputs_it_was_made_from(model_and_batches, tmp_path):
    model, batches = model_and_batches
    options = dict(likelihood="infonce", class_batch_size=5, progress=False)
    data = {"pairs_sha256": "a" * 64, "batch_size": 4}  # what the caller knows and fit_factors cannot see
    path = tmp_path / "kfac.pt"
    whole = fit_factors(model, batches, **options)
    assert fit_factors(model, batches, checkpoint=path, checkpoint_every=1, max_batches=1, fingerprint=data,
                       **options) == {}
    saved = path.read_bytes()

    def refused(message, model=model, batches=batches, **changed):
        with pytest.raises(ValueError, match=message) as raised:
            fit_factors(model, batches, checkpoint=path, **{**options, "fingerprint": data, **changed})
        assert str(path) in str(raised.value)
        assert path.read_bytes() == saved  # a refused checkpoint is left as it was

    refused(r"differs in class_batch_size \(5 in the checkpoint, 4 in this run\)", class_batch_size=4)
    refused(r"differs in likelihood \(\"infonce\" in the checkpoint, \"siglip\" in this run\)", likelihood="siglip")
    refused(r"differs in logit_scale", logit_scale=1.0)
    refused(r"differs in batch_size \(4 in the checkpoint, 8 in this run\)", fingerprint={**data, "batch_size": 8})
    refused(r"differs in pairs_sha256 \(\"aaaaaaaaaaaa\.\.\.\" in the checkpoint, \"bbbbbbbbbbbb\.\.\.\" in this",
            fingerprint={**data, "pairs_sha256": "b" * 64})
    refused(r"differs in loader_batches \(3 in the checkpoint, 2 in this run\)", batches=batches[:2])
    refused(r"differs in batch_size \(4 in the checkpoint, none in this run\); pairs_sha256", fingerprint=None)
    other = open_clip.create_model("ViT-B-32", pretrained=None).eval()  # another draw of the random weights
    refused(r"differs in projections", model=other)
    # the same inputs resume, and end where an uninterrupted run ends
    resumed = fit_factors(model, batches, checkpoint=path, fingerprint=dict(reversed(data.items())), **options)
    for tower in ("image", "text"):
        assert torch.equal(resumed[tower].A, whole[tower].A) and torch.equal(resumed[tower].B, whole[tower].B)


def test_a_damaged_checkpoint_is_a_value_error_naming_it(model_and_batches, tmp_path):
    model, batches = model_and_batches
    path = tmp_path / "kfac.pt"
    assert fit_factors(model, batches, class_batch_size=5, checkpoint=path, max_batches=1, progress=False) == {}
    whole = path.read_bytes()
    for damaged in (whole[:len(whole) // 2], whole[:100], b"", b"not a checkpoint at all"):
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=r"checkpoint .*kfac\.pt: cannot be read, damaged"):
            fit_factors(model, batches, class_batch_size=5, checkpoint=path, progress=False)
    torch.save({"version": 1, "batches_done": 1}, path)  # before checkpoints recorded their inputs
    with pytest.raises(ValueError, match="did not record its inputs"):
        fit_factors(model, batches, class_batch_size=5, checkpoint=path, progress=False)
    torch.save({"version": 2, "batches_done": 1}, path)
    with pytest.raises(ValueError, match="kfac.pt: damaged"):
        fit_factors(model, batches, class_batch_size=5, checkpoint=path, progress=False)


def test_fit_errors(model_and_batches):
    model, batches = model_and_batches
    with pytest.raises(ValueError, match="'class_batch_size'"):
        fit_factors(model, batches, class_batch_size=0, progress=False)
    with pytest.raises(ValueError, match="'sites'"):
        fit_factors(model, batches, sites={"image": find_projection(model, "image")}, progress=False)
    for fingerprint in (["pairs"], {"lambda": float("nan")}, {"tensor": torch.ones(1)}, {1: "a"}):
        with pytest.raises(ValueError, match="'fingerprint'"):
            fit_factors(model, batches, fingerprint=fingerprint, progress=False)


def test_fit_factors_on_a_hugging_face_siglip():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vision, text = tiny_hugging_face_configs()
    model = transformers.SiglipModel(transformers.SiglipConfig(vision_config=vision, text_config=text)).eval()
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(5, 3, 30, 30, generator=g), torch.randint(2, 99, (5, 16), generator=g)) for _ in range(2)]
    result = fit_factors(model, batches, likelihood="siglip", class_batch_size=4, progress=False)
    # The image tower's layer is the head's fc2 with its bias: A has the bias row and column.
    assert result["image"].A.shape == (38, 38) and result["image"].bias is not None
    assert result["text"].A.shape == (33, 33) and result["image"].count == 10
    for tower in ("image", "text"):
        eigenvalues = torch.linalg.eigvalsh(result[tower].B)
        assert eigenvalues.min() >= -1e-10 * eigenvalues.max() and eigenvalues.max() > 0


def test_class_batch_sampler_deals_whole_class_batches():
    n, c, b, world = 23, 5, 2, 3
    shares = [list(ClassBatchSampler(n, c, b, rank, world)) for rank in range(world)]
    for rank, batches in enumerate(shares):
        assert len(batches) == len(ClassBatchSampler(n, c, b, rank, world))
        for batch in batches:
            assert 1 <= len(batch) <= b and len({i // c for i in batch}) == 1  # never straddles a class batch
            assert batch == list(range(batch[0], batch[0] + len(batch)))
            assert batch[0] // c % world == rank
    every = sorted(i for batches in shares for batch in batches for i in batch)
    assert every == list(range(n))
    assert [i for batch in ClassBatchSampler(n, c, b, 0, 1) for i in batch] == list(range(n))
    assert list(ClassBatchSampler(0, c, b, 0, 1)) == []
    with pytest.raises(ValueError, match="'class_batch_size'"):
        ClassBatchSampler(n, 0, b, 0, 1)
    with pytest.raises(ValueError, match="'rank' and 'world_size'"):
        ClassBatchSampler(n, c, b, 2, 2)
    with pytest.raises(ValueError, match="together"):
        ClassBatchSampler(n, c, b, rank=0)


PAIRS, CLASS_BATCH, LOADER_BATCH = 23, 5, 2  # 5 class batches, the last of 3 pairs, in loader batches of <= 2


def generated_pairs():
    g = torch.Generator().manual_seed(11)
    return torch.utils.data.TensorDataset(torch.randn(PAIRS, 3, 32, 32, generator=g),
                                          torch.randint(1, 64, (PAIRS, 8), generator=g))


def _distributed_fit(rank, world, init_file, checkpoint, results):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, dataset = tiny_open_clip(), generated_pairs()
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=ClassBatchSampler(PAIRS, CLASS_BATCH,
                                                                                      LOADER_BATCH))
        options = dict(likelihood="siglip", class_batch_size=CLASS_BATCH, logit_bias=-2.0, progress=False)
        fits = fit_factors(model, loader, **options)
        # Stopped after one loader batch per rank, then resumed from the per-rank checkpoints.
        assert fit_factors(model, loader, checkpoint=checkpoint, checkpoint_every=1, max_batches=1, **options) == {}
        resumed = fit_factors(model, loader, checkpoint=checkpoint, **options)
        try:  # a loader that hands every rank all of the data is refused
            fit_factors(model, torch.utils.data.DataLoader(dataset, batch_size=4), **options)
            refused = None
        except ValueError as error:
            refused = str(error)
        results[rank] = {tower: (fit.A, fit.B, fit.count) for tower, fit in fits.items()}
        results[f"resumed{rank}"] = {tower: (fit.A, fit.B) for tower, fit in resumed.items()}
        results[f"refused{rank}"] = refused
    finally:
        dist.destroy_process_group()


def test_two_process_fit_matches_one_process(tmp_path):
    import torch.multiprocessing as mp

    model, dataset = tiny_open_clip(), generated_pairs()
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=ClassBatchSampler(PAIRS, CLASS_BATCH, LOADER_BATCH))
    single = fit_factors(model, loader, likelihood="siglip", class_batch_size=CLASS_BATCH, logit_bias=-2.0,
                         progress=False)
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_distributed_fit, args=(2, str(tmp_path / "init"), str(tmp_path / "kfac.pt"), results), nprocs=2,
                 join=True)
        results = dict(results)
    assert sorted(p.name for p in tmp_path.glob("kfac.pt.rank*")) == ["kfac.pt.rank0-of-2", "kfac.pt.rank1-of-2"]
    for rank in (0, 1):
        assert "ClassBatchSampler" in results[f"refused{rank}"]
        for tower in ("image", "text"):
            A, B, count = results[rank][tower]
            assert count == PAIRS == single[tower].count
            for mine, theirs in ((A, single[tower].A), (B, single[tower].B)):
                assert ((mine - theirs).norm() / theirs.norm()).item() <= 1e-14
            assert all(torch.equal(x, y) for x, y in zip(results[f"resumed{rank}"][tower], (A, B)))
            assert torch.equal(B, results[0][tower][1])  # every rank holds the same factors
