"""The benchmark script still runs end to end (its --quick mode, as in CI)."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench.py"


def test_quick_benchmark_runs_and_writes_positive_medians(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "\nmedian " in proc.stdout
    assert "median over 2 steps" in proc.stdout

    result = json.loads(out.read_text())
    median = result["median"]
    assert median["time/rollout"] > 0
    assert median["time/update"] > 0
    assert median["tokens_per_second"] > 0
    # EOS is off, so every completion is exactly 16 tokens: G=4 x 16.
    assert median["completion_tokens"] == 4 * 16
    assert result["trainable_parameters"] > 0
    assert len(result["steps"]) == 2
