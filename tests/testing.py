"""Shared test parameters: devices and dtypes, built once (a machine without a GPU runs fewer cases)."""

import contextlib
import os
import subprocess
import sys

import pytest
import torch

import bayesvlm_ext

# BAYESVLM_TEST_DEVICES=cpu,cuda names the devices whatever is visible: for `pytest --collect-only -k cuda` of
# the CUDA cases on a machine without a GPU (tools/gpu_check.sh --dry-run); running those there fails.
_named_devices = os.environ.get("BAYESVLM_TEST_DEVICES", "").strip()
devices = ([torch.device(name) for name in _named_devices.split(",") if name.strip()] if _named_devices else
           [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else []))
dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# Relative error budget per input dtype for ops that read that dtype and accumulate in float32
# (float64 for float64): at most about twice PyTorch's own error at that precision.
def error_budget(dtype: torch.dtype) -> float:
    return {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 2e-5, torch.float64: 1e-12}[dtype]


def spd(n: int, generator: torch.Generator, *, rank: int | None = None, dtype=torch.float64) -> torch.Tensor:
    """A random symmetric PSD matrix X^T X / rows with a spread spectrum (rank-deficient when rank < n)."""
    rows = n + 3 if rank is None else rank
    x = torch.randn(rows, n, generator=generator, dtype=torch.float64)
    x = x * torch.logspace(0, -1.5, n, dtype=torch.float64)[None, :]
    return (x.T @ x / rows).to(dtype)


# ---- the compiled ops' tests: shared inputs and float64 oracles ---------------------------------------
needs_extension = pytest.mark.skipif(not bayesvlm_ext.has_extension(), reason="compiled extension not built")
SCALE, BIAS, TRACE_CROSS = 100.0, -2.5, 0.3


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def budget(dtype):
    """Inputs are read exactly and accumulated in float32 (float64): the budget of that precision."""
    return error_budget(acc_dtype(dtype))


def strided(t: torch.Tensor, transpose: bool) -> torch.Tensor:
    return t.T.contiguous().T if transpose else t  # same values, column-major storage


def pair_data(n, m, d, dtype, device, generator, with_var=False, var_width=None, transpose=False):
    """Means in `dtype`, positive per-item stats and (optionally) positive variance features."""
    acc = acc_dtype(dtype)
    x = strided(torch.randn(n, d, generator=generator, dtype=torch.float64).to(dtype), transpose).to(device)
    y = torch.randn(m, d, generator=generator, dtype=torch.float64).to(dtype).to(device)
    x_stats = (torch.rand(n, 3, generator=generator, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    y_stats = (torch.rand(m, 3, generator=generator, dtype=torch.float64) + 0.1).to(device=device, dtype=acc)
    x_var = y_var = None
    if with_var:
        width = var_width if var_width is not None else 2 * d
        x_var = torch.rand(n, width, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
        y_var = torch.rand(m, width, generator=generator, dtype=torch.float64).to(device=device, dtype=acc)
    return x, y, x_stats, y_stats, x_var, y_var


def oracle_moments(x, y, x_stats, y_stats, x_var, y_var, scale=SCALE, bias=BIAS, trace_cross=TRACE_CROSS):
    """SPEC.md section 4 in float64: (mean, var, magnitude of the mean's rounding) [N, M] each."""
    x, y, xs, ys = x.double().cpu(), y.double().cpu(), x_stats.double().cpu(), y_stats.double().cpu()
    c = xs[:, 0:1] * ys[:, 0][None, :]
    if x_var is not None:
        dot_var = x_var.double().cpu() @ y_var.double().cpu().T
    else:
        ax, qx, ay, qy = xs[:, 1:2], xs[:, 2:3], ys[:, 1][None, :], ys[:, 2][None, :]
        dot_var = ay * qx + ax * qy + trace_cross * ax * ay
    mean = scale * (x @ y.T) * c + bias
    magnitude = scale * (x.abs() @ y.abs().T) * c + abs(bias)
    return mean, scale**2 * dot_var * c * c, magnitude


@contextlib.contextmanager
def tf32_matmul(on: bool):
    """torch's fp32 matmul setting for the duration of a block (the CUDA kernels read it at launch)."""
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = on
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def command_fails(main, capsys, argv: list[str], message: str, status: int = 1) -> None:
    """`main(argv)` fails with `status` (2: argparse exits naming the argument) and `message` on stderr."""
    import pytest

    if status == 2:
        with pytest.raises(SystemExit) as raised:
            main(argv)
        assert raised.value.code == 2
    else:
        assert main(argv) == status
    err = capsys.readouterr().err
    assert message in err, err


def tiny_hugging_face_configs() -> tuple[dict, dict]:
    """(vision, text) keyword configs of a tiny random-init Hugging Face CLIP / SigLIP: 30-pixel images
    in 6-pixel patches, 16-token texts over 99 ids (0 and 1 are the special tokens), width 32."""
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=4, image_size=30,
                  patch_size=6)
    text = dict(hidden_size=32, intermediate_size=29, num_hidden_layers=1, num_attention_heads=4, vocab_size=99,
                max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return vision, text


def tiny_open_clip(seed: int = 0):
    """A tiny random-init open_clip CLIP (32-pixel images in 8-pixel patches, 8-token texts over 64 ids,
    width 32, embeddings of 12), the same weights for the same seed in every process."""
    import open_clip

    torch.manual_seed(seed)
    vision = open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32)
    text = open_clip.CLIPTextCfg(context_length=8, vocab_size=64, width=32, heads=2, layers=1)
    return open_clip.CLIP(embed_dim=12, vision_cfg=vision, text_cfg=text).eval()


def tiny_open_clip_config(folder: str, name: str = "Tiny-CLI-Test") -> str:
    """Registers a tiny open_clip config (32-pixel images in 8-pixel patches, 8-token texts over open_clip's own
    vocabulary, width 32, embeddings of 12) under `name`, so that the commands build it by name in milliseconds."""
    import json
    import os

    import open_clip

    config = {"embed_dim": 12, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                                              "patch_size": 8},
              "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.json"), "w") as f:
        json.dump(config, f)
    open_clip.add_model_config(folder)
    return name


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels (valid chunks and CRCs) with almost no pixel data:
    Pillow refuses it at Image.open as a decompression bomb when width * height > 2 * Image.MAX_IMAGE_PIXELS."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


def truncated_png(path: str, size: int = 24) -> None:
    """Writes the first half of a noisy size x size PNG to `path`: its header opens, its pixels do not decode."""
    import io

    from PIL import Image

    pixels = torch.randint(0, 256, (size, size, 3), generator=torch.Generator().manual_seed(5), dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format="PNG")
    with open(path, "wb") as f:
        f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])


TORCHRUN_TWO = ("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2")


def run_command(arguments, launcher=None, capsys=None):
    """`python -m bayesvlm_ext ...`, asserted to succeed: under `launcher` (torchrun) in subprocesses with
    OMP_NUM_THREADS=1, as torchrun sets it; without, in this process on one thread, which is the same: BLAS
    rounds alike. Returns what it printed (in this process: through `capsys`, None without)."""
    if launcher is None:
        from bayesvlm_ext.cli import main

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            assert main(arguments) == 0
        finally:
            torch.set_num_threads(threads)
        return None if capsys is None else capsys.readouterr().out
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, *launcher, "-m", "bayesvlm_ext", *arguments], env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout
