"""Command line: `bayesvlm-ext fit`, `classify`, `index`, `retrieve`, `probvlm-train` (or `python -m bayesvlm_ext`).

One module per command (fit, classify, index, retrieve, probvlm_train: each `add_parser` and `run`), the input readers
they share (inputs), the torchrun helpers (distributed) and the common checks (common).

    bayesvlm-ext fit --model ViT-B-32 --pretrained CHECKPOINT.pt --pairs PAIRS.jsonl --out DIR
    bayesvlm-ext classify --model ViT-B-32 --pretrained CHECKPOINT.pt --posterior DIR --images FOLDER \
        --classes cat,dog --out PREDICTIONS.jsonl
    bayesvlm-ext index --posterior DIR --tower image --features GALLERY.safetensors --out INDEX
    bayesvlm-ext retrieve --index INDEX --posterior DIR --queries QUERIES.safetensors --k 10 --out RESULTS.jsonl
    bayesvlm-ext probvlm-train --embeddings PAIRS.safetensors --out ADAPTER
    bayesvlm-ext index --adapter ADAPTER --tower image --features EMBEDDINGS.safetensors --out INDEX

PAIRS.jsonl holds one JSON object per line, {"image": PATH, "caption": TEXT}; relative image paths
are read from the JSONL's folder. A line that is not UTF-8 or not such an object (an image that is a
number or null), an empty caption, a missing image, or an image that fails to decode (truncated, over
Pillow's decompression-bomb limit Image.MAX_IMAGE_PIXELS) or to preprocess is counted in summary.json's
"skipped", reported on stderr as "line N: ...; skipped", and skipped; the run fails only when nothing is
left. `--resume` checkpoints to DIR/checkpoint.pt and resumes only from a checkpoint made from the same
pairs file (its sha256 and usable lines), model (name, --pretrained, --precision, --seed, a digest of its
weights), likelihood, --class-batch-size and --batch-size; any other is refused, naming what differs.
DIR receives what `BayesVLM.save` writes, `BayesVLM.load(DIR, model)` reads: `posterior_image/` and
`posterior_text/` (KronPosterior.save, tuned prior precision), `bayesvlm/`, the published factor format
of SPEC.md section 10, and `bayesvlm.json`; beside them `summary.json`. Without --pretrained the
model is random-initialised (for tests; its factors mean nothing).

Under `torchrun --nproc-per-node K` (gloo on CPU, nccl with --device cuda: rank r uses cuda:LOCAL_RANK)
rank r loads and scores the class batches r, r + K, ... and the sums are all-reduced; rank 0 writes
DIR. When every image is readable the factors equal the one-process run's up to float64 summation
order; an unreadable image shortens its rank's stream, which then groups its class batches differently.

`index` embeds a gallery with one tower's posterior (DIR as written by `fit`; the other tower is the
query side) into memory-mapped safetensors shards (bayesvlm_ext.index); `retrieve` streams queries
through it and writes one JSON line per query: {"query", "ids", "scores", "mean", "variance"}. Under
torchrun both deal out whole shards in contiguous blocks (rank r: shards [S r / K, S (r + 1) / K));
`retrieve` gathers each rank's top-k on rank 0 and merges them (retrieval.merge_topk). Shard bytes and
result lines are then identical to one process at the same thread settings (torchrun sets
OMP_NUM_THREADS=1; BLAS may round differently with other thread counts).

`probvlm-train` trains the ProbVLM adapters (bayesvlm_ext.probvlm, SPEC.md section 9) on a safetensors
file of paired embeddings "image" and "text" [N, D] and writes ADAPTER (ProbVLM.save, history.json).
`index` and `retrieve` take `--adapter ADAPTER` in place of `--posterior DIR`: the features are then the
embeddings themselves [N, D], embedded as diagonal Gaussians with the options `index` records.

Outputs are checked before any work (a directory where a file goes, a device, FIFO or socket: exit 2,
naming --out), written beside their target and renamed over it (bayesvlm_ext._files; a symlink is
written through and stays a link), so a failed or interrupted run leaves the old file and no temporary
one. `index` over an existing INDEX builds a new generation and switches index.json over only when it
is complete: a failure (say, a non-finite feature, named by its row) keeps the old index serving, and
`retrieve` searches one generation even while a rewrite runs (bayesvlm_ext.index).
"""

from __future__ import annotations

import argparse

from . import classify, fit, index, probvlm_train, retrieve

COMMANDS = {"fit": fit, "classify": classify, "index": index, "retrieve": retrieve, "probvlm-train": probvlm_train}


def build_parser() -> argparse.ArgumentParser:
    return _parsers()[0]


def main(argv: list[str] | None = None) -> int:
    parser, command_parsers = _parsers()
    args = parser.parse_args(argv)
    return COMMANDS[args.command].run(args, command_parsers[args.command])  # errors name the command's options


def _parsers() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    parser = argparse.ArgumentParser(prog="bayesvlm-ext", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    return parser, {name: module.add_parser(commands) for name, module in COMMANDS.items()}
