"""Agent step benchmark: episodes with one tool round, beside the plain GRPO step.

A random-weight model (Qwen3-0.6B's shapes, or the tiny test model with
--quick) trains for a few steps on B prompts x G completions. In the agent
runs every episode's first turn is a forced tool call (the model's own
log-probs of its tokens; `episodes.FirstTurn`) after a filler of
`--spread` x j tokens for the group's j-th episode, so that turns end at
different steps, as real ones do; the tool answers at once, its result is
prefilled into the row's cache, and the second turn is sampled up to the
completion budget (192 tokens: with the byte-level tiny tokenizer the call
alone is 70). The agent runs twice: rows that called a tool wait until no
row is still in its first turn ("pause"), or go on at the next decode step
("rejoin"). The plain run samples up to the same budget in one turn. It
prints the per-step medians of each phase (rollout, reference, update,
step), the rollout's tokens per second and the tool-call metrics, and
asserts nothing.

Run:
    python scripts/bench_agent.py --quick            # tiny model, seconds
    python scripts/bench_agent.py --steps 2          # Qwen3-0.6B shapes
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
import bench  # noqa: E402  (loads mlx_grpo first, so OpenBLAS before mlx.core)

from mlx_grpo.core import agent as agent_mod  # noqa: E402
from mlx_grpo.core.episodes import FirstTurn  # noqa: E402
from mlx_grpo.core.trainer import train  # noqa: E402
from mlx_grpo.tasks.toy import TOOLS_CHAT_TEMPLATE, save_byte_tokenizer  # noqa: E402

CALL = '<tool_call>{"name": "lookup", "arguments": {"key": "k"}}</tool_call>'
PHASES = ("rollout", "reference", "update", "step")


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: What to look up.
    """
    return f"the value of {key} is 42, as recorded in the table"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="the tiny model")
    p.add_argument("--steps", type=int, default=3, help="measured steps")
    p.add_argument("--warmup", type=int, default=1, help="steps before measuring")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--tokens", type=int, default=192, help="completion tokens per episode")
    p.add_argument("--spread", type=int, default=6, help="filler tokens per episode index")
    p.add_argument("--cache-dir", type=Path, default=None, help="where the model is kept")
    p.add_argument("--json", type=Path, default=None, help="also write the figures here")
    return p.parse_args(argv)


def force_first_turn(spread: int, groups: int, schedule: dict[str, Any]) -> None:
    """Every episode's first turn calls `lookup`, after `spread` x j filler tokens for the
    group's j-th episode; the episodes run with `schedule["now"]`, and each rollout's
    decode steps are added to `schedule["steps"]`."""
    real = agent_mod.run_episodes

    def run(model, tokenizer, prompts, episodes, sampling, *args, **kwargs):
        turns = ["x" * (spread * (i % groups)) + CALL for i in range(len(episodes))]
        forced = FirstTurn(tokenizer, turns, sampling, len(episodes))
        schedule["steps"].append(0)

        def pick(logits, u, rows):
            schedule["steps"][-1] += 1
            return forced(logits, u, rows)

        return real(
            model, tokenizer, prompts, episodes, sampling, *args, **kwargs,
            pick=pick, schedule=schedule["now"],
        )  # fmt: skip

    agent_mod.run_episodes = run


def measure(args, model: Path, data: Path, out: Path, agent: bool) -> dict[str, float]:
    settings = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        prompts_per_step=args.prompts,
        num_generations=args.generations,
        max_completion_length=args.tokens,
        max_steps=args.warmup + args.steps,
        lora_rank=8,
        lora_alpha=16,
        save_steps=0,
        show_progress=False,
    )
    if agent:
        settings["tools"] = [lookup]
    steps = train(**settings, reward_funcs=[bench.even_share]).metrics[args.warmup :]
    keys = [f"time/{p}" for p in PHASES] + ["tokens_per_second", "completions/mean_length"]
    keys += ["tools/call_frequency"] if agent else []
    return {k: statistics.median(m[k] for m in steps) for k in keys}


def measure_agent(args, model: Path, data: Path, out: Path, schedule: dict) -> dict[str, float]:
    """An agent run's figures, with the median decode steps of its measured rollouts."""
    schedule["steps"] = []
    figures = measure(args, model, data, out, agent=True)
    return {**figures, "decode_steps": statistics.median(schedule["steps"][args.warmup :])}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    schedule = {"now": "pause"}
    force_first_turn(args.spread, args.generations, schedule)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.cache_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        model, how = bench.model_dir(root, args.quick)
        save_byte_tokenizer(model, chat_template=TOOLS_CHAT_TEMPLATE)  # shows the tools
        data = bench.write_prompts(Path(tmp) / "prompts.jsonl")
        print(
            f"model {model.name} ({how}); {args.prompts} x G={args.generations}, "
            f"{args.tokens} tok, first turns {len(CALL) + 1} + {args.spread} x j tokens"
        )
        figures = {"plain": measure(args, model, data, Path(tmp) / "plain", agent=False)}
        for name in ("pause", "rejoin"):
            schedule["now"] = name
            figures[name] = measure_agent(args, model, data, Path(tmp) / name, schedule)
    head = "".join(f"{p:>11}" for p in PHASES)
    print(f"{'':8}{head}{'tok/s':>9}{'calls/ep':>10}{'decode steps':>14}")
    for name, f in figures.items():
        times = "".join(f"{f[f'time/{p}']:>10.2f}s" for p in PHASES)
        calls, steps = f.get("tools/call_frequency", ""), f.get("decode_steps", "")
        print(f"{name:8}{times}{f['tokens_per_second']:>9.0f}{calls:>10}{steps:>14}")
    if args.json:
        shown = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        args.json.write_text(json.dumps({"args": shown, **figures}, indent=1))


if __name__ == "__main__":
    main()
