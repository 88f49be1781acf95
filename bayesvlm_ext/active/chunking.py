"""The memory budget of active selection's loops: how many pool or target rows one chunk takes (SPEC.md section 8).

Read `CHUNK_ELEMENTS` through this module (`chunking.CHUNK_ELEMENTS`) at call time, so that setting it
here changes every loop.
"""

from __future__ import annotations

from collections.abc import Iterator

# Elements of the largest temporary one chunk may allocate ([K, rows, D] embeddings, [rows, N] distances,
# the [rows, m, C, C] joint of EPIG): 2^24 float64 values are 128 MiB.
CHUNK_ELEMENTS = 2**24


def rows_per_chunk(row_elements: int) -> int:
    """Rows of `row_elements` elements each that fit in CHUNK_ELEMENTS; at least one."""
    return max(1, CHUNK_ELEMENTS // max(1, row_elements))


def chunks(total: int, rows: int) -> Iterator[slice]:
    """Consecutive slices of at most `rows` rows covering range(total)."""
    for start in range(0, total, rows):
        yield slice(start, min(start + rows, total))
