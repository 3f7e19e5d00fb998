#!/usr/bin/env bash
# Set up a virtual environment with mlx-grpo and the extras named as arguments
# (`./scripts/setup.sh plot` for the main job, `./scripts/setup.sh test` for the
# tests). VENV chooses the environment's folder (default .venv).
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

VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
extras="$(IFS=,; echo "$*")"
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# pip's notices go to a log, shown only when the install fails.
log="$VENV/pip.log"
echo "Installing mlx-grpo${extras:+[$extras]} into $VENV (a few minutes the first time)..."
if ! { "$VENV/bin/python" -m pip install --upgrade pip \
       && "$VENV/bin/python" -m pip install -e ".${extras:+[$extras]}"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "error: installing mlx-grpo${extras:+[$extras]} into $VENV failed; the whole pip log is $log" >&2
    exit 1
fi
