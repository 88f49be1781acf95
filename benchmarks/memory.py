"""Peak extra memory of one top-k call, measured in a fresh process.

    python -m benchmarks.memory --impl topk --score mean      # prints one JSON line
    python -m benchmarks.memory --impl chunked_mm_topk

The process builds the benchmark's inputs (benchmarks/conftest.py shapes), then runs the call once.
CPU: the kernel's peak resident-set growth, from /proc/self/status after resetting the high-water
mark through /proc/self/clear_refs (Linux); `ru_maxrss` growth where that is unavailable. CUDA:
torch.cuda.max_memory_allocated growth. Both count everything the call allocates (output, tile
buffers, BLAS workspace), not the inputs; freed heap pages are returned to the OS first (malloc_trim)
so that reused pages do not hide allocations.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource

import torch

from bayesvlm_ext import topk

from .conftest import DEVICE_ENV, LOGIT_SCALE, SEED, embed_in_chunks, shapes, towers
from .test_bench_core import chunked_mm_topk, with_mean_dtype


def _status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Return freed heap pages to the OS (glibc), so the call's allocations are counted when they fault in
    instead of reusing pages that building the inputs left resident."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def measure(fn, device: torch.device) -> dict:
    _release_free_heap()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return {"method": "torch.cuda.max_memory_allocated",
                "extra_mb": (torch.cuda.max_memory_allocated(device) - before) / 2**20}
    if _reset_peak_rss() and _status_kib("VmHWM") is not None:
        before = _status_kib("VmRSS")
        fn()
        return {"method": "VmHWM after clear_refs", "extra_mb": (_status_kib("VmHWM") - before) / 1024}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn()
    return {"method": "ru_maxrss", "extra_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", choices=["topk", "chunked_mm_topk"], required=True)
    parser.add_argument("--score", default="mean")
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args(argv)
    device = torch.device(os.environ.get(DEVICE_ENV, "cpu"))
    dtype = getattr(torch, args.dtype)
    shape = shapes(device)["topk"]
    generator = torch.Generator().manual_seed(SEED + 2)
    post_img, post_txt = towers(shape, generator)
    post_img, post_txt = post_img.to(device), post_txt.to(device)
    queries = with_mean_dtype(embed_in_chunks(post_txt, shape["N"], generator, device), dtype)
    gallery = with_mean_dtype(embed_in_chunks(post_img, shape["M"], generator, device, against=post_txt), dtype)
    if args.impl == "topk":
        def fn():
            return topk(queries, gallery, shape["k"], score=args.score, logit_scale=LOGIT_SCALE)
    else:
        def fn():
            return chunked_mm_topk(queries.mean, gallery.mean, shape["k"])
    print(json.dumps({"impl": args.impl, "score": args.score if args.impl == "topk" else None, "dtype": args.dtype,
                      "shape": shape, **measure(fn, device)}))


if __name__ == "__main__":
    main()
