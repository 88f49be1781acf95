"""The on-disk layout of a retrieval index: file names, the manifest, generation folders (see `bayesvlm_ext.index`)."""

from __future__ import annotations

import json
import os
import re
import secrets
import time

import torch
from torch import Tensor

FORMAT = "bayesvlm_ext.RetrievalIndex"
VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: the files beside index.json, no generation folders
MANIFEST_FILE = "index.json"
LOCK_FILE = ".index.lock"  # serialises the switches of concurrent writers (flock), not their shard writing
GENERATION_PATTERN = re.compile(r"gen-[0-9A-Za-z_-]{1,100}")  # a plain folder name: no separators, no ".."
SHARED_FILE = "shared.safetensors"
IDS_TENSOR_FILE = "ids.safetensors"
IDS_JSON_FILE = "ids.json"
# With `projected`, each shard also holds the "projected" variance's statistics of its items (SPEC.md section 4):
# S u [m, D], 1 / ||mu|| [m] and u^T S u [m], in EmbeddingDistribution.projection's order.
PROJECTION_TENSORS = ("proj_applied", "proj_inv_mu_norm", "proj_r")
DEFAULT_SHARD_ROWS = 65536  # 128 MiB of float32 means at D = 512: large next to one GEMM tile, small next to memory

DTYPE_NAMES = {torch.float32: "float32", torch.float64: "float64"}


def shard_file_name(number: int) -> str:
    return f"shard-{number:05d}.safetensors"


def ann_file_name(number: int) -> str:  # the FAISS index of shard `number` (indexes built with `ann`)
    return f"ann-{number:05d}.faiss"


def new_generation() -> str:
    """A fresh generation folder name, "gen-<nanoseconds since the epoch, 20 digits>-<random hex>".

    The fixed-width time makes the names sort by age (the writer removes the generations older than the one
    it replaces); the random part keeps two writers started in the same nanosecond apart.
    """
    return f"gen-{time.time_ns():020d}-{secrets.token_hex(4)}"


def shard_ranges(rows: int, shard_rows: int) -> list[tuple[int, int]]:
    """[(start, stop)] of each shard: consecutive blocks of `shard_rows` rows, the last one shorter."""
    for name, value, least in (("rows", rows, 1), ("shard_rows", shard_rows, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"argument '{name}' must be an int >= {least}, got {value!r}")
    return [(start, min(start + shard_rows, rows)) for start in range(0, rows, shard_rows)]


def read_manifest(directory: str):
    """The parsed index.json of `directory` (any JSON value: the caller checks it); FileNotFoundError or ValueError."""
    path = os.path.join(directory, MANIFEST_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"index {directory}: missing {MANIFEST_FILE} (not an index, or one still being "
                                "written)") from None
    except IsADirectoryError:
        raise ValueError(f"index {directory}: {MANIFEST_FILE} is a directory, not a file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"index {directory}: {MANIFEST_FILE} is not valid JSON ({error})") from None


def published_generation(directory: str) -> str | None:
    """The generation the index.json of `directory` names: "" for a version 1 index (files beside index.json),
    None when there is no readable index.json."""
    try:
        manifest = read_manifest(directory)
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        return None
    if manifest.get("version") == 1:
        return ""
    generation = manifest.get("generation")
    return generation if isinstance(generation, str) and GENERATION_PATTERN.fullmatch(generation) else None


def first_non_finite_row(values: Tensor | None) -> int | None:  # values: [n, ...] or None
    """The first row of `values` holding Inf or NaN, None when every entry is finite (or `values` is None)."""
    if values is None or values.numel() == 0:
        return None
    bad = ~torch.isfinite(values.reshape(values.shape[0], -1)).all(dim=1)
    return int(bad.nonzero()[0, 0]) if bool(bad.any()) else None
