"""The training loop: `train`, and `train_step`, one GRPO step in one screen.

Each step takes B prompts, samples G completions of each in one batch
(rollout.py), scores them with the reward functions (step_rewards.py),
turns the rewards into group advantages (advantages.py) and updates the
adapter: mu passes over the rollout (update.py), each accumulating the
gradients of its micro-batches (batches.py) into AdamW steps (one, or
several with steps_per_generation), with pi_old from the rollout and the
reference log-probs (adapters off) only when beta != 0. Setting a run up
and restoring a checkpoint is setup.py's work; data-parallel runs over
several processes are described in distributed.py.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from mlx_grpo.core import checkpoint, dynamic, heldout, memory
from mlx_grpo.core.adapters import Adapter
from mlx_grpo.core.advantages import Advantages, group_advantages
from mlx_grpo.core.agent import AgentCode, tool_metrics
from mlx_grpo.core.batches import micro_batches, row_order
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.data import PromptRow
from mlx_grpo.core.distributed import PeerLost, connect
from mlx_grpo.core.dynamic import Round
from mlx_grpo.core.interrupts import Interrupted, finishing, stop_on_signals
from mlx_grpo.core.reporting import (
    PhaseTimer,
    Reporter,
    clean_record,
    length_metrics,
    reward_metrics,
    sample_records,
)
from mlx_grpo.core.reward_calls import TrainerState
from mlx_grpo.core.rollout import Noise, RolloutBatch, rollout
from mlx_grpo.core.runfolder import DiskFull
from mlx_grpo.core.settings import resolve
from mlx_grpo.core.setup import Run, resume_command, setup, snapshot, summary
from mlx_grpo.core.step_rewards import StepRewards, logged_metrics, score_rollout, trainer_state
from mlx_grpo.core.supervise import report_plan
from mlx_grpo.core.trackers import open_trackers
from mlx_grpo.core.update import Update, optimise


@dataclass
class TrainResult:
    output_dir: Path
    metrics: list[dict[str, Any]]
    rank: int = 0  # of this process in a distributed run; only process 0 wrote files


class TrainingStopped(RuntimeError):
    """The run cannot go on (non-finite updates); its last good state is saved."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped the run after saving a checkpoint."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def train(
    config: TrainConfig | str | Path | None = None,
    *,
    reward_funcs: list[Callable] | None = None,
    tools: list[Callable | str] | None = None,
    environment_factory: Callable | dict[str, Callable] | None = None,
    show_progress: bool | str = True,
    resume: str | Path | None = None,
    **overrides: Any,
) -> TrainResult:
    """Train a LoRA adapter with GRPO; return the output directory and metrics.

    `config` is a TrainConfig or a YAML path; keyword overrides win over it.
    `reward_funcs` adds Python callables (TRL signature) after the named
    rewards (`reward_weights` covers both, in order); given alone, they are
    the only rewards. `tools` (functions, or 'module:function' specs as
    --tools) and `environment_factory` (a class or function making an
    environment, or a dict of them chosen by an `environment` column) train
    an agent, as TRL's arguments of those names do; an environment's
    `get_reward` may be the only reward. Give the callables again to resume.

    `show_progress`: True shows a progress bar on a terminal and one plain
    line per `logging_steps` steps elsewhere, "lines" always the lines, False
    nothing (the files are written all the same). `resume` continues the run
    in that output directory from its newest checkpoint, with its settings
    (`overrides` may change only `checkpoint.RESUMABLE` ones, e.g.
    max_steps), as if never stopped. Ctrl-C or SIGTERM saves a checkpoint
    and raises TrainingInterrupted; any other error saves one too.

    Example:
        >>> import mlx_grpo
        >>> def short(prompts, completions, completion_ids, **kw):
        ...     return [-len(c) / 100 for c in completions]
        >>> result = mlx_grpo.train(model="Qwen/Qwen3-0.6B", data="train.jsonl",
        ...                         rewards=["math_answer"], reward_funcs=[short],
        ...                         max_steps=50, output_dir="runs/demo")
        >>> mlx_grpo.train(resume="runs/demo", max_steps=100)  # 50 more steps
    """
    peers = connect()  # several processes when started by mlx.launch
    code = _agent_code(tools, environment_factory, overrides)
    settings, own = None, bool(reward_funcs) or environment_factory is not None
    if peers.main:  # the others take process 0's settings: a resumed run's are on its disk
        settings = _settings(config, own, resume, overrides).to_dict()
    cfg = resolve(None, **peers.broadcast_json(settings, "the settings"))
    peers.timeout = cfg.distributed_timeout
    run = setup(cfg, reward_funcs or [], resume=resume is not None, peers=peers, code=code)
    report_plan(run.plan.peak)  # for an --auto-resume supervisor, should memory run out
    try:  # the run folder stays locked until here
        reporter = _reporter(run, show_progress)
        reporter.write(summary(run) + ("" if resume is None else "\n" + _resumed(run)))
        try:
            with stop_on_signals(), memory.limits(run.plan):
                _loop(run, reporter)
        finally:
            reporter.close()
            peers.on_timeout = None
    finally:
        run.release()
    return TrainResult(run.output_dir, run.state.history, peers.rank)


def _reporter(run: Run, show_progress: bool | str) -> Reporter:
    """The run's metrics files and progress display (process 0's: the others show nothing)."""
    cfg = run.cfg
    return Reporter(
        run.output_dir,
        max_steps=cfg.max_steps,
        max_minutes=cfg.max_minutes,
        start_step=run.state.step,
        mode={True: "auto", False: "off"}.get(show_progress, show_progress),
        every=cfg.logging_steps,
        enabled=run.peers.main,
        trackers=open_trackers(cfg.report_to, run.output_dir, cfg.to_dict())
        if run.peers.main
        else [],
    )


def _agent_code(
    tools: list[Callable | str] | None,
    environment_factory: Callable | dict[str, Callable] | None,
    overrides: dict[str, Any],
) -> AgentCode:
    """The API's tool callables and environment factory; tool specs (text) join the
    `tools` setting in `overrides`."""
    specs = [t for t in tools or [] if isinstance(t, str)]
    if specs:
        overrides["tools"] = [*overrides.get("tools", []), *specs]
    callables = [t for t in tools or [] if not isinstance(t, str)]
    return AgentCode(callables, environment_factory)


def _settings(
    config: TrainConfig | str | Path | None,
    own_rewards: bool,
    resume: str | Path | None,
    overrides: dict[str, Any],
) -> TrainConfig:
    """The run's settings; reward callables or an environment given without `rewards`
    replace the default math_answer."""
    if resume is not None:
        return checkpoint.resume_settings(resume, config, overrides)
    own_rewards = own_rewards or bool(overrides.get("environment"))
    if own_rewards and config is None and "rewards" not in overrides:
        overrides["rewards"] = []
    if isinstance(config, TrainConfig):
        return resolve(None, **{**config.to_dict(), **overrides})
    return resolve(config, **overrides)


def _loop(run: Run, reporter: Reporter) -> None:
    """Steps until max_steps or max_minutes; checkpoints; saving on every way out."""
    cfg = run.cfg
    run.last = snapshot(run)
    # A process that waited too long for the others saves what it has before exiting.
    run.peers.on_timeout = lambda: _save_checkpoint(run, run.last)
    started = time.perf_counter()
    try:
        for step in range(run.state.step, cfg.max_steps):
            metrics, samples = train_step(run, step)
            run.last = snapshot(run)  # before the logs show the step, so a save includes it
            reporter.log(metrics)
            if step % cfg.logging_steps == 0:
                reporter.samples(step + 1, samples)
            if cfg.save_steps and run.state.step % cfg.save_steps == 0:
                _save_checkpoint(run, run.last)
            _check_finite(run)
            out_of_time = cfg.max_minutes and time.perf_counter() - started > 60 * cfg.max_minutes
            if cfg.max_minutes and run.peers.any(bool(out_of_time), "the time limit"):
                reporter.write(f"stopping after {step + 1} steps: {cfg.max_minutes:g} minutes")
                break
        _save_checkpoint(run, run.last)
        if run.peers.main:
            _save(run)
    except Interrupted as exc:
        where = _save_checkpoint(run, run.last)
        raise TrainingInterrupted(
            f"{exc} received: stopped after step {run.last.step}; {where}. "
            f"Resume with: {resume_command(run)}",
            exc.exit_code,
        ) from None
    except PeerLost as exc:
        with finishing():  # mlx.launch signals the other processes as well
            where = _save_checkpoint(run, run.last)
        raise TrainingStopped(
            f"{exc} Stopped after step {run.last.step}; {where}. Once every process can run "
            f"again, resume with: {resume_command(run)}"
        ) from None
    except BaseException:
        with finishing():
            reporter.write(f"run stopped by an error; {_save_checkpoint(run, run.last)}")
        raise


def _check_finite(run: Run) -> None:
    """Stop a run whose last `max_nonfinite_updates` updates were all skipped."""
    if run.state.bad_updates < run.cfg.max_nonfinite_updates:
        return
    raise TrainingStopped(
        f"{run.state.bad_updates} updates in a row had a NaN or Inf loss or gradient (up to "
        f"step {run.state.step}); none was applied, so the adapter holds its last finite "
        "weights. Lower learning_rate, check the rewards and data for extreme values, then "
        f"continue with `mlx-grpo train --resume {run.output_dir}`."
    )


def _save_checkpoint(run: Run, snap: checkpoint.Snapshot) -> str:
    """Write `snap` unless it is already on disk; say where the progress is.

    Only process 0 of a distributed run writes (every process holds the same state).
    """
    if not run.peers.main:
        return "process 0 keeps the checkpoints"
    if snap.step > run.saved_step and snap.step != run.unsaved_step:
        try:
            checkpoint.write(run.output_dir, snap, run.cfg.save_total_limit)
        except DiskFull:
            run.unsaved_step = snap.step  # the error path does not try the full disk again
            raise
        run.saved_step = snap.step
    if run.saved_step == 0:
        return "no step completed, nothing to save"
    return (
        f"checkpoint of step {run.saved_step} in {checkpoint.path(run.output_dir, run.saved_step)}"
    )


def _resumed(run: Run) -> str:
    notes = "".join(f"\n  {note}" for note in run.resume_notes)
    where = checkpoint.path(run.output_dir, run.state.step)
    return f"resumed at step {run.state.step} from {where}{notes}"


def train_step(run: Run, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One step: rollout -> rewards -> advantages -> update -> log.

    Returns the step's metrics and the completions of its first group. In a
    distributed run this process rolls out and trains on its share of the
    step's prompts; rewards are gathered, so advantages and metrics are the
    whole step's.
    """
    cfg, model, peers, g = run.cfg, run.lm.model, run.peers, run.cfg.num_generations
    state = trainer_state(run)  # what reward functions see: before this step's prompts
    timer = PhaseTimer()
    if cfg.dynamic_sampling:  # one process (setup refuses it in distributed runs)
        draw = functools.partial(_draw, run, step, state, timer)
        limits = cfg.max_resample_rounds, run.lm.pad_id
        sampled, sampling_metrics = dynamic.sample(draw, cfg.prompts_per_step, g, *limits)
        mine = slice(None)
    else:
        sampled, sampling_metrics = _draw(run, step, state, timer), {}
        if sampled.agent is not None:
            sampling_metrics = tool_metrics(sampled.agent.episodes)
        mine = peers.part(len(sampled.prompts) * g)
    every_row, batch, scored = sampled.prompts, sampled.batch, sampled.scored
    adv = group_advantages(
        scored.per_func, scored.weights, g, cfg.scale_rewards, cfg.multi_objective_aggregation
    )
    with timer.phase("reference"):
        tokens, order = run.plan.update_tokens, row_order(len(batch.lengths), cfg, step)
        advantages = mx.array(adv.advantages[mine])
        micro = micro_batches(model, batch, advantages, cfg, tokens, order=order)
    with timer.phase("update"):
        update = optimise(
            model, run.optimizer, micro, cfg, step, peers, run.loss_and_grad, run.state.entropy
        )
    evaluated = heldout.evaluate_step(run, step, timer)  # with the updated adapter
    return _record(run, step, every_row, scored, adv, update, timer, sampling_metrics | evaluated)


def _draw(run: Run, step: int, state: TrainerState, timer: PhaseTimer) -> Round:
    """The next B prompts of every process, this process's rollout of its share, and the
    rewards of every process's completions."""
    cfg, peers, g = run.cfg, run.peers, run.cfg.num_generations
    taken = run.state.take_prompts(len(run.rows), cfg.prompts_per_step * peers.size)
    every_row = [run.rows[i] for i in taken]
    rows, mine = every_row[peers.part(len(every_row))], peers.part(len(every_row) * g)
    noise, agent = Noise.fresh(mine.start, len(every_row) * g), None
    with timer.phase("rollout"):
        if run.agent is None:
            batch = _rollout(run, rows, noise)
        else:
            run.lm.model.eval()
            lm, sampling = run.lm, cfg.sampling()
            agent = run.agent.rollout(
                lm.model, rows, sampling, lm.eos_ids, lm.pad_id, noise, run.plan.decode_rows
            )
            batch = agent.batch
    scored = score_rollout(run, step, rows, batch, state, agent)
    return Round(every_row, batch, scored, agent)


def _rollout(run: Run, rows: list[PromptRow], noise: Noise) -> RolloutBatch:
    """G completions of each of this process's prompts, sampled as the settings say."""
    run.lm.model.eval()
    prompts = [r.prompt_ids for r in rows]
    g, sampling = run.cfg.num_generations, run.cfg.sampling()
    lm, rows = run.lm, run.plan.decode_rows
    return rollout(lm.model, prompts, g, sampling, lm.eos_ids, lm.pad_id, noise, rows)


def _record(
    run: Run,
    step: int,
    every_row: list[PromptRow],
    scored: StepRewards,
    adv: Advantages,
    update: Update,
    timer: PhaseTimer,
    extra: dict[str, Any],
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Move the run state past the step; its metrics, and its first group's completions."""
    g = run.cfg.num_generations
    run.state.count_updates(update.applied)
    completion_tokens = int(scored.lengths.sum())
    run.state.num_tokens += completion_tokens + g * sum(len(r.prompt_ids) for r in every_row)
    names = [r.name for r in run.rewards]
    metrics = {
        "step": step + 1,
        "epoch": run.state.epoch,
        **reward_metrics(names, scored.per_func, adv),
        **length_metrics(scored.lengths.astype(int).tolist(), scored.truncated.tolist()),
        **update.metrics,
        "num_tokens": run.state.num_tokens,
        **timer.metrics(completion_tokens),
        **extra,
    }
    metrics |= logged_metrics(run, scored.logged, metrics)
    run.state.step = step + 1
    run.state.history.append(clean_record(metrics))
    first = slice(0, g)  # process 0's first prompt: the one that writes the logs
    samples = sample_records(
        every_row[0].prompt,
        scored.texts[first],
        names,
        scored.per_func[first],
        adv.advantages[first],
        {column: values[first] for column, values in scored.logged.extra.items()},
    )
    return metrics, samples


def _save(run: Run) -> Path:
    cfg = run.cfg
    adapter = Adapter.from_model(
        run.lm.model, cfg.lora_alpha, cfg.lora_dropout, cfg.use_rslora, base_model=cfg.model
    )
    return adapter.save(run.output_dir)
