#!/usr/bin/env bash
# Set up a virtual environment (.venv) with mlx-grpo and its test tools.
# On Linux it also installs OpenBLAS when it can: MLX's CPU backend is ~30x
# faster with it (see mlx_grpo/core/backend.py).
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(uname -s)" = "Linux" ] && ! /sbin/ldconfig -p 2>/dev/null | grep -q "libopenblas\.so\.0"; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = "0" ]; then
        echo "Installing OpenBLAS (libopenblas0-pthread)..."
        apt-get update -qq >/dev/null && apt-get install -y -qq libopenblas0-pthread >/dev/null
    elif command -v apt-get >/dev/null && command -v sudo >/dev/null; then
        sudo apt-get update -qq >/dev/null && sudo apt-get install -y -qq libopenblas0-pthread >/dev/null
    else
        echo "warning: OpenBLAS not found; MLX's CPU matmuls will be far slower." \
             "Install your distribution's OpenBLAS package." >&2
    fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip >/dev/null
.venv/bin/python -m pip install --quiet -e ".[test]"
