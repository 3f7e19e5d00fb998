"""Accuracy and mean reward of a model, with or without an adapter, on a held-out set.

The prompts decode in batches (the same batched rollout as training); each
gets `num_samples` completions, greedy (temperature 0) or sampled, scored as
core/evaluation.py says (accuracy against `success_threshold`, pass@k).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from tqdm import tqdm

from mlx_grpo.core import data as data_mod
from mlx_grpo.core import rewards as rewards_mod
from mlx_grpo.core.adapters import load_adapted
from mlx_grpo.core.config import DEFAULTS, SamplingSettings
from mlx_grpo.core.evaluation import score_prompts, summarize
from mlx_grpo.core.models import check_completion_length
from mlx_grpo.core.settings import check_settings
from mlx_grpo.core.values import AT_LEAST_0, AT_LEAST_1, MAX_SEED, Range, check_option


@dataclass
class EvalResult:
    summary: dict[str, dict[str, float]]  # group ("all", or a value of group_by) -> figures
    records: list[dict[str, Any]] = field(default_factory=list)  # one per completion
    group_by: str | None = None
    num_samples: int = 1

    def table(self) -> str:
        """The summary as a fixed-width text table."""
        keys = list(next(iter(self.summary.values())))
        width = max(len(g) for g in self.summary) + 2
        cells = [max(12, len(k)) + 2 for k in keys]
        head = "group".ljust(width) + "".join(k.rjust(c) for k, c in zip(keys, cells))
        rows = [
            g.ljust(width) + "".join(_cell(v).rjust(c) for v, c in zip(figures.values(), cells))
            for g, figures in self.summary.items()
        ]
        return "\n".join([head, *rows])


def _cell(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def evaluate(
    model: str,
    data: str,
    rewards: list[str],
    adapter: str | Path | None = None,
    *,
    reward_weights: list[float] | None = None,
    prompt_column: str = DEFAULTS.prompt_column,
    system_prompt: str | None = DEFAULTS.system_prompt,
    enable_thinking: bool | None = DEFAULTS.enable_thinking,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = DEFAULTS.top_p,
    top_k: int = DEFAULTS.top_k,
    min_p: float = DEFAULTS.min_p,
    max_completion_length: int = DEFAULTS.max_completion_length,
    batch_size: int = 32,
    success_threshold: float = 1.0,
    group_by: str | None = None,
    limit: int | None = None,
    seed: int = 0,
    output: str | Path | None = None,
    show_progress: bool = True,
) -> EvalResult:
    """Score a model on `data` with the reward functions; optionally write completions.

    The prompt and sampling options mean what they mean in training (and
    default as there), except the temperature: 0, greedy.

    Example:
        >>> result = evaluate("smollm2", "test.jsonl", ["arithmetic"], adapter="runs/a",
        ...                   group_by="kind")
        >>> print(result.table())
    """
    check_settings(
        top_p=top_p, top_k=top_k, min_p=min_p, max_completion_length=max_completion_length
    )
    for flag, value, allowed in (
        ("--samples", num_samples, AT_LEAST_1),
        ("--temperature", temperature, AT_LEAST_0),
        ("--batch-size", batch_size, AT_LEAST_1),
        ("--success-threshold", success_threshold, Range()),
        ("--limit", limit, AT_LEAST_1),
        ("--seed", seed, Range(0, MAX_SEED)),
    ):
        check_option(flag, value, allowed)
    if num_samples > 1 and temperature == 0:
        raise ValueError("--samples > 1 needs sampling: set --temperature above 0")
    if output is not None:
        _check_output(Path(output), data)
    mx.random.seed(seed)
    lm, _ = load_adapted(model, adapter)
    lm.model.eval()
    funcs = rewards_mod.load_rewards(rewards, reward_weights)
    rows = data_mod.load_prompts(data, lm.tokenizer, prompt_column, system_prompt, enable_thinking)[
        :limit
    ]
    rewards_mod.check_arguments(funcs, (k for r in rows for k in r.columns), data)
    _check_group_by(group_by, rows, data)
    check_completion_length(lm, max_completion_length, "--max-completion-length")
    sampling = SamplingSettings(temperature, top_p, top_k, min_p, max_completion_length)
    per_batch = max(1, batch_size // num_samples)

    def progress(batches):
        # None: off when not a terminal
        return tqdm(batches, disable=None if show_progress else True, unit="batch", desc="eval")

    records = score_prompts(
        lm, rows, funcs, num_samples, sampling, success_threshold, per_batch, progress=progress
    )
    if output is not None:
        partial = Path(output).with_name(f".{Path(output).name}.partial")
        partial.write_text("".join(json.dumps(r) + "\n" for r in records))
        partial.replace(output)  # a crash never leaves half a file where a good one was
    return EvalResult(summarize(records, num_samples, group_by), records, group_by, num_samples)


def _check_output(output: Path, data: str) -> None:
    """Refuse an --output that is not a new .jsonl file or an earlier evaluation's own."""
    if output.suffix.lower() != ".jsonl":
        raise ValueError(f"--output {output}: give it a .jsonl name, e.g. {output.stem}.jsonl.")
    if output.is_dir():
        raise ValueError(f"--output {output} is a folder; give the path of a .jsonl file.")
    if Path(data).exists() and output.exists() and output.resolve() == Path(data).resolve():
        raise ValueError(
            f"--output {output} is the --data file itself, which would be overwritten by the "
            "completions; give another --output path."
        )
    if output.exists() and not _written_by_eval(output):
        raise ValueError(
            f"--output {output} exists and is not an earlier evaluation's output, so it is not "
            "overwritten; give another --output path."
        )
    parent = output.resolve().parent
    if not parent.is_dir():
        raise ValueError(
            f"--output {output}: the folder {parent} does not exist; create it or choose "
            "another path."
        )


def _written_by_eval(path: Path) -> bool:
    """Whether `path` starts with a completion record as `evaluate` writes them (or is empty)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        first = f.readline(1 << 20)
    try:
        record = json.loads(first) if first.strip() else {}
    except ValueError:
        return False
    return isinstance(record, dict) and (not record or {"source", "completion"} <= set(record))


def _check_group_by(group_by: str | None, rows: list[data_mod.PromptRow], data: str) -> None:
    if group_by is None or any(group_by in r.columns for r in rows):
        return
    columns = sorted({k for r in rows for k in r.columns})
    raise ValueError(
        f"--group-by {group_by!r}: no row of {data} has that column (it has "
        f"{', '.join(columns) or 'only the prompt column'}); name one of those columns."
    )


def compare_with(result: EvalResult, before: str | Path) -> str:
    """The change from an earlier evaluation (its --output file): before -> after, per group
    and per figure the two share."""
    path = Path(before)
    if not _written_by_eval(path):
        raise ValueError(
            f"--compare {path} is not an evaluation's output; give the JSONL file an earlier "
            "`mlx-grpo eval ... -o FILE` wrote."
        )
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise ValueError(f"--compare {path} holds no completions; evaluate into it again.")
    samples = max(r.get("sample", 0) for r in records) + 1
    old = summarize(records, samples, result.group_by)
    rows = [f"change from {path}"]
    for group, after in result.summary.items():
        if group not in old:
            continue
        changes = [
            f"{key} {_cell(old[group][key])} -> {_cell(value)} ({value - old[group][key]:+.4g})"
            for key, value in after.items()
            if key != "prompts" and isinstance(old[group].get(key), float)
        ]
        rows.append(f"{group}: " + "; ".join(changes))
    return "\n".join(rows)
