"""Shared test parameters: devices and dtypes, built once (a machine without a GPU runs fewer cases)."""

import torch

devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
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
