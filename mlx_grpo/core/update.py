"""Policy optimisation on one rollout: micro-batches, the loss, mu AdamW updates.

The rollout is split into `gradient_accumulation_steps` micro-batches, each
cut into chunks within the memory plan's token budget, each chunk trimmed
to its own padding and longest completion, its completions packed several
to a row where the model allows (else the chunks hold rows of similar
length). Reference inputs (beta != 0) are computed once per chunk,
before the first update; each of the mu passes sums the chunks' gradients
(from `LossAndGrad`, compiled once per run), clips their global norm and
makes one AdamW step.

pi_old log-probs (mu > 1) are the ones the rollout sampled with: the same
weights, so they equal a fresh forward pass up to float32 rounding (TRL
recomputes them with one more forward pass). A model that computes in
16-bit floats rounds decode and training passes differently, so there the
forward pass is run.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from mlx_grpo.core.caches import takes_token_positions
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.distributed import Peers
from mlx_grpo.core.logprobs import (
    Scores,
    completion_hidden,
    completion_logprobs,
    pack,
    prompt_groups,
)
from mlx_grpo.core.lora import adapters_disabled
from mlx_grpo.core.objective import LossSettings, Normalizer, grpo_loss, k3_kl
from mlx_grpo.core.rollout import RolloutBatch


@dataclass
class MicroBatch:
    """A slice of a rollout, trimmed to its own padding and length."""

    prompt_tokens: mx.array  # (M, P)
    padding: mx.array  # (M,)
    completion_ids: mx.array  # (M, T)
    mask: mx.array  # (M, T)
    advantages: mx.array  # (M,)
    old_logp: mx.array | None  # (M, T)
    ref: mx.array | None  # (M, T) ref log-probs (k3) or (M, T, D) ref hidden (exact)
    group_rows: int | mx.array  # rows of the micro-batch this chunk belongs to (the loss's unit)
    group_tokens: float | mx.array  # completion tokens of that micro-batch
    groups: tuple[mx.array, mx.array] | None = None  # the rows' prompt_groups
    packing: dict[str, mx.array] | None = None  # completions packed several to a row


@dataclass
class Update:
    """What `optimise` did: its metrics, and per pass whether the update was applied."""

    metrics: dict[str, float]
    applied: list[bool]  # False: a NaN/Inf loss or gradient skipped that pass


# Bucketing: a chunk may hold this share of padding tokens (plus a few) before a new one
# starts; a chunk costs one more pass through the layers, so tiny ones do not pay.
PADDING_SHARE = 0.25
PADDING_ALLOWED = 64


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate of update `step` (0-based): linear warmup, then the schedule."""
    if step < cfg.warmup_steps:
        return cfg.learning_rate * step / max(1, cfg.warmup_steps)
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.lr_scheduler == "linear":
        return cfg.learning_rate * max(0.0, 1.0 - progress)
    if cfg.lr_scheduler == "cosine":
        return cfg.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.learning_rate


def micro_batches(
    model: nn.Module,
    batch: RolloutBatch,
    advantages: mx.array,
    cfg: TrainConfig,
    max_tokens: int | None = None,
    buckets: bool = True,
) -> list[MicroBatch]:
    """Split the rollout for accumulation; add pi_old and reference inputs.

    The rollout splits into `gradient_accumulation_steps` micro-batches, the
    objective's unit. A model that takes token positions gets its
    completions packed (no padding in the layers or the head), so longer
    chunks only save passes over the prompts; otherwise, with `buckets`,
    each micro-batch's rows are taken longest first and cut into chunks of
    similar length, so that padding costs little. With `max_tokens` (the
    memory plan's), no chunk's rows x (prompt + longest completion) exceed
    it. A chunk's loss is normalised by its micro-batch, so the chunks'
    gradients add up to the micro-batch's.
    """
    buckets = buckets and not takes_token_positions(model)
    n = batch.completion_ids.shape[0]
    size = n // cfg.gradient_accumulation_steps
    lengths = np.array(batch.lengths)
    width = batch.prompt_tokens.shape[1]
    out = []
    for start in range(0, n, size):
        group = (size, float(lengths[start : start + size].sum()))
        for rows in _chunks(lengths[start : start + size], width, max_tokens, buckets):
            rows = rows + start
            out.append(_micro_batch(model, batch, advantages, cfg, rows, lengths[rows], group))
    return out


def _chunks(
    lengths: np.ndarray, width: int, max_tokens: int | None, buckets: bool
) -> list[np.ndarray]:
    """Row indices of each chunk: in order, or longest first with a new chunk wherever the
    next row would pad the chunk by more than PADDING_SHARE of its tokens (plus
    PADDING_ALLOWED); and always where rows x (width + longest) would exceed `max_tokens`."""
    order = np.argsort(-lengths, kind="stable") if buckets else np.arange(len(lengths))
    out: list[list[int]] = [[]]
    longest = real = 0
    for i in order:
        n, rows = int(lengths[i]), len(out[-1])
        top = max(longest, n)
        too_big = max_tokens is not None and (rows + 1) * (width + top) > max_tokens
        padding = (rows + 1) * top - (real + n)
        too_padded = buckets and padding > PADDING_SHARE * (real + n) + PADDING_ALLOWED
        if rows and (too_big or too_padded):
            out.append([])
            longest = real = 0
        out[-1].append(int(i))
        longest, real = max(longest, n), real + n
    return [np.array(rows) for rows in out]


def _micro_batch(
    model: nn.Module,
    batch: RolloutBatch,
    advantages: mx.array,
    cfg: TrainConfig,
    rows: np.ndarray,
    lengths: np.ndarray,
    group: tuple[int, float],
) -> MicroBatch:
    """The rollout's `rows` (completions of `lengths`), trimmed to their own padding and
    their longest completion, packed where the model allows, with pi_old and the
    reference."""
    sl, length = mx.array(rows), max(1, int(lengths.max()))
    pad = batch.prompt_padding[sl]
    trim_left = int(pad.min().item())
    mb = MicroBatch(
        prompt_tokens=batch.prompt_tokens[sl, trim_left:],
        padding=pad - trim_left,
        completion_ids=batch.completion_ids[sl, :length],
        mask=batch.completion_mask[sl, :length],
        advantages=advantages[sl],
        old_logp=None,
        ref=None,
        group_rows=group[0],
        group_tokens=group[1],
    )
    mb.groups = prompt_groups(mb.prompt_tokens, mb.padding)
    if takes_token_positions(model):
        owner, first = (np.array(a) for a in mb.groups)
        ids, width = np.array(mb.completion_ids), mb.prompt_tokens.shape[1]
        mb.packing = pack(ids, lengths, owner, np.array(mb.padding)[first], width)
    if cfg.num_iterations > 1:
        if computes_in_float32(model):
            mb.old_logp = batch.sampled_logprobs[sl, :length]
        else:
            mb.old_logp = _score(model, mb, cfg, no_grad=True).logp
    if cfg.beta != 0.0:
        with adapters_disabled(model):
            if cfg.kl_estimator == "exact":
                mb.ref = completion_hidden(
                    model, mb.prompt_tokens, mb.padding, mb.completion_ids, mb.groups, mb.packing
                )
            else:
                mb.ref = _score(model, mb, cfg, no_grad=True).logp
    mx.eval(mb.old_logp, mb.ref)
    return mb


def computes_in_float32(model: nn.Module) -> bool:
    """True when the model's activations are float32 (its norm weights are)."""
    norm = getattr(model.layers[0], "input_layernorm", None)
    return norm is not None and norm.weight.dtype == mx.float32


def _score(
    model: nn.Module, mb: MicroBatch, cfg: TrainConfig, ref_hidden=None, no_grad=False
) -> Scores:
    temperature = cfg.sampling().logprob_temperature
    return completion_logprobs(
        model,
        mb.prompt_tokens,
        mb.padding,
        mb.completion_ids,
        temperature,
        cfg.logits_chunk_size,
        ref_hidden=ref_hidden,
        no_grad=no_grad,
        groups=mb.groups,
        packing=mb.packing,
    )


def micro_loss(
    model: nn.Module,
    mb: MicroBatch,
    cfg: TrainConfig,
    settings: LossSettings,
    normalizer: Normalizer,
) -> tuple[mx.array, dict[str, mx.array]]:
    exact = cfg.beta != 0.0 and cfg.kl_estimator == "exact"
    scores = _score(model, mb, cfg, ref_hidden=mb.ref if exact else None)
    kl = None
    if cfg.beta != 0.0:
        kl = scores.kl if exact else k3_kl(scores.logp, mb.ref)
    normalizer = replace(normalizer, rows=mb.group_rows, tokens=mb.group_tokens)
    loss, stats = grpo_loss(
        scores.logp, mb.old_logp, mb.advantages, mb.mask, settings, normalizer, kl
    )
    stats["entropy"] = mx.stop_gradient((scores.entropy * mb.mask).sum())
    return loss, stats


class LossAndGrad:
    """A chunk's loss, metric sums and adapter gradient: `micro_loss` differentiated,
    built once per run and compiled with `mx.compile`.

    One trace per shape of chunk (rows, prompt width, completion length) is
    kept; everything else that changes between calls (the adapter, the
    normaliser's counts, the random state of LoRA dropout) is an input, so a
    kept trace gives what the plain function would. Past MAX_TRACES shapes
    the traces are dropped and made again as needed. MLX_DISABLE_COMPILE=1
    (MLX's own switch) runs it uncompiled.
    """

    def __init__(self, model: nn.Module, cfg: TrainConfig):
        self.model, self.cfg = model, cfg
        self.shapes: set[tuple] = set()
        self.fn = _compiled_loss(model, cfg)

    def __call__(self, mb: MicroBatch, normalizer: Normalizer):
        arrays = {k: getattr(mb, k) for k in ARRAYS if getattr(mb, k) is not None}
        shape = tuple((k, v.shape) for k, v in tree_flatten(arrays))
        if shape not in self.shapes and len(self.shapes) >= MAX_TRACES:
            self.fn, self.shapes = _compiled_loss(self.model, self.cfg), set()
        self.shapes.add(shape)
        counts = {
            "chunk": {"group_rows": mb.group_rows, "group_tokens": mb.group_tokens},
            "update": {
                "accumulation_steps": normalizer.accumulation_steps,
                "tokens_in_batch": normalizer.tokens_in_batch,
            },
        }
        counts = tree_map(lambda x: mx.array(float(x)), counts)
        params = self.model.trainable_parameters()
        try:
            return self.fn(params, arrays, counts)
        finally:
            self.model.update(params)  # a trace leaves its placeholders in the model


def _compiled_loss(model: nn.Module, cfg: TrainConfig) -> Callable:
    # Not a method: the compiled function lives as long as what it refers to,
    # so a reference back to its owner would keep both (and the model) alive.
    settings = cfg.loss_settings()

    def loss(params: dict, arrays: dict, counts: dict):
        model.update(params)
        mb = MicroBatch(**{**dict.fromkeys(ARRAYS), **arrays}, **counts["chunk"])
        return micro_loss(model, mb, cfg, settings, Normalizer(**counts["update"]))

    state = mx.random.state
    return mx.compile(mx.value_and_grad(loss), inputs=state, outputs=state)


# MicroBatch fields that are arrays (or trees of them) or None; the others are counts
ARRAYS = tuple(f.name for f in fields(MicroBatch) if f.name not in ("group_rows", "group_tokens"))
MAX_TRACES = 64


def optimise(
    model: nn.Module,
    optimizer: optim.Optimizer,
    micro: list[MicroBatch],
    cfg: TrainConfig,
    lr: float,
    peers: Peers | None = None,
    loss_and_grad: LossAndGrad | None = None,
) -> Update:
    """mu passes over the rollout, each one accumulated AdamW update at rate `lr`.

    A pass whose loss or gradient norm is not finite makes no update. With
    `peers` (a data-parallel run), `micro` is this process's share: losses
    are divided for the micro-batches of all processes, and the gradients
    and metric sums are summed over them before the update.
    """
    peers = peers or Peers()
    model.train()
    local_tokens = mx.array(sum(mb.mask.sum().item() for mb in micro))
    normalizer = Normalizer(
        accumulation_steps=cfg.gradient_accumulation_steps * peers.size,
        tokens_in_batch=peers.sum({"tokens": local_tokens}, "the token count")["tokens"].item(),
    )
    loss_and_grad = loss_and_grad or LossAndGrad(model, cfg)
    totals: dict[str, float] = {}
    losses, norms, finite = [], [], []
    optimizer.learning_rate = lr
    for _ in range(cfg.num_iterations):
        grads, sums = None, {}
        for mb in micro:
            (loss, stats), g = loss_and_grad(mb, normalizer)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            sums = {k: sums[k] + v if k in sums else v for k, v in {"loss": loss, **stats}.items()}
            mx.eval(grads, sums)
        grads, sums = _summed(peers, grads, sums)
        loss_sum = sums.pop("loss").item()
        for k, v in sums.items():
            totals[k] = totals.get(k, 0.0) + v.item()
        if cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        else:
            norm = mx.sqrt(sum((v * v).sum() for _, v in tree_flatten(grads)))
        losses.append(loss_sum)
        norms.append(norm.item())
        # A NaN or Inf anywhere in the gradients shows in its norm: skip the
        # update so the adapter and AdamW moments keep their last finite values.
        finite.append(math.isfinite(loss_sum) and math.isfinite(norms[-1]))
        if finite[-1]:
            optimizer.update(model, grads)
            mx.eval(model.trainable_parameters(), optimizer.state)
    return Update(_metrics(losses, norms, finite, totals, lr), finite)


def _metrics(
    losses: list[float], norms: list[float], finite: list[bool], totals: dict[str, float], lr: float
) -> dict[str, float]:
    """TRL's update metrics: means over the passes, per-token and per-count ratios."""
    metrics = {
        "loss": float(np.mean(losses)),
        "grad_norm": float(np.mean(norms)),
        "skipped_updates": float(finite.count(False)),
        "learning_rate": lr,
        "entropy": totals["entropy"] / max(totals["tokens"], 1.0),
    }
    for key in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        metrics[key] = totals[key] / max(totals["count"], 1.0)
    if "kl" in totals:
        metrics["kl"] = totals["kl"] / max(totals["tokens"], 1.0)
    return metrics


def _summed(peers: Peers, grads: dict, sums: dict[str, mx.array]) -> tuple[dict, dict]:
    """Gradients and metric sums of one pass, summed over the run's processes."""
    if peers.size == 1:
        return grads, sums
    flat = {f"grad:{k}": v for k, v in tree_flatten(grads)}
    flat |= {f"sum:{k}": v.astype(mx.float32) for k, v in sums.items()}
    out = peers.sum(flat, "the gradient sum")
    grads = tree_unflatten([(k[5:], v) for k, v in out.items() if k.startswith("grad:")])
    return grads, {k[4:]: v for k, v in out.items() if k.startswith("sum:")}
