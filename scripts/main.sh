#!/usr/bin/env bash
# The main job: set up .venv, then GRPO-train SmolLM2-135M-Instruct on held-out-checked
# arithmetic, offline (the model comes from PyPI). Extra arguments go to
# `mlx-grpo quickstart` (e.g. --minutes 5).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh plot
exec .venv/bin/mlx-grpo quickstart "$@"
