"""The on-disk shape shared by saved models: one safetensors file of tensors beside one JSON configuration.

Loading reads the configuration and the safetensors header first (`read_config`, `read_header`), so a damaged or
inconsistent directory is a ValueError naming the file before any tensor is allocated.
"""

from __future__ import annotations

import json
import os

from torch import Tensor

from ._files import atomic_open, output_directory, output_file, replacing


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
