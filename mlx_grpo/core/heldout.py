"""Evaluation during training: held-out prompts scored every `eval_steps` steps.

After the update of every eval_steps-th step, the prompts of `eval_data`
are decoded with the updated adapter (greedy, or `eval_samples` sampled
completions each), scored by the run's reward functions and logged with
the step as `eval_*` metrics (evaluation.py). Sampling noise comes from the
seed and the step, never from the training's random stream, so a run with
evaluation trains exactly as one without. With `keep_best`, the adapter of
the best value so far is kept in the run's best/ folder.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np

from mlx_grpo.core import evaluation
from mlx_grpo.core.adapters import Adapter
from mlx_grpo.core.checkpoint import BEST
from mlx_grpo.core.config import SamplingSettings
from mlx_grpo.core.reporting import PhaseTimer
from mlx_grpo.core.rollout import Noise
from mlx_grpo.core.setup import Run

BEST_FILE = "best.json"  # in best/: which step, metric and value the adapter is from
EVAL_STREAM = 0xE7A1  # keeps the evaluation's noise apart from other seeded streams


def evaluate_step(run: Run, step: int, timer: PhaseTimer) -> dict[str, Any]:
    """The eval_* metrics of step `step` (0-based), if it is an evaluation step."""
    cfg = run.cfg
    if not run.eval_rows or (step + 1) % cfg.eval_every:
        return {}
    with timer.phase("eval"):
        records = _records(run, step)
        metrics = evaluation.eval_metrics(records, cfg.eval_samples, run.rewards)
    if cfg.keep_best is not None:
        keep_best(run, step + 1, metrics.get(cfg.keep_best))
    return metrics


def _records(run: Run, step: int) -> list[dict[str, Any]]:
    """Every held-out completion's record; each process decodes its share of the prompts."""
    cfg, peers = run.cfg, run.peers
    rows = run.eval_rows[peers.part(len(run.eval_rows))]
    sampling = SamplingSettings(
        cfg.eval_temperature, cfg.top_p, cfg.top_k, cfg.min_p, cfg.max_completion_length
    )
    rows_at_once = min(run.plan.decode_rows, cfg.prompts_per_step * cfg.num_generations)
    seeds = np.random.default_rng([cfg.seed, step, EVAL_STREAM, peers.rank])

    def noise(_batch: int) -> Noise:  # one draw per batch, in order
        return Noise(int(seeds.integers(0, 2**31 - 1)))

    mine = evaluation.score_prompts(
        run.lm,
        rows,
        run.rewards,
        cfg.eval_samples,
        sampling,
        cfg.eval_success_threshold,
        max(1, rows_at_once // cfg.eval_samples),
        noise=noise,
        max_rows=run.plan.decode_rows,
    )
    if peers.size == 1:
        return mine
    return [r for part in peers.gather_json(mine, "the evaluation") for r in part]


def keep_best(run: Run, step: int, value: float | None) -> None:
    """Keep the adapter in best/ when `value` beats the best so far (None never does)."""
    best = run.state.best
    if value is None or (best is not None and value <= best["value"]):
        return
    run.state.best = {"metric": run.cfg.keep_best, "step": step, "value": value}
    if run.peers.main:
        _write_best(run)


def _write_best(run: Run) -> None:
    """best/ written beside its place, then swapped in: a crash leaves one whole folder."""
    cfg, final = run.cfg, run.output_dir / BEST
    partial = run.output_dir / f".{BEST}-partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    adapter.save(partial)
    (partial / BEST_FILE).write_text(json.dumps(run.state.best, indent=1) + "\n")
    if final.is_dir() and not final.is_symlink():
        shutil.rmtree(final)
    else:
        final.unlink(missing_ok=True)
    os.replace(partial, final)
