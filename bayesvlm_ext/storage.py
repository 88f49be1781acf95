"""Everything the package reads or writes in safetensors: memory-mapped shards and saved objects.

- `MappedSafetensors` / `open_safetensors`: a file whose header is parsed here and whose tensors are views of one
  mmap of it (the index's shards and the commands' feature files: a gallery larger than memory is searched
  in place); `save_aligned` writes such a file with every tensor at a 64-byte boundary.
- `write_saved` / `saved_files` / `read_config` / `read_header` / `read_tensors`: the on-disk shape of saved
  objects (KronPosterior, ProbVLM): one safetensors file beside one JSON configuration. Loading reads the
  configuration and the header first, so a damaged or inconsistent directory is a ValueError naming the file
  before any tensor is allocated.
Every write goes through bayesvlm_ext._files: aside, then renamed over the target.
"""

from __future__ import annotations

import json
import math
import os

import torch
from torch import Tensor

from ._files import atomic_open, output_directory, output_file, replacing

__all__ = ["MappedSafetensors", "open_safetensors", "save_aligned", "write_saved", "saved_files", "read_config",
           "read_header", "read_tensors"]

_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}

_SAFETENSORS_NAMES = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}

_ALIGNMENT = 64  # bytes, as PyTorch's CPU allocator aligns

_MAX_HEADER = 100 * 2**20  # a safetensors header larger than this is a corrupt file, not a real one


class MappedSafetensors:
    """A safetensors file whose header is parsed here and whose tensors are views of one mmap of the file.

    safetensors' own loaders copy tensors into memory; this maps the file (torch.from_file, MAP_PRIVATE)
    and returns views, so the data stay in the page cache and are read on first touch.
    """

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"missing file {path}")
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
            if not 0 < length <= min(self.size - 8, _MAX_HEADER):
                raise ValueError(f"{path} is not a safetensors file (bad header length)")
            try:
                header = json.loads(f.read(length))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise ValueError(f"{path} is not a safetensors file (header is not JSON)") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path} is not a safetensors file (header is not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        column_major = metadata.get("column_major", "") if isinstance(metadata, dict) else ""
        self.column_major = set(column_major.split(",")) if isinstance(column_major, str) and column_major else set()
        self.data_start, self.entries, self._bytes = 8 + length, {}, None
        for name, entry in header.items():
            try:
                dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
                shape = tuple(int(s) for s in entry["shape"])
                begin, end = (int(o) for o in entry["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: header entry {name!r} is corrupt or of an unsupported dtype") from None
            itemsize = torch.empty((), dtype=dtype).element_size()
            if (min(shape, default=0) < 0 or end - begin != math.prod(shape) * itemsize or begin < 0
                    or self.data_start + end > self.size):
                raise ValueError(f"{path}: tensor {name!r} does not fit the file (shape {shape}, bytes "
                                 f"[{begin}, {end}))")
            if (self.data_start + begin) % itemsize:
                raise ValueError(f"{path}: tensor {name!r} is not aligned to its {itemsize}-byte elements; cannot be "
                                 "memory-mapped")
            if name in self.column_major:
                if len(shape) != 2:
                    raise ValueError(f"{path}: tensor {name!r} is listed as column-major but is not 2-D")
                shape = shape[::-1]  # the stored data is the transpose
            self.entries[name] = (dtype, shape, begin, end)

    def expect(self, name: str, dtype: torch.dtype, shape: tuple) -> None:
        if name not in self.entries:
            raise ValueError(f"{self.path} lacks the tensor {name!r}")
        found_dtype, found_shape = self.entries[name][:2]
        if found_dtype != dtype or found_shape != tuple(shape):
            raise ValueError(f"{self.path}: tensor {name!r} must be {dtype} of shape {tuple(shape)}, got {found_dtype} "
                             f"of shape {found_shape}")

    def tensor(self, name: str) -> Tensor:
        """A view of the mapped file (no copy). Treat it as read-only: writes stay private to this process."""
        dtype, shape, begin, end = self.entries[name]
        if name in self.column_major:
            return self._view(dtype, shape[::-1], begin, end).T
        return self._view(dtype, shape, begin, end)

    def map(self) -> None:
        """Maps the file now (else on the first `tensor`): the mapping keeps these bytes readable even after the
        file is unlinked or renamed over (a rewritten index), as long as this object lives."""
        if self._bytes is None:
            try:
                self._bytes = torch.from_file(self.path, shared=False, size=self.size, dtype=torch.uint8)
            except RuntimeError:
                if not os.path.isfile(self.path):  # removed since the header was read: let callers retry
                    raise FileNotFoundError(f"missing file {self.path}") from None
                raise

    def _view(self, dtype: torch.dtype, shape: tuple, begin: int, end: int) -> Tensor:
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        self.map()
        offset = self.data_start + begin
        return self._bytes[offset:offset + end - begin].view(dtype).view(shape)


def open_safetensors(path: str | os.PathLike) -> MappedSafetensors:
    """A memory-mapped reader of one safetensors file: `.entries` (name -> dtype, shape, ...), `.tensor(name)`."""
    return MappedSafetensors(os.fspath(path))


def save_aligned(tensors: dict[str, Tensor], path: str) -> None:
    """Writes a safetensors file whose tensors start at multiples of 64 bytes, via a temporary name and an
    atomic rename (readers see a whole file or none).

    The alignment is that of PyTorch's own allocations: BLAS kernels may round differently for
    differently aligned operands, and a mapped shard should score exactly like the same tensor in
    memory. safetensors forbids holes in the data, so gaps are filled by uint8 tensors "__pad<i>__".
    A [D, D] tensor stored transposed (it was column-major, as torch.linalg.eigh returns bases) is
    listed in the metadata "column_major" and comes back with the same strides.
    """
    entries, blobs, offset, column_major = {}, [], 0, []
    for name, t in tensors.items():
        t = t.detach().cpu()
        if t.dim() == 2 and not t.is_contiguous() and t.T.is_contiguous():
            t, column_major = t.T, column_major + [name]
        t = t.contiguous()
        if offset % _ALIGNMENT:
            gap = _ALIGNMENT - offset % _ALIGNMENT
            entries[f"__pad{len(blobs)}__"] = {"dtype": "U8", "shape": [gap], "data_offsets": [offset, offset + gap]}
            blobs.append(bytes(gap))
            offset += gap
        nbytes = t.numel() * t.element_size()
        entries[name] = {"dtype": _SAFETENSORS_NAMES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + nbytes]}
        blobs.append(t.reshape(-1).view(torch.uint8).numpy() if nbytes else b"")
        offset += nbytes
    entries["__metadata__"] = {"format": "pt", "column_major": ",".join(column_major)}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % _ALIGNMENT)  # spaces are allowed after the JSON header
    with replacing(path, "index file") as temporary:  # flushed to disk, renamed; removed on any failure
        with open(temporary, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for blob in blobs:
                f.write(blob)


# ---- saved objects: one safetensors file beside one JSON configuration ----------------------------------

def write_saved(path: str | os.PathLike, tensors_file: str, tensors: dict[str, Tensor], config_file: str,
                config: dict) -> None:
    """Create `path` and write `tensors` (moved to the CPU) to `path/tensors_file` and `config` to `path/config_file`.

    Each file is replaced atomically (bayesvlm_ext._files), the configuration last: both are written to
    temporary files first, so a failure while writing leaves the old pair (and no temporary file); only a
    kill between the two renames can leave new tensors beside the old configuration. The targets are checked
    (ValueError for a directory, device or FIFO; symlinks written through) before anything is written.
    """
    from safetensors.torch import save_file

    option = "argument 'path'"
    folder = output_directory(path, option)
    tensors_path = output_file(os.path.join(folder, tensors_file), option)
    config_path = output_file(os.path.join(folder, config_file), option)
    config_text = json.dumps(config, indent=2)  # a value JSON cannot hold fails here, before any file is touched
    with atomic_open(config_path, "w", option) as config_out:  # renamed when this block ends: after the tensors
        config_out.write(config_text)
        with replacing(tensors_path, option) as temporary:
            save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, temporary)


def saved_files(path: str | os.PathLike, tensors_file: str, config_file: str, owner: str) -> tuple[str, str]:
    """The paths of `path/tensors_file` and `path/config_file`; FileNotFoundError naming `owner` if one is missing."""
    files = os.path.join(path, tensors_file), os.path.join(path, config_file)
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{owner}: missing file {file}")
    return files


# safetensors' names of the floating dtypes a saved model may hold.
FLOAT_DTYPE_NAMES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}


def read_config(config_file: str, owner: str) -> dict:
    """The JSON object in `config_file`; ValueError naming `owner` and the file when it is not one
    (truncated, not UTF-8, a list)."""
    try:
        with open(config_file, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as error:  # json.JSONDecodeError and UnicodeDecodeError: the file is damaged
        raise ValueError(f"{owner}: {config_file} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{owner}: {config_file} must hold a JSON object, got {type(config).__name__}")
    return config


def read_header(tensors_file: str, owner: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype name, shape) of every tensor in `tensors_file`, from its header alone.

    Nothing is allocated, so a loader can check the shapes against its configuration first. ValueError
    naming the file when it is damaged (truncated, a bad header) or holds a dtype other than F16, BF16,
    F32 or F64.
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(tensors_file, framework="pt") as f:
            slices = {name: f.get_slice(name) for name in f.keys()}
            header = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
    except (SafetensorError, OSError) as error:  # safetensors checks that the header covers the whole file
        raise ValueError(f"{owner}: {tensors_file} is not a readable safetensors file ({error})") from None
    for name, (dtype, _) in header.items():
        if dtype not in FLOAT_DTYPE_NAMES:
            raise ValueError(f"{owner}: {tensors_file} holds '{name}' as {dtype}; expected a floating dtype "
                             f"({', '.join(FLOAT_DTYPE_NAMES)})")
    return header


def read_tensors(tensors_file: str, device: str, owner: str) -> dict[str, Tensor]:
    """Every tensor of `tensors_file` on `device`; ValueError naming the file when it cannot be read."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(tensors_file, device=device)
    except (SafetensorError, OSError) as error:
        raise ValueError(f"{owner}: {tensors_file} is not a readable safetensors file ({error})") from None
