"""Batched sampling of G completions for each of B prompts.

The B prompts are left-padded and prefilled together, once each; the KV
cache is then repeated G times and all B x G sequences decode in one batch
(or in chunks of whole groups, or of equal parts of a group, when the
memory plan limits the rows decoding at once).
A sequence stops at its first EOS (any id in `eos_ids`), which is kept in
the completion and counted in its mask; it then leaves the batch (its rows
of the KV cache are dropped), so finished sequences cost no more compute.

Sampling draws one uniform number per row and inverts the cumulative
distribution: one exp pass over the vocabulary gives both the token and its
log-prob. (Gumbel-max sampling, mlx-lm's, costs two logs per vocabulary
entry plus as many random numbers: 15% of a decode step on a CPU.) The
number of row i at decode step t depends only on the rollout's seed, t and
i's place in the step's batch (`Noise`), so a data-parallel process samples
exactly what one process holding the whole batch would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

from mlx_grpo.core.backend import blas_threads, cpu_only
from mlx_grpo.core.caches import RolloutCache
from mlx_grpo.core.config import SamplingSettings
from mlx_grpo.core.lora import SMALL_MATMUL_ROWS, split_matmul, split_small_matmuls
from mlx_grpo.core.models import body_and_head, left_pad


@dataclass(frozen=True)
class Noise:
    """Where a rollout's uniform numbers come from.

    Decode step t draws `total_rows` numbers from the t-th split of
    key(seed) and this batch uses rows first_row .. first_row + N - 1.
    """

    seed: int
    first_row: int = 0  # this batch's first row in the step's batch over all processes
    total_rows: int | None = None  # rows in that batch (None: just this one)

    @staticmethod
    def fresh(first_row: int = 0, total_rows: int | None = None) -> Noise:
        """Noise seeded with one draw from MLX's global random stream."""
        return Noise(int(mx.random.randint(0, 2**31 - 1).item()), first_row, total_rows)


@dataclass
class RolloutBatch:
    """B x G sequences; row b * G + j is the j-th completion of prompt b."""

    prompt_tokens: mx.array  # (N, P) int32, left-padded
    prompt_padding: mx.array  # (N,) int32, pad tokens on the left of each prompt
    completion_ids: mx.array  # (N, T) int32, pad after the first EOS
    completion_mask: mx.array  # (N, T) float32, 1 up to and including the first EOS
    sampled_logprobs: mx.array  # (N, T) float32, log pi(token) while sampling, at temperature
    truncated: list[bool]  # no EOS within max_completion_length
    # (N, T) float32, 0 on completion tokens the loss leaves out (an agent's tool results);
    # None: the loss takes every completion token
    loss_mask: mx.array | None = None

    @property
    def tokens(self) -> mx.array:
        """(N, P + T) prompt followed by completion."""
        return mx.concatenate([self.prompt_tokens, self.completion_ids], axis=1)

    @property
    def lengths(self) -> list[int]:
        return self.completion_mask.sum(axis=1).astype(mx.int32).tolist()

    @property
    def trained(self) -> mx.array:
        """(N, T) the completion tokens the loss takes: the mask, less any tool results."""
        return self.completion_mask if self.loss_mask is None else self.loss_mask

    @property
    def trained_lengths(self) -> list[int]:
        """Each completion's tokens the model wrote (what TRL's length metrics count)."""
        return self.trained.sum(axis=1).astype(mx.int32).tolist()

    @classmethod
    def of(
        cls,
        tokens: mx.array,  # (B, P) the prompts, left-padded
        padding: mx.array,  # (B,)
        g: int,  # completions of each prompt
        ids: np.ndarray,  # (B * G, T) completions, and their masks and log-probs
        mask: np.ndarray,
        logp: np.ndarray,
        truncated: list[bool],
        loss_mask: np.ndarray | None = None,
    ) -> RolloutBatch:
        """The batch of B prompts' G completions each (row b * G + j: prompt b's j-th)."""
        return cls(
            prompt_tokens=mx.repeat(tokens, g, axis=0),
            prompt_padding=mx.repeat(padding, g),
            completion_ids=mx.array(ids),
            completion_mask=mx.array(mask),
            sampled_logprobs=mx.array(logp),
            truncated=truncated,
            loss_mask=None if loss_mask is None else mx.array(loss_mask),
        )

    def completion_lists(self) -> list[list[int]]:
        """Each completion's ids, EOS included, padding dropped."""
        ids = self.completion_ids.tolist()
        return [row[:n] for row, n in zip(ids, self.lengths)]


def rollout(
    model: nn.Module,
    prompts: list[list[int]],
    num_generations: int,
    sampling: SamplingSettings,
    eos_ids: list[int],
    pad_id: int,
    noise: Noise | None = None,
    max_rows: int | None = None,
) -> RolloutBatch:
    """Sample `num_generations` completions for every prompt, in one batch or in chunks.

    `noise` defaults to a fresh seed from MLX's global random stream.
    `max_rows` (the memory plan's) decodes at most that many sequences at a
    time: whole groups while they fit, else equal parts of a group (a
    divisor of G). Each sequence draws the same numbers either way.

    Example:
        >>> sampling = TrainConfig(max_completion_length=8).sampling()
        >>> batch = rollout(model, [tok.encode("2+2=")], 4, sampling,
        ...                 eos_ids=[tok.eos_token_id], pad_id=0)
        >>> batch.completion_ids.shape
        (4, 8)
    """
    g = num_generations
    tokens, padding = left_pad(prompts, pad_id)
    noise = noise or Noise.fresh()
    n = len(prompts) * g
    total = noise.total_rows or n
    parts = []
    for first, count, row, copies in decode_chunks(len(prompts), g, max_rows or n):
        sl = slice(first, first + count)
        logits, cache = prefill(
            model, tokens[sl], padding[sl], copies, sampling.max_completion_length
        )
        chunk_noise = replace(noise, first_row=noise.first_row + row, total_rows=total)
        steps, going = _decode(model, logits, cache, sampling, eos_ids, chunk_noise)
        del logits, cache  # the next chunk's cache takes this one's place
        truncated = np.zeros(count * copies, dtype=bool)
        truncated[going] = True
        parts.append((*_assemble(steps, count * copies, pad_id), truncated))
    ids, mask, logp, truncated = _joined(parts, pad_id)
    return RolloutBatch.of(tokens, padding, g, ids, mask, logp, truncated.tolist())


def _joined(parts: list[tuple[np.ndarray, ...]], pad_id: int) -> tuple[np.ndarray, ...]:
    """The chunks' (ids, mask, log-probs, truncated) stacked, padded to the longest."""
    length = max(ids.shape[1] for ids, *_ in parts)

    def padded(a: np.ndarray, fill: float) -> np.ndarray:
        out = np.full((a.shape[0], length), fill, dtype=a.dtype)
        out[:, : a.shape[1]] = a
        return out

    ids, mask, logp, truncated = zip(*parts)
    return (
        np.concatenate([padded(a, pad_id) for a in ids]),
        np.concatenate([padded(a, 0.0) for a in mask]),
        np.concatenate([padded(a, 0.0) for a in logp]),
        np.concatenate(truncated),
    )


def join_rollouts(parts: list[tuple[RolloutBatch, np.ndarray]], pad_id: int) -> RolloutBatch:
    """The rows `rows` of each batch, in that order, in one batch: prompts left-padded to
    the widest, completions right-padded to the longest."""
    width = max(b.prompt_tokens.shape[1] for b, _ in parts)
    length = max(b.completion_ids.shape[1] for b, _ in parts)
    columns: dict[str, list[np.ndarray]] = {}
    for b, rows in parts:
        rows = np.asarray(rows)
        tokens, widen = np.array(b.prompt_tokens)[rows], width - b.prompt_tokens.shape[1]
        columns.setdefault("prompt_tokens", []).append(
            np.pad(tokens, ((0, 0), (widen, 0)), constant_values=pad_id)
        )
        columns.setdefault("prompt_padding", []).append(np.array(b.prompt_padding)[rows] + widen)
        for name, fill in (
            ("completion_ids", pad_id),
            ("completion_mask", 0),
            ("sampled_logprobs", 0),
            ("loss_mask", 0),
        ):
            a = np.array(b.trained if name == "loss_mask" else getattr(b, name))[rows]
            columns.setdefault(name, []).append(
                np.pad(a, ((0, 0), (0, length - a.shape[1])), constant_values=fill)
            )
        columns.setdefault("truncated", []).append(np.array(b.truncated, dtype=bool)[rows])
    joined = {k: np.concatenate(v) for k, v in columns.items()}
    truncated = joined.pop("truncated").tolist()
    if all(b.loss_mask is None for b, _ in parts):
        del joined["loss_mask"]
    return RolloutBatch(**{k: mx.array(v) for k, v in joined.items()}, truncated=truncated)


def decode_chunks(prompts: int, g: int, max_rows: int) -> list[tuple[int, int, int, int]]:
    """(first prompt, prompts, first row, copies of each) per decode chunk, in row order."""
    if max_rows >= prompts * g:
        return [(0, prompts, 0, g)]
    if max_rows >= g:
        k = max_rows // g
        return [(b, min(k, prompts - b), b * g, g) for b in range(0, prompts, k)]
    r = max(d for d in range(1, max_rows + 1) if g % d == 0)
    return [(b, 1, b * g + j, r) for b in range(prompts) for j in range(0, g, r)]


def _decode(
    model: nn.Module,
    logits: mx.array,
    cache: list[RolloutCache],
    sampling: SamplingSettings,
    eos_ids: list[int],
    noise: Noise,
) -> tuple[list[tuple[np.ndarray, np.ndarray, np.ndarray]], np.ndarray]:
    """Sample token after token: per step (the batch's rows decoded, their tokens, their
    log-probs), and the rows still going when the length limit came (truncated).

    A row that samples EOS leaves the batch: its cache rows are dropped.
    """
    draw = make_draw(sampling)
    eos = mx.array(sorted(set(eos_ids)), dtype=mx.int32)
    n = logits.shape[0]
    key, rows = mx.random.key(noise.seed), noise.total_rows or n
    live = np.arange(n)  # the batch's rows still decoding, in the cache's order
    steps = []
    streams = decode_streams(n)
    step_fn = decode_step(model, streams)
    with split_small_matmuls(streams), blas_threads(1 if streams else None):
        for step in range(sampling.max_completion_length):
            key, sub = mx.random.split(key)
            u = mx.random.uniform(shape=(rows, 1), key=sub)[noise.first_row : noise.first_row + n]
            token, token_logp = draw(logits, u if len(live) == n else u[mx.array(live)])
            ended = (token[:, None] == eos[None]).any(axis=1)
            mx.eval(token, token_logp, ended)
            steps.append((live, np.array(token), np.array(token_logp)))
            ended = np.array(ended)
            if step + 1 == sampling.max_completion_length or ended.all():
                break
            if ended.any():  # rows that ended leave the batch: no more compute for them
                keep = mx.array(np.flatnonzero(~ended))
                for c in cache:
                    c.filter(keep)
                token, live = token[keep], live[~ended]
            logits = step_fn(token[:, None], cache)
    return steps, live[~ended]


def _assemble(steps: list[tuple], n: int, pad_id: int) -> tuple[np.ndarray, ...]:
    """(N, T) ids (pad after the end), mask and log-probs from each step's live rows."""
    ids = np.full((n, len(steps)), pad_id, dtype=np.int32)
    mask = np.zeros((n, len(steps)), dtype=np.float32)
    logp = np.zeros((n, len(steps)), dtype=np.float32)
    for t, (rows, tokens, token_logp) in enumerate(steps):
        ids[rows, t], mask[rows, t], logp[rows, t] = tokens, 1.0, token_logp
    return ids, mask, logp


def prefill(
    model: nn.Module, tokens: mx.array, padding: mx.array, g: int, room: int
) -> tuple[mx.array, list[RolloutCache]]:
    """Run each prompt once; return its next-token logits and cache, each repeated G times."""
    cache = [RolloutCache(padding.tolist()) for _ in model.layers]
    logits = model(tokens, cache=cache)[:, -1, :]  # (B, V)
    for c in cache:
        c.repeat(g, room=room)
    return mx.repeat(logits, g, axis=0), cache  # (B*G, V)


_STREAMS: list = []


def decode_streams(rows: int) -> list | None:
    """CPU streams to split small decode matmuls over, one per core; None when not worth it.

    Only on a CPU backend with 2+ cores and at most 8 rows (see `split_matmul`);
    bigger batches already keep every core busy inside BLAS.
    """
    cores = min(os.cpu_count() or 1, 8)
    if rows > SMALL_MATMUL_ROWS or cores < 2 or not cpu_only():
        return None
    while len(_STREAMS) < cores:
        _STREAMS.append(mx.default_stream(mx.cpu) if not _STREAMS else mx.new_stream(mx.cpu))
    return _STREAMS[:cores]


def decode_step(model: nn.Module, streams: list | None):
    """(tokens (N, 1), cache) -> next-token logits (N, V); the LM head split too when asked."""
    split = body_and_head(model) if streams else None
    head = getattr(split[1], "__self__", split[1]) if split else None
    weight = getattr(head, "weight", None)
    if split is None or type(head) not in (nn.Linear, nn.Embedding) or "bias" in head:
        return lambda tokens, cache: model(tokens, cache=cache)[:, -1, :]
    body = split[0]
    return lambda tokens, cache: split_matmul(body(tokens, cache=cache)[:, -1, :], weight, streams)


def make_draw(sampling: SamplingSettings):
    """A function (N, V) logits -> ((N,) tokens, (N,) their log-probs at temperature).

    Temperature first, then top-k, top-p and min-p, in the order transformers
    applies them. The log-prob is under the tempered distribution before the
    filters: the distribution the trainer scores.
    """
    filters = []
    if sampling.top_k > 0:
        filters.append(lambda lp: apply_top_k(lp, sampling.top_k))
    if 0.0 < sampling.top_p < 1.0:
        filters.append(lambda lp: apply_top_p(lp, sampling.top_p))
    if sampling.min_p > 0.0:
        filters.append(lambda lp: apply_min_p(lp, sampling.min_p))
    greedy = sampling.temperature <= 0

    def draw(logits: mx.array, u: mx.array | None = None) -> tuple[mx.array, mx.array]:
        scaled = logits.astype(mx.float32) / sampling.logprob_temperature
        peak = scaled.max(axis=-1, keepdims=True)
        weights = mx.exp(scaled - peak)
        if greedy:
            token = mx.argmax(scaled, axis=-1)
            lse = peak + mx.log(weights.sum(axis=-1, keepdims=True))
        else:
            cdf = mx.cumsum(weights, axis=-1)
            lse = peak + mx.log(cdf[:, -1:])
            if filters:
                logprobs = scaled - lse
                for f in filters:
                    logprobs = f(logprobs)
                cdf = mx.cumsum(mx.exp(logprobs), axis=-1)
            token = inverse_cdf(cdf, u)
        token = token.astype(mx.int32)
        return token, mx.take_along_axis(scaled, token[:, None], axis=-1)[:, 0] - lse[:, 0]

    return draw


def inverse_cdf(cdf: mx.array, u: mx.array | None = None) -> mx.array:
    """Sample row i from the unnormalised cumulative weights cdf[i] (N, V): (N,) ids.

    The id is the first entry whose cumulative weight exceeds u * total, for
    u (N, 1) uniform in [0, 1) (drawn here when not given): zero-weight
    entries are never drawn.
    """
    if u is None:
        u = mx.random.uniform(shape=(cdf.shape[0], 1))
    threshold = u * cdf[:, -1:]
    return mx.minimum((cdf <= threshold).sum(axis=-1), cdf.shape[-1] - 1)
