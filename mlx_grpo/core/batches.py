"""The rollout cut into micro-batches for the update.

The rollout is split into `steps_per_generation` micro-batches (by default
`gradient_accumulation_steps`: one optimizer update takes the whole
rollout), each cut into chunks within the memory plan's token budget, each
chunk trimmed to its own padding and longest completion, its completions
packed several to a row where the model allows (else the chunks hold rows
of similar length). Where one rollout feeds several updates, its rows are
shuffled first (seeded by the step), as TRL shuffles its generation batch.
Reference inputs (beta != 0) are computed once per chunk, before the first
update.

pi_old log-probs (more than one update per rollout) are the ones the
rollout sampled with: the same weights, so they equal a fresh forward pass
up to float32 rounding (TRL recomputes them with one more forward pass). A
model that computes in 16-bit floats rounds decode and training passes
differently, so there the forward pass is run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_grpo.core.caches import takes_token_positions
from mlx_grpo.core.config import TrainConfig
from mlx_grpo.core.logprobs import (
    Scores,
    completion_hidden,
    completion_logprobs,
    pack,
    prompt_groups,
)
from mlx_grpo.core.lora import adapters_disabled
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
    index: int = 0  # which of the update's micro-batches the chunk belongs to
    # That micro-batch's entropy threshold and kept tokens, where it spans several chunks
    # (top_entropy_quantile < 1; set before each pass).
    entropy_threshold: float | mx.array | None = None
    entropy_tokens: float | mx.array | None = None


# Bucketing: a chunk may hold this share of padding tokens (plus a few) before a new one
# starts; a chunk costs one more pass through the layers, so tiny ones do not pay.
PADDING_SHARE = 0.25
PADDING_ALLOWED = 64


def micro_batches(
    model: nn.Module,
    batch: RolloutBatch,
    advantages: mx.array,
    cfg: TrainConfig,
    max_tokens: int | None = None,
    buckets: bool = True,
    order: np.ndarray | None = None,
) -> list[MicroBatch]:
    """Split the rollout for accumulation; add pi_old and reference inputs.

    The rollout's rows, taken in `order` (`row_order`; default as they
    are), split into `cfg.slices` micro-batches, the objective's unit; each
    chunk's `index` says which. A model that takes token positions gets its
    completions packed (no padding in the layers or the head), so longer
    chunks only save passes over the prompts; otherwise, with `buckets`,
    each micro-batch's rows are taken longest first and cut into chunks of
    similar length, so that padding costs little. With `max_tokens` (the
    memory plan's), no chunk's rows x (prompt + longest completion) exceed
    it. A chunk's loss is normalised by its micro-batch, so the chunks'
    gradients add up to the micro-batch's. With `mask_truncated_completions`
    a truncated completion's mask is 0: it leaves the loss and the token
    counts (its reward has already counted in the advantages), and its
    tokens are not fed.
    """
    if cfg.mask_truncated_completions:
        kept = mx.array(~np.array(batch.truncated, dtype=bool))[:, None]
        batch = replace(batch, completion_mask=batch.completion_mask * kept)
        if batch.loss_mask is not None:
            batch = replace(batch, loss_mask=batch.loss_mask * kept)
    buckets = buckets and not takes_token_positions(model)
    n = batch.completion_ids.shape[0]
    order = np.arange(n) if order is None else np.asarray(order)
    size = n // cfg.slices
    lengths = np.array(batch.lengths)
    width = batch.prompt_tokens.shape[1]
    out = []
    for start in range(0, n, size):
        part = order[start : start + size]
        group = (size, batch.trained[mx.array(part)].sum().item())
        for rows in _chunks(lengths[part], width, max_tokens, buckets):
            rows = part[rows]
            out.append(_micro_batch(model, batch, advantages, cfg, rows, lengths[rows], group))
            out[-1].index = start // size
    return out


def row_order(n: int, cfg: TrainConfig, step: int) -> np.ndarray:
    """The order in which a rollout's `n` rows are cut into micro-batches: as they are when
    one update takes them all (its gradient sums every micro-batch's, and a group's rows
    keep sharing their prompt's pass), else shuffled, the same way whenever step `step`
    runs, so that each update sees rows of every group."""
    if cfg.updates_per_step == cfg.num_iterations:
        return np.arange(n)
    return np.random.default_rng([cfg.seed, step, ROW_ORDER_STREAM]).permutation(n)


ROW_ORDER_STREAM = 0x0DE5  # keeps this shuffle's random stream apart from the data's


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
        mask=batch.trained[sl, :length],  # tool results (an agent's) are read, not trained
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
    if cfg.updates_per_step > 1:
        if computes_in_float32(model):
            mb.old_logp = batch.sampled_logprobs[sl, :length]
        else:
            mb.old_logp = score(model, mb, cfg, no_grad=True).logp
    if cfg.beta != 0.0:
        with adapters_disabled(model):
            if cfg.kl_estimator == "exact":
                mb.ref = completion_hidden(
                    model, mb.prompt_tokens, mb.padding, mb.completion_ids, mb.groups, mb.packing
                )
            else:
                mb.ref = score(model, mb, cfg, no_grad=True).logp
    mx.eval(mb.old_logp, mb.ref)
    return mb


def computes_in_float32(model: nn.Module) -> bool:
    """True when the model's activations are float32 (its norm weights are)."""
    norm = getattr(model.layers[0], "input_layernorm", None)
    return norm is not None and norm.weight.dtype == mx.float32


def score(
    model: nn.Module,
    mb: MicroBatch,
    cfg: TrainConfig,
    ref_hidden=None,
    no_grad=False,
    entropy=False,
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
        entropy=entropy,
    )
