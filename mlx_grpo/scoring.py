"""Per-token log-probs of completions under the model, in bounded memory.

One forward pass over (prompt + completion) gives the final hidden states,
with each prompt computed once for all the completions that share it; the
LM head then runs over chunks of completion positions. Each chunk is
wrapped in `mx.checkpoint`, so the backward pass recomputes its logits
instead of keeping full-vocabulary logits for every token alive at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_grpo.models import PrefixCache, body_of, head_and_body
from mlx_grpo.objective import exact_kl, token_logprobs


@dataclass
class Scores:
    logp: mx.array  # (N, T) log-prob of each completion token, at temperature
    entropy: mx.array  # (N, T) policy entropy (metric, no gradient)
    kl: mx.array | None  # (N, T) exact KL to the reference, when reference hidden given


def completion_hidden(
    model: nn.Module, prompt_tokens: mx.array, padding: mx.array, completion_ids: mx.array
) -> mx.array:
    """(N, T, D) hidden states whose head output predicts each completion token.

    Rows that share a prompt (a group's G completions) share its forward
    pass: the prompt runs once, its keys and values go to every row of the
    group, and only the completions run per row. For models whose head
    cannot be split off these are the logits (N, T, V).
    """
    body = body_of(model)
    owner, first = prompt_groups(prompt_tokens, padding)
    caches = [PrefixCache(padding[first]) for _ in model.layers]
    prompt_hidden = body(prompt_tokens[first], cache=caches)  # (U, P, D)
    caches = [c.select(owner) for c in caches]
    last = prompt_hidden[owner, -1:]  # (N, 1, D) predicts completion token 0
    if completion_ids.shape[1] == 1:
        return last
    rest = body(completion_ids[:, :-1], cache=caches)  # (N, T - 1, D)
    return mx.concatenate([last, rest], axis=1)


def prompt_groups(prompt_tokens: mx.array, padding: mx.array) -> tuple[mx.array, mx.array]:
    """(owner (N,), first (U,)): row i's prompt is row first[owner[i]]'s.

    Rows are compared with their predecessor, which finds the groups of a
    rollout (row b * G + j holds prompt b).
    """
    tokens, pads = np.array(prompt_tokens), np.array(padding)
    same = np.r_[False, (tokens[1:] == tokens[:-1]).all(axis=1) & (pads[1:] == pads[:-1])]
    owner = np.cumsum(~same) - 1
    first = np.flatnonzero(~same)
    return mx.array(owner), mx.array(first)


def _head(model: nn.Module):
    split = head_and_body(model)
    return split[1] if split is not None else (lambda h: h)


def score_completions(
    model: nn.Module,
    prompt_tokens: mx.array,  # (N, P)
    padding: mx.array,  # (N,)
    completion_ids: mx.array,  # (N, T)
    temperature: float,
    chunk_size: int = 256,
    ref_hidden: mx.array | None = None,  # (N, T, D) for the exact KL
) -> Scores:
    """Log-probs (with gradient), entropy and optionally the exact KL per token."""
    hidden = completion_hidden(model, prompt_tokens, padding, completion_ids)
    head = _head(model)

    def chunk_fn(h: mx.array, targets: mx.array, *ref: mx.array) -> tuple[mx.array, ...]:
        logits = head(h)
        logp, entropy = token_logprobs(logits, mx.stop_gradient(targets), temperature)
        if not ref:
            return logp, entropy
        kl = exact_kl(logits, mx.stop_gradient(head(ref[0])), temperature)
        return logp, entropy, kl

    step = mx.checkpoint(chunk_fn)
    outs: list[tuple[mx.array, ...]] = []
    t = completion_ids.shape[1]
    for start in range(0, t, chunk_size):
        sl = slice(start, min(start + chunk_size, t))
        args = (hidden[:, sl], completion_ids[:, sl])
        if ref_hidden is not None:
            args += (ref_hidden[:, sl],)
        outs.append(step(*args))
    cols = [mx.concatenate(parts, axis=1) for parts in zip(*outs)]
    return Scores(cols[0], cols[1], cols[2] if ref_hidden is not None else None)
