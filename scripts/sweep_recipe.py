"""Compare main-job recipes on a validation split carved from the training problems.

    python scripts/sweep_recipe.py --minutes 10                 # every recipe below
    python scripts/sweep_recipe.py --minutes 5 --only base lr2e-4

Each recipe changes one thing of the quickstart's (tasks/quickstart.py:
TRAINING) and trains SmolLM2-135M-Instruct for the same minutes, saving a
checkpoint every --every steps. Every checkpoint is then scored on the
validation problems (greedy, exact answers), which training never sees and
which are not the held-out set the main job reports. The table shows how
far each recipe's validation accuracy kept rising; results.json keeps every
point. Run it on an otherwise idle machine: the step counts are the point.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path
from typing import Any

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_grpo.core.checkpoint import CHECKPOINTS
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.arithmetic import make_split
from mlx_grpo.tasks.quickstart import EVAL, TRAINING
from mlx_grpo.tasks.smollm2 import MODEL_NAME, smollm2_model
from mlx_grpo.tools.evaluate import evaluate

RECIPES: dict[str, dict[str, Any]] = {
    "base": {},
    "lr2e-4": {"learning_rate": 2e-4},
    "lr5e-4": {"learning_rate": 5e-4},
    "G8": {"num_generations": 8},
    "B4": {"prompts_per_step": 4},
    "topk20-topp0.95": {"top_k": 20, "top_p": 0.95},
}


def split(folder: Path, n_val: int, seed: int = 0) -> tuple[Path, Path]:
    """train.jsonl without the validation problems, and val.jsonl: both from the training side
    of the main job's split (its held-out set is never used here)."""
    train_rows, _ = make_split(2000, 100, seed)
    unique = list({r["prompt"]: r for r in train_rows}.values())
    random.Random(seed + 1).shuffle(unique)
    kinds = sorted({r["kind"] for r in unique})
    val = [r for k in kinds for r in [u for u in unique if u["kind"] == k][: n_val // len(kinds)]]
    held = {r["prompt"] for r in val}
    rows = [r for r in train_rows if r["prompt"] not in held]
    folder.mkdir(parents=True, exist_ok=True)
    paths = folder / "train.jsonl", folder / "val.jsonl"
    for path, part in zip(paths, (rows, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def accuracy(adapter: Path | None, val: Path) -> dict[str, float]:
    result = evaluate(MODEL_NAME, str(val), adapter=adapter, show_progress=False, **EVAL)
    return {group: figures["accuracy"] for group, figures in result.summary.items()}


def sweep(out: Path, minutes: float, every: int, names: list[str], n_val: int) -> dict:
    smollm2_model()
    train_file, val = split(out / "data", n_val)
    results: dict[str, Any] = {"base model": accuracy(None, val), "recipes": {}}
    for name in names:
        settings = dataclasses.replace(
            TRAINING,
            model=MODEL_NAME,
            data=str(train_file),
            output_dir=str(out / name),
            overwrite=True,
            max_minutes=minutes,
            save_steps=every,
            save_total_limit=0,
            logging_steps=1000,
            **RECIPES[name],
        )
        run = train(settings, show_progress="lines")
        seconds = 0.0
        elapsed = {}
        for m in run.metrics:
            seconds += m["time/step"]
            elapsed[m["step"]] = seconds / 60
        points = []
        for checkpoint in sorted((out / name / CHECKPOINTS).iterdir()):
            step = int(checkpoint.name.split("-")[-1])
            points.append({"step": step, "minutes": elapsed[step], **accuracy(checkpoint, val)})
            print(name, points[-1], flush=True)
        results["recipes"][name] = {"changes": RECIPES[name], "points": points}
        (out / "results.json").write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """Per recipe: steps, best validation accuracy and when it was last improved, final."""
    base = results["base model"]["all"]
    lines = [
        f"validation (exact answers), base model {base:.0%}",
        "| recipe | steps | best (all) | last new best at | final: all / add1 / addsub2 |",
        "|---|---|---|---|---|",
    ]
    for name, recipe in results["recipes"].items():
        points = recipe["points"]
        best, at = base, None
        for p in points:
            if p["all"] > best:
                best, at = p["all"], p
        last = points[-1]
        when = f"step {at['step']} ({at['minutes']:.1f} min)" if at else "never"
        final = f"{last['all']:.0%} / {last['add1']:.0%} / {last['addsub2']:.0%}"
        lines.append(f"| {name} | {last['step']} | {best:.0%} | {when} | {final} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per recipe")
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--val", type=int, default=100, help="validation problems")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()
    results = sweep(args.out, args.minutes, args.every, args.only, args.val)
    print(table(results))


if __name__ == "__main__":
    main()
