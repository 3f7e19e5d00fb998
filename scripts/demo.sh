#!/usr/bin/env bash
# Set up, then run the offline end-to-end demo: a tiny random Qwen3 learns a
# toy task with GRPO-LoRA. Extra arguments go to `mlx-grpo demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
exec .venv/bin/mlx-grpo demo "$@"
