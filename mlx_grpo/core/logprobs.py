"""Per-token log-probs of completions under the model, in bounded memory.

One forward pass over (prompt + completion) gives the final hidden states,
with each prompt computed once for all the completions that share it; the
LM head then runs over chunks of completion positions, so full-vocabulary
logits exist for at most `chunk_size` positions at a time. The log-probs
have their own backward pass (`head_logprobs`): it recomputes a chunk's
logits and reuses the log-normaliser saved by the forward pass, instead of
re-running the forward pass under `mx.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from mlx_grpo.core.caches import PrefixCache
from mlx_grpo.core.models import body_and_head, body_of
from mlx_grpo.core.objective import exact_kl, logprob_stats


@dataclass
class Scores:
    logp: mx.array  # (N, T) log-prob of each completion token, at temperature
    entropy: mx.array | None  # (N, T) policy entropy (a gradient only for a bonus)
    kl: mx.array | None  # (N, T) exact KL to the reference, when reference hidden given


def completion_hidden(
    model: nn.Module,
    prompt_tokens: mx.array,
    padding: mx.array,
    completion_ids: mx.array,
    groups: tuple[mx.array, mx.array] | None = None,
    packing: dict[str, mx.array] | None = None,
    real_only: bool = False,
) -> mx.array:
    """(N, T, D) hidden states whose head output predicts each completion token.

    Rows that share a prompt (a group's G completions) share its forward
    pass: the prompt runs once, its keys and values go to every row of the
    group, and only the completions run per row. For models whose head
    cannot be split off these are the logits (N, T, V). `groups` are the
    rows' `prompt_groups`, when known; with `packing` (from `pack`) the
    completions run packed several to a row, without padding, and
    `real_only` gives (M, D): the completions' own M tokens, in row order.
    """
    body = body_of(model)
    owner, first = groups or prompt_groups(prompt_tokens, padding)
    caches = [PrefixCache(padding[first]) for _ in model.layers]
    prompt_hidden = body(prompt_tokens[first], cache=caches)  # (U, P, D)
    if packing is not None:
        rows, positions, mask = packing["rows"], packing["positions"], packing["mask"]
        rest = body(packing["tokens"], cache=[c.packed(rows, positions, mask) for c in caches])
        flat = mx.concatenate([prompt_hidden[:, -1], rest.reshape(-1, rest.shape[-1])])
        return flat[packing["real" if real_only else "index"]]
    caches = [c.select(owner) for c in caches]
    last = prompt_hidden[owner, -1:]  # (N, 1, D) predicts completion token 0
    if completion_ids.shape[1] == 1:
        return last
    rest = body(completion_ids[:, :-1], cache=caches)  # (N, T - 1, D)
    return mx.concatenate([last, rest], axis=1)


def prompt_groups(prompt_tokens: mx.array, padding: mx.array) -> tuple[mx.array, mx.array]:
    """(owner (N,), first (U,)): row i's prompt is row first[owner[i]]'s.

    Rows with the same tokens and padding share a prompt, wherever they
    are: a rollout's groups, or a chunk whose rows were sorted by length.
    """
    rows = np.concatenate([np.array(padding)[:, None], np.array(prompt_tokens)], axis=1)
    _, first, owner = np.unique(rows, axis=0, return_index=True, return_inverse=True)
    order = np.argsort(first)  # prompts numbered in the order they first appear
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return mx.array(rank[owner.reshape(-1)]), mx.array(first[order])


def pack(
    completion_ids: np.ndarray,  # (N, T)
    lengths: np.ndarray,  # (N,) completion tokens of each row
    owner: np.ndarray,  # (N,) row's prompt (prompt_groups)
    prompt_padding: np.ndarray,  # (U,) left padding of each prompt
    width: int,  # prompt width P
) -> dict[str, mx.array] | None:
    """Completions packed several to a row, for `completion_hidden`; None where that
    would not save a token.

    Row i feeds its first lengths[i] - 1 tokens (the last one predicts
    nothing); rows of one prompt share packed rows, first fit, longest first.
    Each token gets the RoPE position it has alone (prompt length + its
    index), and the mask lets it see its prompt's tokens and the tokens
    before it in its own completion. The unused end of a packed row is one
    more span that sees its prompt and itself (no empty softmax row).
    `index` maps each (row, position) to its hidden state in [prompts' last
    states; packed states]; padding positions point at the prompt's. `real`
    and `targets` are the index and token of each real position, in row
    order, and `back` maps (row, position) to that order (padding: past it).
    """
    n, t = completion_ids.shape
    feeds = np.maximum(lengths - 1, 0)
    cap = int(feeds.max(initial=0))
    rows, where = _first_fit(feeds, owner, cap)
    if not len(rows) or len(rows) * cap >= n * (t - 1):  # the unpacked pass feeds n x (t - 1)
        return None
    r, u = len(rows), len(prompt_padding)
    tokens = np.zeros((r, cap), dtype=np.int32)
    span = np.full((r, cap), -1)  # which row's completion each packed token is (-1: unused)
    positions = np.zeros((r, cap), dtype=np.int32)
    index = np.repeat(owner[:, None], t, axis=1).astype(np.int32)
    start_of = np.arange(cap)[None].repeat(r, 0)  # unused tokens continue the row's count
    for i in np.nonzero(feeds)[0]:
        b, s, k = where[i][0], where[i][1], feeds[i]
        tokens[b, s : s + k] = completion_ids[i, :k]
        span[b, s : s + k] = i
        start_of[b, s : s + k] = s
        index[i, 1 : k + 1] = u + b * cap + s + np.arange(k)
    real = width - prompt_padding[rows]
    positions[:] = real[:, None] + np.arange(cap)[None] - start_of
    q = np.arange(cap)
    own = (span[:, :, None] == span[:, None, :]) & (q[:, None] >= q[None, :])
    prompt = np.arange(width)[None, None] >= prompt_padding[rows][:, None, None]
    prompt = np.broadcast_to(prompt, (r, cap, width))
    mask = np.concatenate([prompt, own], axis=2)[:, None]
    real = np.arange(t)[None] < lengths[:, None]
    back = np.full((n, t), real.sum())  # padding -> one past the real tokens
    back[real] = np.arange(real.sum())
    arrays = dict(tokens=tokens, rows=rows, positions=positions, mask=mask, index=index, back=back)
    arrays |= dict(real=index[real], targets=completion_ids[real])
    return {k: mx.array(v.astype(np.int32) if v.dtype != bool else v) for k, v in arrays.items()}


def _first_fit(feeds: np.ndarray, owner: np.ndarray, cap: int) -> tuple[np.ndarray, np.ndarray]:
    """(prompt of each packed row, (packed row, start) of each row's span): spans of one
    prompt share packed rows of `cap` tokens, first fit, longest first."""
    bins: list[list[int]] = []  # per packed row: [prompt, tokens used]
    where = np.zeros((len(feeds), 2), dtype=np.int64)
    for i in sorted(range(len(feeds)), key=lambda i: -feeds[i]):
        if feeds[i] == 0:
            continue
        b = next((b for b in bins if b[0] == owner[i] and b[1] + feeds[i] <= cap), None)
        if b is None:
            bins.append(b := [int(owner[i]), 0])
        where[i] = (bins.index(b), b[1])
        b[1] += int(feeds[i])
    return np.array([b[0] for b in bins], dtype=np.int64), where


def _spread(values: mx.array, back: mx.array) -> mx.array:
    """(N, T) from the real tokens' (M,) values: zero at padding."""
    return mx.concatenate([values, mx.zeros((1,), values.dtype)])[back]


def _head(model: nn.Module) -> tuple[Callable | None, bool]:
    """(head, frozen): the LM head (None if it cannot be split off the model), and
    whether it has no trainable parameters."""
    split = body_and_head(model)
    if split is None:
        return None, False
    module = getattr(split[1], "__self__", split[1])  # embed_tokens.as_linear is a bound method
    return split[1], not tree_flatten(module.trainable_parameters())


def _after(x: mx.array, done: list[mx.array]) -> mx.array:
    """`x`, computed only once the last array of `done` is.

    MLX schedules independent chunks side by side, which would keep every
    chunk's (rows, V) logits alive at once; this makes them take turns.
    """
    return mx.depends(x, done[-1]) if done else x


def head_logprobs(
    head: Callable[[mx.array], mx.array],
    hidden: mx.array,  # (..., D)
    targets: mx.array,  # (...) int
    temperature: float,
    chunk_size: int,
    entropy_grad: bool = False,
) -> tuple[mx.array, mx.array]:
    """(logp, entropy) of `targets` under softmax(head(hidden) / temperature).

    Rows are processed `chunk_size` at a time. The backward pass gives the
    gradient with respect to `hidden` only (the head must be frozen); the
    entropy carries a gradient only with `entropy_grad`. For one row with
    logits x / T = z, p = softmax(z), target y and entropy H:
    d logp / d z = onehot(y) - p and d H / d z = -p (log p + H).
    """
    shape = targets.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).astype(mx.int32)
    spans = [slice(i, min(i + chunk_size, t.shape[0])) for i in range(0, t.shape[0], chunk_size)]

    def logits_of(x: mx.array) -> mx.array:
        z = head(x).astype(mx.float32)
        return z / temperature if temperature != 1.0 else z

    @mx.custom_function
    def scored(h: mx.array, t: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        parts: list[mx.array] = []
        for sl in spans:
            parts.append(mx.stack(logprob_stats(head(_after(h[sl], parts)), t[sl], temperature)))
        logp, entropy, lse = mx.concatenate(parts, axis=1)
        return logp, entropy, lse

    @scored.vjp
    def scored_vjp(primals, cotangents, outputs):
        h, t = primals
        d_logp, d_entropy = cotangents[0], cotangents[1]
        entropy, lse = outputs[1], outputs[2]
        grads = []
        for sl in spans:
            z = logits_of(_after(h[sl], grads))
            log_p = z - lse[sl, None]
            p = mx.exp(log_p)
            g = -p * d_logp[sl, None]  # -softmax * upstream
            if entropy_grad:
                g = g - p * (log_p + entropy[sl, None]) * d_entropy[sl, None]
            g = mx.put_along_axis(
                g,
                t[sl, None],
                mx.take_along_axis(g, t[sl, None], axis=-1) + d_logp[sl, None],
                axis=-1,
            )
            grads.append(mx.vjp(logits_of, [h[sl]], [g])[1][0])
        return mx.concatenate(grads), mx.zeros_like(t)

    logp, entropy, _ = scored(h, t)
    entropy = entropy if entropy_grad else mx.stop_gradient(entropy)
    return logp.reshape(shape), entropy.reshape(shape)


def _logprobs_now(
    head: Callable,
    hidden: mx.array,
    targets: mx.array,
    temperature: float,
    chunk_size: int,
    entropy: bool,
) -> Scores:
    """Log-probs (and with `entropy` the entropies), computed now, one chunk after
    another, without gradient."""
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).astype(mx.int32)
    mx.eval(h)
    parts = []
    for i in range(0, t.shape[0], chunk_size):
        sl = slice(i, i + chunk_size)
        logp, ent, _ = logprob_stats(head(h[sl]), t[sl], temperature)
        parts.append((logp, ent) if entropy else (logp,))
        mx.eval(parts[-1])
    cols = [mx.concatenate(col).reshape(targets.shape) for col in zip(*parts)]
    return Scores(cols[0], cols[1] if entropy else None, None)


def completion_logprobs(
    model: nn.Module,
    prompt_tokens: mx.array,  # (N, P)
    padding: mx.array,  # (N,)
    completion_ids: mx.array,  # (N, T)
    temperature: float,
    chunk_size: int = 256,
    ref_hidden: mx.array | None = None,  # (N, T, D) for the exact KL
    no_grad: bool = False,
    groups: tuple[mx.array, mx.array] | None = None,  # prompt_groups of the rows
    packing: dict[str, mx.array] | None = None,  # from `pack`
    entropy: bool = False,
) -> Scores:
    """Log-probs (with gradient), entropy and optionally the exact KL per token.

    `chunk_size` counts completion tokens (rows x positions) per LM-head chunk.
    With `no_grad` (pi_old, reference) the log-probs are computed now, one
    chunk after another, and the entropy only with `entropy`. Otherwise
    `entropy` gives the entropy a gradient (an entropy bonus); without it the
    entropy is a metric.
    """
    head, frozen = _head(model)
    if packing is not None and head is not None and ref_hidden is None and (frozen or no_grad):
        # the head runs on the completions' own tokens only
        h = completion_hidden(model, prompt_tokens, padding, completion_ids, groups, packing, True)
        back = packing["back"]
        if no_grad:
            now = _logprobs_now(head, h, packing["targets"], temperature, chunk_size, entropy)
            spread = None if now.entropy is None else _spread(now.entropy, back)
            return Scores(_spread(now.logp, back), spread, None)
        logp, ent = head_logprobs(head, h, packing["targets"], temperature, chunk_size, entropy)
        return Scores(_spread(logp, back), _spread(ent, back), None)
    hidden = completion_hidden(model, prompt_tokens, padding, completion_ids, groups, packing)
    if head is not None and ref_hidden is None:
        if no_grad:
            return _logprobs_now(head, hidden, completion_ids, temperature, chunk_size, entropy)
        if frozen:
            scored = head_logprobs(head, hidden, completion_ids, temperature, chunk_size, entropy)
            return Scores(*scored, None)
    return _checkpointed(head, hidden, completion_ids, temperature, chunk_size, ref_hidden, entropy)


def _checkpointed(
    head: Callable | None,
    hidden: mx.array,  # (N, T, D)
    completion_ids: mx.array,  # (N, T)
    temperature: float,
    chunk_size: int,
    ref_hidden: mx.array | None,
    entropy_grad: bool,
) -> Scores:
    """The exact KL needs both full distributions per position, and a head with
    trainable weights needs autodiff: chunks of positions, recomputed in the
    backward pass."""
    head = head or (lambda h: h)  # models whose logits cannot be split: hidden are the logits

    def chunk_fn(h: mx.array, targets: mx.array, *ref: mx.array) -> tuple[mx.array, ...]:
        logits = head(h)
        logp, entropy, _ = logprob_stats(
            logits, mx.stop_gradient(targets), temperature, entropy_grad
        )
        if not ref:
            return logp, entropy
        kl = exact_kl(logits, mx.stop_gradient(head(ref[0])), temperature)
        return logp, entropy, kl

    step = mx.checkpoint(chunk_fn)
    outs: list[tuple[mx.array, ...]] = []
    t = completion_ids.shape[1]
    positions = max(1, chunk_size // max(1, completion_ids.shape[0]))
    for start in range(0, t, positions):
        sl = slice(start, min(start + positions, t))
        args = (hidden[:, sl], completion_ids[:, sl])
        if ref_hidden is not None:
            args += (ref_hidden[:, sl],)
        outs.append(step(*args))
    cols = [mx.concatenate(parts, axis=1) for parts in zip(*outs)]
    return Scores(cols[0], cols[1], cols[2] if ref_hidden is not None else None)
