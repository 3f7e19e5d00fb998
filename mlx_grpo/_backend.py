"""Pick the fastest BLAS for MLX's CPU backend before `mlx.core` is imported.

The Linux `mlx[cpu]` wheel links a reference BLAS (~6 GFLOP/s for fp32
matmul). Loading OpenBLAS into the global symbol namespace first makes MLX
resolve its BLAS calls there (~30x faster). On macOS MLX uses Accelerate and
Metal, and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

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


def cpu_only() -> bool:
    """True when MLX has no GPU here: compute should then stay in float32."""
    import mlx.core as mx

    return not mx.metal.is_available()
