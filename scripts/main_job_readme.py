"""Render the README's main-job results from a recorded `summary.json` of `./scripts/main.sh`.

    python scripts/main_job_readme.py                               # re-render the README
    python scripts/main_job_readme.py runs/quickstart/summary.json  # record a run, then render

Recording copies the run's summary and plot into docs/main-job/; the README's
section between the markers is then rendered from docs/main-job/summary.json,
and the table of recipes tried (scripts/sweep_recipe.py) from
docs/main-job/recipes.json. tests/test_readme.py fails when the README and
those files disagree.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from sweep_recipe import table

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.tasks.quickstart import README_END, README_START, readme_section

SWEEP_START = "<!-- recipes tried: rendered by scripts/main_job_readme.py -->"
SWEEP_END = "<!-- end of recipes tried -->"

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "main-job"
IMAGE = "docs/main-job/training.png"  # as the README links it


def record(summary_file: Path) -> None:
    """Keep a run's summary and plot in docs/main-job/."""
    summary = json.loads(summary_file.read_text())
    RECORD.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(summary["outputs"]["plot"], RECORD / "training.png")
    (RECORD / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def recipes_section(passes: list[dict]) -> str:
    """The recipe sweeps: per pass its description, then the table of its runs."""
    lines = [SWEEP_START]
    for sweep in passes:
        lines += ["", sweep["description"], "", table(sweep["results"])]
    return "\n".join([*lines, "", SWEEP_END])


def _replace(text: str, start: str, end: str, section: str) -> str:
    a, b = text.index(start), text.index(end) + len(end)
    return text[:a] + section + text[b:]


def render(readme: Path = ROOT / "README.md") -> None:
    """Replace the README's sections between the markers with the recorded runs'."""
    summary = json.loads((RECORD / "summary.json").read_text())
    passes = json.loads((RECORD / "recipes.json").read_text())
    text = _replace(readme.read_text(), README_START, README_END, readme_section(summary, IMAGE))
    readme.write_text(_replace(text, SWEEP_START, SWEEP_END, recipes_section(passes)))


if __name__ == "__main__":
    if len(sys.argv) > 1:
        record(Path(sys.argv[1]))
    render()
    print(f"README.md rendered from {RECORD / 'summary.json'}")
