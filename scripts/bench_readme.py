"""Render the README's performance table from a recorded `scripts/bench.py --json` report.

    python scripts/bench_readme.py                   # re-render the README
    python scripts/bench_readme.py bench.json        # record a full run, then render

Recording copies the report to docs/bench/bench.json; the README's section
between the markers is then rendered from that file. tests/test_readme.py
fails when the README and that file disagree.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench import PEER_NAME as PEER
from bench import PHASES

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "bench" / "bench.json"
START, END = "<!-- bench:start -->", "<!-- bench:end -->"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _config(name: str, config: dict[str, Any]) -> list[str]:
    spec, med, bound = config["spec"], config["medians"], config["bound"]
    ours, peer = med["mlx-grpo"], med.get(PEER)
    label = f"{name}: {spec['prompts']} x G={spec['generations']}, {spec['completion_length']} tok"

    def side(row: dict[str, float]) -> list[str]:
        return [f"{row[k]:.1f} s" for k in PHASES] + [
            f"{row['tokens_per_second']:.1f}",
            f"{row['peak_gb']:.2f} GB",
        ]

    rows = [_row([label, "mlx-grpo", *side(ours)])]
    if peer:
        speed = [f"{peer[k] / ours[k]:.1f}x" if ours[k] else "-" for k in PHASES]
        speed[-1] = f"**{speed[-1]}**"
        tokens = f"{ours['tokens_per_second'] / peer['tokens_per_second']:.1f}x"
        rows.append(_row(["", PEER, *side(peer)]))
        rows.append(_row(["", "speed-up (peer time / ours)", *speed, tokens, ""]))
        memory = f"**{ours['peak_gb'] / peer['peak_gb']:.2f}x**"
        rows.append(_row(["", "memory (ours / peer)", "", "", "", "", "", memory]))
    rows.append(_row(["", "hardware bound", *[f"{bound[k]:.1f} s" for k in PHASES], "", ""]))
    ratio = [f"{ours[k] / bound[k]:.1f}x" if bound[k] else "-" for k in PHASES]
    rows.append(_row(["", "ours / bound", *ratio, "", ""]))
    if "estimated_gb" in ours:
        estimate = f"{ours['estimated_gb']:.2f} GB ({ours['estimated_gb'] / ours['peak_gb']:.2f}x)"
        rows.append(_row(["", "memory plan's estimate", "", "", "", "", "", estimate]))
    return rows


def section(report: dict[str, Any]) -> str:
    """The README's performance table, with the machine and the probes it was measured on."""
    host, probes, run = report["machine"], report["probes"], report["run"]
    peers = {c["peer"]["version"] for c in report["configs"].values() if c.get("peer")}
    lines = [
        START,
        f"Measured with `python scripts/bench.py` on {host['platform']} ({host['cpu_count']} "
        f"CPUs, MLX {host['mlx']} on {host['device']}, BLAS: {host['blas']}); probes: GEMM "
        f"{probes['gemm_flops'] / 1e9:.0f} GFLOP/s, bandwidth {probes['bandwidth'] / 1e9:.1f} "
        f"GB/s; "
        + (f"{PEER} {', '.join(sorted(peers))}; " if peers else "no peer; ")
        + (
            f"one measured step after {run['warmup']} warm-up."
            if run["steps"] == 1
            else f"medians of {run['steps']} steps after {run['warmup']} warm-up."
        ),
        "",
        _row(["config", "side", *PHASES, "rollout tok/s", "peak memory"]),
        _row(["---"] * 8),
    ]
    for name, config in report["configs"].items():
        lines += _config(name, config)
    return "\n".join([*lines, END])


def render(readme: Path = ROOT / "README.md") -> None:
    """Replace the README's section between the markers with the recorded report's."""
    report = json.loads(RECORD.read_text())
    text = readme.read_text()
    start, end = text.index(START), text.index(END) + len(END)
    readme.write_text(text[:start] + section(report) + text[end:])


if __name__ == "__main__":
    if len(sys.argv) > 1:
        report = json.loads(Path(sys.argv[1]).read_text())
        if report["run"]["quick"]:
            raise SystemExit(f"{sys.argv[1]} is a --quick run (a tiny model): run the full bench")
        RECORD.parent.mkdir(parents=True, exist_ok=True)
        RECORD.write_text(json.dumps(report, indent=2) + "\n")
    render()
    print(f"README.md rendered from {RECORD}")
