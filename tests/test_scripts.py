"""The set-up scripts: the main job's environment holds what it needs and no test tools."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_main_jobs_install_leaves_out_the_test_extra(tmp_path):
    venv = tmp_path / "venv"
    env = {**os.environ, "VENV": str(venv), "PYTHON": sys.executable}
    done = subprocess.run(
        [str(ROOT / "scripts" / "setup.sh"), "plot"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    probe = (
        "import importlib.util as u; "
        "print(' '.join(m for m in ('mlx_grpo', 'mlx_lm', 'matplotlib', 'torch', 'peft', "
        "'pytest') if u.find_spec(m)))"
    )
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, cwd=tmp_path
    )
    assert found.stdout.split() == ["mlx_grpo", "mlx_lm", "matplotlib"]
