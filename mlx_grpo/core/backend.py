"""Pick the fastest BLAS for MLX's CPU backend before `mlx.core` is imported.

The Linux `mlx[cpu]` wheel links a reference BLAS (~6 GFLOP/s for fp32
matmul). Loading OpenBLAS into the global symbol namespace first makes MLX
resolve its BLAS calls there (~30x faster). On macOS MLX uses Accelerate and
Metal, and nothing is done.

Second, glibc's malloc serves every buffer over 32 MB with a fresh mmap and
returns it to the system when freed, so each large MLX array (activations,
logits, KV caches) is page-faulted in again, step after step: 0.75 s per GB
on the 2-core Linux VM this was measured on, more than the arithmetic on it.
`keep_freed_memory` makes malloc take every block from its heap and keep
freed blocks for reuse (7x faster on a recycled 940 MB buffer).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import sys
from collections.abc import Iterator

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
)

openblas_path: str | None = None


def load_openblas() -> str | None:
    """Load OpenBLAS globally on Linux; return its path, or None if absent.

    Set MLX_GRPO_NO_OPENBLAS=1 to skip (for measuring the difference).
    """
    global openblas_path
    if not sys.platform.startswith("linux") or os.environ.get("MLX_GRPO_NO_OPENBLAS"):
        return None
    if openblas_path is not None:
        return openblas_path
    found = ctypes.util.find_library("openblas")
    for path in (*_CANDIDATES, found):
        if path and (os.path.exists(path) or path == found):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
            openblas_path = path
            return path
    return None


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4

malloc_tuned = False


def keep_freed_memory() -> bool:
    """Linux/glibc: no mmap per large block, no trimming of freed heap; True if done.

    The process keeps the memory it has freed (up to its peak) instead of
    handing it back. Set MLX_GRPO_NO_MALLOC_TUNING=1 to skip.
    """
    global malloc_tuned
    if not sys.platform.startswith("linux") or os.environ.get("MLX_GRPO_NO_MALLOC_TUNING"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    malloc_tuned = bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return malloc_tuned


@contextlib.contextmanager
def blas_threads(n: int | None) -> Iterator[None]:
    """Run the block with OpenBLAS using `n` threads (no-op for None or without OpenBLAS)."""
    lib = ctypes.CDLL(openblas_path) if n and openblas_path else None
    setter = getattr(lib, "openblas_set_num_threads", None)
    getter = getattr(lib, "openblas_get_num_threads", None)
    if setter is None or getter is None:
        yield
        return
    before = getter()
    setter(n)
    try:
        yield
    finally:
        setter(before)


def cpu_only() -> bool:
    """True when MLX has no GPU here: compute should then stay in float32."""
    import mlx.core as mx

    return not mx.metal.is_available()
