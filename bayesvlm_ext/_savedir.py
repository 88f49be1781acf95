"""The on-disk shape shared by saved models: one safetensors file of tensors beside one JSON configuration."""

from __future__ import annotations

import json
import os

from torch import Tensor


def write_saved(path: str | os.PathLike, tensors_file: str, tensors: dict[str, Tensor], config_file: str,
                config: dict) -> None:
    """Create `path` and write `tensors` (moved to the CPU) to `path/tensors_file` and `config` to `path/config_file`."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, os.path.join(path, tensors_file))
    with open(os.path.join(path, config_file), "w") as f:
        json.dump(config, f, indent=2)


def saved_files(path: str | os.PathLike, tensors_file: str, config_file: str, owner: str) -> tuple[str, str]:
    """The paths of `path/tensors_file` and `path/config_file`; FileNotFoundError naming `owner` if one is missing."""
    files = os.path.join(path, tensors_file), os.path.join(path, config_file)
    for file in files:
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{owner}: missing file {file}")
    return files
