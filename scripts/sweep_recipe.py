"""Compare main-job recipes on a validation split carved from the training problems.

    python scripts/sweep_recipe.py --minutes 10                 # every recipe below
    python scripts/sweep_recipe.py --minutes 5 --only base lr2e-4
    python scripts/sweep_recipe.py --kinds add1 add2 --only base --out runs/sweep-add1-add2

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
from mlx_grpo.core.reporting import read_log
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.arithmetic import ALL_KINDS, KINDS, make_split
from mlx_grpo.tasks.quickstart import EVAL, TRAINING
from mlx_grpo.tasks.smollm2 import MODEL_NAME, smollm2_model
from mlx_grpo.tools.evaluate import evaluate

# "mix" is the kinds' shares of the training rows (tasks/arithmetic.py: make_split);
# everything else is a TrainConfig field.
RECIPES: dict[str, dict[str, Any]] = {
    "base": {},  # the quickstart's recipe as it is now
    "lr1e-4": {"learning_rate": 1e-4},
    "lr2e-4": {"learning_rate": 2e-4},
    "lr5e-4": {"learning_rate": 5e-4},
    "G8": {"num_generations": 8},
    "B4": {"prompts_per_step": 4},
    "topk20-topp0.95": {"top_k": 20, "top_p": 0.95},
    "mix1:3": {"mix": (1, 3)},
    "lr2e-4-mix1:3": {"learning_rate": 2e-4, "mix": (1, 3)},
}


def split(
    folder: Path,
    n_val: int,
    mix: tuple[int, ...] | None,
    kinds: tuple[str, ...] = KINDS,
    seed: int = 0,
) -> tuple[Path, Path]:
    """A training file without the validation problems, and val.jsonl: both from the training
    side of the main job's split (its held-out set is never used here).

    Validation takes n_val / 2 problems of each kind but never more than a fifth of the
    kind's training-side problems (one-digit sums have 50 there), so training keeps most of
    every kind; the same problems whatever the mix.
    """
    unique = list({r["prompt"]: r for r in make_split(2000, 100, seed, kinds)[0]}.values())
    random.Random(seed + 1).shuffle(unique)
    val = []
    for kind in sorted({r["kind"] for r in unique}):
        pool = [u for u in unique if u["kind"] == kind]
        val += pool[: min(n_val // 2, len(pool) // 5)]
    held = {r["prompt"] for r in val}
    rows = [r for r in make_split(2000, 100, seed, kinds, mix)[0] if r["prompt"] not in held]
    folder.mkdir(parents=True, exist_ok=True)
    name = "train.jsonl" if mix is None else f"train-mix{'-'.join(map(str, mix))}.jsonl"
    paths = folder / name, folder / "val.jsonl"
    for path, part in zip(paths, (rows, val)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
    return paths


def accuracy(adapter: Path | None, val: Path) -> dict[str, float]:
    """Exact-answer accuracy per kind, and "all" as the kinds' mean (as the held-out set weighs)."""
    result = evaluate(MODEL_NAME, str(val), adapter=adapter, show_progress=False, **EVAL)
    kinds = {group: f["accuracy"] for group, f in result.summary.items() if group != "all"}
    return {"all": sum(kinds.values()) / len(kinds), **kinds}


def sweep(
    out: Path,
    minutes: float,
    every: int,
    names: list[str],
    n_val: int,
    seed: int,
    reuse: bool,
    kinds: tuple[str, ...] = KINDS,
) -> dict:
    smollm2_model()
    val = split(out / "data", n_val, None, kinds)[1]
    path = out / "results.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"recipes": {}}
    if results.get("validation") != val.read_text():  # another split: start again
        results = {"validation": val.read_text(), "base model": accuracy(None, val), "recipes": {}}
    for name in names:
        changes = dict(RECIPES[name])
        train_file = split(out / "data", n_val, changes.pop("mix", None), kinds)[0]
        key = f"{name} seed {seed}"
        settings = dataclasses.replace(
            TRAINING,
            model=MODEL_NAME,
            data=str(train_file),
            output_dir=str(out / key.replace(" ", "-")),
            overwrite=True,
            max_minutes=minutes,
            seed=seed,
            save_steps=every,
            save_total_limit=0,
            logging_steps=1000,
            **changes,
        )
        run_dir = Path(settings.output_dir)
        if reuse and (run_dir / "metrics.jsonl").exists():
            metrics = read_log(run_dir / "metrics.jsonl")[0]
        else:
            metrics = train(settings, show_progress="lines").metrics
        seconds = 0.0
        elapsed = {}
        for m in metrics:
            seconds += m["time/step"]
            elapsed[m["step"]] = seconds / 60
        points = []
        for checkpoint in sorted((run_dir / CHECKPOINTS).iterdir()):
            step = int(checkpoint.name.split("-")[-1])
            points.append({"step": step, "minutes": elapsed[step], **accuracy(checkpoint, val)})
            print(key, points[-1], flush=True)
        results["recipes"][key] = {"changes": RECIPES[name], "minutes": minutes, "points": points}
        path.write_text(json.dumps(results, indent=2))
    return results


def table(results: dict) -> str:
    """Per recipe: what it changes, its steps, its validation curve, each kind's accuracy at
    the end and when it last gained."""
    base = results["base model"]["all"]
    kinds = [k for k in results["base model"] if k != "all"]
    lines = [
        "| recipe | steps | validation exact answers, base model then every checkpoint "
        "| at the end, per kind | last gain |",
        "|---|---|---|---|---|",
    ]
    for name, recipe in results["recipes"].items():
        points = recipe["points"]
        best, at = base, None
        for p in points:
            if p["all"] > best:
                best, at = p["all"], p
        curve = " ".join(f"{round(100 * v)}" for v in [base] + [p["all"] for p in points])
        when = f"step {at['step']} ({at['minutes']:.1f} min)" if at else "never"
        last = points[-1]
        end = ", ".join(f"{k} {last[k]:.0%}" for k in kinds)
        lines.append(f"| {name} | {last['step']} | {curve} | {end} | {when} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="training time per recipe")
    parser.add_argument("--every", type=int, default=5, help="steps between checkpoints")
    parser.add_argument("--val", type=int, default=200, help="validation problems")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the split stays)")
    parser.add_argument("--reuse", action="store_true", help="score runs already in --out")
    parser.add_argument("--only", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    parser.add_argument("--kinds", nargs="+", choices=ALL_KINDS, default=list(KINDS))
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"))
    args = parser.parse_args()
    results = sweep(
        args.out,
        args.minutes,
        args.every,
        args.only,
        args.val,
        args.seed,
        args.reuse,
        tuple(args.kinds),
    )
    print(table(results))


if __name__ == "__main__":
    main()
