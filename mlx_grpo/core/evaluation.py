"""Scoring a model on held-out prompts: completions, rewards, accuracy and pass@k.

Each prompt gets n completions, greedy (temperature 0) or sampled, decoded
in batches by the training rollout. A completion is correct when its
weighted reward reaches the success threshold. With n samples per prompt of
which c are correct, pass@k is the unbiased estimate 1 - C(n - c, k) /
C(n, k), averaged over prompts. `mlx-grpo eval` and evaluation during
training (`eval_data`) both score this way.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from mlx_grpo.core import data as data_mod
from mlx_grpo.core import reward_calls
from mlx_grpo.core.advantages import weighted_rewards
from mlx_grpo.core.config import SamplingSettings
from mlx_grpo.core.models import LoadedModel
from mlx_grpo.core.rewards import Reward
from mlx_grpo.core.rollout import Noise, rollout


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples of which c are correct."""
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def score_prompts(
    lm: LoadedModel,
    rows: list[data_mod.PromptRow],
    funcs: list[Reward],
    n: int,
    sampling: SamplingSettings,
    threshold: float,
    per_batch: int,
    *,
    noise: Callable[[int], Noise | None] = lambda batch: None,
    max_rows: int | None = None,
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> list[dict[str, Any]]:
    """One record per completion: `n` of each prompt, `per_batch` prompts decoded at once.

    `noise(i)` gives batch i's sampling noise (None: drawn from MLX's random
    stream); `max_rows` caps the rows decoded at once (the memory plan's).
    """
    lm.model.eval()
    records = []
    for start in progress(range(0, len(rows), per_batch)):
        chunk = rows[start : start + per_batch]
        prompts = [r.prompt_ids for r in chunk]
        batch = rollout(
            lm.model, prompts, n, sampling, lm.eos_ids, lm.pad_id, noise(start), max_rows
        )
        records += _records(lm, chunk, funcs, n, batch, threshold)
    return records


def _records(lm, chunk, funcs, n, batch, threshold) -> list[dict[str, Any]]:
    ids = batch.completion_lists()
    texts = [lm.tokenizer.decode(i, skip_special_tokens=True) for i in ids]
    # Evaluation is outside training: the state of a run that has not started.
    per_func = reward_calls.score_groups(
        funcs, chunk, n, texts, ids, state=reward_calls.TrainerState()
    )
    totals = weighted_rewards(per_func, np.array([f.weight for f in funcs]))  # NaN: unscored
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
                "length": len(ids[i]),
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


def eval_metrics(records: list[dict], n: int, funcs: list[Reward]) -> dict[str, float | None]:
    """An evaluation during training as `eval_*` metrics, TRL's names with its prefix."""
    figures = summarize(records, n, None)["all"]
    lengths = [r["length"] for r in records]
    out: dict[str, float | None] = {
        "eval_reward": figures["mean_reward"],
        "eval_accuracy": figures["accuracy"],
        **{f"eval_rewards/{f.name}/mean": figures[f.name] for f in funcs},
        **{f"eval_{k}": v for k, v in figures.items() if k.startswith("pass@")},
        "eval_completions/mean_length": float(np.mean(lengths)),
        "eval_completions/clipped_ratio": figures["truncated"],
    }
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in out.items()}


def metric_names(n: int, funcs: list[Reward]) -> list[str]:
    """The higher-is-better metrics `eval_metrics` gives: what `keep_best` may name."""
    names = ["eval_reward", "eval_accuracy", *(f"eval_rewards/{f.name}/mean" for f in funcs)]
    return names + ([f"eval_pass@{k}" for k in sorted({1, n})] if n > 1 else [])
