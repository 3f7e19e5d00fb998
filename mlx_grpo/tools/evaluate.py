"""Accuracy and mean reward of a model, with or without an adapter, on a held-out set.

The prompts decode in batches (the same batched rollout as training); each
gets `num_samples` completions, greedy (temperature 0) or sampled. A
completion is correct when its weighted reward reaches `success_threshold`.
With n samples per prompt of which c are correct, pass@k is the unbiased
estimate 1 - C(n - c, k) / C(n, k), averaged over prompts.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tqdm import tqdm

from mlx_grpo.core import data as data_mod
from mlx_grpo.core import reward_calls
from mlx_grpo.core import rewards as rewards_mod
from mlx_grpo.core.adapters import load_adapted
from mlx_grpo.core.advantages import weighted_rewards
from mlx_grpo.core.config import DEFAULTS, SamplingSettings
from mlx_grpo.core.models import check_completion_length
from mlx_grpo.core.rollout import rollout
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


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


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
    records = []
    for start in tqdm(
        range(0, len(rows), per_batch),
        disable=None if show_progress else True,  # None: off when not a terminal
        unit="batch",
        desc="eval",
    ):
        chunk = rows[start : start + per_batch]
        records += _score_chunk(lm, chunk, funcs, num_samples, sampling, success_threshold)
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


def _score_chunk(lm, chunk, funcs, n, sampling, threshold) -> list[dict[str, Any]]:
    batch = rollout(lm.model, [r.prompt_ids for r in chunk], n, sampling, lm.eos_ids, lm.pad_id)
    ids = batch.completion_lists()
    texts = [lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    # Evaluation is outside training: the state of a run that has not started.
    per_func = reward_calls.score_groups(
        funcs, chunk, n, texts, ids, state=reward_calls.TrainerState()
    )
    weights = np.array([f.weight for f in funcs])
    totals = weighted_rewards(per_func, weights)  # NaN: no function scored it
    out = []
    for i, (text, row) in enumerate(zip(texts, data_mod.per_completion(chunk, n))):
        out.append(
            {
                "source": row.source,
                "prompt": row.prompt,
                "sample": i % n,
                "completion": text,
                "rewards": {
                    f.name: reward_calls.optional_float(per_func[i, k]) for k, f in enumerate(funcs)
                },
                "reward": reward_calls.optional_float(totals[i]),
                "correct": bool(totals[i] >= threshold),  # False when unscored
                "truncated": batch.truncated[i],
                "columns": row.columns,
            }
        )
    return out


def summarize(records: list[dict], n: int, group_by: str | None) -> dict[str, dict[str, float]]:
    """Figures over all records and, with `group_by`, per value of that column."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        groups["all"].append(r)
        if group_by is not None:
            groups[str(r["columns"].get(group_by))].append(r)
    summary = {}
    for name, items in groups.items():
        by_prompt: dict[str, list[bool]] = defaultdict(list)
        for r in items:
            by_prompt[r["source"]].append(r["correct"])
        figures: dict[str, Any] = {"prompts": len(by_prompt)}
        figures["accuracy"] = float(np.mean([r["correct"] for r in items]))
        scored = [r["reward"] for r in items if r["reward"] is not None]
        figures["mean_reward"] = float(np.mean(scored)) if scored else float("nan")
        for func in items[0]["rewards"]:  # each function's own mean beside the weighted one
            values = [r["rewards"][func] for r in items if r["rewards"][func] is not None]
            figures[func] = float(np.mean(values)) if values else float("nan")
        if n > 1:
            for k in sorted({1, n}):
                figures[f"pass@{k}"] = float(
                    np.mean([pass_at_k(len(v), sum(v), k) for v in by_prompt.values()])
                )
        figures["truncated"] = float(np.mean([r["truncated"] for r in items]))
        summary[name] = figures
    return summary


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
