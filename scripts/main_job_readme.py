"""Render the README's main-job results from a recorded `summary.json` of `./scripts/main.sh`.

    python scripts/main_job_readme.py                               # re-render the README
    python scripts/main_job_readme.py runs/quickstart/summary.json  # record a run, then render

Recording copies the run's summary and plot into docs/main-job/; the README's
section between the markers is then rendered from docs/main-job/summary.json.
tests/test_readme.py fails when the README and that file disagree.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.tasks.quickstart import README_END, README_START, readme_section

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "main-job"
IMAGE = "docs/main-job/training.png"  # as the README links it


def record(summary_file: Path) -> None:
    """Keep a run's summary and plot in docs/main-job/."""
    summary = json.loads(summary_file.read_text())
    RECORD.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["outputs"]["plot"], RECORD / "training.png")
    (RECORD / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def render(readme: Path = ROOT / "README.md") -> None:
    """Replace the README's section between the markers with the recorded run's."""
    summary = json.loads((RECORD / "summary.json").read_text())
    text = readme.read_text()
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    readme.write_text(text[:start] + readme_section(summary, IMAGE) + text[end:])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        record(Path(sys.argv[1]))
    render()
    print(f"README.md rendered from {RECORD / 'summary.json'}")
